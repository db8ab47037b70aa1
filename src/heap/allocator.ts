/**
 * OffsetAllocator: the sub-allocator of a DMA heap. It hands out byte offsets inside one region of
 * `capacity` bytes and knows nothing about memory, file descriptors or the kernel.
 *
 * Algorithm: TLSF (two-level segregated fit).
 *
 * - Everything is kept in units of the granule (`minBlock`, default 4096, the IOMMU page size, so
 *   every buffer starts on its own page and can later be mapped or exported on its own). Sizes are
 *   rounded up to it.
 * - The region is tiled by blocks, each free or used, linked to their physical neighbours. Free
 *   neighbours are merged the moment a block is freed, so two free blocks are never adjacent and
 *   freeing everything leaves exactly one free block of the whole capacity.
 * - Free blocks sit in segregated lists. A size of n granules falls in first level
 *   fl = floor(log2 n) - 4 and second level sl = the next 5 bits below the leading one (32 linear
 *   slots per power of two); sizes under 32 granules get one exact class each (fl 0, sl = n).
 *   One bitmap word per first level marks non-empty second-level lists and two words mark
 *   non-empty first levels, so finding a list is a couple of `Math.clz32` scans.
 * - alloc rounds the request up to the next class boundary and takes the head of the first
 *   non-empty list at or above it: every block there fits, no list is walked. The block is split,
 *   the remainder goes back to the free lists.
 * - Alignment above the granule: first the unpadded search is tried and kept if its block happens
 *   to contain an aligned placement; otherwise the search asks for size + align - granule, which
 *   always contains one, and the leading remainder is split off as a free block of its own.
 * - Block metadata lives in one preallocated buffer of 32-byte records indexed by slot (grown by
 *   doubling), so a block's fields share a cache line; free lists are intrusive doubly linked
 *   lists of slots; offset -> slot of live allocations is a direct Int32Array when
 *   capacity/granule <= 2^22 (at most 16 MiB) or an open-addressing hash table otherwise. The hot
 *   path allocates no JS objects.
 *
 * Worst case, time: alloc, free and sizeOf are O(1): at most three bitmap scans, two list unlinks,
 * two splits or two merges, one table lookup. Growth of the slot arrays and of the hash table is
 * amortised O(1) (doubling). stats() is O(free blocks in the largest non-empty class) because the
 * largest free block is found by walking that one list; it is not meant for hot paths.
 *
 * Worst case, space and fragmentation:
 * - Internal: below one granule per allocation (rounding); blocks are split exactly, so class
 *   rounding wastes nothing.
 * - Search false negative (the price of O(1)): alloc is guaranteed to succeed only if some free
 *   block has at least T(n) granules, where n = size in granules (+ align/granule - 1 when the
 *   alignment exceeds the granule) and T rounds n up to its class boundary, T(n) < n * (1 + 1/32)
 *   and T(n) = n below 64 granules. A block in [n, T(n)) shares the request's class; only the head
 *   of that list is looked at before giving up, so ENOMEM can be reported while such a block, not
 *   at the head, exists. With alignment the padding adds up to align - granule on top.
 * - External: like any allocator that cannot move blocks, an adversarial sequence can leave free
 *   space split into gaps each smaller than the next request. Immediate merging bounds the number
 *   of free blocks by liveAllocations + 1, so the largest free block is at least
 *   bytesFree / (liveAllocations + 1).
 * - Metadata: 32 bytes per block (blocks <= 2 * liveAllocations + 1), plus 4 bytes per granule of
 *   capacity for the direct table, or 24 to 48 bytes per live allocation for the hash table.
 */
import { argumentError, type IommufdError, ioError } from "../sys/error.ts";
import { hex } from "../sys/validate.ts";

export interface OffsetAllocatorOptions {
  /** Granule in bytes, a power of two: sizes are rounded up to it and offsets are multiples of it. Default 4096. */
  minBlock?: number;
  /** Largest alignment alloc accepts, a power of two >= minBlock: the page size of the region. Default 2 MiB. */
  maxAlign?: number;
  /** Prefix of error operations, e.g. `DmaHeap` gives `DmaHeap.alloc`. Default `OffsetAllocator`. */
  operationPrefix?: string;
}

