/**
 * What Ioas.map, mapFile, prepareMapFile and copy accept, and the checks that turn it into
 * command values: each argument is checked here once, with one wording, whatever call passed it.
 */
import { ptr } from "bun:ffi";
import { MemfdBuffer } from "../memory/memfd.ts";
import { argumentError } from "../sys/error.ts";
import { fstat, requireOpenFd } from "../sys/fd.ts";
import { type Iova, normaliseIova, positiveLength, u64 } from "../sys/validate.ts";
import { IOMMU_IOAS_MAP_FIXED_IOVA, IOMMU_IOAS_MAP_READABLE, IOMMU_IOAS_MAP_WRITEABLE } from "../uapi/iommufd.ts";

/** Options shared by map(), mapFile() and copy(). */
export interface MapOptions {
  /** Fixed IOVA. Without it the kernel picks one (inside the allowed ranges, if any). */
  iova?: number | bigint;
  /**
   * Device may read (DMA to device). Default true. false is a request: Intel's driver before its
   * generic page table (e.g. 6.12) leaves every entry readable.
   */
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

export interface CopyOptions extends MapOptions {
  srcIova: number | bigint;
  length: number;
}

export function fixedIova(options: MapOptions, op: string): Iova | undefined {
  const iova = options.iova;
  return iova === undefined ? undefined : normaliseIova(u64(iova, op, "options.iova"));
}

const READ_WRITE = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE;

export function mapFlags(options: MapOptions, op: string, iova: Iova | undefined): number {
  const fixed = iova === undefined ? 0 : IOMMU_IOAS_MAP_FIXED_IOVA;
  if (options.readable === undefined && options.writable === undefined) return READ_WRITE | fixed;
  return accessFlags(options, op) | fixed;
}

function accessFlags(options: MapOptions, op: string): number {
  const readable = options.readable ?? true;
  const writable = options.writable ?? true;
  if (!readable && !writable) {
    throw argumentError(op, "options", "a mapping must be readable, writable or both");
  }
  return (readable ? IOMMU_IOAS_MAP_READABLE : 0) | (writable ? IOMMU_IOAS_MAP_WRITEABLE : 0);
}

export function resolveMemory(source: MapSource, op: string): { address: number; size: number } {
  if (source instanceof MemfdBuffer) {
    source.assertOpen(op);
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

export function resolveFile(file: MappableFile | number, op: string): { fd: number; size: number | undefined } {
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
