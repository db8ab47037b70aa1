/**
 * The libc bindings: one dlopen, done on first use, shared by the whole library.
 *
 * Every wrapper here returns the raw result; callers turn a failure into an IommufdError with
 * {@link lastErrno} read immediately after the call (errno is thread-local and the next libc
 * call may overwrite it). ioctl goes through src/sys/ioctl.ts, the library's one ioctl path.
 */
import { dlopen, FFIType, read, type Pointer } from "bun:ffi";

const { i32, u32, i64, i64_fast, u64, ptr, cstring } = FFIType;

const SYMBOLS = {
  // int ioctl(int fd, unsigned long request, ...);
  ioctl: { args: [i32, u64, ptr], returns: i32 },
  // int open(const char *pathname, int flags, ... /* mode_t mode */);
  // Variadic; on x86-64 and aarch64 passing the mode as a third integer is the ABI.
  open: { args: [cstring, i32, u32], returns: i32 },
  // int close(int fd);
  close: { args: [i32], returns: i32 },
  // int memfd_create(const char *name, unsigned int flags);
  memfd_create: { args: [cstring, u32], returns: i32 },
  // int ftruncate(int fd, off_t length);
  ftruncate: { args: [i32, i64], returns: i32 },
  // int fstat(int fd, struct stat *statbuf);
  fstat: { args: [i32, ptr], returns: i32 },
  // int fcntl(int fd, int cmd, ... /* arg */);
  fcntl: { args: [i32, i32, u64], returns: i32 },
  // void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset);
  mmap: { args: [ptr, u64, i32, i32, i32, i64], returns: ptr },
  // int munmap(void *addr, size_t length);
  munmap: { args: [ptr, u64], returns: i32 },
  // int madvise(void *addr, size_t length, int advice);
  madvise: { args: [ptr, u64, i32], returns: i32 },
  // ssize_t pread(int fd, void *buf, size_t count, off_t offset);
  pread: { args: [i32, ptr, u64, i64], returns: i64 },
  // ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset);
  pwrite: { args: [i32, ptr, u64, i64], returns: i64 },
  // ssize_t read(int fd, void *buf, size_t count);
  // i64_fast: a plain number for every size these calls return (no BigInt on the interrupt path).
  read: { args: [i32, ptr, u64], returns: i64_fast },
  // ssize_t write(int fd, const void *buf, size_t count);
  write: { args: [i32, ptr, u64], returns: i64_fast },
  // int eventfd(unsigned int initval, int flags);
  eventfd: { args: [u32, i32], returns: i32 },
  // int getrlimit(int resource, struct rlimit *rlim);
  getrlimit: { args: [i32, ptr], returns: i32 },
  // int setrlimit(int resource, const struct rlimit *rlim);
  setrlimit: { args: [i32, ptr], returns: i32 },
  // pid_t gettid(void);
  gettid: { args: [], returns: i32 },
  // int poll(struct pollfd *fds, nfds_t nfds, int timeout);
  poll: { args: [ptr, u64, i32], returns: i32 },
  // int *__errno_location(void);  (glibc: the calling thread's errno)
  __errno_location: { args: [], returns: ptr },
} as const;

type Libc = ReturnType<typeof dlopen<typeof SYMBOLS>>["symbols"];

let loaded: Libc | undefined;
let errnoAddress: Pointer | undefined;

function candidates(): string[] {
  return ["libc.so.6", "libc.so"];
}

function load(): Libc {
  let lastError: unknown;
  for (const name of candidates()) {
    try {
      const lib = dlopen(name, SYMBOLS);
      loaded = lib.symbols;
      // glibc's errno lives at a fixed per-thread address: look it up once, read it cheaply.
      errnoAddress = (loaded.__errno_location() as Pointer | null) ?? undefined;
      return loaded;
    } catch (error) {
      lastError = error;
    }
  }
  throw new Error(`bun-iommufd: cannot load the C library (tried ${candidates().join(", ")})`, {
    cause: lastError,
  });
}

/** The libc symbol table, loaded on first use. */
export function libc(): Libc {
  return loaded ?? load();
}

/** errno of the last failed libc call on this thread. Read it straight after the call. */
export function lastErrno(): number {
  if (!errnoAddress) libc();
  return read.i32(errnoAddress!, 0);
}

export const O_RDONLY = 0;
export const O_WRONLY = 1;
export const O_RDWR = 2;
export const O_CLOEXEC = 0o2000000;

export const PROT_NONE = 0;
export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 0x01;
export const MAP_PRIVATE = 0x02;
export const MAP_FIXED = 0x10;
export const MAP_ANONYMOUS = 0x20;
export const MAP_FAILED = -1;

export const MFD_CLOEXEC = 0x1;
export const MFD_ALLOW_SEALING = 0x2;
export const MFD_HUGETLB = 0x4;
export const MFD_HUGE_SHIFT = 26;

export const F_GETFD = 1;
export const F_SETFD = 2;
export const F_GETFL = 3;
export const FD_CLOEXEC = 1;
export const F_ADD_SEALS = 1033;
export const F_GET_SEALS = 1034;
export const F_SEAL_SEAL = 0x1;
export const F_SEAL_SHRINK = 0x2;
export const F_SEAL_GROW = 0x4;
export const F_SEAL_WRITE = 0x8;

export const RLIMIT_MEMLOCK = 8;

/** <sys/eventfd.h>: the same bits as O_CLOEXEC and O_NONBLOCK. */
export const EFD_CLOEXEC = O_CLOEXEC;
export const EFD_NONBLOCK = 0o4000;

/** <poll.h> events; POLLERR, POLLHUP and POLLNVAL come back in revents unasked. */
export const POLLIN = 0x1;
export const POLLERR = 0x8;
export const POLLHUP = 0x10;
export const POLLNVAL = 0x20;

/** The base page size of the kernels the library runs on (x86-64; aarch64 built for 4K pages). */
export const PAGE_SIZE = 4096;

/** struct stat on x86-64 / aarch64 generic: only the fields the library reads. */
export const STAT_SIZE = 144;
export const STAT_MODE_OFFSET_X86_64 = 24;
export const STAT_SIZE_OFFSET_X86_64 = 48;
export const S_IFMT = 0o170000;
export const S_IFCHR = 0o020000;
export const S_IFREG = 0o100000;