export interface OffsetAllocatorStats {
  capacity: number;
  /** Sum of the rounded sizes of live allocations. */
  bytesInUse: number;
  bytesFree: number;
  /** Size of the largest free block; a request this big can still fail (see "search false negative" above). */
  largestFree: number;
  liveAllocations: number;
  /** Number of free blocks; 1 when nothing is allocated. */
  freeBlocks: number;
}

const SL_BITS = 5;
const SL_COUNT = 1 << SL_BITS;
/** Sizes below this many granules get one exact class each. */
const SMALL = SL_COUNT;
/** capacity < 2^48 and granule >= 1, so n < 2^48 and floor(log2 n) - 4 <= 43. */
const FL_COUNT = 44;
const MAX_CAPACITY = 2 ** 48;
const TWO_32 = 4294967296;
/** Above this many granules the direct offset table would cost more than 16 MiB. */
const DIRECT_LIMIT = 1 << 22;
const INITIAL_SLOTS = 64;
const INITIAL_HASH = 1024;

// Slot layout, 32 bytes so two slots share a cache line: offset and length (granules) as
// float64 words 0 and 1; prevPhys, nextPhys, prevFree and nextFree as int32 words 4..7.
// prevFree doubles as the state: >= -1 on a free block, USED or UNUSED otherwise.
const F_STRIDE = 4;
const I_STRIDE = 8;
const I_PREV_PHYS = 4;
const I_NEXT_PHYS = 5;
const I_PREV_FREE = 6;
const I_NEXT_FREE = 7;
const USED = -2;
const UNUSED = -3;

const POW2 = new Float64Array(64);
for (let i = 0; i < 64; i++) POW2[i] = 2 ** i;

function isPowerOfTwo(x: number): boolean {
  return Number.isInteger(x) && x >= 1 && 2 ** Math.round(Math.log2(x)) === x;
}

function ctz(m: number): number {
  return 31 - Math.clz32(m & -m);
}

/** floor(log2 n) for integer n >= 2^31, where the 32-bit tricks no longer apply. */
function bigLog2(n: number): number {
  return n < TWO_32 ? 31 : 63 - Math.clz32(Math.floor(n / TWO_32));
}

// The class functions keep sizes of 2^31 granules and more in separate functions: the common
// case then stays small enough for the JIT to inline.

/** Class holding a free block of n granules (fl * 32 + sl). */
function classOf(n: number): number {
  if (n < SMALL) return n;
  if (n < 2147483648) {
    const t = 31 - Math.clz32(n);
    return ((t - 4) << SL_BITS) + ((n >>> (t - SL_BITS)) & (SL_COUNT - 1));
  }
  return bigClassOf(n);
}

function bigClassOf(n: number): number {
  const t = bigLog2(n);
  return ((t - 4) << SL_BITS) + (Math.floor(n / POW2[t - SL_BITS]!) & (SL_COUNT - 1));
}

/** First class whose every block holds n granules. */
function ceilClassOf(n: number): number {
  if (n < SMALL) return n;
  if (n < 2147483648) {
    const t = 31 - Math.clz32(n);
    const shift = t - SL_BITS;
    const c = ((t - 4) << SL_BITS) + ((n >>> shift) & (SL_COUNT - 1));
    return (n & ((1 << shift) - 1)) === 0 ? c : c + 1;
  }
  return bigCeilClassOf(n);
}

function bigCeilClassOf(n: number): number {
  const t = bigLog2(n);
  const width = POW2[t - SL_BITS]!;
  const c = ((t - 4) << SL_BITS) + (Math.floor(n / width) & (SL_COUNT - 1));
  return n % width === 0 ? c : c + 1;
}

export class OffsetAllocator {
  readonly capacity: number;
  /** Granule in bytes. */
  readonly granule: number;
  readonly maxAlign: number;
  readonly operationPrefix: string;

