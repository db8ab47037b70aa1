/**
 * Ioas: one I/O address space inside an Iommufd, and the Mappings in it.
 *
 * The library's view of what is mapped follows the kernel's answers only: a Mapping is forgotten
 * when an unmap succeeded (or the IOAS/iommufd went away), never because an unmap failed.
 */
import { ptr } from "bun:ffi";
import { ERRNO } from "./sys/errno.ts";
import { argumentError, IommufdError, syscallError } from "./sys/error.ts";
import { fstat, requireOpenFd } from "./sys/fd.ts";
import { addIova, hex, type Iova, normaliseIova, positiveLength, u64 } from "./sys/validate.ts";
import {
  IOMMU_IOAS_ALLOW_IOVAS,
  IOMMU_IOAS_COPY,
  IOMMU_IOAS_IOVA_RANGES,
  IOMMU_IOAS_MAP,
  IOMMU_IOAS_MAP_FILE,
  IOMMU_IOAS_MAP_FIXED_IOVA,
  IOMMU_IOAS_MAP_READABLE,
  IOMMU_IOAS_MAP_WRITEABLE,
  IOMMU_IOAS_UNMAP,
  IOMMU_OPTION_HUGE_PAGES,
  IOMMU_OPTION_OP_GET,
  IOMMU_OPTION_OP_SET,
  iommu_ioas_allow_iovas,
  iommu_ioas_copy,
  iommu_ioas_iova_ranges,
  iommu_ioas_map,
  iommu_ioas_map_file,
  iommu_ioas_unmap,
  iommu_iova_range,
} from "./uapi/iommufd.ts";
import { getU64, putU64, wordIndex } from "./uapi/codec.ts";
import type { Iommufd } from "./iommufd.ts";
import { MemfdBuffer } from "./memfd.ts";

export type { Iova };

/** Options shared by map(), mapFile() and copy(). */
export interface MapOptions {
  /** Fixed IOVA. Without it the kernel picks one (inside the allowed ranges, if any). */
  iova?: number | bigint;
  /** Device may read (DMA to device). Default true. */
  readable?: boolean;
  /** Device may write (DMA from device). Default true. */
  writable?: boolean;
}

export interface RangeOptions extends MapOptions {
  /** Byte offset into the source. Default 0. */
  offset?: number;
  /** Bytes to map. Default: from offset to the end of the source. */
  length?: number;
}

/** Memory mapped by its address in this process (IOMMU_IOAS_MAP). */
export type MapSource = ArrayBuffer | ArrayBufferView | MemfdBuffer | { address: number; length: number };

/** A file mapped by fd (IOMMU_IOAS_MAP_FILE): a MemfdBuffer, a DmaBuf, or anything with fd and size. */
export interface MappableFile {
  readonly fd: number;
  readonly size: number;
  /** Explains EOPNOTSUPP/ENODEV in the file's own terms (dma-bufs). */
  describeMapError?(errno: number): string | undefined;
}

export interface IovaRange {
  start: Iova;
  /** Inclusive, as the kernel reports it. */
  last: Iova;
}

export interface IovaRanges {
  ranges: IovaRange[];
  /** Every fixed IOVA and length must be a multiple of this. */
  alignment: number;
}

export interface CopyOptions extends MapOptions {
  srcIova: number | bigint;
  length: number;
}

const mapCmd = iommu_ioas_map.create();
const mapFileCmd = iommu_ioas_map_file.create();
const unmapCmd = iommu_ioas_unmap.create();
const copyCmd = iommu_ioas_copy.create();
const rangesCmd = iommu_ioas_iova_ranges.create();
const allowCmd = iommu_ioas_allow_iovas.create();

const U64_ALL = (1n << 64n) - 1n;

