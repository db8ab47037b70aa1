#!/usr/bin/env bun
/**
 * Explicit IOMMU page tables (IOMMU_HWPT_ALLOC) and an atomic replace: edu DMAs through one IOAS,
 * its page table is swapped for one mirroring another IOAS while the device stays attached, and
 * the next DMA lands in the other IOAS's buffer at the very same IOVA.
 *
 *   bun run vm -- bun examples/hwpt-replace.ts
 */
import { bindToVfioPci, findPciDevices, HwPageTable, Iommufd, MemfdBuffer, VfioDevice } from "../src/index.ts";
import { Edu, EDU_DEVICE, EDU_VENDOR } from "./edu.ts";

const IOVA = 0x100000;
const address = findPciDevices(EDU_VENDOR, EDU_DEVICE)[0];
if (!address) {
  console.error("no edu device (1234:11e8) here: run it in the test guest: bun run vm -- bun examples/hwpt-replace.ts");
  process.exit(1);
}

using iommufd = Iommufd.open();
using device = VfioDevice.open(bindToVfioPci(address));
device.bind(iommufd);
using first = iommufd.createIoas();
using second = iommufd.createIoas();
using bufferA = MemfdBuffer.create(64 * 1024);
using bufferB = MemfdBuffer.create(64 * 1024);
first.mapFile(bufferA, { iova: IOVA });
second.mapFile(bufferB, { iova: IOVA });

using tableA = HwPageTable.allocate(first, device);
using tableB = HwPageTable.allocate(second, device);
console.log(`allocated hw page tables ${tableA.id} (IOAS ${first.id}) and ${tableB.id} (IOAS ${second.id})`);
device.attach(tableA.id);
using bar = device.mapRegion(0);
const edu = new Edu(bar);
device.setBusMaster(true);

// edu copies 32 bytes from IOVA into its own buffer and back to IOVA + 0x1000.
function copyThroughDevice(): void {
  edu.fromRam(IOVA, 0, 32);
  edu.toRam(0, IOVA + 0x1000, 32);
}
const copied = (buffer: MemfdBuffer) =>
  new TextDecoder().decode(buffer.bytes.subarray(0x1000, 0x1020)).replace(/\0+$/, "");
bufferA.bytes.set(new TextEncoder().encode("written via IOAS A"), 0);
bufferB.bytes.set(new TextEncoder().encode("written via IOAS B"), 0);
copyThroughDevice();
console.log(`attached to table ${tableA.id}: edu copied "${copied(bufferA)}" inside buffer A`);

const now = device.attach(tableB.id);
copyThroughDevice();
console.log(`replaced with table ${now} while attached: edu copied "${copied(bufferB)}" inside buffer B`);
device.setBusMaster(false);
device.detach();
console.log("done");