  private readonly units: number;
  /** 1 / granule: exact, and a multiply is cheaper than a divide on the hot path. */
  private readonly perGranule: number;
  private readonly opAlloc: string;
  private readonly opFree: string;
  private readonly opSizeOf: string;

  /** Two views of one buffer holding every slot, see F_STRIDE / I_STRIDE. */
  private f: Float64Array;
  private i: Int32Array;
  private slotCap: number;
  /** Slots never handed out start here; released ones are chained from spareSlot. */
  private slotHigh = 0;
  private spareSlot = -1;

  private flLo = 0;
  private flHi = 0;
  private readonly slMap = new Int32Array(FL_COUNT);
  private readonly heads = new Int32Array(FL_COUNT * SL_COUNT).fill(-1);

  /** Direct offset table: slot + 1 at the granule index of each live allocation, 0 elsewhere. */
  private readonly direct: Int32Array | null;
  // Open-addressing table (linear probing) used instead when the direct table would be too big.
  // Keys are granule index + 1 so that the zero fill means empty.
  private hashKeys: Float64Array;
  private hashSlots: Int32Array;
  private hashMask: number;
  private hashShift: number;
  private hashCount = 0;

  private usedUnits = 0;
  private live = 0;
  private freeBlocks = 0;

  constructor(capacity: number, options: OffsetAllocatorOptions = {}) {
    const prefix = options.operationPrefix ?? "OffsetAllocator";
    const op = `${prefix}.constructor`;
    const granule = options.minBlock ?? 4096;
    if (!isPowerOfTwo(granule) || granule > 2 ** 30) {
      throw argumentError(op, "options.minBlock", `minBlock must be a power of two between 1 and 2^30, got ${granule}`);
    }
    const maxAlign = options.maxAlign ?? Math.max(2 * 1024 * 1024, granule);
    if (!isPowerOfTwo(maxAlign) || maxAlign < granule || maxAlign >= MAX_CAPACITY) {
      throw argumentError(
        op,
        "options.maxAlign",
        `maxAlign must be a power of two between minBlock (${granule}) and 2^47, got ${maxAlign}`,
      );
    }
    if (!Number.isInteger(capacity) || capacity <= 0 || capacity >= MAX_CAPACITY) {
      throw argumentError(op, "capacity", `capacity must be a positive integer below 2^48 bytes, got ${capacity}`);
    }
    if (capacity % granule !== 0) {
      throw argumentError(op, "capacity", `capacity ${capacity} is not a multiple of minBlock ${granule}`);
    }
    this.capacity = capacity;
    this.granule = granule;
    this.perGranule = 1 / granule;
    this.maxAlign = maxAlign;
    this.operationPrefix = prefix;
    this.opAlloc = `${prefix}.alloc`;
    this.opFree = `${prefix}.free`;
    this.opSizeOf = `${prefix}.sizeOf`;
    this.units = capacity / granule;

    this.slotCap = INITIAL_SLOTS;
    const buffer = new ArrayBuffer(INITIAL_SLOTS * F_STRIDE * 8);
    this.f = new Float64Array(buffer);
    this.i = new Int32Array(buffer);

    const direct = this.units <= DIRECT_LIMIT;
    this.direct = direct ? new Int32Array(this.units) : null;
    // With the direct table the hash is never touched; a 2-entry stub keeps the fields typed.
    const hashSize = direct ? 2 : INITIAL_HASH;
    this.hashKeys = new Float64Array(hashSize);
    this.hashSlots = new Int32Array(hashSize);
    this.hashMask = hashSize - 1;
    this.hashShift = 32 - Math.log2(hashSize);

    const s = this.newSlot();
    this.f[s * F_STRIDE] = 0;
    this.f[s * F_STRIDE + 1] = this.units;
    this.i[s * I_STRIDE + I_PREV_PHYS] = -1;
    this.i[s * I_STRIDE + I_NEXT_PHYS] = -1;
    this.insertFree(s);
  }

