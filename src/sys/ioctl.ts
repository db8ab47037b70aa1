/**
 * The one path every ioctl of the library takes: issue it, and on failure turn the errno into the
 * one error class with the sentence the caller's table gives for that errno.
 *
 * The table is data, written once per ioctl next to its wrapper (like the open hints of
 * `openPath`). An entry that needs the call's values reads them from the failure (the command
 * buffer the kernel saw, the fd, a context the caller passed): nothing is built per call unless
 * the call fails, which keeps the map/unmap hot path free of allocations.
 */
import type { Pointer } from "bun:ffi";
import type { StructBuffer } from "../uapi/codec.ts";
import type { ErrnoCode } from "./errno.ts";
import { ERRNO, errnoCode } from "./errno.ts";
import { IommufdError, syscallError } from "./error.ts";
import { lastErrno, libc } from "./libc.ts";

/** How many ioctls the library has issued: lets tests prove a path makes no kernel call. */
export const counters = { ioctls: 0 };

/** What a failure means, beyond the errno's own meaning. */
export interface ErrnoText {
  /** The sentence; the errno's generic meaning when absent. */
  message?: string;
  hint?: string;
  /** The argument at fault, when the errno points at one. */
  argument?: string;
}

/** What the explanation of a failed ioctl can read. */
export interface IoctlFailure<Context> {
  readonly operation: string;
  readonly errno: number;
  readonly fd: number;
  /** The command as the kernel left it. */
  readonly cmd: StructBuffer | null;
  readonly context: Context;
}

/** A fixed text, or one computed from the failure; `undefined` falls back to `otherwise`. */
export type Explanation<Context> =
  | string
  | ErrnoText
  | ((failure: IoctlFailure<Context>) => string | ErrnoText | undefined);

/** Errno explanations of one ioctl, keyed by errno code; `otherwise` covers the rest. */
export type ErrnoTable<Context = undefined> = {
  readonly [Code in ErrnoCode | "otherwise"]?: Explanation<Context>;
};

/**
 * ioctl(2) on `fd` with `cmd` (its address; `null` passes 0). Returns the kernel's non-negative
 * result (an fd for the ioctls that create one); throws IommufdError naming `operation` otherwise.
 */
export function ioctl<Context = undefined>(
  fd: number,
  request: number,
  cmd: StructBuffer | null,
  operation: string,
  errors?: ErrnoTable<Context>,
  context?: Context,
): number {
  counters.ioctls++;
  const rc = libc().ioctl(fd, request, (cmd === null ? 0 : cmd.address) as unknown as Pointer);
  if (rc >= 0) return rc;
  const errno = lastErrno();
  throw ioctlError({ operation, errno, fd, cmd, context: context as Context }, errors);
}

/** The error for a failed ioctl, worded by `errors`. */
export function ioctlError<Context>(failure: IoctlFailure<Context>, errors: ErrnoTable<Context> = {}): IommufdError {
  const text =
    explain(errors[errnoCode(failure.errno) as ErrnoCode], failure) ?? explain(errors.otherwise, failure) ?? {};
  return syscallError(failure.operation, failure.errno, text.message, { argument: text.argument, hint: text.hint });
}

function explain<Context>(
  entry: Explanation<Context> | undefined,
  failure: IoctlFailure<Context>,
): ErrnoText | undefined {
  const text = typeof entry === "function" ? entry(failure) : entry;
  return typeof text === "string" ? { message: text } : text;
}

/** Whether `error` is the library's error for `code`: for callers that treat one errno as an answer. */
export function isErrno(error: unknown, code: ErrnoCode): error is IommufdError {
  return error instanceof IommufdError && error.errno === ERRNO[code];
}
