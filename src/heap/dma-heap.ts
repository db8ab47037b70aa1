/**
 * DmaHeap: map one region into an IOAS once, then hand out many DMA buffers from it with no
 * kernel call on the I/O path.
 *
 * Three parts, each with one owner:
 * - the region: one MemfdBuffer (huge pages when the system has them), mapped once into a
 *   DmaSpace (an iommufd IOAS by file, a VFIO type1 container by address) at one contiguous IOVA
 *   range; owned by the heap;
 * - the address rule ({@link AddressRule}): offset <-> IOVA <-> view, by arithmetic only;
 * - the allocator ({@link OffsetAllocator}): offsets only, O(1) TLSF, knows nothing of memory.
 *
 * Growing: a full heap does not grow. alloc() throws ENOMEM with the heap's figures; create a
 * larger heap or a second one. (Growing in place would need a second region at a non-contiguous
 * address, which breaks the one-rule translation this design is for.)
 */
import { argumentError, closedError, stateError } from "../sys/error.ts";
import { hex, type Iova } from "../sys/validate.ts";
import type { DmaMapping, DmaSpace } from "../dma/space.ts";
import { MemfdBuffer, type HugePageSize } from "../memory/memfd.ts";
import { OffsetAllocator, type OffsetAllocatorStats } from "./allocator.ts";

export interface DmaHeapOptions {
  /** Region size in bytes (rounded up to the region's page size). */
  size: number;
  /**
   * "auto" (default): 2 MiB huge pages when they can be had, else 4 KiB pages with a note.
   * "2MB"/"1GB": insist on huge pages. false: never.
   */
  hugePages?: "auto" | HugePageSize | false;
  /** Fixed IOVA of the region; default: the space chooses (the kernel for an IOAS). */
  iova?: number | bigint;
  /** Allocation granule: every size is rounded up to it. Default 4096. */
  granule?: number;
  /** Name of the memfd (shows in /proc/<pid>/maps). */
  name?: string;
}

export interface DmaHeapStats extends OffsetAllocatorStats {
  pageSize: number;
  iova: Iova;
}

/** The arithmetic between region offsets, IOVAs and views. No state but three numbers. */
export class AddressRule {
  constructor(
    /** IOVA of offset 0. */
    readonly iovaBase: number,
    readonly length: number,
  ) {}

  iovaOf(offset: number): number {
    return this.iovaBase + offset;
  }

  /** The offset of an IOVA, or -1 when the IOVA lies outside the region. */
  offsetOf(iova: number | bigint): number {
    const offset = Number(iova) - this.iovaBase;
    return offset >= 0 && offset < this.length && Number.isInteger(offset) ? offset : -1;
  }
}

/** One buffer from a DmaHeap: a zero-copy view and the IOVA the device uses for it. */
export class DmaBuffer {
  readonly heap: DmaHeap;
  readonly offset: number;
  /** Bytes requested (the heap reserves it rounded up to the granule). */
  readonly size: number;
  readonly #iova: number;
  #bytes: Uint8Array | undefined;
  /** @internal Set by DmaHeap.free: the buffer itself knows, so no lookup table is needed. */
  _freed = false;

  /** @internal */
  constructor(heap: DmaHeap, offset: number, size: number, iova: number) {
    this.heap = heap;
    this.offset = offset;
    this.size = size;
    this.#iova = iova;
  }

  /** The device-visible address of byte 0. */
  get iova(): number {
    this.heap.assertOpen("DmaBuffer.iova");
    return this.#iova;
  }

  /** Zero-copy view of the buffer's bytes (made on first use: many buffers are only handed to devices). */
  get bytes(): Uint8Array {
    this.heap.assertOpen("DmaBuffer.bytes");
    this.#bytes ??= this.heap.viewOf(this.offset, this.size);
    return this.#bytes;
  }

  get freed(): boolean {
    return this._freed;
  }

  free(): void {
    this.heap.free(this);
  }

  [Symbol.dispose](): void {
    if (!this.heap.closed && !this._freed) this.heap.free(this);
  }
}

export class DmaHeap {
  /** Where the region is mapped: an Ioas or a VfioContainer. */
  readonly space: DmaSpace;
  readonly rule: AddressRule;
  readonly pageSize: number;
  /** Why huge pages were not used, when "auto" fell back; undefined otherwise. */
  readonly note: string | undefined;
  #region: MemfdBuffer | undefined;
  #mapping: DmaMapping | undefined;
  readonly #allocator: OffsetAllocator;