  /**
   * Reserve `size` bytes (rounded up to the granule) at an offset that is a multiple of `align`
   * (a power of two up to maxAlign; alignments below the granule mean the granule).
   * Throws EINVAL for a bad size or alignment, ENOMEM when no free block fits.
   */
  alloc(size: number, align: number = this.granule): number {
    if (!(size > 0 && size <= Number.MAX_SAFE_INTEGER) || Math.floor(size) !== size) {
      throw argumentError(this.opAlloc, "size", `size must be a positive integer number of bytes, got ${size}`);
    }
    let a = 1;
    if (align !== this.granule) a = this.alignUnits(align);
    if (size > this.capacity) throw this.noSpace(size, a);
    const n = Math.ceil(size * this.perGranule);

    if (a > 1) return this.allocAligned(size, n, a);
    let s = this.search(ceilClassOf(n));
    if (s < 0) {
      // Last O(1) chance before ENOMEM: the request's own class may hold a block that fits.
      s = this.heads[classOf(n)]!;
      if (s < 0 || this.f[s * F_STRIDE + 1]! < n) throw this.noSpace(size, 1);
    }
    this.unlinkFree(s);
    return this.carve(s, n);
  }

  /** alloc of n granules aligned to a > 1 granules; apart from alloc to keep the common path small. */
  private allocAligned(size: number, n: number, a: number): number {
    const f = this.f;
    // Trying the unpadded fit first keeps aligned requests from always taking a larger class.
    let s = this.search(ceilClassOf(n));
    if (s >= 0) {
      const start = Math.ceil(f[s * F_STRIDE]! / a) * a;
      if (start + n <= f[s * F_STRIDE]! + f[s * F_STRIDE + 1]!) return this.take(s, start, n);
    }
    s = this.search(ceilClassOf(n + a - 1));
    if (s < 0) {
      s = this.heads[classOf(n)]!;
      if (s < 0) throw this.noSpace(size, a);
      const start = Math.ceil(f[s * F_STRIDE]! / a) * a;
      if (start + n > f[s * F_STRIDE]! + f[s * F_STRIDE + 1]!) throw this.noSpace(size, a);
      return this.take(s, start, n);
    }
    return this.take(s, Math.ceil(f[s * F_STRIDE]! / a) * a, n);
  }

  /** Release the allocation that starts at `offset`. Throws EINVAL if there is none (double free). */
  free(offset: number): void {
    const u = offset * this.perGranule;
    const s = this.liveSlot(u);
    if (s < 0) {
      throw argumentError(this.opFree, "offset", `offset ${hex(offset)} is not a live allocation (double free?)`);
    }
    this.forget(u);
    this.live--;
    const f = this.f;
    const ints = this.i;
    const base = s * I_STRIDE;
    let size = f[s * F_STRIDE + 1]!;
    this.usedUnits -= size;

    const nx = ints[base + I_NEXT_PHYS]!;
    if (nx >= 0 && ints[nx * I_STRIDE + I_PREV_FREE]! >= -1) {
      this.unlinkFree(nx);
      size += f[nx * F_STRIDE + 1]!;
      const after = ints[nx * I_STRIDE + I_NEXT_PHYS]!;
      ints[base + I_NEXT_PHYS] = after;
      if (after >= 0) ints[after * I_STRIDE + I_PREV_PHYS] = s;
      this.releaseSlot(nx);
    }
    const pv = ints[base + I_PREV_PHYS]!;
    if (pv >= 0 && ints[pv * I_STRIDE + I_PREV_FREE]! >= -1) {
      this.unlinkFree(pv);
      f[pv * F_STRIDE + 1] = f[pv * F_STRIDE + 1]! + size;
      const after = ints[base + I_NEXT_PHYS]!;
      ints[pv * I_STRIDE + I_NEXT_PHYS] = after;
      if (after >= 0) ints[after * I_STRIDE + I_PREV_PHYS] = pv;
      this.releaseSlot(s);
      this.insertFree(pv);
      return;
    }
    f[s * F_STRIDE + 1] = size;
    this.insertFree(s);
  }

