// The cheapest proof that the kernel tests run where iommufd exists: in the test guest (or on a
// host with iommufd) /dev/iommu must be a character device we can open.
import { expect, test } from "bun:test";
import { closeSync, existsSync, fstatSync, openSync, readFileSync, readlinkSync, statSync } from "node:fs";

const mustHaveIommu = process.env.IOMMUFD_IN_VM === "1" || existsSync("/dev/iommu");

test.skipIf(!mustHaveIommu)("/dev/iommu is a character device that opens", () => {
  const node = statSync("/dev/iommu");
  expect(node.isCharacterDevice()).toBe(true);
  // openSync throws on failure; what it gave must be that very device, opened read-write.
  const fd = openSync("/dev/iommu", "r+");
  try {
    const opened = fstatSync(fd);
    expect({ char: opened.isCharacterDevice(), rdev: opened.rdev }).toEqual({ char: true, rdev: node.rdev });
    expect(readlinkSync(`/proc/self/fd/${fd}`)).toBe("/dev/iommu");
    const flags = /^flags:\s+([0-7]+)$/m.exec(readFileSync(`/proc/self/fdinfo/${fd}`, "utf8"))?.[1];
    expect(Number.parseInt(flags ?? "", 8) & 3).toBe(2); // O_ACCMODE == O_RDWR
  } finally {
    closeSync(fd);
  }
});
