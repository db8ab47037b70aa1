// The kernel matrix of `bun-iommufd vm --kernel NAME`: each kernel boots with edu and one NVMe
// controller, binds both to vfio-pci, and tells the command what booted and what it has: the
// device description names each device's IOMMU group (whose node exists), the VFIO cdev only
// where the kernel has cdevs, and /dev/iommu is there exactly on the kernels with iommufd.
// A kernel that is not cached is skipped here (under CI a skip fails: scripts/test.ts fetches and
// builds every kernel of the matrix first).
import { afterAll, describe, expect, test } from "bun:test";
import { cachedKernel, KERNEL_NAMES, type KernelName } from "../../vm/images.ts";
import { bin, noGuest, processesMentioning, removeMarkers, root, runCli } from "./support.ts";

afterAll(removeMarkers);

interface Expected {
  kernel: RegExp;
  /** Features IOMMUFD_VM_FEATURES must list, and those it must not. */
  has: string[];
  lacks: string[];
}

const EXPECTED: Record<KernelName, Expected> = {
  "7.2": {
    kernel: /^7\.2\.\d+/,
    has: ["iommufd", "vfio-cdev", "vfio-container", "iommufd-test", "fault-injection", "udmabuf", "hugepages"],
    lacks: [],
  },
  "6.12": {
    kernel: /^6\.12\.\d+/,
    has: ["iommufd", "vfio-cdev", "vfio-container", "iommufd-test", "fault-injection", "udmabuf", "hugepages"],
    lacks: [],
  },
  // Debian 12's stock kernel: VFIO type1 only, nothing of the fragment's test options.
  debian: {
    kernel: /^debian-6\.1\.0-\d+-amd64$/,
    has: ["vfio-container", "hugepages"],
    lacks: ["iommufd", "vfio-cdev", "iommufd-test", "fault-injection", "udmabuf"],
  },
};

interface Device {
  name: string;
  kind: string;
  addr: string;
  driver: string;
  group?: string;
  vfio?: string;
}

function facts(stdout: string): Map<string, string[]> {
  const map = new Map<string, string[]>();
  for (const line of stdout.split("\n")) {
    const eq = line.indexOf("=");
    if (eq <= 0) continue;
    const key = line.slice(0, eq);
    map.set(key, [...(map.get(key) ?? []), line.slice(eq + 1)]);
  }
  return map;
}

const cached = new Map<KernelName, string | undefined>();
for (const name of KERNEL_NAMES) cached.set(name, noGuest ? undefined : await cachedKernel(name));

for (const name of KERNEL_NAMES) {
  const skip = noGuest ?? (cached.get(name) ? undefined : `not cached: bash vm/kernel.sh build ${name}`);
  describe.skipIf(skip !== undefined)(`--kernel ${name} (${skip ?? cached.get(name)})`, () => {
    test("boots, binds edu and NVMe to vfio-pci, describes them by group, /dev/iommu as the kernel has it", async () => {
      const argv = [process.execPath, bin, "vm", "--kernel", name, "--device", "edu", "--device", "nvme"];
      const r = await runCli([...argv, "--", "sh", `${root}/test/vm/guest-facts.sh`]);
      const boot = /boot-to-command [^\n]*/.exec(r.stderr)?.[0];
      const f = facts(r.stdout);
      console.log(`--kernel ${name}: ${boot}; guest memory used ${f.get("mem-used-mib")?.[0]} MiB`);
      if (r.code !== 0) console.log(r.stderr);
      expect(r.code).toBe(0);

      const want = EXPECTED[name];
      const kernel = f.get("kernel")?.[0] ?? "";
      expect(kernel).toMatch(want.kernel);
      expect(kernel.endsWith(f.get("release")![0]!)).toBe(true);
      const features = (f.get("features")?.[0] ?? "").split(",");
      for (const feature of want.has) expect(features).toContain(feature);
      for (const feature of want.lacks) expect(features).not.toContain(feature);
      // The feature list agrees with the guest's own /dev.
      expect(f.get("dev-iommu")).toEqual([features.includes("iommufd") ? "yes" : "no"]);
      expect(f.get("container")).toEqual([features.includes("vfio-container") ? "yes" : "no"]);

      const devices = JSON.parse(f.get("devices")?.[0] ?? "[]") as Device[];
      expect(devices.map((d) => [d.kind, d.driver])).toEqual([
        ["edu", "vfio-pci"],
        ["nvme", "vfio-pci"],
      ]);
      // The group each device names is the one the guest kernel put it in, and its node exists.
      const groups = new Map((f.get("group") ?? []).map((g) => g.split("=") as [string, string]));
      expect(new Map(devices.map((d) => [d.addr, d.group!]))).toEqual(groups);
      const cdev = features.includes("vfio-cdev");
      for (const d of devices) {
        if (cdev) expect(d.vfio).toMatch(/^\/dev\/vfio\/devices\/vfio\d+$/);
        else expect(d.vfio).toBeUndefined();
      }
      // IOMMUFD_VM_VFIO names the node the command opens: the cdev, else the group.
      expect(f.get("vfio")).toEqual([devices.map((d) => `${d.addr}=${cdev ? d.vfio : d.group}`).join(",")]);
      expect(processesMentioning(r.marker)).toEqual([]);
    }, 600_000);
  });
}