  /** Rounded size in bytes of the allocation at `offset`. Throws EINVAL if there is none. */
  sizeOf(offset: number): number {
    const s = this.liveSlot(offset * this.perGranule);
    if (s < 0) throw argumentError(this.opSizeOf, "offset", `offset ${hex(offset)} is not a live allocation`);
    return this.f[s * F_STRIDE + 1]! * this.granule;
  }

  /** Whether `offset` is the start of a live allocation. */
  has(offset: number): boolean {
    return this.liveSlot(offset * this.perGranule) >= 0;
  }

  stats(): OffsetAllocatorStats {
    const g = this.granule;
    return {
      capacity: this.capacity,
      bytesInUse: this.usedUnits * g,
      bytesFree: (this.units - this.usedUnits) * g,
      largestFree: this.largestFreeUnits() * g,
      liveAllocations: this.live,
      freeBlocks: this.freeBlocks,
    };
  }

  /**
   * Walk every block and list and throw EIO at the first broken invariant. O(blocks); for tests
   * and debugging a corrupted heap.
   */
  checkConsistency(): void {
    const fail = (what: string): never => {
      throw ioError(`${this.operationPrefix}.checkConsistency`, `allocator state is inconsistent: ${what}`);
    };
    const f = this.f;
    const ints = this.i;
    const off = (s: number): number => f[s * F_STRIDE]!;
    const len = (s: number): number => f[s * F_STRIDE + 1]!;
    const link = (s: number, word: number): number => ints[s * I_STRIDE + word]!;
    const isFree = (s: number): boolean => link(s, I_PREV_FREE) >= -1;

    let first = -1;
    let blocks = 0;
    let spares = 0;
    for (let s = 0; s < this.slotHigh; s++) {
      if (link(s, I_PREV_FREE) === UNUSED) {
        spares++;
        continue;
      }
      blocks++;
      if (link(s, I_PREV_PHYS) === -1) {
        if (first >= 0) fail(`two first blocks, slots ${first} and ${s}`);
        first = s;
      }
    }
    let chained = 0;
    for (let s = this.spareSlot; s >= 0; s = link(s, I_NEXT_FREE)) {
      if (++chained > spares || link(s, I_PREV_FREE) !== UNUSED) fail("spare slot chain is broken");
    }
    if (chained !== spares) fail(`${spares - chained} unused slots are not on the spare chain`);
    if (first < 0) fail("no first block");
    let at = 0;
    let walked = 0;
    let used = 0;
    let live = 0;
    let freeCount = 0;
    let prev = -1;
    for (let s = first; s >= 0; s = link(s, I_NEXT_PHYS)) {
      if (++walked > blocks) fail("physical chain has a cycle");
      if (link(s, I_PREV_PHYS) !== prev) fail(`slot ${s} has a wrong physical back link`);
      if (off(s) !== at) fail(`block at slot ${s} starts at ${off(s)} granules, expected ${at}`);
      const n = len(s);
      if (!(n >= 1) || !Number.isInteger(n)) fail(`block at slot ${s} has length ${n}`);
      if (isFree(s)) {
        freeCount++;
        if (prev >= 0 && isFree(prev)) fail(`free blocks at ${off(prev)} and ${at} not merged`);
        if (this.lookup(at) >= 0) fail(`free block at ${at} is registered as live`);
      } else {
        if (link(s, I_PREV_FREE) !== USED) fail(`slot ${s} on the chain has state ${link(s, I_PREV_FREE)}`);
        live++;
        used += n;
        if (this.lookup(at) !== s) fail(`live block at ${at} is not registered`);
      }
      at += n;
      prev = s;
    }
    if (walked !== blocks) fail(`${blocks - walked} blocks are not on the physical chain`);
    if (at !== this.units) fail(`blocks cover ${at} granules of ${this.units}`);
    if (used !== this.usedUnits) fail(`used granules ${used} but counter says ${this.usedUnits}`);
    if (live !== this.live) fail(`live blocks ${live} but counter says ${this.live}`);
    if (freeCount !== this.freeBlocks) fail(`free blocks ${freeCount} but counter says ${this.freeBlocks}`);
    if (!this.direct && live !== this.hashCount) fail(`hash holds ${this.hashCount} entries for ${live} live`);

    let listed = 0;
    for (let fl = 0; fl < FL_COUNT; fl++) {
      const flBit = fl < 32 ? (this.flLo >>> fl) & 1 : (this.flHi >>> (fl - 32)) & 1;
      if (flBit !== (this.slMap[fl] !== 0 ? 1 : 0)) fail(`first-level bit ${fl} disagrees with its word`);
      for (let sl = 0; sl < SL_COUNT; sl++) {
        const c = (fl << SL_BITS) | sl;
        const head = this.heads[c]!;
        if (((this.slMap[fl]! >>> sl) & 1) !== (head >= 0 ? 1 : 0)) fail(`bitmap bit of class ${c} is wrong`);
        let back = -1;
        for (let s = head; s >= 0; s = link(s, I_NEXT_FREE)) {
          if (++listed > freeCount) fail("free lists hold more entries than free blocks");
          if (link(s, I_PREV_FREE) !== back) fail(`slot ${s} has a wrong free-list back link`);
          if (classOf(len(s)) !== c) fail(`slot ${s} of ${len(s)} granules is in class ${c}`);
          back = s;
        }
      }
    }
    if (listed !== freeCount) fail(`free lists hold ${listed} blocks, chain has ${freeCount}`);
  }

