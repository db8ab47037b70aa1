/**
 * MemfdBuffer: anonymous shared memory (memfd) mapped into this process and handed to JavaScript
 * as an ArrayBuffer over the very same pages. What JS writes is what a device DMAs; what a device
 * writes is what JS reads. No copy anywhere.
 */
import { toArrayBuffer, type Pointer } from "bun:ffi";
import { ERRNO } from "../sys/errno.ts";
import { argumentError, closedError, IommufdError, syscallError } from "../sys/error.ts";
import { closeFd, cString, fdFinalizer, fstat, requireOpenFd, setCloseOnExec } from "../sys/fd.ts";
import { hex } from "../sys/validate.ts";
import {
  F_ADD_SEALS,
  F_GET_SEALS,
  F_SEAL_GROW,
  F_SEAL_SEAL,
  F_SEAL_SHRINK,
  F_SEAL_WRITE,
  lastErrno,
  libc,
  PAGE_SIZE,
  MAP_SHARED,
  MFD_ALLOW_SEALING,
  MFD_CLOEXEC,
  MFD_HUGE_SHIFT,
  MFD_HUGETLB,
  PROT_READ,
  PROT_WRITE,
  S_IFMT,
  S_IFREG,
} from "../sys/libc.ts";

export type HugePageSize = "2MB" | "1GB";

export interface MemfdBufferOptions {
  /** Name shown in /proc/<pid>/maps and fd listings. Default "bun-iommufd". */
  name?: string;
  /**
   * Back the buffer with huge pages (MFD_HUGETLB). The size must be a multiple of the huge page
   * size, and the system must have huge pages reserved (/proc/sys/vm/nr_hugepages).
   */
  hugePages?: HugePageSize | false;
  /**
   * Seals added besides F_SEAL_SHRINK (which is always set): `grow` forbids growing the file
   * (F_SEAL_GROW), `final` forbids adding or removing seals later (F_SEAL_SEAL).
   */
  seal?: { grow?: boolean; final?: boolean };
}

/** The seals of a memfd, as fcntl(F_GET_SEALS) reports them. */
export interface MemfdSeals {
  shrink: boolean;
  grow: boolean;
  write: boolean;
  final: boolean;
}

const HUGE_PAGE_BYTES: Record<HugePageSize, number> = { "2MB": 2 << 20, "1GB": 1 << 30 };
const HUGE_PAGE_SHIFT: Record<HugePageSize, number> = { "2MB": 21, "1GB": 30 };
/** x86-64 user address space: nothing larger can be mapped. */
const MAX_SIZE = 2 ** 47;

export class MemfdBuffer {
  readonly size: number;
  /** The page size backing the buffer: 4096, or the huge page size. */
  readonly pageSize: number;
  readonly name: string;
  #fd: number;
  #address: number;
  #buffer: ArrayBuffer;
  #bytes: Uint8Array;

