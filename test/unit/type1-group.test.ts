/** How a non-viable IOMMU group is explained: read from a sysfs tree laid out like the kernel's. */
import { afterAll, describe, expect, test } from "bun:test";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { explainNotViable, groupMembers } from "../../src/type1/group.ts";

const root = mkdtempSync(join(tmpdir(), "iommu-groups-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

/** /sys/kernel/iommu_groups/<group>/devices/<address> -> a device dir with an optional driver link. */
function device(group: number, address: string, driver?: string): void {
  const dir = join(root, "devices", address);
  mkdirSync(dir, { recursive: true });
  if (driver) {
    mkdirSync(join(root, "drivers", driver), { recursive: true });
    symlinkSync(join(root, "drivers", driver), join(dir, "driver"));
  }
  mkdirSync(join(root, String(group), "devices"), { recursive: true });
  symlinkSync(dir, join(root, String(group), "devices", address));
}

describe("group viability", () => {
  device(7, "0000:01:00.1", "snd_hda_intel");
  device(7, "0000:01:00.0", "vfio-pci");
  device(7, "0000:01:00.2");
  device(7, "0000:01:00.3", "xhci_hcd");

  test("members come sorted, with their drivers (none when unbound)", () => {
    expect(groupMembers(7, root)).toEqual([
      { address: "0000:01:00.0", driver: "vfio-pci" },
      { address: "0000:01:00.1", driver: "snd_hda_intel" },
      { address: "0000:01:00.2", driver: undefined },
      { address: "0000:01:00.3", driver: "xhci_hcd" },
    ]);
    expect(groupMembers(8, root)).toEqual([]);
  });

  test("the explanation names every device bound to another driver, and only those", () => {
    const text = explainNotViable(7, groupMembers(7, root));
    expect(text).toBe(
      "IOMMU group 7 is not viable: 0000:01:00.1 (bound to snd_hda_intel), 0000:01:00.3 (bound to xhci_hcd) are not bound to vfio-pci",
    );
    expect(explainNotViable(9, [{ address: "0000:02:00.0", driver: "nvme" }])).toContain(
      "0000:02:00.0 (bound to nvme) is not",
    );
  });
});