  /** Validated alignment in granules (1 for anything up to the granule). */
  private alignUnits(align: number): number {
    if (!isPowerOfTwo(align)) {
      throw argumentError(this.opAlloc, "align", `align must be a power of two, got ${align}`);
    }
    if (align > this.maxAlign) {
      const message = `align ${align} exceeds the largest supported alignment ${this.maxAlign}`;
      throw argumentError(this.opAlloc, "align", message);
    }
    return align > this.granule ? align / this.granule : 1;
  }

  private noSpace(size: number, a: number): IommufdError {
    const g = this.granule;
    const rounded = Math.ceil(size / g) * g;
    const largest = this.largestFreeUnits() * g;
    const aligned = a > 1 ? ` aligned to ${a * g}` : "";
    const free = (this.units - this.usedUnits) * g;
    return argumentError(
      this.opAlloc,
      "size",
      `cannot allocate ${size} bytes (${rounded} rounded to the ${g}-byte granule)${aligned}: ` +
        `the largest free block is ${largest} bytes, ${free} of ${this.capacity} bytes free`,
      "ENOMEM",
      "free some allocations or create a bigger heap",
    );
  }

  /** Head of the first non-empty list at or above class c, or -1. */
  private search(c: number): number {
    let fl = c >>> SL_BITS;
    if (fl >= FL_COUNT) return -1;
    let m = this.slMap[fl]! & (-1 << (c & (SL_COUNT - 1)));
    if (m === 0) {
      fl++;
      if (fl < 32) {
        const lo = this.flLo & (-1 << fl);
        if (lo !== 0) fl = ctz(lo);
        else if (this.flHi !== 0) fl = 32 + ctz(this.flHi);
        else return -1;
      } else {
        if (fl >= FL_COUNT) return -1;
        const hi = this.flHi & (-1 << (fl - 32));
        if (hi === 0) return -1;
        fl = 32 + ctz(hi);
      }
      m = this.slMap[fl]!;
    }
    return this.heads[(fl << SL_BITS) | ctz(m)]!;
  }

  /** Turn free block s into an allocation of n granules at `start` (inside s), freeing the lead gap. */
  private take(s: number, start: number, n: number): number {
    this.unlinkFree(s);
    const lead = start - this.f[s * F_STRIDE]!;
    if (lead > 0) {
      // The leading gap keeps slot s and stays free; the allocation moves to a new slot t.
      const t = this.split(s, lead);
      this.insertFree(s);
      return this.carve(t, n);
    }
    return this.carve(s, n);
  }

