/**
 * Dirty-bitmap read of 1 GiB of IOVA at 4 KiB granularity (IOMMU_HWPT_GET_DIRTY_BITMAP), the
 * library against bench/baseline/ops_vmm.c doing the same ioctl in the same guest session.
 *
 * Setup on both sides: an IOAS with huge pages off, the selftest mock device, a 64 MiB memfd
 * mapped 16 times back to back from IOVA 1 << 24 (1 GiB of IOVA over 64 MiB of memory), a
 * dirty-tracking HWPT for the mock device with tracking on, every 7th page marked dirty once.
 * One timed operation: zero the 32 KiB bitmap and read (and clear) the dirty bits of the range.
 */
import { DirtyBitmap, HwPageTable, Iommufd, MemfdBuffer } from "../src/index.ts";
import { markMockDirty, MOCK_APERTURE_START, MockDomain } from "../src/testing/selftest.ts";

export const DIRTY_LABEL = "GET_DIRTY_BITMAP of 1 GiB IOVA at 4 KiB (mock domain, 32 KiB bitmap zeroed first)";

const CHUNK = 64 << 20;
const PAGE = 4096;

export interface DirtyBench {
  /** The timed operation. */
  read(): void;
  /** For the C side: the table and the range it reads. */
  iommufdFd: number;
  hwptId: number;
  iova: number;
  /** Dirty pages the first read found (every 7th page: 37450 for 1 GiB). */
  firstReadDirtyPages: number;
  dispose(): void;
}

/** `range` bytes of IOVA (a multiple of 64 MiB, at most 1 GiB: the mock aperture ends at 2 GiB). */
export function setupDirtyBench(range = 1 << 30): DirtyBench {
  const chunk = Math.min(CHUNK, range);
  const iommufd = Iommufd.open();
  const ioas = iommufd.createIoas();
  ioas.hugePages = false;
  const mock = MockDomain.attach(ioas);
  const memory = MemfdBuffer.create(chunk);
  for (let at = 0; at < range; at += chunk) ioas.mapFile(memory, { iova: MOCK_APERTURE_START + at });
  const hwpt = HwPageTable.allocate(ioas, mock, { dirtyTracking: true });
  hwpt.setDirtyTracking(true);
  const bitmap = new DirtyBitmap({ iova: MOCK_APERTURE_START, length: range, pageSize: PAGE });
  for (let page = 0; page < bitmap.pages; page += 7) bitmap.bytes[page >> 3]! |= 1 << (page & 7);
  markMockDirty(hwpt, iommufd, bitmap);
  hwpt.readDirty(bitmap);
  const firstReadDirtyPages = bitmap.countDirty();
  return {
    read: () => void hwpt.readDirty(bitmap),
    iommufdFd: iommufd.fd,
    hwptId: hwpt.id,
    iova: MOCK_APERTURE_START,
    firstReadDirtyPages,
    dispose() {
      hwpt.destroy();
      mock.destroy();
      iommufd.close();
      memory.close();
    },
  };
}
