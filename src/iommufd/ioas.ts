/**
 * Ioas: one I/O address space inside an Iommufd, and the Mappings in it.
 *
 * The library's view of what is mapped follows the kernel's answers only: a Mapping is forgotten
 * when an unmap succeeded (or the IOAS/iommufd went away), never because an unmap failed.
 */
import type { DmaSpace } from "../dma/space.ts";
import { MemfdBuffer } from "../memory/memfd.ts";
import { argumentError, closedError } from "../sys/error.ts";
import { ioctl, isErrno } from "../sys/ioctl.ts";
import { hex, type Iova, positiveLength, rangeLength, rangeOffset, U64_MAX, u64 } from "../sys/validate.ts";
import {
  IOMMU_IOAS_MAP,
  IOMMU_IOAS_MAP_FILE,
  IOMMU_IOAS_UNMAP,
  IOMMU_OPTION_HUGE_PAGES,
  IOMMU_OPTION_OP_GET,
  IOMMU_OPTION_OP_SET,
  iommu_ioas_map,
  iommu_ioas_map_file,
  iommu_ioas_unmap,
} from "../uapi/iommufd.ts";
import {
  allowIovas,
  encodeMap,
  encodeMapFile,
  encodeUnmap,
  ioasCopy,
  type IovaRange,
  type IovaRanges,
  MAP_ERRORS,
  MAP_FILE_ERRORS,
  mappedIova,
  readIovaRanges,
  UNMAP_ERRORS,
  unmappedBytes,
} from "./ioctls.ts";
import { missingFeatureError } from "./features.ts";
import type { Iommufd } from "./iommufd.ts";
import {
  type CopyOptions,
  fixedIova,
  mapFlags,
  type MapSource,
  type MappableFile,
  type RangeOptions,
  resolveFile,
  resolveMemory,
} from "./map-arguments.ts";
import { Mapping, MappingList, PreparedMapping } from "./mapping.ts";

export { Mapping, PreparedMapping } from "./mapping.ts";
export type { Iova, IovaRange, IovaRanges };

// The 4 KiB path encodes into these and allocates nothing; see src/iommufd/ioctls.ts.
const mapCmd = iommu_ioas_map.create();
const mapFileCmd = iommu_ioas_map_file.create();
const unmapCmd = iommu_ioas_unmap.create();

/** The operation a mapFile names when the kernel lacks MAP_FILE and the buffer is mapped by address. */
const MAP_BY_ADDRESS = "IOMMU_IOAS_MAP (mapFile on a kernel without IOMMU_IOAS_MAP_FILE)";

/** The address to MAP instead of a file: only a MemfdBuffer has one in this process. */
function addressForMap(file: MappableFile | number, operation: string): number {
  if (file instanceof MemfdBuffer) return file.address;
  const what = typeof file === "number" ? "a bare fd" : "a dma-buf";
  throw missingFeatureError(
    operation,
    "mapFile",
    `${what} has no address in this process to map instead (a MemfdBuffer would be mapped by address)`,
  );
}

export class Ioas implements DmaSpace {
  readonly backend = "iommufd";
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