// Hot paths write the command words directly: no object, no field lookup, no BigInt per call.
const MAP_FILE = {
  words: mapFileCmd.u32,
  size: wordIndex(iommu_ioas_map_file, "size"),
  flags: wordIndex(iommu_ioas_map_file, "flags"),
  ioas: wordIndex(iommu_ioas_map_file, "ioas_id"),
  fd: wordIndex(iommu_ioas_map_file, "fd"),
  start: wordIndex(iommu_ioas_map_file, "start"),
  length: wordIndex(iommu_ioas_map_file, "length"),
  iova: wordIndex(iommu_ioas_map_file, "iova"),
};
const MAP = {
  words: mapCmd.u32,
  size: wordIndex(iommu_ioas_map, "size"),
  flags: wordIndex(iommu_ioas_map, "flags"),
  ioas: wordIndex(iommu_ioas_map, "ioas_id"),
  reserved: wordIndex(iommu_ioas_map, "__reserved"),
  userVa: wordIndex(iommu_ioas_map, "user_va"),
  length: wordIndex(iommu_ioas_map, "length"),
  iova: wordIndex(iommu_ioas_map, "iova"),
};
const COPY = {
  words: copyCmd.u32,
  size: wordIndex(iommu_ioas_copy, "size"),
  flags: wordIndex(iommu_ioas_copy, "flags"),
  dst: wordIndex(iommu_ioas_copy, "dst_ioas_id"),
  src: wordIndex(iommu_ioas_copy, "src_ioas_id"),
  length: wordIndex(iommu_ioas_copy, "length"),
  dstIova: wordIndex(iommu_ioas_copy, "dst_iova"),
  srcIova: wordIndex(iommu_ioas_copy, "src_iova"),
};
const UNMAP = {
  words: unmapCmd.u32,
  size: wordIndex(iommu_ioas_unmap, "size"),
  ioas: wordIndex(iommu_ioas_unmap, "ioas_id"),
  iova: wordIndex(iommu_ioas_unmap, "iova"),
  length: wordIndex(iommu_ioas_unmap, "length"),
};

export class Ioas {
  readonly iommufd: Iommufd;
  readonly id: number;
  #alive = true;
  /** Why the IOAS is gone, for the EBADF message. */
  #goneBecause = "";
  readonly #mappings = new MappingList();
  /** Prepared mappings: registered once, so map/unmap through them record nothing per call. */
  readonly #prepared = new Set<PreparedMapping>();

  /** @internal Created by Iommufd.createIoas(). */
  constructor(iommufd: Iommufd, id: number) {
    this.iommufd = iommufd;
    this.id = id;
  }

  get destroyed(): boolean {
    return !this.#alive;
  }

  /** Live mappings this object made (and has not seen unmapped). */
  get mappings(): readonly Mapping[] {
    return [...this.#mappings];
  }

  #requireAlive(operation: string): number {
    if (!this.#alive) {
      throw new IommufdError({
        operation,
        errno: ERRNO.EBADF,
        message: `IOAS ${this.id} ${this.#goneBecause}; it cannot be used any more`,
      });
    }
    return this.iommufd.requireFd(operation);
  }

  /** Map memory of this process by address (IOMMU_IOAS_MAP). Pins the pages. */
  map(source: MapSource, options: RangeOptions = {}): Mapping {
    const op = "IOMMU_IOAS_MAP";
    this.#requireAlive(op);
    const { address, size } = resolveMemory(source, op);
    const offset = options.offset === undefined ? 0 : (u64(options.offset, op, "options.offset") as number);
    if (offset >= size)
      throw argumentError(op, "options.offset", `offset ${offset} is past the end of the ${size}-byte source`);
    const length = options.length === undefined ? size - offset : positiveLength(options.length, op, "options.length");
    if (offset + length > size) {
      throw argumentError(
        op,
        "options.length",
        `${length} bytes from offset ${offset} run past the end of the ${size}-byte source`,
      );
    }
    const iova = fixedIova(options, op);
    const w = MAP.words;
    w[MAP.size] = iommu_ioas_map.size;
    w[MAP.flags] = mapFlags(options, op, iova);
    w[MAP.ioas] = this.id;
    w[MAP.reserved] = 0;
    putU64(w, MAP.userVa, address + offset);
    putU64(w, MAP.length, length);
    putU64(w, MAP.iova, iova ?? 0);
    const errno = this.iommufd.call(IOMMU_IOAS_MAP, mapCmd, op);
    if (errno) throw this.#mapError(op, errno, iova, length);
    return this.#record(getU64(w, MAP.iova), length, source);
  }

