/**
 * The one path every ioctl of the library takes: issue it, and on failure turn the errno into the
 * one error class with the sentence the caller's table (src/sys/errno-table.ts) gives for it.
 */
import type { Pointer } from "bun:ffi";
import type { StructBuffer } from "../uapi/codec.ts";
import { ERRNO, type ErrnoCode } from "./errno.ts";
import { type ErrnoTable, failureError } from "./errno-table.ts";
import { IommufdError } from "./error.ts";
import { lastErrno, libc } from "./libc.ts";

/** How many ioctls the library has issued: lets tests prove a path makes no kernel call. */
export const counters = { ioctls: 0 };

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
  throw failureError({ operation, errno, fd, cmd, context: context as Context }, errors);
}

/** Whether `error` is the library's error for `code`: for callers that treat one errno as an answer. */
export function isErrno(error: unknown, code: ErrnoCode): error is IommufdError {
  return error instanceof IommufdError && error.errno === ERRNO[code];
}

/**
 * ioctl(2) whose argument is a plain value rather than a command struct: the legacy VFIO calls
 * take an integer (VFIO_CHECK_EXTENSION, VFIO_SET_IOMMU) or the address of a string or an int
 * (VFIO_GROUP_GET_DEVICE_FD, VFIO_GROUP_SET_CONTAINER). Same counting, same error path.
 */
export function ioctlWithArgument<Context = undefined>(
  fd: number,
  request: number,
  argument: number,
  operation: string,
  errors?: ErrnoTable<Context>,
  context?: Context,
): number {
  counters.ioctls++;
  const rc = libc().ioctl(fd, request, argument as unknown as Pointer);
  if (rc >= 0) return rc;
  const errno = lastErrno();
  throw failureError({ operation, errno, fd, cmd: null, context: context as Context }, errors);
}
