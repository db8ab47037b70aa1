/**
 * The kernel's own answer to "is dirty tracking on for this table?", for the selftest mock domain:
 * IOMMU_TEST_OP_DIRTY refuses with EINVAL while tracking is off (iommufd_test_dirty checks
 * MOCK_DIRTY_TRACK), so marking pages and reading them back tells on from off without trusting the
 * library's `dirtyTracking` flag.
 */
import { DirtyBitmap, type HwPageTable } from "../../src/index.ts";
import { isErrno } from "../../src/sys/ioctl.ts";
import { markMockDirty } from "../../src/testing/selftest.ts";

/**
 * Marks `marks` dirty in the mock IOMMU and reads the table's whole `marks` range back (clearing
 * it): the dirty ranges, or undefined when the kernel refused the mark because tracking is off.
 */
export function markAndReadDirty(
  hwpt: HwPageTable,
  marks: DirtyBitmap,
): { iova: number | bigint; length: number }[] | undefined {
  try {
    markMockDirty(hwpt, hwpt.iommufd, marks);
  } catch (error) {
    if (isErrno(error, "EINVAL")) return undefined;
    throw error;
  }
  return hwpt
    .readDirty(new DirtyBitmap({ iova: marks.iova, length: marks.length, pageSize: marks.pageSize }))
    .dirtyRanges();
}
