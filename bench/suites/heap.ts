/**
 * The heap suite: a DmaHeap buffer (alloc + free, no kernel call) against mapping and unmapping
 * the same size with MAP_FILE under the mock domain, in the same paired rounds (`speedup` =
 * mapFile+unmap time over alloc+free time); and the heap's allocator alone at several live-set
 * sizes (pure JS: no C side, absolute times).
 */
import { DmaHeap, Iommufd, MemfdBuffer } from "../../src/index.ts";
import { OffsetAllocator } from "../../src/heap/allocator.ts";
import { MOCK_APERTURE_START, MockDomain } from "../../src/testing/selftest.ts";
import { defineSuite, KiB, MiB, Scope, sizeLabel, type BenchCase, type Tier } from "../suite.ts";

/** Allocations kept alive while the heap is timed, so it works on a real free list. */
const HEAP_LIVE = 256;
const LIVE_SIZES: { live: number; tier: Tier }[] = [
  { live: 16, tier: "quick" },
  { live: 256, tier: "default" },
  { live: 4096, tier: "default" },
  { live: 16384, tier: "default" },
];
/** Power of two, so the precomputed random streams wrap with a mask. */
const STREAM = 1 << 16;

function heapCase(size: number, tier: Tier): Omit<BenchCase, "suite"> {
  return {
    id: `heap/mock/${sizeLabel(size)}`,
    title: `DmaHeap alloc(${sizeLabel(size)}) + free() (live set ${HEAP_LIVE}) against mapFile + unmap of ${sizeLabel(size)}; mock domain`,
    bytes: size,
    k: 64,
    tier,
    tracked: true,
    c: false,
    reference: true,
    skip: (env) => (env.mock ? undefined : "no mock domain: the kernel lacks CONFIG_IOMMUFD_TEST"),
    setup() {
      const scope = new Scope();
      try {
        const iommufd = scope.keep(Iommufd.open());
        const ioas = iommufd.createIoas();
        scope.keep(MockDomain.attach(ioas));
        const heap = scope.keep(DmaHeap.create(ioas, { size: 64 * MiB, iova: MOCK_APERTURE_START }));
        const live = Array.from({ length: HEAP_LIVE }, () => heap.alloc(size));
        scope.keep({
          close: () => {
            for (const b of live) b.free();
          },
        });
        const buffer = scope.keep(MemfdBuffer.create(size));
        buffer.bytes.fill(1);
        const mapOptions = { length: size };
        return {
          lib: () => heap.alloc(size).free(),
          reference: () => ioas.mapFile(buffer, mapOptions).unmap(),
          close: () => scope.close(),
        };
      } catch (error) {
        throw scope.abandon(error);
      }
    },
  };
}

/** Small seeded PRNG so every run measures the same sequence. */
function xorshift32(seed: number): () => number {
  let x = seed | 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 4294967296;
  };
}

function allocatorCase(live: number, tier: Tier): Omit<BenchCase, "suite"> {
  return {
    id: `allocator/live=${live}`,
    title: `OffsetAllocator free of a random live block + alloc of a random 4-64 KiB size, ${live} blocks live (pure JS)`,
    k: 256,
    tier,
    tracked: true,
    c: false,
    setup() {
      const randomSize = (rand: () => number) => 4 * KiB + Math.floor(rand() * (60 * KiB + 1));
      const heap = new OffsetAllocator(Math.max(64 * MiB, live * 128 * KiB));
      const rand = xorshift32(0x9e3779b9 ^ live);
      const offsets = new Float64Array(live);
      for (let i = 0; i < live; i++) offsets[i] = heap.alloc(randomSize(rand));
      // Random draws precomputed: the loop measures the allocator, not the PRNG.
      const victims = new Int32Array(STREAM);
      const sizes = new Float64Array(STREAM);
      for (let i = 0; i < STREAM; i++) {
        victims[i] = Math.floor(rand() * live);
        sizes[i] = randomSize(rand);
      }
      let step = 0;
      return {
        lib: () => {
          const i = step;
          step = (step + 1) & (STREAM - 1);
          const v = victims[i]!;
          heap.free(offsets[v]!);
          offsets[v] = heap.alloc(sizes[i]!);
          return offsets[v];
        },
        close() {},
      };
    },
  };
}

defineSuite({
  name: "heap",
  description: "DmaHeap alloc+free against mapFile+unmap of the same size (speedup), and the allocator alone",
  cases: () => [
    heapCase(4 * KiB, "quick"),
    heapCase(64 * KiB, "default"),
    ...LIVE_SIZES.map(({ live, tier }) => allocatorCase(live, tier)),
  ],
});
