/**
 * HwPageTable: an explicitly allocated IOMMU page table (IOMMU_HWPT_ALLOC) that mirrors one IOAS,
 * for a VMM that wants to choose its domain: dirty tracking for live migration, a nesting parent,
 * an I/O page fault queue. Devices attach to it by id (`device.attach(hwpt.id)`); attaching a
 * device that is already attached replaces its page table atomically.
 *
 * Dirty tracking reads into a {@link DirtyBitmap} that JavaScript owns: its command is encoded
 * once, so each read is one ioctl.
 */
import { ptr } from "bun:ffi";
import { deviceIdOf, type BoundDevice } from "./device-ref.ts";
import type { FaultQueue } from "./fault-queue.ts";
import type { Ioas } from "../iommufd/ioas.ts";
import type { Iommufd } from "../iommufd/iommufd.ts";
import { argumentError, closedError } from "../sys/error.ts";
import { PAGE_SIZE } from "../sys/libc.ts";
import type { ErrnoTable, CallFailure } from "../sys/errno-table.ts";
import { ioctl } from "../sys/ioctl.ts";
import { hex, type Iova, normaliseIova, u64 } from "../sys/validate.ts";
import { putU64, type StructBuffer } from "../uapi/codec.ts";
import {
  IOMMU_HWPT_ALLOC,
  IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
  IOMMU_HWPT_ALLOC_NEST_PARENT,
  IOMMU_HWPT_DATA_NONE,
  IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
  IOMMU_HWPT_FAULT_ID_VALID,
  IOMMU_HWPT_GET_DIRTY_BITMAP,
  IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
  IOMMU_HWPT_SET_DIRTY_TRACKING,
  iommu_hwpt_alloc,
  iommu_hwpt_get_dirty_bitmap,
  iommu_hwpt_set_dirty_tracking,
} from "../uapi/iommufd.ts";

export interface HwPageTableOptions {
  /** Let the IOMMU record DMA writes (IOMMU_HWPT_ALLOC_DIRTY_TRACKING); needs hardware support. */
  dirtyTracking?: boolean;
  /** Usable as the parent (stage 2) of nested page tables (IOMMU_HWPT_ALLOC_NEST_PARENT). */
  nestParent?: boolean;
  /** Deliver I/O page faults of devices attached to this table to this queue. */
  faultQueue?: FaultQueue;
}

const allocCmd = iommu_hwpt_alloc.create();
const dirtyTrackingCmd = iommu_hwpt_set_dirty_tracking.create();

export class HwPageTable {
  readonly iommufd: Iommufd;
  readonly ioas: Ioas;
  readonly id: number;
  /** The device id the table was allocated for (its IOMMU decides what the table can do). */
  readonly deviceId: number;
  readonly dirtyTrackingCapable: boolean;
  readonly nestParent: boolean;
  readonly faultQueue: FaultQueue | undefined;
  /**
   * The IOAS's IOVA alignment when the table was made: the smallest page the IOMMU tracks. A
   * dirty bitmap at a finer page size would get only the first bit of each dirty IOMMU page.
   */
  readonly granule: number;
  #alive = true;
  #goneBecause = "";
  #dirtyTracking = false;

  private constructor(ioas: Ioas, id: number, deviceId: number, granule: number, options: HwPageTableOptions) {
    this.iommufd = ioas.iommufd;
    this.ioas = ioas;
    this.id = id;
    this.deviceId = deviceId;
    this.granule = granule;
    this.dirtyTrackingCapable = options.dirtyTracking === true;
    this.nestParent = options.nestParent === true;
    this.faultQueue = options.faultQueue;
  }

