/** Whether a device has a VFIO cdev, read from a sysfs tree laid out like the kernel's (6.1 and 6.6+). */
import { afterAll, expect, test } from "bun:test";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { vfioCdevIfAny } from "../../src/vfio/pci.ts";

const root = mkdtempSync(join(tmpdir(), "sysfs-pci-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

/** /sys/bus/pci/devices/<address>/vfio-dev/<node>, with a device number when `devt` is given. */
function vfioDev(address: string, node: string, devt?: string): void {
  const dir = join(root, address, "vfio-dev", node);
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, "uevent"), "");
  if (devt) writeFileSync(join(dir, "dev"), `${devt}\n`);
}

test("a vfio-dev entry with a device number is a cdev; 6.1's entry without one is none", () => {
  vfioDev("0000:00:04.0", "vfio1", "245:1");
  vfioDev("0000:00:03.0", "vfio0");
  mkdirSync(join(root, "0000:00:05.0"), { recursive: true });
  expect(vfioCdevIfAny("0000:00:04.0", root)).toBe("/dev/vfio/devices/vfio1");
  expect(vfioCdevIfAny("0000:00:03.0", root)).toBeUndefined();
  expect(vfioCdevIfAny("0000:00:05.0", root)).toBeUndefined();
  expect(vfioCdevIfAny("0000:00:06.0", root)).toBeUndefined();
});