  /** Map a file range by fd (IOMMU_IOAS_MAP_FILE): a MemfdBuffer, a VFIO dma-buf, or a raw fd. */
  mapFile(file: MappableFile | number, options: RangeOptions = {}): Mapping {
    const op = "IOMMU_IOAS_MAP_FILE";
    this.#requireAlive(op);
    let fd: number;
    let size: number | undefined;
    // The common case first, without the object resolveFile() returns: this runs per I/O.
    if (file instanceof MemfdBuffer) {
      file.assertOpen(op);
      fd = file.fd;
      size = file.size;
    } else {
      ({ fd, size } = resolveFile(file, op));
    }
    const offset = options.offset === undefined ? 0 : (u64(options.offset, op, "options.offset") as number);
    let length: number;
    if (options.length === undefined) {
      if (size === undefined) throw argumentError(op, "options.length", "the file's size is unknown: give a length");
      if (offset >= size)
        throw argumentError(op, "options.offset", `offset ${offset} is at or past the end of the ${size}-byte file`);
      length = size - offset;
    } else {
      length = positiveLength(options.length, op, "options.length");
    }
    // With no domain attached the kernel accepts a range past the end of the file and fails only
    // later, at attach time: refuse it here, where the cause is clear.
    if (size !== undefined && offset + length > size) {
      throw argumentError(
        op,
        "options.length",
        `${length} bytes from offset ${offset} run past the end of the ${size}-byte file`,
      );
    }
    const iova = fixedIova(options, op);
    const w = MAP_FILE.words;
    w[MAP_FILE.size] = iommu_ioas_map_file.size;
    w[MAP_FILE.flags] = mapFlags(options, op, iova);
    w[MAP_FILE.ioas] = this.id;
    w[MAP_FILE.fd] = fd;
    putU64(w, MAP_FILE.start, offset);
    putU64(w, MAP_FILE.length, length);
    putU64(w, MAP_FILE.iova, iova ?? 0);
    const errno = this.iommufd.call(IOMMU_IOAS_MAP_FILE, mapFileCmd, op);
    if (errno) {
      const special = typeof file === "object" ? file.describeMapError?.(errno) : undefined;
      if (special) throw syscallError(op, errno, special, { argument: "file" });
      throw this.#mapError(op, errno, iova, length);
    }
    return this.#record(getU64(w, MAP_FILE.iova), length, file);
  }

  /**
   * Validate and encode a MAP_FILE once, for a buffer that is mapped and unmapped over and over
   * (per-I/O mapping). `map()` and `unmap()` on the result then issue one ioctl each with the
   * command already built: no argument checks, no encoding, no allocation per call.
   */
  prepareMapFile(file: MappableFile, options: RangeOptions = {}): PreparedMapping {
    const op = "Ioas.prepareMapFile";
    this.#requireAlive(op);
    const { fd, size } = resolveFile(file, op);
    if (typeof file !== "object" || !("closed" in file)) {
      throw argumentError(
        op,
        "file",
        "a prepared mapping needs a MemfdBuffer or DmaBuf (an object that knows when it is closed)",
      );
    }
    const offset = options.offset === undefined ? 0 : (u64(options.offset, op, "options.offset") as number);
    const fileSize = size ?? 0;
    const length =
      options.length === undefined ? fileSize - offset : positiveLength(options.length, op, "options.length");
    if (length <= 0 || offset + length > fileSize) {
      throw argumentError(
        op,
        "options.length",
        `${length} bytes from offset ${offset} do not fit in the ${fileSize}-byte file`,
      );
    }
    const iova = fixedIova(options, op);
    const prepared = new PreparedMapping(
      this,
      file as MappableFile & { readonly closed: boolean },
      fd,
      offset,
      length,
      mapFlags(options, op, iova),
      iova,
    );
    this.#prepared.add(prepared);
    return prepared;
  }

  /** @internal Forget a prepared mapping (it was released). */
  dropPrepared(prepared: PreparedMapping): void {
    this.#prepared.delete(prepared);
  }

  /** @internal For PreparedMapping: the same error text map() would give. */
  mapError(op: string, errno: number, iova: Iova | undefined, length: number, file: MappableFile): IommufdError {
    const special = file.describeMapError?.(errno);
    return special ? syscallError(op, errno, special, { argument: "file" }) : this.#mapError(op, errno, iova, length);
  }

  /** @internal For PreparedMapping: the same error text unmap() would give. */
  unmapError(op: string, errno: number, iova: Iova, length: number): IommufdError {
    return syscallError(op, errno, describeUnmapError(errno, iova, length), {
      hint:
        errno === ERRNO.ENOENT
          ? "the kernel also says ENOENT when the unmap itself failed: the range may still be mapped"
          : undefined,
    });
  }

