/**
 * DmaBuf: an owned dma-buf fd. iommufd maps only single-range VFIO PCI dma-bufs (a slice of a
 * device BAR exported with VFIO_DEVICE_FEATURE_DMA_BUF, for peer-to-peer DMA); other dma-bufs
 * still exist here so that the refusal comes back as a clear error.
 */
import type { MappableFile } from "../iommufd/map-arguments.ts";
import type { MemfdBuffer } from "./memfd.ts";
import { ERRNO } from "../sys/errno.ts";
import { closedError } from "../sys/error.ts";
import { closeFd, fdFinalizer, fstat, openPath } from "../sys/fd.ts";
import type { ErrnoTable } from "../sys/errno-table.ts";
import { ioctl } from "../sys/ioctl.ts";
import { O_RDWR } from "../sys/libc.ts";
import { UDMABUF_CREATE, UDMABUF_FLAGS_CLOEXEC, udmabuf_create } from "../uapi/udmabuf.ts";

/** Where a dma-buf came from; decides what a refusal from iommufd means. */
export type DmaBufOrigin = "vfio" | "udmabuf" | "selftest" | "external";

/** Why iommufd refuses (EOPNOTSUPP) a dma-buf of each origin. */
const NOT_MAPPABLE_BECAUSE: Record<DmaBufOrigin, string> = {
  vfio: "this VFIO dma-buf has more than one range",
  udmabuf: "this is a udmabuf (memfd pages), not a VFIO dma-buf; map the memfd itself instead",
  selftest: "this dma-buf was not exported by VFIO",
  external: "this dma-buf was not exported by VFIO",
};

const UDMABUF_CREATE_ERRORS: ErrnoTable = {
  EINVAL: "the memfd range must be page aligned and sealed against shrinking",
};

export class DmaBuf implements MappableFile {
  readonly size: number;
  readonly origin: DmaBufOrigin;
  /** Human-readable source, e.g. "0000:00:03.0 BAR0 [0x0, +0x1000)". */
  readonly description: string;
  #fd: number;

  /** Take ownership of a dma-buf fd (closed by close()). */
  constructor(fd: number, options: { origin?: DmaBufOrigin; size?: number; description?: string } = {}) {
    this.#fd = fd;
    this.origin = options.origin ?? "external";
    this.size = options.size ?? fstat(fd, "DmaBuf").size;
    this.description = options.description ?? `dma-buf fd ${fd}`;
    fdFinalizer.register(this, fd, this);
  }

  get fd(): number {
    return this.assertOpen("DmaBuf.fd");
  }

  /** Throws EBADF when closed; the fd otherwise. */
  assertOpen(operation: string): number {
    if (this.#fd < 0) throw closedError(operation, this.description);
    return this.#fd;
  }

  get closed(): boolean {
    return this.#fd < 0;
  }

  /** @internal Used by Ioas.mapFile to explain a refusal in the dma-buf's terms. */
  describeMapError(errno: number): string | undefined {
    if (errno === ERRNO.EOPNOTSUPP) {
      const because = NOT_MAPPABLE_BECAUSE[this.origin];
      return `iommufd maps only single-range VFIO PCI dma-bufs (VFIO_DEVICE_FEATURE_DMA_BUF): ${because}`;
    }
    if (errno === ERRNO.ENODEV) {
      return (
        `${this.description} was revoked: its device was closed, reset or disabled, so its memory can no ` +
        `longer be mapped`
      );
    }
    return undefined;
  }

  close(): void {
    if (this.#fd < 0) return;
    const fd = this.#fd;
    this.#fd = -1;
    fdFinalizer.unregister(this);
    closeFd(fd, "DmaBuf.close");
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/**
 * Wrap memfd pages as a dma-buf through /dev/udmabuf. iommufd refuses these (EOPNOTSUPP); the
 * function exists to show and test that refusal, and for users who pass dma-bufs elsewhere.
 */
export function createUdmabuf(
  memfd: MemfdBuffer,
  options: { offset?: number; size?: number; device?: string } = {},
): DmaBuf {
  const op = "UDMABUF_CREATE";
  const offset = options.offset ?? 0;
  const size = options.size ?? memfd.size - offset;
  const dev = openPath(options.device ?? "/dev/udmabuf", O_RDWR, op, {
    ENOENT: { hint: "the kernel has no udmabuf device (CONFIG_UDMABUF)" },
  });
  try {
    const cmd = udmabuf_create.create().fill({ memfd: memfd.fd, flags: UDMABUF_FLAGS_CLOEXEC, offset, size });
    const fd = ioctl(dev, UDMABUF_CREATE, cmd, op, UDMABUF_CREATE_ERRORS);
    return new DmaBuf(fd, { origin: "udmabuf", size, description: `udmabuf of memfd "${memfd.name}"` });
  } finally {
    closeFd(dev, op);
  }
}
