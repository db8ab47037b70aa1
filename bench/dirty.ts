/**
 * Dirty-bitmap read of 1 GiB of IOVA at 4 KiB granularity (IOMMU_HWPT_GET_DIRTY_BITMAP), the
 * library against bench/baseline/dirty_bench.c doing the same ioctl in the same guest session.
 *
 * Setup on both sides: an IOAS with huge pages off, the selftest mock device, a 64 MiB memfd
 * mapped 16 times back to back from IOVA 1 << 24 (1 GiB of IOVA over 64 MiB of memory), a
 * dirty-tracking HWPT for the mock device with tracking on, every 7th page marked dirty once.
 * One timed operation: zero the 32 KiB bitmap and read (and clear) the dirty bits of the range.
 */
import { DirtyBitmap, HwPageTable, Iommufd, MemfdBuffer } from "../src/index.ts";
import { markMockDirty, MOCK_APERTURE_START, MockDomain } from "../src/selftest.ts";

export const DIRTY_CASE_ID = "dirtyBitmap/mock/1GiB@4KiB";
export const DIRTY_LABEL = "GET_DIRTY_BITMAP of 1 GiB IOVA at 4 KiB (mock domain, 32 KiB bitmap zeroed first)";

const CHUNK = 64 << 20;
const CHUNKS = 16;
const RANGE = CHUNK * CHUNKS;
const PAGE = 4096;

export interface DirtyBench {
  /** The timed operation. */
  read(): void;
  /** Dirty pages the first read found (every 7th page: 37450). */
  firstReadDirtyPages: number;
  dispose(): void;
}

export function setupDirtyBench(): DirtyBench {
  const iommufd = Iommufd.open();
  const ioas = iommufd.createIoas();
  ioas.hugePages = false;
  const mock = MockDomain.attach(ioas);
  const memory = MemfdBuffer.create(CHUNK);
  for (let i = 0; i < CHUNKS; i++) ioas.mapFile(memory, { iova: MOCK_APERTURE_START + i * CHUNK });
  const hwpt = HwPageTable.allocate(ioas, mock, { dirtyTracking: true });
  hwpt.setDirtyTracking(true);
  const bitmap = new DirtyBitmap({ iova: MOCK_APERTURE_START, length: RANGE, pageSize: PAGE });
  for (let page = 0; page < bitmap.pages; page += 7) bitmap.bytes[page >> 3]! |= 1 << (page & 7);
  markMockDirty(hwpt, iommufd, bitmap);
  hwpt.readDirty(bitmap);
  const firstReadDirtyPages = bitmap.countDirty();
  return {
    read: () => void hwpt.readDirty(bitmap),
    firstReadDirtyPages,
    dispose() {
      hwpt.destroy();
      mock.destroy();
      iommufd.close();
      memory.close();
    },
  };
}