  /**
   * Map the pages behind `srcIova..+length` of another IOAS into this one (IOMMU_IOAS_COPY),
   * without pinning them again. The range must cover whole mappings of the source.
   */
  copy(from: Ioas, options: CopyOptions): Mapping {
    const op = "IOMMU_IOAS_COPY";
    this.#requireAlive(op);
    if (!(from instanceof Ioas)) throw argumentError(op, "from", "the source must be an Ioas");
    from.#requireAlive(op);
    if (from.iommufd !== this.iommufd) {
      throw argumentError(op, "from", "both IOASes must belong to the same Iommufd");
    }
    const srcIova = u64(options.srcIova, op, "options.srcIova");
    const length = positiveLength(options.length, op, "options.length");
    const iova = fixedIova(options, op);
    const w = COPY.words;
    w[COPY.size] = iommu_ioas_copy.size;
    w[COPY.flags] = mapFlags(options, op, iova);
    w[COPY.dst] = this.id;
    w[COPY.src] = from.id;
    putU64(w, COPY.length, length);
    putU64(w, COPY.dstIova, iova ?? 0);
    putU64(w, COPY.srcIova, srcIova);
    const errno = this.iommufd.call(IOMMU_IOAS_COPY, copyCmd, op);
    if (errno) {
      if (errno === ERRNO.ENOENT) {
        throw syscallError(
          op,
          errno,
          `nothing is mapped at ${hex(srcIova)}..+${hex(length)} in IOAS ${from.id}, or the range does not cover whole mappings`,
        );
      }
      throw this.#mapError(op, errno, iova, length);
    }
    return this.#record(getU64(w, COPY.dstIova), length, from);
  }

  /**
   * Unmap every mapping inside `iova..+length` (IOMMU_IOAS_UNMAP). The range must not split a
   * mapping. Returns the bytes unmapped.
   */
  unmap(iova: number | bigint, length: number | bigint): number {
    const op = "IOMMU_IOAS_UNMAP";
    this.#requireAlive(op);
    const start = u64(iova, op, "iova");
    const len = typeof length === "bigint" ? u64(length, op, "length") : positiveLength(length, op, "length");
    if (len === 0n) throw argumentError(op, "length", "length is 0; there is nothing to unmap");
    const unmapped = this.#unmapRaw(start, len, op);
    const end = BigInt(start) + BigInt(len);
    for (const mapping of this.#mappings) {
      const mStart = BigInt(mapping.iova);
      if (mStart >= BigInt(start) && mStart + BigInt(mapping.length) <= end) this.#forget(mapping);
    }
    for (const prepared of this.#prepared) {
      const at = prepared.iova;
      if (at !== undefined && BigInt(at) >= BigInt(start) && BigInt(at) + BigInt(prepared.length) <= end)
        prepared.markUnmapped();
    }
    return unmapped;
  }

