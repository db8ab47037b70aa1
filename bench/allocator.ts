/**
 * Hot path of the DMA heap sub-allocator: one free of a random live block followed by one alloc
 * of a random 4-64 KiB size, at several live-set sizes. Run alone with `bun bench/allocator.ts`.
 */
import { bench, do_not_optimize, group, run, summary } from "mitata";
import { OffsetAllocator } from "../src/heap/allocator.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const LIVE_SIZES = [16, 256, 4096, 16384];
/** Power of two, so the precomputed random streams wrap with a mask. */
const STREAM = 1 << 16;
const WARMUP_PAIRS = 20_000;

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

function randomSize(rand: () => number): number {
  return 4 * KiB + Math.floor(rand() * (60 * KiB + 1));
}

export function registerAllocatorBenchmarks(): void {
  group("OffsetAllocator: free + alloc, random 4-64 KiB", () => {
    summary(() => {
      bench("free+alloc live=$live", function* (state: { get(name: string): number }) {
        const live = state.get("live");
        // Roomy but not absurd: twice the largest possible live set.
        const capacity = Math.max(64 * MiB, live * 128 * KiB);
        const heap = new OffsetAllocator(capacity);
        const rand = xorshift32(0x9e3779b9 ^ live);
        const offsets = new Float64Array(live);
        for (let i = 0; i < live; i++) offsets[i] = heap.alloc(randomSize(rand));
        // Random draws are precomputed so the loop measures the allocator, not the PRNG.
        const victims = new Int32Array(STREAM);
        const sizes = new Float64Array(STREAM);
        for (let i = 0; i < STREAM; i++) {
          victims[i] = Math.floor(rand() * live);
          sizes[i] = randomSize(rand);
        }
        let step = 0;
        const pair = (): number => {
          const i = step;
          step = (step + 1) & (STREAM - 1);
          const v = victims[i]!;
          heap.free(offsets[v]!);
          const off = heap.alloc(sizes[i]!);
          offsets[v] = off;
          return off;
        };
        // Steady state, and a JIT-compiled first call: mitata times one call to decide whether to
        // batch iterations, and an unbatched sub-microsecond loop mostly measures the clock.
        for (let k = 0; k < WARMUP_PAIRS; k++) pair();
        yield () => do_not_optimize(pair());
      }).args("live", LIVE_SIZES);
    });
  });
}

if (import.meta.main) {
  registerAllocatorBenchmarks();
  await run();
}
