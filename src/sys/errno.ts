/**
 * Linux errno numbers (x86-64 / generic) with a short plain-language meaning.
 * Only the numbers this library can meet are listed; unknown ones print as `E<number>`.
 */
export const ERRNO = {
  EPERM: 1,
  ENOENT: 2,
  ESRCH: 3,
  EINTR: 4,
  EIO: 5,
  ENXIO: 6,
  E2BIG: 7,
  EBADF: 9,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EFAULT: 14,
  EBUSY: 16,
  EEXIST: 17,
  EXDEV: 18,
  ENODEV: 19,
  ENOTDIR: 20,
  EISDIR: 21,
  EINVAL: 22,
  ENFILE: 23,
  EMFILE: 24,
  ENOTTY: 25,
  EFBIG: 27,
  ENOSPC: 28,
  ESPIPE: 29,
  EROFS: 30,
  ERANGE: 34,
  EDEADLK: 35,
  ENOSYS: 38,
  EPROTO: 71,
  EOVERFLOW: 75,
  EBADFD: 77,
  EMSGSIZE: 90,
  EOPNOTSUPP: 95,
  EADDRINUSE: 98,
  EADDRNOTAVAIL: 99,
  ETIMEDOUT: 110,
  ESTALE: 116,
} as const;

export type ErrnoCode = keyof typeof ERRNO;

const CODE_BY_NUMBER = new Map<number, ErrnoCode>(
  (Object.entries(ERRNO) as [ErrnoCode, number][]).map(([code, n]) => [n, code]),
);

const MEANING: Partial<Record<ErrnoCode, string>> = {
  EPERM: "operation not permitted",
  ENOENT: "no such file, object or mapping",
  EINTR: "interrupted by a signal",
  EIO: "input/output error",
  ENXIO: "no such device or address",
  E2BIG: "argument list or structure too big",
  EBADF: "bad file descriptor",
  EAGAIN: "resource temporarily unavailable",
  ENOMEM: "out of memory or over the locked-memory limit",
  EACCES: "permission denied",
  EFAULT: "bad address",
  EBUSY: "device or resource busy",
  EEXIST: "already exists",
  ENODEV: "no such device",
  EINVAL: "invalid argument",
  EMFILE: "too many open files in this process",
  ENOTTY: "inappropriate ioctl for this file",
  EFBIG: "file too large",
  ENOSPC: "no space left",
  ERANGE: "result out of range",
  ENOSYS: "function not implemented by this kernel",
  EPROTO: "protocol error: the device broke its protocol",
  EOVERFLOW: "value too large",
  EMSGSIZE: "buffer too small for the result",
  EOPNOTSUPP: "operation not supported",
  EADDRINUSE: "address already in use",
  ETIMEDOUT: "timed out",
};

/** `EINVAL` for 22; `E<n>` for numbers not in the table. */
export function errnoCode(errno: number): string {
  return CODE_BY_NUMBER.get(errno) ?? `E${errno}`;
}

/** A short meaning of an errno, in lower case, for messages. */
export function errnoMeaning(errno: number): string {
  const code = CODE_BY_NUMBER.get(errno);
  return (code && MEANING[code]) ?? `error ${errno}`;
}