  /** Unmap everything in this IOAS. Returns the bytes unmapped. */
  unmapAll(): number {
    const op = "IOMMU_IOAS_UNMAP";
    this.#requireAlive(op);
    const unmapped = this.#unmapRaw(0, U64_ALL, op, true);
    for (const mapping of this.#mappings) this.#forget(mapping);
    for (const prepared of this.#prepared) prepared.markUnmapped();
    return unmapped;
  }

  #unmapRaw(iova: Iova, length: number | bigint, op: string, all = false): number {
    const w = UNMAP.words;
    w[UNMAP.size] = iommu_ioas_unmap.size;
    w[UNMAP.ioas] = this.id;
    putU64(w, UNMAP.iova, iova);
    putU64(w, UNMAP.length, length);
    const errno = this.iommufd.call(IOMMU_IOAS_UNMAP, unmapCmd, op);
    if (errno) {
      // ENOENT on unmap-all means "empty" only when nothing was recorded: the kernel also answers
      // ENOENT when the unmap itself failed, and then the mappings are still there.
      if (errno === ERRNO.ENOENT && all && this.#mappings.size === 0 && ![...this.#prepared].some((p) => p.mapped))
        return 0;
      throw syscallError(op, errno, describeUnmapError(errno, iova, length), {
        hint:
          errno === ERRNO.ENOENT
            ? "the kernel also says ENOENT when the unmap itself failed: the range may still be mapped"
            : undefined,
      });
    }
    return Number(getU64(w, UNMAP.length));
  }

  /** @internal Unmap one Mapping exactly. */
  unmapMapping(mapping: Mapping): void {
    const op = "Mapping.unmap";
    if (!this.#mappings.has(mapping)) {
      throw new IommufdError({
        operation: op,
        errno: ERRNO.ENOENT,
        message: `the mapping at IOVA ${hex(mapping.iova)} is already unmapped`,
      });
    }
    this.#requireAlive(op);
    this.#unmapRaw(mapping.iova, mapping.length, op);
    this.#forget(mapping);
  }

  /** @internal */
  isLive(mapping: Mapping): boolean {
    return this.#mappings.has(mapping);
  }

  /** The IOVA ranges usable in this IOAS and the required alignment (IOMMU_IOAS_IOVA_RANGES). */
  iovaRanges(): IovaRanges {
    const op = "IOMMU_IOAS_IOVA_RANGES";
    this.#requireAlive(op);
    // The kernel answers EMSGSIZE with the count when the array is too small: ask twice at most.
    let capacity = 8;
    for (;;) {
      const array = new Uint8Array(capacity * iommu_iova_range.size);
      rangesCmd.fill({
        size: iommu_ioas_iova_ranges.size,
        ioas_id: this.id,
        num_iovas: capacity,
        allowed_iovas: ptr(array),
      });
      const errno = this.iommufd.call(IOMMU_IOAS_IOVA_RANGES, rangesCmd, op);
      const count = rangesCmd.get("num_iovas");
      if (errno === ERRNO.EMSGSIZE && count > capacity) {
        capacity = count;
        continue;
      }
      if (errno) throw syscallError(op, errno);
      const view = new DataView(array.buffer);
      const ranges: IovaRange[] = [];
      for (let i = 0; i < count; i++) {
        const at = i * iommu_iova_range.size;
        ranges.push({
          start: normaliseIova(view.getBigUint64(at + iommu_iova_range.fields.start.offset, true)),
          last: normaliseIova(view.getBigUint64(at + iommu_iova_range.fields.last.offset, true)),
        });
      }
      return { ranges, alignment: rangesCmd.get("out_iova_alignment") };
    }
  }

  /**
   * Restrict where the kernel may place kernel-chosen IOVAs (IOMMU_IOAS_ALLOW_IOVAS). Fixed-IOVA
   * maps are not restricted. An empty list lifts the restriction.
   */
  allowIovas(ranges: readonly { start: number | bigint; last: number | bigint }[]): void {
    const op = "IOMMU_IOAS_ALLOW_IOVAS";
    this.#requireAlive(op);
    if (!Array.isArray(ranges)) throw argumentError(op, "ranges", "expected an array of { start, last }");
    const array = new Uint8Array(Math.max(1, ranges.length) * iommu_iova_range.size);
    const view = new DataView(array.buffer);
    ranges.forEach((range, i) => {
      const start = BigInt(u64(range?.start, op, `ranges[${i}].start`));
      const last = BigInt(u64(range?.last, op, `ranges[${i}].last`));
      if (last < start) throw argumentError(op, `ranges[${i}]`, `last ${hex(last)} is below start ${hex(start)}`);
      view.setBigUint64(i * 16, start, true);
      view.setBigUint64(i * 16 + 8, last, true);
    });
    allowCmd.fill({
      size: iommu_ioas_allow_iovas.size,
      ioas_id: this.id,
      num_iovas: ranges.length,
      allowed_iovas: ptr(array),
    });
    const errno = this.iommufd.call(IOMMU_IOAS_ALLOW_IOVAS, allowCmd, op);
    if (errno) {
      const message =
        errno === ERRNO.EINVAL
          ? "the ranges overlap, are unsorted, or exclude IOVAs that are already mapped or required by an attached device"
          : errno === ERRNO.EBUSY
            ? "an existing mapping or reserved range lies outside the new allowed ranges"
            : undefined;
      throw syscallError(op, errno, message, { argument: "ranges" });
    }
  }

  /** Whether the kernel may use huge IOMMU pages for this IOAS (IOMMU_OPTION_HUGE_PAGES). */
  get hugePages(): boolean {
    this.#requireAlive("IOMMU_OPTION");
    return this.iommufd.option(IOMMU_OPTION_HUGE_PAGES, this.id, IOMMU_OPTION_OP_GET, 0n) !== 0n;
  }

  set hugePages(enabled: boolean) {
    this.#requireAlive("IOMMU_OPTION");
    this.iommufd.option(IOMMU_OPTION_HUGE_PAGES, this.id, IOMMU_OPTION_OP_SET, enabled ? 1n : 0n);
  }

  /** Destroy the IOAS (IOMMU_DESTROY); the kernel unmaps whatever it still holds. Idempotent. */
  destroy(): void {
    if (!this.#alive) return;
    if (this.iommufd.closed) {
      this.markGone("is gone: its Iommufd was closed");
      return;
    }
    this.iommufd.destroyObject(this.id, "Ioas.destroy");
    this.markGone("was destroyed");
  }

  /** @internal The IOAS no longer exists (destroyed, or its iommufd closed). */
  markGone(because = "is gone: its Iommufd was closed"): void {
    this.#alive = false;
    this.#goneBecause = because;
    this.#mappings.clear();
    for (const prepared of this.#prepared) prepared.markUnmapped();
    this.#prepared.clear();
    this.iommufd.untrack(this);
  }

  [Symbol.dispose](): void {
    this.destroy();
  }

  #record(iova: Iova, length: number, source: unknown): Mapping {
    const mapping = new Mapping(this, iova, length, source);
    this.#mappings.add(mapping);
    return mapping;
  }

  #forget(mapping: Mapping): void {
    this.#mappings.delete(mapping);
  }

  #mapError(op: string, errno: number, iova: Iova | undefined, length: number): IommufdError {
    const where =
      iova === undefined ? `${hex(length)} bytes` : `IOVA range ${hex(iova)}..${hex(addIova(iova, length - 1))}`;
    switch (errno) {
      case ERRNO.EEXIST:
        return syscallError(op, errno, `${where} overlaps an existing mapping`, { argument: "options.iova" });
      case ERRNO.ENOSPC:
        return syscallError(op, errno, `no free IOVA range of ${hex(length)} bytes is left in IOAS ${this.id}`);
      case ERRNO.ENOMEM:
        return syscallError(
          op,
          errno,
          `cannot pin ${hex(length)} bytes: out of memory or over the locked-memory limit`,
          {
            hint: "raise RLIMIT_MEMLOCK (ulimit -l) or map less",
          },
        );
      case ERRNO.EFAULT:
        return syscallError(op, errno, "the source memory is not mapped in this process");
      case ERRNO.EBADF:
        return syscallError(op, errno, "the file descriptor is not open", { argument: "file" });
      case ERRNO.ENOENT:
        return syscallError(op, errno, `IOAS ${this.id} does not exist in this iommufd`);
      case ERRNO.EOVERFLOW:
        return syscallError(op, errno, `${where} wraps past the end of the 64-bit IOVA space`, {
          argument: "options.iova",
        });
      case ERRNO.EINVAL:
        return syscallError(op, errno, this.#explainInvalid(iova, length));
      default:
        return syscallError(op, errno, `cannot map ${where}`);
    }
  }

  /** EINVAL from a map: ask the kernel which rule the request broke, so the message can say it. */
  #explainInvalid(iova: Iova | undefined, length: number): string {
    if (iova === undefined)
      return `the kernel refused to map ${hex(length)} bytes (bad source, or a file type it cannot map)`;
    let info: IovaRanges;
    try {
      info = this.iovaRanges();
    } catch {
      return `the kernel refused IOVA ${hex(iova)}`;
    }
    if (BigInt(iova) % BigInt(info.alignment) !== 0n) {
      return `IOVA ${hex(iova)} is not aligned to this IOAS's IOVA alignment ${hex(info.alignment)}`;
    }
    const last = BigInt(iova) + BigInt(length) - 1n;
    const inside = info.ranges.some((r) => BigInt(r.start) <= BigInt(iova) && last <= BigInt(r.last));
    if (!inside) {
      const usable = info.ranges.map((r) => `${hex(r.start)}..${hex(r.last)}`).join(", ");
      return `IOVA range ${hex(iova)}..${hex(last)} is outside the usable ranges (${usable || "none"})`;
    }
    return `the kernel refused IOVA ${hex(iova)} (length ${hex(length)}): check alignment and the source`;
  }
}

/**
 * The live mappings of one IOAS, linked through the Mappings themselves. A Set costs a hashed
 * insert, a hashed delete and an allocated entry per map+unmap pair (about a third of the
 * library's own time per pair, measured by bench/hotpath.ts); links cost neither.
 */
class MappingList {
  #head: Mapping | null = null;
  #tail: Mapping | null = null;
  size = 0;

