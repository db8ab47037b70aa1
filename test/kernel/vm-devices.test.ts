// The test guest's device variables (vm/guest-init.sh) agree with what the guest kernel sees in
// sysfs: every listed device is where the variable says, on the driver it says, with the node it
// says (the VFIO cdev where the kernel has them, the IOMMU group always), and the per-kind lists
// hold exactly the devices of that kind.
import { describe, expect, test } from "bun:test";
import { existsSync, readFileSync, readlinkSync } from "node:fs";
import { basename } from "node:path";

interface GuestDevice {
  name: string;
  kind: "edu" | "nvme";
  addr: string;
  driver: string;
  group?: string;
  vfio?: string;
  block?: string;
  size?: number;
  cmb?: number;
  disk?: string;
}

const inGuest = process.env.IOMMUFD_IN_VM === "1" && process.env.IOMMUFD_VM_DEVICES !== undefined;
const devices: GuestDevice[] = inGuest ? JSON.parse(process.env.IOMMUFD_VM_DEVICES!) : [];
const sysfs = (addr: string, file: string) => `/sys/bus/pci/devices/${addr}/${file}`;
const IDS = { edu: "0x1234:0x11e8", nvme: "0x1b36:0x0010" };
const features = (process.env.IOMMUFD_VM_FEATURES ?? "").split(",");

function list(name: string): Map<string, string> {
  const text = process.env[`IOMMUFD_VM_${name}`];
  if (text === undefined) throw new Error(`IOMMUFD_VM_${name} is not set in the guest`);
  return new Map(text === "" ? [] : text.split(",").map((e) => e.split("=") as [string, string]));
}

describe.skipIf(!inGuest)("test guest devices (only in the guest of vm/run.ts, which sets IOMMUFD_VM_DEVICES)", () => {
  test("every device is at its address, of its kind, on its driver, with its node", () => {
    expect(devices.length).toBeGreaterThan(0);
    for (const d of devices) {
      const ids = `${readFileSync(sysfs(d.addr, "vendor"), "utf8").trim()}:${readFileSync(sysfs(d.addr, "device"), "utf8").trim()}`;
      expect(ids).toBe(IDS[d.kind]);
      const driver = basename(readlinkSync(sysfs(d.addr, "driver")));
      expect(driver).toBe(d.driver);
      if (d.driver === "vfio-pci") {
        expect(d.group).toBe(`/dev/vfio/${basename(readlinkSync(sysfs(d.addr, "iommu_group")))}`);
        expect(existsSync(d.group!)).toBe(true);
        if (features.includes("vfio-cdev")) {
          expect(d.vfio).toMatch(/^\/dev\/vfio\/devices\/vfio\d+$/);
          expect(existsSync(d.vfio!)).toBe(true);
          expect(existsSync(sysfs(d.addr, `vfio-dev/${basename(d.vfio!)}`))).toBe(true);
        } else {
          expect(d.vfio).toBeUndefined();
        }
      }
      if (d.driver === "nvme") expect(existsSync(d.block!)).toBe(true);
    }
  });

  test("NVMe controllers have their namespace size and CMB", () => {
    for (const d of devices.filter((x) => x.kind === "nvme")) {
      expect(d.size).toBeGreaterThan(0);
      expect(d.disk).toMatch(/\.img$/);
      // QEMU puts the CMB in BAR 2; sysfs `resource` lists start, end, flags per BAR.
      const bar2 = readFileSync(sysfs(d.addr, "resource"), "utf8")
        .split("\n")[2]!
        .split(" ")
        .map((x) => BigInt(x));
      const bar2Size = bar2[1]! === 0n ? 0 : Number(bar2[1]! - bar2[0]! + 1n);
      if (d.cmb) expect(bar2Size).toBe(d.cmb);
      else expect(bar2Size).toBe(0);
    }
  });

  test("the per-kind lists hold exactly the devices of their kind", () => {
    const onVfio = devices.filter((d) => d.driver === "vfio-pci");
    const expected = (keep: (d: GuestDevice) => boolean) =>
      new Map(onVfio.filter(keep).map((d) => [d.addr, d.vfio ?? d.group!] as [string, string]));
    expect(list("VFIO")).toEqual(expected(() => true));
    expect(list("EDU")).toEqual(expected((d) => d.kind === "edu"));
    expect(list("NVME")).toEqual(expected((d) => d.kind === "nvme"));
    expect(list("NVME_CMB")).toEqual(expected((d) => d.kind === "nvme" && !!d.cmb));
    const kernel = new Map(
      devices.filter((d) => d.driver === "nvme").map((d) => [d.addr, d.block!] as [string, string]),
    );
    expect(list("NVME_KERNEL")).toEqual(kernel);
  });
});
