// The cheapest proof that the kernel tests run where iommufd exists: in the test guest (or on a
// host with iommufd) /dev/iommu must be a character device we can open.
import { expect, test } from "bun:test";
import { closeSync, existsSync, openSync, statSync } from "node:fs";

const mustHaveIommu = process.env.IOMMUFD_IN_VM === "1" || existsSync("/dev/iommu");

test.skipIf(!mustHaveIommu)("/dev/iommu is a character device that opens", () => {
  expect(statSync("/dev/iommu").isCharacterDevice()).toBe(true);
  const fd = openSync("/dev/iommu", "r+");
  try {
    expect(fd).toBeGreaterThanOrEqual(0);
  } finally {
    closeSync(fd);
  }
});