  /**
   * Split block s (off the free lists) after its first `head` granules: s keeps the head, a new
   * slot, linked after s in address order and returned, takes the rest.
   */
  private split(s: number, head: number): number {
    const t = this.newSlot();
    // newSlot may have grown the arrays: read the fields only now.
    const f = this.f;
    const ints = this.i;
    f[t * F_STRIDE] = f[s * F_STRIDE]! + head;
    f[t * F_STRIDE + 1] = f[s * F_STRIDE + 1]! - head;
    ints[t * I_STRIDE + I_PREV_PHYS] = s;
    const after = ints[s * I_STRIDE + I_NEXT_PHYS]!;
    ints[t * I_STRIDE + I_NEXT_PHYS] = after;
    if (after >= 0) ints[after * I_STRIDE + I_PREV_PHYS] = t;
    ints[s * I_STRIDE + I_NEXT_PHYS] = t;
    f[s * F_STRIDE + 1] = head;
    return t;
  }

  /**
   * Make the first n granules of block s (already off the free lists) an allocation and return the
   * rest to the lists. Kept apart from the alignment case so the JIT can inline it into alloc.
   */
  private carve(s: number, n: number): number {
    const trail = this.f[s * F_STRIDE + 1]! - n;
    if (trail > 0) this.insertFree(this.split(s, n));
    this.i[s * I_STRIDE + I_PREV_FREE] = USED;
    this.usedUnits += n;
    this.live++;
    const start = this.f[s * F_STRIDE]!;
    this.remember(start, s);
    return start * this.granule;
  }

  private insertFree(s: number): void {
    const ints = this.i;
    const c = classOf(this.f[s * F_STRIDE + 1]!);
    const head = this.heads[c]!;
    ints[s * I_STRIDE + I_PREV_FREE] = -1;
    ints[s * I_STRIDE + I_NEXT_FREE] = head;
    if (head >= 0) ints[head * I_STRIDE + I_PREV_FREE] = s;
    else this.markNonEmpty(c);
    this.heads[c] = s;
    this.freeBlocks++;
  }

  private markNonEmpty(c: number): void {
    const fl = c >>> SL_BITS;
    this.slMap[fl] = this.slMap[fl]! | (1 << (c & (SL_COUNT - 1)));
    if (fl < 32) this.flLo |= 1 << fl;
    else this.flHi |= 1 << (fl - 32);
  }

  private unlinkFree(s: number): void {
    const ints = this.i;
    const p = ints[s * I_STRIDE + I_PREV_FREE]!;
    const nx = ints[s * I_STRIDE + I_NEXT_FREE]!;
    if (nx >= 0) ints[nx * I_STRIDE + I_PREV_FREE] = p;
    if (p >= 0) ints[p * I_STRIDE + I_NEXT_FREE] = nx;
    else this.unlinkHead(s, nx);
    this.freeBlocks--;
  }

  /** unlinkFree of a list head, apart so the JIT keeps unlinkFree small enough to inline. */
  private unlinkHead(s: number, next: number): void {
    const c = classOf(this.f[s * F_STRIDE + 1]!);
    this.heads[c] = next;
    if (next >= 0) return;
    const fl = c >>> SL_BITS;
    const word = this.slMap[fl]! & ~(1 << (c & (SL_COUNT - 1)));
    this.slMap[fl] = word;
    if (word === 0) {
      if (fl < 32) this.flLo &= ~(1 << fl);
      else this.flHi &= ~(1 << (fl - 32));
    }
  }

  private newSlot(): number {
    const s = this.spareSlot;
    if (s >= 0) {
      this.spareSlot = this.i[s * I_STRIDE + I_NEXT_FREE]!;
      return s;
    }
    if (this.slotHigh === this.slotCap) this.growSlots();
    return this.slotHigh++;
  }

  private releaseSlot(s: number): void {
    this.i[s * I_STRIDE + I_PREV_FREE] = UNUSED;
    this.i[s * I_STRIDE + I_NEXT_FREE] = this.spareSlot;
    this.spareSlot = s;
  }

  private growSlots(): void {
    const cap = this.slotCap * 2;
    const f = new Float64Array(cap * F_STRIDE);
    f.set(this.f);
    this.f = f;
    this.i = new Int32Array(f.buffer);
    this.slotCap = cap;
  }