  private constructor(
    space: DmaSpace,
    region: MemfdBuffer,
    mapping: DmaMapping,
    granule: number,
    note: string | undefined,
  ) {
    this.space = space;
    this.#region = region;
    this.#mapping = mapping;
    this.pageSize = region.pageSize;
    this.note = note;
    if (typeof mapping.iova !== "number") {
      throw stateError("DmaHeap.create", "ERANGE", "the heap's IOVA must lie below 2^53");
    }
    this.rule = new AddressRule(mapping.iova, region.size);
    this.#allocator = new OffsetAllocator(region.size, {
      minBlock: granule,
      maxAlign: region.pageSize,
      operationPrefix: "DmaHeap",
    });
  }

  /** Create the region, map it once into `space` (an Ioas or a VfioContainer), and set up the allocator. */
  static create(space: DmaSpace, options: DmaHeapOptions): DmaHeap {
    const op = "DmaHeap.create";
    const size = options?.size;
    if (typeof size !== "number" || !Number.isSafeInteger(size) || size <= 0) {
      throw argumentError(op, "options.size", `expected a positive whole number of bytes, got ${String(size)}`);
    }
    const granule = options.granule ?? 4096;
    if (!Number.isInteger(granule) || granule <= 0 || (granule & (granule - 1)) !== 0) {
      throw argumentError(op, "options.granule", `${granule} is not a power of two`);
    }
    const want = options.hugePages ?? "auto";
    let region: MemfdBuffer | undefined;
    let note: string | undefined;
    if (want !== false) {
      const huge: HugePageSize = want === "auto" ? "2MB" : want;
      const hugeBytes = huge === "2MB" ? 2 << 20 : 1 << 30;
      try {
        region = MemfdBuffer.create(Math.ceil(size / hugeBytes) * hugeBytes, {
          hugePages: huge,
          name: options.name ?? "dma-heap",
        });
      } catch (error) {
        if (want !== "auto") throw error;
        note = `huge pages unavailable (${(error as Error).message}); using 4 KiB pages`;
      }
    }
    region ??= MemfdBuffer.create(Math.ceil(size / 4096) * 4096, { name: options.name ?? "dma-heap" });
    let mapping: DmaMapping;
    try {
      mapping = space.mapDma(region, options.iova === undefined ? {} : { iova: options.iova });
    } catch (error) {
      region.close();
      throw error;
    }
    try {
      return new DmaHeap(space, region, mapping, granule, note);
    } catch (error) {
      mapping.unmap();
      region.close();
      throw error;
    }
  }

  get closed(): boolean {
    return this.#region === undefined;
  }

  /** The IOVA of the region's first byte. */
  get iova(): number {
    return this.rule.iovaBase;
  }

  get size(): number {
    return this.rule.length;
  }

  /** The region's address in this process (offset 0). */
  get address(): number {
    return this.assertOpen("DmaHeap.address").address;
  }

  /** @internal Throws EBADF once closed; the region otherwise. */
  assertOpen(operation: string): MemfdBuffer {
    if (this.#region === undefined) throw closedError(operation, "the DmaHeap");
    return this.#region;
  }

  /** @internal A view of the region for a buffer. */
  viewOf(offset: number, size: number): Uint8Array {
    return new Uint8Array(this.#region!.buffer, offset, size);
  }

  /** Reserve a buffer. `align` is a power of two up to the region's page size. No kernel call. */
  alloc(size: number, options: { align?: number } = {}): DmaBuffer {
    this.assertOpen("DmaHeap.alloc");
    const offset =
      options.align === undefined ? this.#allocator.alloc(size) : this.#allocator.alloc(size, options.align);
    return new DmaBuffer(this, offset, size, this.rule.iovaBase + offset);
  }

  /** Return a buffer to the heap. Double frees and buffers of other heaps get EINVAL. No kernel call. */
  free(buffer: DmaBuffer): void {
    const op = "DmaHeap.free";
    this.assertOpen(op);
    if (!(buffer instanceof DmaBuffer)) throw argumentError(op, "buffer", "expected a DmaBuffer from this heap");
    if (buffer.heap !== this) throw argumentError(op, "buffer", "the buffer belongs to another DmaHeap");
    if (buffer._freed) {
      throw argumentError(op, "buffer", `the buffer at offset ${hex(buffer.offset)} was already freed`);
    }
    this.#allocator.free(buffer.offset);
    buffer._freed = true;
  }

  /** The IOVA of a view into the heap (or of a region offset). */
  iovaOf(target: ArrayBufferView | number): number {
    const op = "DmaHeap.iovaOf";
    const region = this.assertOpen(op);
    let offset: number;
    if (typeof target === "number") {
      offset = target;
    } else if (ArrayBuffer.isView(target) && target.buffer === region.buffer) {
      offset = target.byteOffset;
    } else {
      throw argumentError(op, "target", "the view does not point into this heap's region");
    }
    if (!Number.isInteger(offset) || offset < 0 || offset >= this.rule.length) {
      throw argumentError(op, "target", `offset ${offset} is outside the ${hex(this.rule.length)}-byte region`);
    }
    return this.rule.iovaOf(offset);
  }

  /** A zero-copy view of `length` bytes at `iova` inside the heap. */
  viewAt(iova: number | bigint, length: number): Uint8Array {
    const op = "DmaHeap.viewAt";
    const region = this.assertOpen(op);
    const offset = this.rule.offsetOf(iova);
    if (offset < 0)
      throw argumentError(op, "iova", `${hex(iova)} is outside the heap (${hex(this.iova)}..+${hex(this.size)})`);
    if (!Number.isInteger(length) || length <= 0 || offset + length > this.rule.length) {
      throw argumentError(op, "length", `${length} bytes at ${hex(iova)} run past the end of the heap`);
    }
    return new Uint8Array(region.buffer, offset, length);
  }

  stats(): DmaHeapStats {
    this.assertOpen("DmaHeap.stats");
    return { ...this.#allocator.stats(), pageSize: this.pageSize, iova: this.iova };
  }

  /**
   * Unmap the region and release it. Buffers still out become unusable: their iova and bytes
   * throw EBADF (the views are detached, so stale copies read nothing). Idempotent.
   */
  close(): void {
    const region = this.#region;
    if (region === undefined) return;
    const mapping = this.#mapping;
    // Unmap first: if the kernel refuses, the heap stays whole and close() can be retried.
    if (mapping?.mapped) mapping.unmap();
    this.#mapping = undefined;
    this.#region = undefined;
    region.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
