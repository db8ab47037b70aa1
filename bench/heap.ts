/**
 * DmaHeap against per-buffer mapping, in one run: a 4 KiB / 64 KiB buffer from the heap
 * (alloc + free, no kernel call) versus mapping and unmapping the same size with
 * IOMMU_IOAS_MAP_FILE on the kernel's mock domain. Needs /dev/iommu with CONFIG_IOMMUFD_TEST:
 * `bun run vm -- bun bench/heap.ts` here.
 */
import { bench, group, run, summary } from "mitata";
import { DmaHeap, Iommufd, MemfdBuffer } from "../src/index.ts";
import { MOCK_APERTURE_START, MockDomain } from "../src/selftest.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZES = [4 * KiB, 64 * KiB];
const LIVE = 256;
const WARMUP = 20_000;
/**
 * Pairs per timed iteration: under TCG a clock read costs microseconds and mitata times single
 * calls, so one iteration runs K pairs and the figure is divided by K.
 */
const K = 64;

export function registerHeapBenchmarks(): () => void {
  const iommufd = Iommufd.open();
  const ioas = iommufd.createIoas();
  const domain = MockDomain.attach(ioas);
  const heap = DmaHeap.create(ioas, { size: 64 * MiB, iova: MOCK_APERTURE_START });
  const buffer = MemfdBuffer.create(64 * KiB);
  buffer.bytes.fill(1);

  group(
    `DmaHeap alloc+free vs mapFile+unmap (mock domain, ${heap.pageSize === 2 * MiB ? "2 MiB" : "4 KiB"} heap pages)`,
    () => {
      summary(() => {
        for (const size of SIZES) {
          bench(`heap alloc+free ${size / KiB} KiB (live ${LIVE}) (x${K})`, function* () {
            // A live set, so the allocator works on a realistic free list rather than an empty heap.
            const live = Array.from({ length: LIVE }, () => heap.alloc(size));
            const pair = () => heap.alloc(size).free();
            for (let i = 0; i < WARMUP; i++) pair();
            yield () => {
              for (let i = 0; i < K; i++) pair();
            };
            for (const b of live) b.free();
          });
          bench(`mapFile+unmap ${size / KiB} KiB (x${K})`, function* () {
            const pair = () => ioas.mapFile(buffer, { length: size }).unmap();
            for (let i = 0; i < WARMUP; i++) pair();
            yield () => {
              for (let i = 0; i < K; i++) pair();
            };
          });
        }
      });
    },
  );

  return () => {
    heap.close();
    buffer.close();
    domain.destroy();
    iommufd.close();
  };
}

if (import.meta.main) {
  const release = registerHeapBenchmarks();
  await run();
  release();
}