  /**
   * @internal Whether the mappings this object knows of (plain and prepared) cover
   * `start..end` without a hole; undefined when it knows of none (an adopted IOAS, say).
   */
  coversRange(start: number, end: number): boolean | undefined {
    const spans: [number, number][] = [];
    for (const m of this.#mappings) spans.push([Number(m.iova), Number(m.iova) + m.length]);
    for (const p of this.#prepared) if (p.mapped) spans.push([Number(p.iova), Number(p.iova) + p.length]);
    if (spans.length === 0) return undefined;
    spans.sort((a, b) => a[0] - b[0]);
    let reached = start;
    for (const [from, to] of spans) {
      if (to <= reached) continue;
      if (from > reached) break;
      reached = to;
      if (reached >= end) return true;
    }
    return reached >= end;
  }

  /** Live mappings this object made (and has not seen unmapped). */
  get mappings(): readonly Mapping[] {
    return [...this.#mappings];
  }

  /**
   * @internal Throws EBADF once the IOAS or its Iommufd is gone (naming `argument`, when the IOAS
   * was one); the iommufd's fd otherwise.
   */
  assertOpen(operation: string, argument?: string): number {
    if (!this.#alive) throw this.#goneError(operation, argument);
    return this.iommufd.assertOpen(operation);
  }

  // Out of line: the checks that run per map stay small enough to be inlined.
  #goneError(operation: string, argument?: string): Error {
    return closedError(operation, `IOAS ${this.id}`, this.#goneBecause, argument);
  }

  /** Map memory of this process by address (IOMMU_IOAS_MAP). Pins the pages. */
  map(source: MapSource, options: RangeOptions = {}): Mapping {
    const op = "IOMMU_IOAS_MAP";
    const fd = this.assertOpen(op);
    let address: number;
    let size: number;
    // As in mapFile: the common source without the object resolveMemory() returns.
    if (source instanceof MemfdBuffer) {
      source.assertOpen(op);
      address = source.address;
      size = source.size;
    } else {
      ({ address, size } = resolveMemory(source, op));
    }
    const offset = rangeOffset(options, size, op, "source");
    const length = rangeLength(options, offset, size, op, "source");
    const iova = fixedIova(options, op);
    encodeMap(mapCmd, mapFlags(options, op, iova), this.id, address + offset, length, iova);
    ioctl(fd, IOMMU_IOAS_MAP, mapCmd, op, MAP_ERRORS);
    return this.#record(mappedIova(mapCmd), length, source);
  }

  /** Map a file range by fd (IOMMU_IOAS_MAP_FILE): a MemfdBuffer, a VFIO dma-buf, or a raw fd. */
  mapFile(file: MappableFile | number, options: RangeOptions = {}): Mapping {
    const op = "IOMMU_IOAS_MAP_FILE";
    const iommufdFd = this.assertOpen(op);
    let fd: number;
    let size: number | undefined;
    // The common case first, without the object resolveFile() returns: this runs per I/O.
    if (file instanceof MemfdBuffer) {
      fd = file.assertOpen(op);
      size = file.size;
    } else {
      ({ fd, size } = resolveFile(file, op));
    }
    // With no domain attached the kernel accepts a range past the end of the file and fails only
    // later, at attach time: rangeLength refuses it here, where the cause is clear.
    const offset = rangeOffset(options, size, op, "file");
    const length = rangeLength(options, offset, size, op, "file");
    const iova = fixedIova(options, op);
    const flags = mapFlags(options, op, iova);
    if (!this.iommufd.features.mapFile) return this.#mapFileByAddress(iommufdFd, file, flags, offset, length, iova);
    encodeMapFile(mapFileCmd, flags, this.id, fd, offset, length, iova);
    ioctl(iommufdFd, IOMMU_IOAS_MAP_FILE, mapFileCmd, op, MAP_FILE_ERRORS, file);
    return this.#record(mappedIova(mapFileCmd), length, file);
  }

  /**
   * Before Linux 6.13: a MemfdBuffer is mapped into this process anyway, and MAP of that mapping
   * pins the very pages MAP_FILE would, so the caller gets the same Mapping. Out of line: every
   * byte of mapFile's body counts against the JIT's inlining budget on the per-I/O path.
   */
  #mapFileByAddress(
    iommufdFd: number,
    file: MappableFile | number,
    flags: number,
    offset: number,
    length: number,
    iova: Iova | undefined,
  ): Mapping {
    encodeMap(mapCmd, flags, this.id, addressForMap(file, "IOMMU_IOAS_MAP_FILE") + offset, length, iova);
    ioctl(iommufdFd, IOMMU_IOAS_MAP, mapCmd, MAP_BY_ADDRESS, MAP_ERRORS);
    return this.#record(mappedIova(mapCmd), length, file);
  }

  /**
   * Map memory for device DMA (the DmaSpace seam): a MemfdBuffer by file, which pins the file's
   * own pages whatever this process does with its view, and any other source by address.
   */
  mapDma(source: MapSource, options: RangeOptions = {}): Mapping {
    return source instanceof MemfdBuffer ? this.mapFile(source, options) : this.map(source, options);
  }

  /**
   * Validate and encode a MAP_FILE once, for a buffer that is mapped and unmapped over and over
   * (per-I/O mapping). `map()` and `unmap()` on the result then issue one ioctl each with the
   * command already built: no argument checks, no encoding, no allocation per call.
   */
  prepareMapFile(file: MappableFile, options: RangeOptions = {}): PreparedMapping {
    const op = "Ioas.prepareMapFile";
    this.assertOpen(op);
    const { fd, size } = resolveFile(file, op);
    if (typeof file !== "object" || !("closed" in file)) {
      throw argumentError(
        op,
        "file",
        "a prepared mapping needs a MemfdBuffer or DmaBuf (an object that knows when it is closed)",
      );
    }
    const offset = rangeOffset(options, size, op, "file");
    const length = rangeLength(options, offset, size, op, "file");
    const iova = fixedIova(options, op);
    const flags = mapFlags(options, op, iova);
    const closable = file as MappableFile & { readonly closed: boolean };
    const byAddress = this.iommufd.features.mapFile ? undefined : addressForMap(file, op) + offset;
    const prepared = new PreparedMapping(this, closable, fd, offset, length, flags, iova, byAddress);
    this.#prepared.add(prepared);
    return prepared;
  }

  /** @internal Forget a prepared mapping (it was released). */
  dropPrepared(prepared: PreparedMapping): void {
    this.#prepared.delete(prepared);
  }

  /**
   * Map the pages behind `srcIova..+length` of another IOAS into this one (IOMMU_IOAS_COPY),
   * without pinning them again. The range must cover whole mappings of the source.
   */
  copy(from: Ioas, options: CopyOptions): Mapping {
    const op = "IOMMU_IOAS_COPY";
    const fd = this.assertOpen(op);
    if (!(from instanceof Ioas)) throw argumentError(op, "from", "the source must be an Ioas");
    from.assertOpen(op);
    if (from.iommufd !== this.iommufd) {
      throw argumentError(op, "from", "both IOASes must belong to the same Iommufd");
    }
    const srcIova = u64(options.srcIova, op, "options.srcIova");
    const length = positiveLength(options.length, op, "options.length");
    const iova = fixedIova(options, op);
    const at = ioasCopy(fd, mapFlags(options, op, iova), this.id, from.id, length, iova, srcIova, op);
    return this.#record(at, length, from);
  }

  /**
   * Unmap every mapping inside `iova..+length` (IOMMU_IOAS_UNMAP). The range must not split a
   * mapping. Returns the bytes unmapped.
   */
  unmap(iova: number | bigint, length: number | bigint): number {
    const op = "IOMMU_IOAS_UNMAP";
    const fd = this.assertOpen(op);
    const start = u64(iova, op, "iova");
    const len = typeof length === "bigint" ? u64(length, op, "length") : positiveLength(length, op, "length");
    if (len === 0n) throw argumentError(op, "length", "length is 0; there is nothing to unmap");
    this.#unmapRaw(fd, start, len, op);
    const unmapped = unmappedBytes(unmapCmd);
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
    const fd = this.assertOpen(op);
    let unmapped: number;
    try {
      this.#unmapRaw(fd, 0, U64_MAX, op);
      unmapped = unmappedBytes(unmapCmd);
    } catch (error) {
      // ENOENT on unmap-all means "empty" only when nothing was recorded: the kernel also answers
      // ENOENT when the unmap itself failed, and then the mappings are still there.
      const nothingRecorded = this.#mappings.size === 0 && ![...this.#prepared].some((p) => p.mapped);
      if (isErrno(error, "ENOENT") && nothingRecorded) return 0;
      throw error;
    }
    for (const mapping of this.#mappings) this.#forget(mapping);
    for (const prepared of this.#prepared) prepared.markUnmapped();
    return unmapped;
  }

  /** IOMMU_IOAS_UNMAP through the shared command; the bytes unmapped are then in unmapCmd. */
  #unmapRaw(fd: number, iova: Iova, length: number | bigint, op: string): void {
    encodeUnmap(unmapCmd, this.id, iova, length);
    ioctl(fd, IOMMU_IOAS_UNMAP, unmapCmd, op, UNMAP_ERRORS);
  }

  /** @internal */
  isLive(mapping: Mapping): boolean {
    return this.#mappings.has(mapping);
  }

  /** The IOVA ranges usable in this IOAS and the required alignment (IOMMU_IOAS_IOVA_RANGES). */
  iovaRanges(): IovaRanges {
    const op = "IOMMU_IOAS_IOVA_RANGES";
    return readIovaRanges(this.assertOpen(op), this.id, op);
  }

  /**
   * Restrict where the kernel may place kernel-chosen IOVAs (IOMMU_IOAS_ALLOW_IOVAS). Fixed-IOVA
   * maps are not restricted. An empty list lifts the restriction.
   */
  allowIovas(ranges: readonly { start: number | bigint; last: number | bigint }[]): void {
    const op = "IOMMU_IOAS_ALLOW_IOVAS";
    const fd = this.assertOpen(op);
    if (!Array.isArray(ranges)) throw argumentError(op, "ranges", "expected an array of { start, last }");
    const checked = ranges.map((range, i) => {
      const start = BigInt(u64(range?.start, op, `ranges[${i}].start`));
      const last = BigInt(u64(range?.last, op, `ranges[${i}].last`));
      if (last < start) throw argumentError(op, `ranges[${i}]`, `last ${hex(last)} is below start ${hex(start)}`);
      return { start, last };
    });
    allowIovas(fd, this.id, checked, op);
  }

  /** Whether the kernel may use huge IOMMU pages for this IOAS (IOMMU_OPTION_HUGE_PAGES). */
  get hugePages(): boolean {
    this.assertOpen("IOMMU_OPTION");
    return this.iommufd.option(IOMMU_OPTION_HUGE_PAGES, this.id, IOMMU_OPTION_OP_GET, 0n) !== 0n;
  }

  set hugePages(enabled: boolean) {
    this.assertOpen("IOMMU_OPTION");
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
}
