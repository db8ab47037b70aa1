/**
 * The DMA heap sub-allocator against a plain reference model: seeded random alloc/free runs check
 * placement, alignment, stats and ENOMEM after every operation, plus the error contract.
 */
import { describe, expect, test } from "bun:test";
import { OffsetAllocator, type OffsetAllocatorOptions } from "../../src/heap/allocator.ts";
import { IommufdError } from "../../src/sys/error.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function floorLog2(n: number): number {
  let t = 0;
  while (2 ** (t + 1) <= n) t++;
  return t;
}

/**
 * Smallest free-block size (in granules) the documented guarantee covers for a request of n
 * granules: n rounded up to a multiple of 2^(floor(log2 n) - 5), exact below 64.
 */
function guaranteedFit(n: number): number {
  if (n < 64) return n;
  const width = 2 ** (floorLog2(n) - 5);
  return Math.ceil(n / width) * width;
}

function catchError(fn: () => unknown): IommufdError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(IommufdError);
    return e as IommufdError;
  }
  throw new Error("expected an IommufdError, nothing was thrown");
}

/** Live allocations as a sorted list of [start, end) byte intervals. */
class Model {
  readonly starts: number[] = [];
  readonly ends: number[] = [];
  bytesInUse = 0;

  constructor(readonly capacity: number) {}

  /** Index of the first interval starting at or after `offset`. */
  lowerBound(offset: number): number {
    let lo = 0;
    let hi = this.starts.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.starts[mid]! < offset) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** Records [offset, offset + size), failing the test if it overlaps anything or leaves the region. */
  add(offset: number, size: number): void {
    expect(offset).toBeGreaterThanOrEqual(0);
    expect(offset + size).toBeLessThanOrEqual(this.capacity);
    const i = this.lowerBound(offset);
    if (i > 0) expect(this.ends[i - 1]!).toBeLessThanOrEqual(offset);
    if (i < this.starts.length) expect(this.starts[i]!).toBeGreaterThanOrEqual(offset + size);
    this.starts.splice(i, 0, offset);
    this.ends.splice(i, 0, offset + size);
    this.bytesInUse += size;
  }

  remove(index: number): number {
    const offset = this.starts[index]!;
    this.bytesInUse -= this.ends[index]! - offset;
    this.starts.splice(index, 1);
    this.ends.splice(index, 1);
    return offset;
  }

  gaps(): Array<[number, number]> {
    const out: Array<[number, number]> = [];
    let at = 0;
    for (let i = 0; i < this.starts.length; i++) {
      if (this.starts[i]! > at) out.push([at, this.starts[i]!]);
      at = this.ends[i]!;
    }
    if (at < this.capacity) out.push([at, this.capacity]);
    return out;
  }
}

function expectStatsMatch(heap: OffsetAllocator, model: Model): void {
  const gaps = model.gaps();
  let largest = 0;
  for (const [s, e] of gaps) largest = Math.max(largest, e - s);
  expect(heap.stats()).toEqual({
    capacity: model.capacity,
    bytesInUse: model.bytesInUse,
    bytesFree: model.capacity - model.bytesInUse,
    largestFree: largest,
    liveAllocations: model.starts.length,
    freeBlocks: gaps.length,
  });
}

interface Scenario {
  name: string;
  capacity: number;
  options: OffsetAllocatorOptions;
  seed: number;
  ops: number;
  /** Random request size in bytes. */
  size: (rand: () => number) => number;
  /** Alignments to draw from; `undefined` means the default argument. */
  aligns: Array<number | undefined>;
}

function logUniform(rand: () => number, lo: number, hi: number): number {
  return Math.max(1, Math.floor(Math.exp(Math.log(lo) + rand() * (Math.log(hi) - Math.log(lo)))));
}

