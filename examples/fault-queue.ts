#!/usr/bin/env bun
/**
 * I/O page faults delivered to user space: a fault queue (IOMMU_FAULT_QUEUE_ALLOC) attached to a
 * page table receives the page requests of its devices; the program awaits them, decodes them and
 * answers each group. The selftest mock device raises the faults (IOMMU_TEST_OP_TRIGGER_IOPF).
 *
 *   bun run vm -- bun examples/fault-queue.ts
 */
import { FaultQueue, HwPageTable, Iommufd } from "../src/index.ts";
import { MockDomain } from "../src/testing/selftest.ts";

using iommufd = Iommufd.open();
using ioas = iommufd.createIoas();
using device = MockDomain.attach(ioas);
using faults = FaultQueue.allocate(iommufd);
using hwpt = HwPageTable.allocate(ioas, device, { faultQueue: faults });
device.replace(hwpt);
console.log(`fault queue ${faults.id} (fd ${faults.fd}) serves hw page table ${hwpt.id}`);

const arrived = faults.read({ timeoutMs: 10_000 });
setTimeout(() => device.triggerPageFault({ address: 0x12345000, groupId: 9, write: true }), 10);
for (const fault of await arrived) {
  console.log(
    `fault from device ${fault.deviceId}: address 0x${fault.address.toString(16)} group ${fault.groupId} ` +
      `${fault.read ? "r" : "-"}${fault.write ? "w" : "-"} last=${fault.lastPage} cookie ${fault.cookie}`,
  );
  faults.respond(fault, "success");
  console.log(`answered cookie ${fault.cookie}: success`);
}
device.replace(ioas);
console.log("done");
