#!/usr/bin/env bun
/**
 * What the IOMMU behind a device can do (IOMMU_GET_HW_INFO): its type, the generic capabilities
 * (dirty tracking, PASID) and, for Intel VT-d, the capability registers decoded by name.
 *
 *   bun run vm -- bun examples/hw-info.ts     (edu behind QEMU's emulated VT-d, plus a mock device)
 */
import {
  bindToVfioPci,
  explainNoDirtyTracking,
  findPciDevices,
  Iommufd,
  readHwInfo,
  VfioDevice,
  type HwInfo,
} from "../src/index.ts";
import { MockDomain } from "../src/testing/selftest.ts";
import { EDU_DEVICE, EDU_VENDOR } from "./edu.ts";

function show(label: string, info: HwInfo): void {
  console.log(
    `${label}: type ${info.type} (0x${info.typeId.toString(16)}), ${info.data.byteLength} bytes of driver data`,
  );
  console.log(`  capabilities: ${JSON.stringify(info.capabilities)}, max PASID bits ${info.maxPasidLog2}`);
  console.log(`  dirty tracking: ${info.capabilities.dirtyTracking ? "yes" : `no (${explainNoDirtyTracking(info)})`}`);
  if (info.vtd) {
    console.log(`  VT-d cap 0x${info.vtd.capReg.toString(16)} ecap 0x${info.vtd.ecapReg.toString(16)}`);
    console.log(
      `  address widths ${info.vtd.cap.adjustedGuestAddressWidths.join("/")} bits, MGAW ${info.vtd.cap.maxGuestAddressWidth}, ${info.vtd.cap.domains} domains`,
    );
    console.log(`  set: ${info.vtd.names.join(" ")}`);
  }
  if (info.selftest) console.log(`  selftest register 0x${info.selftest.testReg.toString(16)}`);
}

using iommufd = Iommufd.open();
const edu = findPciDevices(EDU_VENDOR, EDU_DEVICE)[0];
if (edu) {
  using device = VfioDevice.open(bindToVfioPci(edu));
  device.bind(iommufd);
  show(`edu ${edu}`, readHwInfo(iommufd, device));
} else {
  console.log("no edu device here: showing only the selftest mock device");
}
using ioas = iommufd.createIoas();
using mock = MockDomain.attach(ioas);
show("mock device", readHwInfo(iommufd, mock));
console.log("done");