const SCENARIOS: Scenario[] = [
  {
    name: "1 MiB, 4 KiB granule, tight: ENOMEM is frequent",
    capacity: 1 * MiB,
    options: {},
    seed: 1,
    ops: 6000,
    size: (r) => 1 + Math.floor(r() * 64 * KiB),
    aligns: [undefined, undefined, 4096, 8192, 64 * KiB],
  },
  {
    name: "64 MiB + 7 pages, 4 KiB granule, sizes 1 B..2 MiB, alignment up to 2 MiB",
    capacity: 64 * MiB + 7 * 4096,
    options: {},
    seed: 2,
    ops: 6000,
    size: (r) => logUniform(r, 1, 2 * MiB),
    aligns: [undefined, undefined, undefined, 512, 16 * KiB, 256 * KiB, 2 * MiB],
  },
  {
    name: "sizes around class boundaries (64..4096 granules)",
    capacity: 256 * MiB,
    options: {},
    seed: 3,
    ops: 5000,
    size: (r) => 4096 * (64 * 2 ** Math.floor(r() * 6) + Math.floor(r() * 5) - 2),
    aligns: [undefined, undefined, 32 * KiB],
  },
  {
    name: "64-byte granule, 1 GiB: hash-table offset lookup",
    capacity: 1 * GiB,
    options: { minBlock: 64, maxAlign: 64 * KiB },
    seed: 4,
    ops: 5000,
    size: (r) => logUniform(r, 1, 8 * MiB),
    aligns: [undefined, 64, 128, 4096, 64 * KiB],
  },
  {
    name: "1-byte granule, odd capacity, hash-table lookup",
    capacity: 5_000_011,
    options: { minBlock: 1, maxAlign: 4096 },
    seed: 5,
    ops: 5000,
    size: (r) => logUniform(r, 1, 300_000),
    aligns: [undefined, undefined, 1, 2, 8, 4096],
  },
  {
    name: "2^47-byte region: sizes past 2^31 granules",
    capacity: 2 ** 47,
    options: { minBlock: 4096, maxAlign: 2 ** 40 },
    seed: 6,
    ops: 4000,
    size: (r) => logUniform(r, 1, 2 ** 45),
    aligns: [undefined, undefined, 2 * MiB, 1 * GiB, 2 ** 40],
  },
];

describe("OffsetAllocator randomized against a reference model", () => {
  for (const sc of SCENARIOS) {
    test(sc.name, () => {
      const rand = mulberry32(sc.seed);
      const heap = new OffsetAllocator(sc.capacity, sc.options);
      const g = heap.granule;
      const model = new Model(sc.capacity);
      let allocs = 0;
      let frees = 0;
      let enomem = 0;
      for (let op = 0; op < sc.ops; op++) {
        // Fill for the first half, drain for the second, so both full and sparse states occur.
        const pAlloc = op < sc.ops / 2 ? 0.7 : 0.35;
        if (model.starts.length === 0 || rand() < pAlloc) {
          const size = sc.size(rand);
          const align = sc.aligns[Math.floor(rand() * sc.aligns.length)];
          const rounded = Math.ceil(size / g) * g;
          const effective = Math.max(align ?? g, g);
          let offset: number | undefined;
          let error: IommufdError | undefined;
          try {
            offset = align === undefined ? heap.alloc(size) : heap.alloc(size, align);
          } catch (e) {
            if (!(e instanceof IommufdError)) throw e;
            error = e;
          }
          if (offset !== undefined) {
            allocs++;
            expect(offset % effective).toBe(0);
            model.add(offset, rounded);
            expect(heap.sizeOf(offset)).toBe(rounded);
            expect(heap.has(offset)).toBe(true);
          } else {
            enomem++;
            expect(error!.code).toBe("ENOMEM");
            expect(error!.operation).toBe("OffsetAllocator.alloc");
            expect(error!.message).toContain(`cannot allocate ${size} bytes`);
            // A free block at least this big would have been found: none may exist.
            const need = guaranteedFit(rounded / g + effective / g - 1) * g;
            let largest = 0;
            for (const [s, e] of model.gaps()) {
              largest = Math.max(largest, e - s);
              expect(e - s).toBeLessThan(need);
            }
            expect(error!.message).toContain(`largest free block is ${largest} bytes`);
          }
        } else {
          const offset = model.remove(Math.floor(rand() * model.starts.length));
          heap.free(offset);
          expect(heap.has(offset)).toBe(false);
          frees++;
        }
        expectStatsMatch(heap, model);
        if (op % 97 === 0) heap.checkConsistency();
      }
      heap.checkConsistency();
      // The run must have exercised what it claims to.
      expect(allocs).toBeGreaterThan(sc.ops / 5);
      expect(frees).toBeGreaterThan(sc.ops / 5);

      while (model.starts.length > 0) {
        heap.free(model.remove(Math.floor(rand() * model.starts.length)));
      }
      heap.checkConsistency();
      expect(heap.stats()).toEqual({
        capacity: sc.capacity,
        bytesInUse: 0,
        bytesFree: sc.capacity,
        largestFree: sc.capacity,
        liveAllocations: 0,
        freeBlocks: 1,
      });
      // And the whole region is one block again.
      expect(heap.alloc(sc.capacity)).toBe(0);
      if (sc.name.startsWith("1 MiB")) expect(enomem).toBeGreaterThan(50);
    });
  }
});

