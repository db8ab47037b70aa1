/**
 * The mappings an Ioas makes: Mapping (one range mapped by map, mapFile or copy, linked into its
 * IOAS's list of live mappings) and PreparedMapping (a MAP_FILE encoded once, mapped and unmapped
 * over and over).
 */
import { argumentError, stateError } from "../sys/error.ts";
import { addIova, hex, type Iova } from "../sys/validate.ts";
import { ioctl } from "../sys/ioctl.ts";
import {
  IOMMU_IOAS_MAP,
  IOMMU_IOAS_MAP_FILE,
  IOMMU_IOAS_UNMAP,
  iommu_ioas_map,
  iommu_ioas_map_file,
  iommu_ioas_unmap,
} from "../uapi/iommufd.ts";
import type { Ioas } from "./ioas.ts";
import {
  encodeMap,
  encodeMapFile,
  encodeUnmap,
  MAP_ERRORS,
  MAP_FILE_ERRORS,
  mappedIova,
  UNMAP_ERRORS,
} from "./ioctls.ts";
import type { MappableFile } from "./map-arguments.ts";

/**
 * The live mappings of one IOAS, linked through the Mappings themselves. A Set costs a hashed
 * insert, a hashed delete and an allocated entry per map+unmap pair (about a third of the
 * library's own time per pair, measured by bench/hotpath.ts); links cost neither.
 */
export class MappingList {
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

/** Mapping.unmap encodes into this one and allocates nothing. */
const unmapCmd = iommu_ioas_unmap.create();

function staleMappingError(op: string, mapping: Mapping): Error {
  return stateError(op, "ENOENT", `the mapping at IOVA ${hex(mapping.iova)} is already unmapped`);
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
    // The IOAS's work done here rather than in an Ioas method: one call level less on the per-I/O
    // path lets the JIT inline the whole unmap (bench/hotpath.ts: 65-70 -> 41-44 ns per pair).
    const op = "Mapping.unmap";
    const list = this._list;
    if (list === null) throw staleMappingError(op, this);
    const ioas = this.ioas;
    const fd = ioas.assertOpen(op);
    encodeUnmap(unmapCmd, ioas.id, this.iova, this.length);
    ioctl(fd, IOMMU_IOAS_UNMAP, unmapCmd, op, UNMAP_ERRORS);
    list.delete(this);
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
  readonly #map;
  /** Mapped with IOMMU_IOAS_MAP of the buffer's address: the kernel lacks MAP_FILE. */
  readonly #byAddress: boolean;
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
    byAddress?: number,
  ) {
    this.ioas = ioas;
    this.file = file;
    this.length = length;
    this.#fixed = iova !== undefined;
    this.#iova = iova;
    this.#isClosed = () => file.closed;
    if (byAddress === undefined) {
      this.#map = iommu_ioas_map_file.create();
      this.#byAddress = false;
      encodeMapFile(this.#map, flags, ioas.id, fd, offset, length, iova);
    } else {
      this.#map = iommu_ioas_map.create();
      this.#byAddress = true;
      encodeMap(this.#map, flags, ioas.id, byAddress, length, iova);
    }
    encodeUnmap(this.#unmap, ioas.id, iova ?? 0, length);
  }

  get mapped(): boolean {
    return this.#mapped;
  }

  /** The IOVA of the current (or, for a fixed IOVA, every) mapping; undefined before the first map. */
  get iova(): Iova | undefined {
    return this.#iova;
  }

  /** The prepared IOMMU_IOAS_MAP_FILE (or MAP by address: see the constructor). Returns the IOVA. */
  map(): Iova {
    const op = "PreparedMapping.map";
    if (this.#mapped) {
      throw stateError(op, "EEXIST", `already mapped at IOVA ${hex(this.#iova!)}; unmap it first`);
    }
    // The fd number of a closed file may already belong to another file: never map it blindly.
    if (this.#isClosed()) {
      throw argumentError(op, "file", "the prepared file was closed; prepare again with an open one", "EBADF");
    }
    const fd = this.ioas.assertOpen(op);
    if (this.#byAddress) ioctl(fd, IOMMU_IOAS_MAP, this.#map, op, MAP_ERRORS);
    else ioctl(fd, IOMMU_IOAS_MAP_FILE, this.#map, op, MAP_FILE_ERRORS, this.file);
    if (!this.#fixed) {
      const at = mappedIova(this.#map);
      this.#iova = at;
      encodeUnmap(this.#unmap, this.ioas.id, at, this.length);
    }
    this.#mapped = true;
    return this.#iova!;
  }

  /** IOMMU_IOAS_UNMAP of exactly this mapping. On failure it stays mapped and can be retried. */
  unmap(): void {
    const op = "PreparedMapping.unmap";
    if (!this.#mapped) throw stateError(op, "ENOENT", "not mapped");
    ioctl(this.ioas.assertOpen(op), IOMMU_IOAS_UNMAP, this.#unmap, op, UNMAP_ERRORS);
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