  private constructor(fd: number, address: number, size: number, pageSize: number, name: string) {
    this.#fd = fd;
    this.#address = address;
    this.size = size;
    this.pageSize = pageSize;
    this.name = name;
    // The ArrayBuffer owns the mapping: when it is detached (close) or collected, libc's munmap
    // runs as its deallocator, called as munmap(address, context) with the length as context.
    this.#buffer = (toArrayBuffer as ToArrayBufferWithDeallocator)(
      address as unknown as Pointer,
      0,
      size,
      size,
      (libc().munmap as unknown as { ptr: Pointer }).ptr,
    );
    this.#bytes = new Uint8Array(this.#buffer);
    // Safety net only: close() is the contract. The ArrayBuffer unmaps itself when collected.
    fdFinalizer.register(this, fd, this);
  }

  /** Create, size, seal against shrinking, and map a memfd of `size` bytes. */
  static create(size: number, options: MemfdBufferOptions = {}): MemfdBuffer {
    const op = "MemfdBuffer.create";
    const name = options.name ?? "bun-iommufd";
    const huge = options.hugePages || undefined;
    if (typeof size !== "number" || !Number.isFinite(size)) {
      throw argumentError(op, "size", `expected a byte count, got ${typeof size === "number" ? size : typeof size}`);
    }
    if (!Number.isInteger(size)) throw argumentError(op, "size", `${size} is not a whole number of bytes`);
    if (size <= 0) throw argumentError(op, "size", `${size} bytes: a buffer needs at least 1 byte`);
    if (size > MAX_SIZE) throw argumentError(op, "size", `${size} bytes is larger than the 128 TiB address space`);
    if (huge !== undefined && !(huge in HUGE_PAGE_BYTES)) {
      throw argumentError(op, "options.hugePages", `"${String(huge)}" is not one of "2MB", "1GB"`);
    }
    const pageSize = huge ? HUGE_PAGE_BYTES[huge] : PAGE_SIZE;
    if (huge && size % pageSize !== 0) {
      throw argumentError(op, "size", `${size} bytes is not a multiple of the ${huge} huge page size`);
    }

    let flags = MFD_CLOEXEC | MFD_ALLOW_SEALING;
    if (huge) flags |= MFD_HUGETLB | (HUGE_PAGE_SHIFT[huge] << MFD_HUGE_SHIFT);
    const lib = libc();
    const fd = lib.memfd_create(cString(name), flags);
    if (fd < 0) {
      const errno = lastErrno();
      throw syscallError("memfd_create", errno, `cannot create a memfd "${name}"`, {
        hint:
          huge && errno === ERRNO.EINVAL
            ? `the kernel has no ${huge} hugetlbfs pool (CONFIG_HUGETLBFS, or this page size is unsupported)`
            : undefined,
      });
    }
    try {
      if (lib.ftruncate(fd, size) < 0) {
        throw syscallError("ftruncate", lastErrno(), `cannot size the memfd to ${size} bytes`);
      }
      // A shrunk file turns every touch of the ArrayBuffer into SIGBUS: forbid shrinking for good.
      const seals = F_SEAL_SHRINK | (options.seal?.grow ? F_SEAL_GROW : 0) | (options.seal?.final ? F_SEAL_SEAL : 0);
      if (lib.fcntl(fd, F_ADD_SEALS, seals) < 0) {
        throw syscallError("fcntl", lastErrno(), `cannot seal the memfd (F_ADD_SEALS ${hex(seals)})`);
      }
      const address = Number(lib.mmap(null, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) ?? -1);
      if (address === -1 || address === 0 || address === 2 ** 64 - 1) {
        const errno = lastErrno();
        const outOfMemory = huge
          ? `not enough ${huge} huge pages are reserved: ` +
            `raise /proc/sys/vm/nr_hugepages (needs ${size / pageSize} free pages)`
          : "the process is out of address space or memory";
        throw syscallError("mmap", errno, `cannot map ${size} bytes of the memfd`, {
          hint: errno === ERRNO.ENOMEM ? outOfMemory : undefined,
        });
      }
      return new MemfdBuffer(fd, address, size, pageSize, name);
    } catch (error) {
      lib.close(fd);
      throw error;
    }
  }

  /**
   * Adopt a memfd this process received (from a parent through Bun.spawn's extra stdio, say):
   * map it whole, take ownership of the fd and make it close-on-exec. The pages are the same ones
   * the sender sees and the IOMMU maps.
   */
  static fromFd(fd: number, options: { name?: string; pageSize?: number } = {}): MemfdBuffer {
    const op = "MemfdBuffer.fromFd";
    requireOpenFd(fd, op, "fd");
    const { mode, size } = fstat(fd, op);
    if ((mode & S_IFMT) !== S_IFREG) throw argumentError(op, "fd", `fd ${fd} is not a memfd or regular file`);
    if (size <= 0) throw argumentError(op, "fd", `the file behind fd ${fd} is empty`);
    setCloseOnExec(fd, op);
    const address = Number(libc().mmap(null, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) ?? -1);
    if (address === -1 || address === 0 || address === 2 ** 64 - 1) {
      throw syscallError("mmap", lastErrno(), `cannot map the ${size} bytes of fd ${fd}`, { argument: "fd" });
    }
    return new MemfdBuffer(fd, address, size, options.pageSize ?? PAGE_SIZE, options.name ?? `adopted fd ${fd}`);
  }

  /** The memfd. Valid until close(). */
  get fd(): number {
    return this.assertOpen("MemfdBuffer.fd");
  }

  /** The buffer's address in this process (for IOMMU_IOAS_MAP by VA). */
  get address(): number {
    this.assertOpen("MemfdBuffer.address");
    return this.#address;
  }

  /** The zero-copy ArrayBuffer over the memfd's pages. Detached (length 0) after close(). */
  get buffer(): ArrayBuffer {
    return this.#buffer;
  }

  /** A Uint8Array over the whole buffer (the same object every time). Empty after close(). */
  get bytes(): Uint8Array {
    return this.#bytes;
  }

  get closed(): boolean {
    return this.#fd < 0;
  }

  /** The memfd's seals, read from the kernel. */
  get seals(): MemfdSeals {
    const bits = libc().fcntl(this.fd, F_GET_SEALS, 0);
    if (bits < 0) throw syscallError("fcntl", lastErrno(), "cannot read the memfd's seals (F_GET_SEALS)");
    return {
      shrink: (bits & F_SEAL_SHRINK) !== 0,
      grow: (bits & F_SEAL_GROW) !== 0,
      write: (bits & F_SEAL_WRITE) !== 0,
      final: (bits & F_SEAL_SEAL) !== 0,
    };
  }

  /** Throws EBADF when closed; the fd otherwise. Used by the objects that accept a MemfdBuffer. */
  assertOpen(operation: string): number {
    if (this.#fd < 0) throw this.#closedError(operation);
    return this.#fd;
  }

  // Out of line: assertOpen runs on every map of this buffer and stays small enough to inline.
  #closedError(operation: string): Error {
    return closedError(operation, `MemfdBuffer "${this.name}"`);
  }

  /**
   * Release the mapping and the fd. Views of the buffer become empty (the ArrayBuffer is
   * detached), so later touches read `undefined` instead of faulting. IOAS mappings of the memfd
   * keep their own page references until they are unmapped. Idempotent.
   */
  close(): void {
    if (this.#fd < 0) return;
    const fd = this.#fd;
    this.#fd = -1;
    fdFinalizer.unregister(this);
    // Detaching runs the deallocator (munmap) now rather than at some later collection.
    this.#buffer.transfer(0);
    closeFd(fd, "MemfdBuffer.close");
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

type ToArrayBufferWithDeallocator = (
  address: Pointer,
  byteOffset: number,
  byteLength: number,
  deallocatorContext: number,
  deallocator: Pointer | null,
) => ArrayBuffer;

export { IommufdError };