describe("OffsetAllocator placement", () => {
  test("sizes round up to the granule and allocations are carved from the front", () => {
    const heap = new OffsetAllocator(1 * MiB);
    expect(heap.granule).toBe(4096);
    expect(heap.maxAlign).toBe(2 * MiB);
    expect(heap.alloc(1)).toBe(0);
    expect(heap.sizeOf(0)).toBe(4096);
    expect(heap.alloc(4097)).toBe(4096);
    expect(heap.sizeOf(4096)).toBe(8192);
    expect(heap.alloc(4096)).toBe(12288);
    expect(heap.stats()).toEqual({
      capacity: 1 * MiB,
      bytesInUse: 16384,
      bytesFree: 1 * MiB - 16384,
      largestFree: 1 * MiB - 16384,
      liveAllocations: 3,
      freeBlocks: 1,
    });
  });

  test("the whole capacity can be taken in one allocation", () => {
    const heap = new OffsetAllocator(8 * MiB);
    expect(heap.alloc(8 * MiB)).toBe(0);
    expect(heap.stats()).toMatchObject({ largestFree: 0, freeBlocks: 0, bytesFree: 0 });
    expect(catchError(() => heap.alloc(1)).code).toBe("ENOMEM");
    heap.free(0);
    expect(heap.stats()).toMatchObject({ largestFree: 8 * MiB, freeBlocks: 1, liveAllocations: 0 });
  });

  test("freed neighbours merge on both sides at once", () => {
    const heap = new OffsetAllocator(64 * KiB);
    const [a, b, c, d] = [heap.alloc(8192), heap.alloc(8192), heap.alloc(8192), heap.alloc(8192)];
    expect([a, b, c, d]).toEqual([0, 8192, 16384, 24576]);
    heap.free(a!);
    heap.free(c!);
    // [a free][b][c free][d][tail free]
    expect(heap.stats()).toMatchObject({ freeBlocks: 3, largestFree: 32 * KiB });
    heap.free(b!);
    // a, b and c are one block of 24 KiB now.
    expect(heap.stats()).toMatchObject({ freeBlocks: 2, largestFree: 32 * KiB });
    expect(heap.alloc(24 * KiB)).toBe(0);
    heap.free(0);
    heap.free(d!);
    expect(heap.stats()).toMatchObject({ freeBlocks: 1, largestFree: 64 * KiB });
    heap.checkConsistency();
  });

  test("a freed hole is reused by a request of its size (good fit)", () => {
    const heap = new OffsetAllocator(16 * MiB);
    heap.alloc(4096);
    const hole = heap.alloc(12288);
    heap.alloc(4096);
    heap.free(hole);
    expect(heap.alloc(12288)).toBe(hole);
  });

  test("alignment splits off the leading gap as a free block that merges back", () => {
    const heap = new OffsetAllocator(8 * MiB);
    expect(heap.alloc(4096)).toBe(0);
    const big = heap.alloc(4096, 2 * MiB);
    expect(big).toBe(2 * MiB);
    // [0: used][4 KiB .. 2 MiB: free gap][2 MiB: used][tail free]
    expect(heap.stats()).toMatchObject({ freeBlocks: 2, largestFree: 6 * MiB - 4096 });
    // The gap is used for the next small request instead of the tail.
    expect(heap.alloc(8192)).toBe(4096);
    heap.free(4096);
    heap.free(0);
    expect(heap.stats()).toMatchObject({ freeBlocks: 2, largestFree: 6 * MiB - 4096 });
    heap.free(big);
    expect(heap.stats()).toMatchObject({ freeBlocks: 1, largestFree: 8 * MiB });
    heap.checkConsistency();
  });

  test("an already aligned block is used without padding", () => {
    const heap = new OffsetAllocator(4 * MiB);
    const a = heap.alloc(2 * MiB);
    expect(a).toBe(0);
    // The tail starts at 2 MiB and is exactly 2 MiB: only an unpadded search can fit it.
    expect(heap.alloc(2 * MiB, 2 * MiB)).toBe(2 * MiB);
  });

  test("alignments below the granule mean the granule", () => {
    const heap = new OffsetAllocator(1 * MiB);
    heap.alloc(100, 1);
    expect(heap.alloc(100, 512)).toBe(4096);
  });

  test("documented false negative: a fitting block not at the head of the request's class", () => {
    // Free blocks of 64 and 65 granules share the class [64, 66). A 65-granule request searches
    // from class [66, 68) up, then looks only at the head of [64, 66).
    const g = 4096;
    const setup = (freeFirst: "a" | "b") => {
      const heap = new OffsetAllocator(131 * g);
      const a = heap.alloc(64 * g);
      heap.alloc(g);
      const b = heap.alloc(65 * g);
      heap.alloc(g);
      expect(heap.stats().freeBlocks).toBe(0);
      if (freeFirst === "a") {
        heap.free(a);
        heap.free(b);
      } else {
        heap.free(b);
        heap.free(a);
      }
      return { heap, b };
    };
    // b was freed last, so it heads the list: found.
    const first = setup("a");
    expect(first.heap.alloc(65 * g)).toBe(first.b);
    // a heads the list and is too small: ENOMEM although b would fit.
    const second = setup("b");
    const err = catchError(() => second.heap.alloc(65 * g));
    expect(err.code).toBe("ENOMEM");
    expect(err.message).toContain(`largest free block is ${65 * g} bytes`);
    // Below 64 granules classes are exact, so there is no such case there.
    expect(second.heap.alloc(64 * g)).toBe(0);
  });

  test("sizes past 2^31 granules are classed like small ones", () => {
    const g = 4096;
    const big = 2 ** 33;
    const heap = new OffsetAllocator((big + 1) * g);
    const a = heap.alloc(big * g);
    heap.alloc(g);
    heap.free(a);
    // The only free block is one granule short: its class must not be searched.
    expect(catchError(() => heap.alloc((big + 1) * g)).code).toBe("ENOMEM");
    expect(heap.alloc((big - 1) * g)).toBe(0);
    heap.checkConsistency();
    expect(heap.stats()).toMatchObject({ freeBlocks: 1, largestFree: g, bytesInUse: big * g });
  });

  test.each([10, 33])("second-level classes separate sizes within 2^%p granules", (t) => {
    // Free blocks of 2^t (head of its list) and 1.5 * 2^t granules; a request of 1.25 * 2^t + 1
    // only fits the second, which sits in a higher second-level class of the same first level.
    const g = 4096;
    const small = 2 ** t;
    const large = 1.5 * small;
    const heap = new OffsetAllocator((small + large + 2) * g);
    const a = heap.alloc(large * g);
    heap.alloc(g);
    const b = heap.alloc(small * g);
    heap.alloc(g);
    heap.free(a);
    heap.free(b);
    expect(heap.alloc((1.25 * small + 1) * g)).toBe(a);
    heap.checkConsistency();
  });

  test("thousands of allocations grow slot arrays and the hash table", () => {
    const heap = new OffsetAllocator(1 * GiB, { minBlock: 64 });
    const rand = mulberry32(7);
    const offsets: number[] = [];
    for (let i = 0; i < 5000; i++) offsets.push(heap.alloc(64));
    expect(offsets).toEqual(Array.from({ length: 5000 }, (_, i) => i * 64));
    heap.checkConsistency();
    while (offsets.length > 0) {
      const i = Math.floor(rand() * offsets.length);
      heap.free(offsets[i]!);
      offsets[i] = offsets[offsets.length - 1]!;
      offsets.pop();
      if (offsets.length % 1000 === 0) heap.checkConsistency();
    }
    expect(heap.stats()).toMatchObject({ freeBlocks: 1, largestFree: 1 * GiB, liveAllocations: 0 });
  });
});

