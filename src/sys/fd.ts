/**
 * File-descriptor helpers over libc: each turns a failure into an IommufdError naming the call.
 * Every fd the library opens is close-on-exec.
 */
import { ptr, type Pointer } from "bun:ffi";
import { errnoMeaning } from "./errno.ts";
import { type ErrnoTable, explainFailure } from "./errno-table.ts";
import { argumentError, syscallError } from "./error.ts";
import {
  F_GETFD,
  F_SETFD,
  FD_CLOEXEC,
  lastErrno,
  libc,
  O_CLOEXEC,
  STAT_MODE_OFFSET_X86_64,
  STAT_SIZE,
  STAT_SIZE_OFFSET_X86_64,
} from "./libc.ts";

const encoder = new TextEncoder();

/** A NUL-terminated C string for bun:ffi. */
export function cString(text: string): Uint8Array {
  const bytes = new Uint8Array(Buffer.byteLength(text) + 1);
  encoder.encodeInto(text, bytes);
  return bytes;
}

/**
 * The safety net for every fd an object owns: register the owner with its fd (and itself as the
 * unregister token); close() unregisters it. Closing is the contract, collection only a fallback.
 */
export const fdFinalizer = new FinalizationRegistry<number>((fd) => {
  libc().close(fd);
});

/** What open(2)'s errnos mean for any path; a caller's table adds hints (or a sentence) of its own. */
const OPEN_ERRORS: ErrnoTable<string> = {
  ENOENT: (f) => `cannot open ${f.context}: no such file or device node`,
  EACCES: (f) => `cannot open ${f.context}: permission denied`,
  EPERM: (f) => `cannot open ${f.context}: operation not permitted`,
  ENODEV: (f) => `cannot open ${f.context}: no device behind this node`,
  EBUSY: (f) => `cannot open ${f.context}: the device is busy (already opened or bound elsewhere)`,
  otherwise: (f) => `cannot open ${f.context}: ${errnoMeaning(f.errno)}`,
};

/**
 * open(2) of `path` with O_CLOEXEC always added. `errors` (keyed by errno, like an ioctl's table)
 * words what this path's refusal means: usually a hint, e.g. `{ ENOENT: { hint: "needs CONFIG_IOMMUFD" } }`.
 */
export function openPath(path: string, flags: number, operation: string, errors: ErrnoTable<string> = {}): number {
  const fd = libc().open(cString(path), flags | O_CLOEXEC, 0);
  if (fd < 0) {
    const failure = { operation, errno: lastErrno(), fd: -1, cmd: null, context: path };
    const own = explainFailure(failure, errors);
    const message = own.message ?? explainFailure(failure, OPEN_ERRORS).message;
    throw syscallError(operation, failure.errno, message, { argument: own.argument ?? "path", hint: own.hint });
  }
  return fd;
}

/** close(2). Errors are reported, never swallowed: EBADF means a double close somewhere. */
export function closeFd(fd: number, operation: string): void {
  if (libc().close(fd) < 0) throw syscallError(operation, lastErrno(), `close(${fd}) failed`);
}

/** Whether the fd has FD_CLOEXEC set (tests check that every fd the library opens has it). */
export function isCloseOnExec(fd: number): boolean {
  const flags = libc().fcntl(fd, F_GETFD, 0);
  if (flags < 0) throw syscallError("fcntl", lastErrno(), `fcntl(${fd}, F_GETFD) failed`);
  return (flags & FD_CLOEXEC) !== 0;
}

const statBuffer = new Uint8Array(STAT_SIZE);
const statView = new DataView(statBuffer.buffer);
const statAddress = ptr(statBuffer);

export interface FdStat {
  mode: number;
  size: number;
}

export function fstat(fd: number, operation: string): FdStat {
  if (libc().fstat(fd, statAddress) < 0) {
    throw syscallError(operation, lastErrno(), `fstat(${fd}) failed`, { argument: "fd" });
  }
  return {
    mode: statView.getUint32(STAT_MODE_OFFSET_X86_64, true),
    size: Number(statView.getBigInt64(STAT_SIZE_OFFSET_X86_64, true)),
  };
}

/** pread(2) into `target`; returns the bytes read. */
export function preadInto(fd: number, target: Uint8Array, offset: number, operation: string): number {
  const n = Number(libc().pread(fd, target, target.byteLength, offset));
  if (n < 0)
    throw syscallError(operation, lastErrno(), `pread of ${target.byteLength} bytes at offset ${offset} failed`);
  return n;
}

/** pwrite(2) of `source`; returns the bytes written. */
export function pwriteFrom(fd: number, source: Uint8Array, offset: number, operation: string): number {
  const n = Number(libc().pwrite(fd, source, source.byteLength, offset));
  if (n < 0)
    throw syscallError(operation, lastErrno(), `pwrite of ${source.byteLength} bytes at offset ${offset} failed`);
  return n;
}

/** Set FD_CLOEXEC on an fd the library adopts (fds inherited from a parent arrive without it). */
export function setCloseOnExec(fd: number, operation: string): void {
  if (libc().fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
    throw syscallError(operation, lastErrno(), `fcntl(${fd}, F_SETFD, FD_CLOEXEC) failed`, { argument: "fd" });
}

/** Throws EBADF when the fd is not open: checked up front for fds handed in by the caller. */
export function requireOpenFd(fd: number, operation: string, argument: string): void {
  if (!Number.isInteger(fd) || fd < 0) {
    throw argumentError(operation, argument, `${fd} is not a file descriptor`, "EBADF");
  }
  if (libc().fcntl(fd, F_GETFD, 0) < 0) {
    throw syscallError(operation, lastErrno(), `fd ${fd} is not open`, { argument });
  }
}

export type { Pointer };