  add(mapping: Mapping): void {
    mapping._list = this;
    mapping._prev = this.#tail;
    mapping._next = null;
    if (this.#tail) this.#tail._next = mapping;
    else this.#head = mapping;
    this.#tail = mapping;
    this.size++;
  }

  has(mapping: Mapping): boolean {
    return mapping._list === this;
  }

  delete(mapping: Mapping): void {
    if (mapping._list !== this) return;
    const prev = mapping._prev;
    const next = mapping._next;
    if (prev) prev._next = next;
    else this.#head = next;
    if (next) next._prev = prev;
    else this.#tail = prev;
    mapping._list = mapping._prev = mapping._next = null;
    this.size--;
  }

  clear(): void {
    for (const mapping of this) mapping._list = mapping._prev = mapping._next = null;
    this.#head = this.#tail = null;
    this.size = 0;
  }

  /** Safe against deleting the mapping just returned. */
  *[Symbol.iterator](): IterableIterator<Mapping> {
    for (let mapping = this.#head; mapping; ) {
      const next: Mapping | null = mapping._next;
      yield mapping;
      mapping = next;
    }
  }
}

/** One mapping in an IOAS. Unmapped by unmap(), by `using`, or when its IOAS or iommufd goes. */
export class Mapping {
  readonly ioas: Ioas;
  readonly iova: Iova;
  readonly length: number;
  /** What was mapped; kept referenced so it cannot be collected while the device may use it. */
  readonly source: unknown;
  /** @internal Links of the IOAS's list of live mappings. */
  _list: MappingList | null = null;
  /** @internal */
  _prev: Mapping | null = null;
  /** @internal */
  _next: Mapping | null = null;

