/**
 * What a failed call's errno means, as data: one table per call (an ioctl, open(2)), keyed by errno
 * code, written once beside the call. An entry that needs the call's values reads them from the
 * failure (the command buffer the kernel saw, the fd, a context the caller passed): nothing is
 * built unless the call fails, which keeps the map/unmap hot path free of allocations.
 */
import type { StructBuffer } from "../uapi/codec.ts";
import { type ErrnoCode, errnoCode } from "./errno.ts";
import { type IommufdError, syscallError } from "./error.ts";

/** What a failure means, beyond the errno's own meaning. */
export interface ErrnoText {
  /** The sentence; the errno's generic meaning when absent. */
  message?: string;
  hint?: string;
  /** The argument at fault, when the errno points at one. */
  argument?: string;
}

/** What the explanation of a failed call can read. */
export interface CallFailure<Context> {
  readonly operation: string;
  readonly errno: number;
  /** The fd the call was made on; -1 for a call on no fd (open). */
  readonly fd: number;
  /** The command as the kernel left it; null for a call without one. */
  readonly cmd: StructBuffer | null;
  readonly context: Context;
}

/** A fixed text, or one computed from the failure; `undefined` falls back to `otherwise`. */
export type Explanation<Context> =
  | string
  | ErrnoText
  | ((failure: CallFailure<Context>) => string | ErrnoText | undefined);

/** Errno explanations of one call, keyed by errno code; `otherwise` covers the rest. */
export type ErrnoTable<Context = undefined> = {
  readonly [Code in ErrnoCode | "otherwise"]?: Explanation<Context>;
};

/** The table's entry for the failure's errno, else its `otherwise`, else nothing. */
export function explainFailure<Context>(failure: CallFailure<Context>, table: ErrnoTable<Context> = {}): ErrnoText {
  return explain(table[errnoCode(failure.errno) as ErrnoCode], failure) ?? explain(table.otherwise, failure) ?? {};
}

/** The error for a failed call, worded by `table`. */
export function failureError<Context>(failure: CallFailure<Context>, table?: ErrnoTable<Context>): IommufdError {
  const text = explainFailure(failure, table);
  return syscallError(failure.operation, failure.errno, text.message, { argument: text.argument, hint: text.hint });
}

function explain<Context>(
  entry: Explanation<Context> | undefined,
  failure: CallFailure<Context>,
): ErrnoText | undefined {
  const text = typeof entry === "function" ? entry(failure) : entry;
  return typeof text === "string" ? { message: text } : text;
}
