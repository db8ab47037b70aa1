#!/usr/bin/env bun
/**
 * Dirty tracking for live migration: a page table allocated with dirty tracking records which
 * pages a device wrote; the VMM reads (and clears) that record into a bitmap JavaScript owns,
 * and copies only those pages. The selftest mock device stands in for a device that writes (its
 * IOMMU supports dirty tracking); QEMU's emulated VT-d does not, and says so.
 *
 *   bun run vm -- bun examples/dirty-tracking.ts
 */
import {
  DirtyBitmap,
  findPciDevices,
  HwPageTable,
  Iommufd,
  IommufdError,
  MemfdBuffer,
  VfioDevice,
  bindToVfioPci,
} from "../src/index.ts";
import { markMockDirty, MOCK_APERTURE_START, MockDomain } from "../src/testing/selftest.ts";
import { EDU_DEVICE, EDU_VENDOR } from "./edu.ts";

const PAGE = 4096;
using iommufd = Iommufd.open();
using ioas = iommufd.createIoas();
ioas.hugePages = false; // dirty bits per small page
using device = MockDomain.attach(ioas);
using guestMemory = MemfdBuffer.create(256 * PAGE);
using mapping = ioas.mapFile(guestMemory, { iova: MOCK_APERTURE_START });

using hwpt = HwPageTable.allocate(ioas, device, { dirtyTracking: true });
device.replace(hwpt);
hwpt.setDirtyTracking(true);
console.log(
  `hw page table ${hwpt.id} tracks dirty pages of IOVA ${`0x${mapping.iova.toString(16)}`}..+${guestMemory.size}`,
);

// The "device" writes pages 3, 4 and 200 (the mock IOMMU sets their dirty bits).
const writes = new DirtyBitmap({ iova: MOCK_APERTURE_START, length: guestMemory.size, pageSize: PAGE });
for (const page of [3, 4, 200]) writes.bytes[page >> 3]! |= 1 << (page & 7);
markMockDirty(hwpt, iommufd, writes);

const bitmap = new DirtyBitmap({ iova: MOCK_APERTURE_START, length: guestMemory.size, pageSize: PAGE });
hwpt.readDirty(bitmap);
const ranges = bitmap.dirtyRanges().map((r) => `0x${r.iova.toString(16)}+${r.length}`);
console.log(`dirty: ${bitmap.countDirty()} pages: ${ranges.join(", ")}`);
hwpt.readDirty(bitmap);
console.log(`read again after clearing: ${bitmap.countDirty()} dirty pages`);
hwpt.setDirtyTracking(false);
device.replace(ioas);

const edu = findPciDevices(EDU_VENDOR, EDU_DEVICE)[0];
if (edu) {
  using vfio = VfioDevice.open(bindToVfioPci(edu));
  vfio.bind(iommufd);
  try {
    HwPageTable.allocate(ioas, vfio, { dirtyTracking: true });
  } catch (error) {
    if (!(error instanceof IommufdError)) throw error;
    console.log(`edu behind QEMU's VT-d: ${error.code}: ${error.message}`);
  }
}
console.log("done");