  /**
   * IOMMU_HWPT_ALLOC: a page table for `device` holding every mapping of `ioas` (now and later).
   * It exists on its own until destroyed; attach devices to it with `device.attach(hwpt.id)`.
   */
  static allocate(ioas: Ioas, device: BoundDevice, options: HwPageTableOptions = {}): HwPageTable {
    const op = "IOMMU_HWPT_ALLOC";
    ioas.assertOpen(op, "ioas");
    const devId = deviceIdOf(device, op);
    if (options.faultQueue && options.nestParent) {
      throw argumentError(
        op,
        "options.faultQueue",
        "a nesting parent cannot take a fault queue (the kernel refuses the combination)",
        "EOPNOTSUPP",
      );
    }
    let flags = 0;
    if (options.dirtyTracking) flags |= IOMMU_HWPT_ALLOC_DIRTY_TRACKING;
    if (options.nestParent) flags |= IOMMU_HWPT_ALLOC_NEST_PARENT;
    let faultId = 0;
    if (options.faultQueue) {
      if (options.faultQueue.iommufd !== ioas.iommufd)
        throw argumentError(op, "options.faultQueue", "the fault queue belongs to another Iommufd");
      faultId = options.faultQueue.requireId(op);
      flags |= IOMMU_HWPT_FAULT_ID_VALID;
    }
    allocCmd.fill({
      size: iommu_hwpt_alloc.size,
      flags,
      dev_id: devId,
      pt_id: ioas.id,
      data_type: IOMMU_HWPT_DATA_NONE,
      fault_id: faultId,
    });
    ioas.iommufd.ioctl(IOMMU_HWPT_ALLOC, allocCmd, op, HWPT_ALLOC_ERRORS, options);
    const id = allocCmd.get("out_hwpt_id");
    let granule: number;
    try {
      // The table is part of the IOAS now: the IOAS's alignment covers this table's page size.
      granule = ioas.iovaRanges().alignment;
    } catch (error) {
      ioas.iommufd.destroyObject(id, op);
      throw error;
    }
    const hwpt = new HwPageTable(ioas, id, devId, granule, options);
    ioas.iommufd.track(hwpt);
    return hwpt;
  }

  get destroyed(): boolean {
    return !this.#alive;
  }

  /** Whether dirty tracking is on, as last set through this object. */
  get dirtyTracking(): boolean {
    return this.#dirtyTracking;
  }