  /** @internal */
  constructor(ioas: Ioas, iova: Iova, length: number, source: unknown) {
    this.ioas = ioas;
    this.iova = iova;
    this.length = length;
    this.source = source;
  }

  get mapped(): boolean {
    return this.ioas.isLive(this);
  }

  /** The IOVA just past the end. */
  get end(): Iova {
    return addIova(this.iova, this.length);
  }

  /**
   * Unmap exactly this range. If the kernel fails, the mapping stays recorded as live (it may
   * well still be mapped) and unmap() can be called again.
   */
  unmap(): void {
    this.ioas.unmapMapping(this);
  }

  [Symbol.dispose](): void {
    if (this.mapped) this.unmap();
  }
}

/**
 * A MAP_FILE validated and encoded once (Ioas.prepareMapFile): map() and unmap() issue one ioctl
 * each. At most one mapping of it exists at a time; the Ioas keeps track of it like a Mapping.
 */
export class PreparedMapping {
  readonly ioas: Ioas;
  readonly file: MappableFile;
  readonly length: number;
  #mapped = false;
  #iova: Iova | undefined;
  readonly #fixed: boolean;
  readonly #map = iommu_ioas_map_file.create();
  readonly #unmap = iommu_ioas_unmap.create();
  readonly #isClosed: () => boolean;

  /** @internal Created by Ioas.prepareMapFile(). */
  constructor(
    ioas: Ioas,
    file: MappableFile & { readonly closed: boolean },
    fd: number,
    offset: number,
    length: number,
    flags: number,
    iova: Iova | undefined,
  ) {
    this.ioas = ioas;
    this.file = file;
    this.length = length;
    this.#fixed = iova !== undefined;
    this.#iova = iova;
    this.#isClosed = () => file.closed;
    this.#map.fill({
      size: iommu_ioas_map_file.size,
      flags,
      ioas_id: ioas.id,
      fd,
      start: offset,
      length,
      iova: iova ?? 0,
    });
    this.#unmap.fill({ size: iommu_ioas_unmap.size, ioas_id: ioas.id, iova: iova ?? 0, length });
  }

  get mapped(): boolean {
    return this.#mapped;
  }

  /** The IOVA of the current (or, for a fixed IOVA, every) mapping; undefined before the first map. */
  get iova(): Iova | undefined {
    return this.#iova;
  }

