import { ERRNO, errnoCode, errnoMeaning, type ErrnoCode } from "./errno.ts";

export interface IommufdErrorDetails {
  /** The kernel call or library operation that failed: `IOMMU_IOAS_MAP_FILE`, `mmap`, `Ioas.map`. */
  operation: string;
  /** Linux errno number. Library-side validation uses the errno the kernel would have returned. */
  errno: number;
  /** What went wrong, in the terms of the call. */
  message: string;
  /** The argument at fault, when there is one (`length`, `iova`, `options.align`). */
  argument?: string;
  /** What the user can do about it. */
  hint?: string;
  cause?: unknown;
}

/**
 * The one error class of the library. Every failure, from the kernel or from argument checks,
 * is an IommufdError carrying the errno, its code, the operation and a readable message.
 */
export class IommufdError extends Error {
  override readonly name: string = "IommufdError";
  readonly errno: number;
  /** `EINVAL`, `EEXIST`, ... */
  readonly code: string;
  readonly operation: string;
  readonly argument: string | undefined;
  readonly hint: string | undefined;

  constructor(details: IommufdErrorDetails) {
    const code = errnoCode(details.errno);
    const where = details.argument ? `${details.operation} (${details.argument})` : details.operation;
    const hint = details.hint ? ` Hint: ${details.hint}` : "";
    super(`${where}: ${details.message} [${code}]${hint}`, { cause: details.cause });
    this.errno = details.errno;
    this.code = code;
    this.operation = details.operation;
    this.argument = details.argument;
    this.hint = details.hint;
  }
}

/** A failed system call: the message is the errno's meaning unless the caller knows better. */
export function syscallError(
  operation: string,
  errno: number,
  message?: string,
  extra: Omit<Partial<IommufdErrorDetails>, "operation" | "errno" | "message"> = {},
): IommufdError {
  return new IommufdError({ operation, errno, message: message ?? errnoMeaning(errno), ...extra });
}

/** Bad input caught before any kernel call. `code` is the errno the kernel would give (EINVAL by default). */
export function argumentError(
  operation: string,
  argument: string,
  message: string,
  code: ErrnoCode = "EINVAL",
  hint?: string,
): IommufdError {
  return new IommufdError({ operation, errno: ERRNO[code], message, argument, hint });
}

/**
 * The one "still open?" refusal: use of an object after close()/destroy() or after its parent went
 * away. EBADF, like the kernel says for a closed fd. `state` says how it went: "was destroyed",
 * "is gone: its Iommufd was closed".
 */
export function closedError(operation: string, what: string, state = "is closed", argument?: string): IommufdError {
  const message = `${what} ${state}; it cannot be used any more`;
  return new IommufdError({ operation, errno: ERRNO.EBADF, message, argument });
}

/**
 * A call the object's present state refuses (already bound, not mapped, one waiter at a time),
 * with the errno the kernel gives for the same refusal.
 */
export function stateError(
  operation: string,
  code: ErrnoCode,
  message: string,
  extra: Pick<Partial<IommufdErrorDetails>, "argument" | "hint"> = {},
): IommufdError {
  return new IommufdError({ operation, errno: ERRNO[code], message, ...extra });
}

/** ETIMEDOUT: what was awaited did not happen before the deadline. */
export function timeoutError(operation: string, message: string): IommufdError {
  return new IommufdError({ operation, errno: ERRNO.ETIMEDOUT, message });
}

/** EIO: a transfer came up short or a step under the call failed (`cause` keeps the original). */
export function ioError(operation: string, message: string, cause?: unknown): IommufdError {
  return new IommufdError({ operation, errno: ERRNO.EIO, message, cause });
}