  /** @internal */
  assertOpen(operation: string): number {
    if (!this.#alive) throw closedError(operation, `hw page table ${this.id}`, this.#goneBecause);
    return this.iommufd.assertOpen(operation);
  }

  /**
   * IOMMU_HWPT_SET_DIRTY_TRACKING. Enabling first clears every dirty bit, so the first read
   * afterwards shows only writes made since.
   */
  setDirtyTracking(enabled: boolean): void {
    const op = "IOMMU_HWPT_SET_DIRTY_TRACKING";
    this.assertOpen(op);
    if (typeof enabled !== "boolean")
      throw argumentError(op, "enabled", `expected true or false, got ${typeof enabled}`);
    dirtyTrackingCmd.fill({
      size: iommu_hwpt_set_dirty_tracking.size,
      flags: enabled ? IOMMU_HWPT_DIRTY_TRACKING_ENABLE : 0,
      hwpt_id: this.id,
    });
    this.iommufd.ioctl(IOMMU_HWPT_SET_DIRTY_TRACKING, dirtyTrackingCmd, op, DIRTY_ERRORS, {
      hwpt: this,
      bitmap: undefined,
    });
    this.#dirtyTracking = enabled;
  }

  /**
   * IOMMU_HWPT_GET_DIRTY_BITMAP into `bitmap` (zeroed first: the kernel only sets bits). Unless
   * `clear` is false (NO_CLEAR, e.g. right before an unmap of the range), the IOMMU's dirty bits
   * of the range are cleared, so the next read shows only newer writes. One ioctl.
   */
  readDirty(bitmap: DirtyBitmap, options: { clear?: boolean } = {}): DirtyBitmap {
    const op = "IOMMU_HWPT_GET_DIRTY_BITMAP";
    const fd = this.assertOpen(op);
    if (!(bitmap instanceof DirtyBitmap))
      throw argumentError(op, "bitmap", "expected a DirtyBitmap (new DirtyBitmap({ iova, length, pageSize }))");
    if (bitmap.pageSize < this.granule) {
      throw argumentError(
        op,
        "bitmap",
        `page size ${bitmap.pageSize} is below the ${this.granule}-byte IOVA granule of hw page table ${this.id}: ` +
          "the kernel would report only the first bit of each dirty IOMMU page",
      );
    }
    // Linux 7.2.13 stops its walk at the first unmapped hole and drops the error: every bit after
    // the hole would be missing (and left uncleared) with success reported. Refuse such ranges.
    const start = Number(bitmap.iova);
    if (this.ioas.coversRange(start, start + bitmap.length) === false) {
      throw argumentError(
        op,
        "bitmap",
        `${hex(bitmap.iova)}..+${hex(bitmap.length)} is not mapped from end to end in IOAS ${this.ioas.id}: ` +
          "the kernel would skip every page after the first hole and still report success",
        "EINVAL",
        "read each mapped range with its own bitmap",
      );
    }
    const w = bitmap.command.u32;
    w[DIRTY.hwpt] = this.id;
    w[DIRTY.flags] = options.clear === false ? IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR : 0;
    bitmap.bytes.fill(0);
    ioctl(fd, IOMMU_HWPT_GET_DIRTY_BITMAP, bitmap.command, op, DIRTY_ERRORS, { hwpt: this, bitmap });
    return bitmap;
  }

  /** IOMMU_DESTROY. EBUSY while a device is still attached to it. Idempotent. */
  destroy(): void {
    if (!this.#alive) return;
    if (!this.iommufd.closed) this.iommufd.destroyObject(this.id, "HwPageTable.destroy");
    this.markGone("was destroyed");
    this.iommufd.untrack(this);
    this.faultQueue?.releaseUser();
  }

  /** @internal Called when the Iommufd closes: the kernel destroyed the table. */
  markGone(because = "is gone: its Iommufd was closed"): void {
    this.#alive = false;
    this.#goneBecause = because;
  }

  [Symbol.dispose](): void {
    if (this.#alive && !this.iommufd.closed) this.destroy();
  }
}

function allocUnsupported({ context: options, cmd }: CallFailure<HwPageTableOptions>) {
  const wanted = [
    options.dirtyTracking && "dirty tracking",
    options.nestParent && "nesting",
    options.faultQueue && "I/O page faults",
  ].filter(Boolean);
  const device = `the IOMMU of device ${cmd!.get("dev_id")}`;
  return {
    message: wanted.length
      ? `${device} cannot give a page table with ${wanted.join(" and ")}`
      : `${device} cannot allocate a page table this way`,
    hint: "readHwInfo(iommufd, device) tells what this IOMMU offers",
  };
}

const HWPT_ALLOC_ERRORS: ErrnoTable<HwPageTableOptions> = {
  EOPNOTSUPP: allocUnsupported,
  ENOENT: ({ cmd }) => ({
    message: `no device with id ${cmd!.get("dev_id")} is bound to this iommufd (or no fault queue ${cmd!.get("fault_id")})`,
    argument: "device",
  }),
  EINVAL: ({ cmd }) =>
    `IOAS ${cmd!.get("pt_id")} cannot back a page table for device ${cmd!.get("dev_id")} (no such IOAS, or an unsupported combination)`,
  EADDRINUSE: ({ cmd }) =>
    `IOAS ${cmd!.get("pt_id")} has mappings outside the IOVA ranges the IOMMU of device ${cmd!.get("dev_id")} can reach`,
};

interface DirtyContext {
  hwpt: HwPageTable;
  bitmap: DirtyBitmap | undefined;
}

function cannotTrack({ context: { hwpt } }: CallFailure<DirtyContext>) {
  return {
    message: `hw page table ${hwpt.id} cannot track dirty pages`,
    hint: hwpt.dirtyTrackingCapable
      ? "its IOMMU driver has no dirty-tracking operations"
      : "allocate it with HwPageTable.allocate(ioas, device, { dirtyTracking: true }) on an IOMMU whose hw info reports dirtyTracking",
  };
}

const DIRTY_ERRORS: ErrnoTable<DirtyContext> = {
  EOPNOTSUPP: cannotTrack,
  ENOENT: ({ context: { hwpt } }) => `no hw page table with id ${hwpt.id} exists any more`,
  EINVAL: (failure) => {
    const { bitmap, hwpt } = failure.context;
    // The mock driver refuses to enable tracking on a table without dirty support with EINVAL.
    if (!bitmap) return hwpt.dirtyTrackingCapable ? undefined : cannotTrack(failure);
    return {
      message: `the range ${hex(bitmap.iova)}..+${hex(bitmap.length)} at page size ${bitmap.pageSize} is not aligned to the IOAS's IOVA alignment`,
      hint: "use a page size and range that are multiples of ioas.iovaRanges().alignment",
    };
  },
  EOVERFLOW: ({ context: { bitmap } }) =>
    bitmap ? `the range ${hex(bitmap.iova)}..+${hex(bitmap.length)} runs past the end of the address space` : undefined,
};

const W = iommu_hwpt_get_dirty_bitmap.words;
const DIRTY = {
  size: W.size,
  hwpt: W.hwpt_id,
  flags: W.flags,
  iova: W.iova,
  length: W.length,
  pageSize: W.page_size,
  data: W.data,
};

export interface DirtyBitmapOptions {
  /** First IOVA covered; a multiple of `pageSize`. */
  iova: number | bigint;
  /** Bytes of IOVA covered; a multiple of `pageSize`. */
  length: number;
  /** IOVA bytes per bit: a power of two, at least the IOAS's IOVA alignment. Default 4096. */
  pageSize?: number;
  /** Memory for the bits (at least `DirtyBitmap.bytesFor(length, pageSize)` bytes). Default: allocated. */
  storage?: ArrayBuffer | ArrayBufferView;
}

/** Largest bitmap the library allocates or accepts: 1 GiB of bits covers 32 TiB at 4 KiB. */
const MAX_BITMAP_BYTES = 1 << 30;

/**
 * One bit per `pageSize` bytes of IOVA starting at `iova`, as IOMMU_HWPT_GET_DIRTY_BITMAP writes
 * it: bit n (of 64-bit little-endian words) stands for `iova + n * pageSize`.
 */
export class DirtyBitmap {
  readonly iova: Iova;
  readonly length: number;
  readonly pageSize: number;
  /** Number of bits that mean something. */
  readonly pages: number;
  readonly bytes: Uint8Array;
  /** Address of `bytes` in this process. */
  readonly address: number;
  /** @internal The encoded IOMMU_HWPT_GET_DIRTY_BITMAP command (hwpt id and flags set per read). */
  readonly command: StructBuffer;

  /** Bytes a bitmap of `length` IOVA bytes at `pageSize` needs: whole 64-bit words. */
  static bytesFor(length: number, pageSize = PAGE_SIZE): number {
    return Math.ceil(Math.ceil(length / pageSize) / 64) * 8;
  }

  constructor(options: DirtyBitmapOptions) {
    const op = "DirtyBitmap";
    if (!options || typeof options !== "object")
      throw argumentError(op, "options", "expected { iova, length, pageSize }");
    const pageSize = options.pageSize ?? PAGE_SIZE;
    if (!Number.isSafeInteger(pageSize) || pageSize <= 0 || (pageSize & (pageSize - 1)) !== 0 || pageSize > 2 ** 30) {
      throw argumentError(op, "options.pageSize", `${pageSize} is not a power of two between 1 and 1 GiB`);
    }
    const iova = normaliseIova(u64(options.iova, op, "options.iova"));
    const length = options.length;
    if (!Number.isSafeInteger(length) || length <= 0)
      throw argumentError(op, "options.length", `${length} is not a positive byte count`);
    if (BigInt(iova) % BigInt(pageSize) !== 0n)
      throw argumentError(op, "options.iova", `${hex(iova)} is not a multiple of the page size ${pageSize}`);
    if (length % pageSize !== 0)
      throw argumentError(op, "options.length", `${length} is not a multiple of the page size ${pageSize}`);
    if (BigInt(iova) + BigInt(length) > 1n << 64n)
      throw argumentError(
        op,
        "options.length",
        `${hex(iova)}..+${hex(length)} runs past the end of the 64-bit IOVA space`,
        "EOVERFLOW",
      );
    const pages = length / pageSize;
    const needed = Math.ceil(pages / 64) * 8;
    if (needed > MAX_BITMAP_BYTES)
      throw argumentError(
        op,
        "options.length",
        `${pages} pages need a ${needed}-byte bitmap; read the range in parts or with a larger page size`,
        "E2BIG",
      );
    let bytes: Uint8Array;
    if (options.storage === undefined) {
      bytes = new Uint8Array(needed);
    } else if (options.storage instanceof ArrayBuffer) {
      bytes = new Uint8Array(options.storage);
    } else if (ArrayBuffer.isView(options.storage)) {
      bytes = new Uint8Array(options.storage.buffer, options.storage.byteOffset, options.storage.byteLength);
    } else {
      throw argumentError(op, "options.storage", "expected an ArrayBuffer or a typed array");
    }
    // The kernel trusts the length: a short bitmap would have it write past the end of our memory.
    if (bytes.byteLength < needed) {
      throw argumentError(
        op,
        "options.storage",
        `${bytes.byteLength} bytes are too small for ${pages} pages of ${pageSize} bytes: the bitmap needs ${needed} bytes (one bit per page, whole 64-bit words)`,
        "EMSGSIZE",
      );
    }
    this.iova = iova;
    this.length = length;
    this.pageSize = pageSize;
    this.pages = pages;
    this.bytes = needed === bytes.byteLength ? bytes : bytes.subarray(0, needed);
    this.command = iommu_hwpt_get_dirty_bitmap.create();
    const w = this.command.u32;
    w[DIRTY.size] = iommu_hwpt_get_dirty_bitmap.size;
    putU64(w, DIRTY.iova, iova);
    putU64(w, DIRTY.length, length);
    putU64(w, DIRTY.pageSize, pageSize);
    this.address = ptr(this.bytes);
    putU64(w, DIRTY.data, this.address);
  }

  /** Whether the page holding `iova` was reported dirty by the last read. */
  isDirty(iova: number | bigint): boolean {
    const offset = BigInt(iova) - BigInt(this.iova);
    if (offset < 0n || offset >= BigInt(this.length)) {
      throw argumentError(
        "DirtyBitmap.isDirty",
        "iova",
        `${hex(iova)} is outside ${hex(this.iova)}..+${hex(this.length)}`,
        "ERANGE",
      );
    }
    return this.isPageDirty(Number(offset / BigInt(this.pageSize)));
  }

  /** Whether page number `index` (0 = the page at `iova`) is dirty. */
  isPageDirty(index: number): boolean {
    return ((this.bytes[index >>> 3]! >>> (index & 7)) & 1) === 1;
  }

  /** How many pages the last read reported dirty. */
  countDirty(): number {
    let count = 0;
    const bytes = this.bytes;
    for (let i = 0; i < bytes.length; i++) {
      let b = bytes[i]!;
      while (b) {
        b &= b - 1;
        count++;
      }
    }
    return count;
  }

  /** Dirty pages as IOVA ranges (`length` in bytes), merged where adjacent. */
  dirtyRanges(): { iova: Iova; length: number }[] {
    const ranges: { iova: Iova; length: number }[] = [];
    let start = -1;
    for (let page = 0; page <= this.pages; page++) {
      const dirty = page < this.pages && this.isPageDirty(page);
      if (dirty && start < 0) start = page;
      if (!dirty && start >= 0) {
        ranges.push({
          iova: normaliseIova(BigInt(this.iova) + BigInt(start * this.pageSize)),
          length: (page - start) * this.pageSize,
        });
        start = -1;
      }
    }
    return ranges;
  }
}
