/** Argument checks shared by the public objects: each throws an EINVAL IommufdError naming the argument. */
import { argumentError } from "./error.ts";

/** Largest byte count or address the library accepts as a number; bigint covers the rest of u64. */
export const U64_MAX = (1n << 64n) - 1n;

export type Iova = number | bigint;

/** `0x1000` for messages; a value that is no address or size (negative, fractional) prints as is. */
export function hex(value: number | bigint): string {
  const plain = typeof value === "number" ? !Number.isInteger(value) || value < 0 : value < 0n;
  return plain ? String(value) : `0x${value.toString(16)}`;
}

/**
 * Whether `value` is a number the library takes as is: a non-negative safe integer. The checks
 * below test this first and leave every other case to a function of its own, so that what runs on
 * the map path per call stays small enough for the JIT to inline (measured by bench/hotpath.ts).
 */
function plainCount(value: unknown): value is number {
  return typeof value === "number" && value >= 0 && value <= Number.MAX_SAFE_INTEGER && Math.floor(value) === value;
}

/** A non-negative integer (number or bigint) below 2^64, returned unchanged. */
export function u64(value: unknown, operation: string, argument: string): number | bigint {
  return plainCount(value) ? value : checkedU64(value, operation, argument);
}

function checkedU64(value: unknown, operation: string, argument: string): number | bigint {
  if (typeof value === "bigint") {
    if (value < 0n || value > U64_MAX) throw argumentError(operation, argument, `${value} is outside 0..2^64-1`);
    return value;
  }
  if (typeof value !== "number" || !Number.isFinite(value)) {
    throw argumentError(operation, argument, `expected a non-negative integer, got ${describe(value)}`);
  }
  if (!Number.isInteger(value)) throw argumentError(operation, argument, `${value} is not a whole number`);
  if (value < 0) throw argumentError(operation, argument, `${value} is negative`);
  if (!Number.isSafeInteger(value)) {
    throw argumentError(operation, argument, `${value} is above 2^53 and not exact as a number; pass a bigint`);
  }
  return value;
}

/** A byte count: a positive safe integer. */
export function positiveLength(value: unknown, operation: string, argument = "length"): number {
  return plainCount(value) && value !== 0 ? value : checkedLength(value, operation, argument);
}

function checkedLength(value: unknown, operation: string, argument: string): number {
  if (typeof value === "bigint") {
    if (value <= 0n || value > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw argumentError(operation, argument, `${value} must be between 1 and 2^53-1 bytes`);
    }
    return Number(value);
  }
  const n = checkedU64(value, operation, argument) as number;
  if (n === 0) throw argumentError(operation, argument, "length is 0; there is nothing to map");
  return n;
}

/** Where a map starts in its source: `options.offset` (default 0), inside a source of `size` bytes when known. */
export function rangeOffset(
  options: { offset?: number },
  size: number | undefined,
  operation: string,
  noun: string,
): number {
  return options.offset === undefined ? 0 : checkedOffset(options.offset, size, operation, noun);
}

function checkedOffset(value: unknown, size: number | undefined, operation: string, noun: string): number {
  const offset = u64(value, operation, "options.offset") as number;
  if (size !== undefined && offset >= size) {
    throw argumentError(
      operation,
      "options.offset",
      `offset ${offset} is at or past the end of the ${size}-byte ${noun}`,
    );
  }
  return offset;
}

/**
 * How many bytes a map covers: `options.length`, or the rest of the source from `offset`. A range
 * running past the end of a source of known size is refused here, whatever path asked.
 */
export function rangeLength(
  options: { length?: number },
  offset: number,
  size: number | undefined,
  operation: string,
  noun: string,
): number {
  return options.length === undefined && size !== undefined
    ? size - offset
    : checkedRangeLength(options.length, offset, size, operation, noun);
}

function checkedRangeLength(
  value: unknown,
  offset: number,
  size: number | undefined,
  operation: string,
  noun: string,
): number {
  if (value === undefined)
    throw argumentError(operation, "options.length", `the ${noun}'s size is unknown: give a length`);
  const length = positiveLength(value, operation, "options.length");
  if (size !== undefined && offset + length > size) {
    throw argumentError(
      operation,
      "options.length",
      `${length} bytes from offset ${offset} run past the end of the ${size}-byte ${noun}`,
    );
  }
  return length;
}

/** Converts to a number when exact, else keeps the bigint: IOVAs above 2^53 stay precise. */
export function normaliseIova(value: number | bigint): Iova {
  if (typeof value === "number") return value;
  return value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : value;
}

export function addIova(iova: Iova, length: number): Iova {
  return typeof iova === "bigint" || iova + length > Number.MAX_SAFE_INTEGER
    ? normaliseIova(BigInt(iova) + BigInt(length))
    : iova + length;
}

function describe(value: unknown): string {
  if (value === null) return "null";
  if (typeof value === "number" || typeof value === "bigint") return String(value);
  if (typeof value === "string") return `the string "${value}"`;
  return typeof value;
}