describe("OffsetAllocator errors", () => {
  test.each([0, -4096, 1.5, Number.NaN, Infinity, -Infinity])("alloc(%p) is EINVAL on size", (size) => {
    const heap = new OffsetAllocator(1 * MiB);
    const err = catchError(() => heap.alloc(size));
    expect(err.code).toBe("EINVAL");
    expect(err.errno).toBe(22);
    expect(err.operation).toBe("OffsetAllocator.alloc");
    expect(err.argument).toBe("size");
    expect(err.message).toContain("size must be a positive integer");
    expect(heap.stats().liveAllocations).toBe(0);
  });

  test.each([0, -4096, 3, 6144, 1.5, Number.NaN, Infinity])("alloc(4096, %p) is EINVAL on align", (align) => {
    const heap = new OffsetAllocator(1 * MiB);
    const err = catchError(() => heap.alloc(4096, align));
    expect(err.code).toBe("EINVAL");
    expect(err.operation).toBe("OffsetAllocator.alloc");
    expect(err.argument).toBe("align");
    expect(err.message).toContain("power of two");
  });

  test("an alignment above maxAlign is EINVAL", () => {
    const heap = new OffsetAllocator(64 * MiB, { maxAlign: 64 * KiB });
    expect(heap.alloc(4096, 64 * KiB)).toBe(0);
    const err = catchError(() => heap.alloc(4096, 128 * KiB));
    expect(err.code).toBe("EINVAL");
    expect(err.argument).toBe("align");
    expect(err.message).toContain("exceeds the largest supported alignment 65536");
  });

  test("a request bigger than the capacity is ENOMEM with sizes in the message", () => {
    const heap = new OffsetAllocator(1 * MiB);
    const err = catchError(() => heap.alloc(1 * MiB + 1));
    expect(err.code).toBe("ENOMEM");
    expect(err.errno).toBe(12);
    expect(err.operation).toBe("OffsetAllocator.alloc");
    expect(err.argument).toBe("size");
    expect(err.message).toContain(`cannot allocate ${1 * MiB + 1} bytes (${1 * MiB + 4096} rounded`);
    expect(err.message).toContain(`largest free block is ${1 * MiB} bytes`);
  });

  test("a fragmented heap reports ENOMEM with its largest free block, state untouched", () => {
    const heap = new OffsetAllocator(64 * KiB);
    const offsets = Array.from({ length: 16 }, () => heap.alloc(4096));
    // Free the odd pages: every hole is one page and none is 8 KiB aligned.
    for (let i = 1; i < 16; i += 2) heap.free(offsets[i]!);
    const before = heap.stats();
    expect(before).toMatchObject({ bytesFree: 32 * KiB, largestFree: 4096, freeBlocks: 8 });
    const err = catchError(() => heap.alloc(8192));
    expect(err.code).toBe("ENOMEM");
    expect(err.message).toContain("largest free block is 4096 bytes, 32768 of 65536 bytes free");
    const aligned = catchError(() => heap.alloc(4096, 8192));
    expect(aligned.code).toBe("ENOMEM");
    expect(aligned.message).toContain("aligned to 8192");
    expect(heap.stats()).toEqual(before);
    heap.checkConsistency();
  });

  test.each([
    ["never allocated", 4096, "0x1000"],
    ["inside an allocation", 16384, "0x4000"],
    ["past the end", 2 * MiB, "0x200000"],
    ["negative", -4096, "-4096"],
    ["unaligned", 100, "0x64"],
    ["fractional", 0.5, "0.5"],
    ["NaN", Number.NaN, "NaN"],
  ])("free of an offset %s is EINVAL", (_what, offset, shown) => {
    const heap = new OffsetAllocator(1 * MiB);
    heap.alloc(4096);
    heap.alloc(4096, 8192);
    heap.alloc(8192);
    const before = heap.stats();
    const err = catchError(() => heap.free(offset));
    expect(err.code).toBe("EINVAL");
    expect(err.operation).toBe("OffsetAllocator.free");
    expect(err.argument).toBe("offset");
    expect(err.message).toBe(
      `OffsetAllocator.free (offset): offset ${shown} is not a live allocation (double free?) [EINVAL]`,
    );
    expect(heap.stats()).toEqual(before);
    heap.checkConsistency();
  });

  test("double free is EINVAL and leaves the heap intact", () => {
    const heap = new OffsetAllocator(1 * MiB);
    const a = heap.alloc(4096);
    const b = heap.alloc(4096);
    heap.free(b);
    const err = catchError(() => heap.free(b));
    expect(err.code).toBe("EINVAL");
    expect(err.message).toContain("offset 0x1000 is not a live allocation (double free?)");
    expect(heap.sizeOf(a)).toBe(4096);
    expect(heap.stats()).toMatchObject({ liveAllocations: 1, freeBlocks: 1 });
    heap.checkConsistency();
  });

  test("sizeOf of an offset that is not live is EINVAL", () => {
    const heap = new OffsetAllocator(1 * MiB);
    const err = catchError(() => heap.sizeOf(0));
    expect(err.code).toBe("EINVAL");
    expect(err.operation).toBe("OffsetAllocator.sizeOf");
    expect(err.argument).toBe("offset");
    expect(err.message).toContain("offset 0x0 is not a live allocation");
    expect(heap.has(0)).toBe(false);
  });

  test("operationPrefix names the operations", () => {
    const heap = new OffsetAllocator(1 * MiB, { operationPrefix: "DmaHeap" });
    expect(catchError(() => heap.alloc(0)).operation).toBe("DmaHeap.alloc");
    expect(catchError(() => heap.free(0)).operation).toBe("DmaHeap.free");
    expect(catchError(() => heap.sizeOf(0)).operation).toBe("DmaHeap.sizeOf");
    expect(catchError(() => new OffsetAllocator(0, { operationPrefix: "DmaHeap" })).operation).toBe(
      "DmaHeap.constructor",
    );
  });

  test.each([
    ["capacity", 0, {}],
    ["capacity", -4096, {}],
    ["capacity", 4096.5, {}],
    ["capacity", Number.NaN, {}],
    ["capacity", 2 ** 48, {}],
    ["capacity", 4096 * 3 + 1, {}],
    ["options.minBlock", 1 * MiB, { minBlock: 3 }],
    ["options.minBlock", 1 * MiB, { minBlock: 0 }],
    ["options.minBlock", 2 * GiB, { minBlock: 2 * GiB }],
    ["options.maxAlign", 1 * MiB, { maxAlign: 1000 }],
    ["options.maxAlign", 1 * MiB, { maxAlign: 2048 }],
  ] as Array<[string, number, OffsetAllocatorOptions]>)(
    "constructor rejects bad %s (%p, %o)",
    (arg, capacity, options) => {
      const err = catchError(() => new OffsetAllocator(capacity, options));
      expect(err.code).toBe("EINVAL");
      expect(err.operation).toBe("OffsetAllocator.constructor");
      expect(err.argument).toBe(arg);
    },
  );
});