  /** IOMMU_IOAS_MAP_FILE with the prepared command. Returns the IOVA. */
  map(): Iova {
    const op = "PreparedMapping.map";
    if (this.#mapped) {
      throw new IommufdError({
        operation: op,
        errno: ERRNO.EEXIST,
        message: `already mapped at IOVA ${hex(this.#iova!)}; unmap it first`,
      });
    }
    // The fd number of a closed file may already belong to another file: never map it blindly.
    if (this.#isClosed()) throw closedFileError(op);
    if (this.ioas.destroyed) {
      throw new IommufdError({ operation: op, errno: ERRNO.EBADF, message: `IOAS ${this.ioas.id} no longer exists` });
    }
    const errno = this.ioas.iommufd.call(IOMMU_IOAS_MAP_FILE, this.#map, op);
    if (errno) throw this.ioas.mapError(op, errno, this.#fixed ? this.#iova : undefined, this.length, this.file);
    if (!this.#fixed) {
      const words = this.#map.u32;
      const at = getU64(words, MAP_FILE.iova);
      this.#iova = at;
      putU64(this.#unmap.u32, UNMAP.iova, at);
    }
    this.#mapped = true;
    return this.#iova!;
  }

  /** IOMMU_IOAS_UNMAP of exactly this mapping. On failure it stays mapped and can be retried. */
  unmap(): void {
    const op = "PreparedMapping.unmap";
    if (!this.#mapped) throw new IommufdError({ operation: op, errno: ERRNO.ENOENT, message: "not mapped" });
    const errno = this.ioas.iommufd.call(IOMMU_IOAS_UNMAP, this.#unmap, op);
    if (errno) throw this.ioas.unmapError(op, errno, this.#iova!, this.length);
    this.#mapped = false;
  }

  /** @internal The range was unmapped another way (unmapAll, a range unmap, the IOAS went away). */
  markUnmapped(): void {
    this.#mapped = false;
  }

  /** Unmap if mapped, and stop tracking. */
  release(): void {
    if (this.#mapped && !this.ioas.destroyed) this.unmap();
    this.ioas.dropPrepared(this);
  }

  [Symbol.dispose](): void {
    this.release();
  }
}

function closedFileError(operation: string): IommufdError {
  return new IommufdError({
    operation,
    errno: ERRNO.EBADF,
    argument: "file",
    message: "the prepared file was closed; prepare again with an open one",
  });
}

function fixedIova(options: MapOptions, op: string): Iova | undefined {
  return options.iova === undefined ? undefined : normaliseIova(u64(options.iova, op, "options.iova"));
}

function mapFlags(options: MapOptions, op: string, iova: Iova | undefined): number {
  const readable = options.readable ?? true;
  const writable = options.writable ?? true;
  if (!readable && !writable) {
    throw argumentError(op, "options", "a mapping must be readable, writable or both");
  }
  return (
    (readable ? IOMMU_IOAS_MAP_READABLE : 0) |
    (writable ? IOMMU_IOAS_MAP_WRITEABLE : 0) |
    (iova === undefined ? 0 : IOMMU_IOAS_MAP_FIXED_IOVA)
  );
}

function resolveMemory(source: MapSource, op: string): { address: number; size: number } {
  if (source instanceof MemfdBuffer) {
    return { address: source.address, size: source.size };
  }
  if (source instanceof ArrayBuffer) {
    if (source.byteLength === 0) throw argumentError(op, "source", "the ArrayBuffer is empty (or detached)");
    return { address: ptr(new Uint8Array(source)), size: source.byteLength };
  }
  if (ArrayBuffer.isView(source)) {
    if (source.byteLength === 0) throw argumentError(op, "source", "the view is empty (or its buffer is detached)");
    return { address: ptr(source as Uint8Array), size: source.byteLength };
  }
  if (source && typeof source === "object" && "address" in source && "length" in source) {
    const address = u64(source.address, op, "source.address");
    if (typeof address !== "number" || address === 0) throw argumentError(op, "source.address", "not a valid address");
    return { address, size: positiveLength(source.length, op, "source.length") };
  }
  throw argumentError(op, "source", "expected an ArrayBuffer, a typed array, a MemfdBuffer or { address, length }");
}

function resolveFile(file: MappableFile | number, op: string): { fd: number; size: number | undefined } {
  if (typeof file === "number") {
    requireOpenFd(file, op, "file");
    const stat = fstat(file, op);
    return { fd: file, size: stat.size > 0 ? stat.size : undefined };
  }
  if (file instanceof MemfdBuffer) {
    file.assertOpen(op);
    return { fd: file.fd, size: file.size };
  }
  if (file && typeof file === "object" && "fd" in file) {
    return { fd: file.fd, size: file.size };
  }
  throw argumentError(op, "file", "expected a MemfdBuffer, a DmaBuf or a file descriptor");
}

function describeUnmapError(errno: number, iova: Iova, length: number | bigint): string {
  if (errno === ERRNO.ENOENT) {
    return `no mapping covers exactly ${hex(iova)}..+${hex(length)} (an unmap must not split a mapping), or the unmap failed`;
  }
  if (errno === ERRNO.EBUSY) return "a device access to the range is in progress";
  return `cannot unmap ${hex(iova)}..+${hex(length)}`;
}