  /** Slot of the live allocation starting at granule index u, or -1 (also for malformed offsets). */
  private liveSlot(u: number): number {
    if (!(u >= 0 && u < this.units) || Math.floor(u) !== u) return -1;
    return this.lookup(u);
  }

  // lookup, remember and forget keep the hash table in separate methods so that the direct-table
  // case stays small enough for the JIT to inline. `u | 0` keeps the index an int32; u < 2^22.
  private lookup(u: number): number {
    const direct = this.direct;
    return direct !== null ? direct[u | 0]! - 1 : this.hashLookup(u);
  }

  private remember(u: number, s: number): void {
    const direct = this.direct;
    if (direct !== null) direct[u | 0] = s + 1;
    else this.hashRemember(u, s);
  }

  private forget(u: number): void {
    const direct = this.direct;
    if (direct !== null) direct[u | 0] = 0;
    else this.hashForget(u);
  }

  private hashLookup(u: number): number {
    const keys = this.hashKeys;
    const mask = this.hashMask;
    const key = u + 1;
    for (let i = this.hash(u); ; i = (i + 1) & mask) {
      const k = keys[i]!;
      if (k === key) return this.hashSlots[i]!;
      if (k === 0) return -1;
    }
  }

  private hashRemember(u: number, s: number): void {
    // Load factor stays at most 1/2 so probe runs stay short.
    if ((this.hashCount + 1) * 2 > this.hashKeys.length) this.growHash();
    this.hashInsert(u + 1, s);
    this.hashCount++;
  }

  private hashForget(u: number): void {
    const keys = this.hashKeys;
    const slots = this.hashSlots;
    const mask = this.hashMask;
    const key = u + 1;
    let i = this.hash(u);
    while (keys[i] !== key) i = (i + 1) & mask;
    // Backward-shift deletion: pull later entries of the run into the hole when their home
    // position allows it, so lookups never need tombstones.
    for (let j = i; ; ) {
      j = (j + 1) & mask;
      const k = keys[j]!;
      if (k === 0) break;
      const home = this.hash(k - 1);
      if (((j - home) & mask) >= ((j - i) & mask)) {
        keys[i] = k;
        slots[i] = slots[j]!;
        i = j;
      }
    }
    keys[i] = 0;
    this.hashCount--;
  }

  private hash(u: number): number {
    // Fibonacci hashing of both 32-bit halves; the top bits index the table.
    return Math.imul((u >>> 0) ^ Math.imul((u / TWO_32) | 0, 0x27d4eb2d), 0x9e3779b1) >>> this.hashShift;
  }

  private hashInsert(key: number, s: number): void {
    const keys = this.hashKeys;
    const mask = this.hashMask;
    let i = this.hash(key - 1);
    while (keys[i] !== 0) i = (i + 1) & mask;
    keys[i] = key;
    this.hashSlots[i] = s;
  }

  private growHash(): void {
    const oldKeys = this.hashKeys;
    const oldSlots = this.hashSlots;
    const size = oldKeys.length * 2;
    this.hashKeys = new Float64Array(size);
    this.hashSlots = new Int32Array(size);
    this.hashMask = size - 1;
    this.hashShift = 32 - Math.log2(size);
    for (let i = 0; i < oldKeys.length; i++) {
      const k = oldKeys[i]!;
      if (k !== 0) this.hashInsert(k, oldSlots[i]!);
    }
  }

  private largestFreeUnits(): number {
    let fl: number;
    if (this.flHi !== 0) fl = 63 - Math.clz32(this.flHi);
    else if (this.flLo !== 0) fl = 31 - Math.clz32(this.flLo);
    else return 0;
    const sl = 31 - Math.clz32(this.slMap[fl]!);
    let best = 0;
    for (let s = this.heads[(fl << SL_BITS) | sl]!; s >= 0; s = this.i[s * I_STRIDE + I_NEXT_FREE]!) {
      const n = this.f[s * F_STRIDE + 1]!;
      if (n > best) best = n;
    }
    return best;
  }
}
