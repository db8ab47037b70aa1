// The test guest's options: device specs, PCI placement, what QEMU and the guest's init are told.
import { describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs, UsageError } from "../../vm/cli.ts";
import {
  DeviceSpecError,
  deviceArgs,
  guestDeviceTable,
  parseDeviceSpec,
  parseMiBSize,
  placeDevices,
  prepareDisks,
} from "../../vm/devices.ts";
import { workShare } from "../../vm/guest-script.ts";

describe("--device", () => {
  test("edu and nvme with size, cmb, name, file, driver", () => {
    expect(parseDeviceSpec("edu")).toEqual({ kind: "edu" });
    expect(parseDeviceSpec("nvme,size=128M,cmb=16M")).toEqual({ kind: "nvme", size: 128 << 20, cmb: 16 << 20 });
    expect(parseDeviceSpec("nvme,cmb=16,name=b")).toEqual({ kind: "nvme", cmb: 16 << 20, name: "b" });
    expect(parseDeviceSpec("nvme,size=1G,driver=kernel").driver).toBe("kernel");
    expect(parseDeviceSpec("nvme,file=/x/y.img").file).toBe("/x/y.img");
    expect(parseMiBSize("512K")).toBe(512 << 10);
  });

  test("bad specs name the device, the parameter and what is accepted", () => {
    expect(() => parseDeviceSpec("floppy")).toThrow(/unknown device "floppy".*known: edu, nvme/);
    expect(() => parseDeviceSpec("edu,size=1M")).toThrow(/edu has no parameter "size"/);
    expect(() => parseDeviceSpec("nvme,size=abc")).toThrow(/size wants a size like 64M/);
    expect(() => parseDeviceSpec("nvme,cmb=1K")).toThrow(/cmb wants whole MiB/);
    expect(() => parseDeviceSpec("nvme,size=")).toThrow(/size needs a value/);
    expect(() => parseDeviceSpec("nvme,driver=spdk")).toThrow(/driver is vfio .* or kernel/);
    expect(() =>
      placeDevices([
        { kind: "edu", name: "x" },
        { kind: "nvme", name: "x" },
      ]),
    ).toThrow(DeviceSpecError);
    expect(() => placeDevices(Array.from({ length: 29 }, () => ({ kind: "edu" as const })))).toThrow(
      /at most 28 devices/,
    );
  });
});

describe("placement", () => {
  test("fixed slots in command-line order, names per kind", () => {
    const placed = placeDevices([{ kind: "edu" }, { kind: "nvme" }, { kind: "nvme", cmb: 16 << 20 }]);
    expect(placed.map((d) => [d.name, d.addr])).toEqual([
      ["edu0", "0000:00:03.0"],
      ["nvme0", "0000:00:04.0"],
      ["nvme1", "0000:00:05.0"],
    ]);
    expect(placed[2]).toMatchObject({ size: 64 << 20, cmb: 16 << 20, driver: "vfio" });
  });

  test("QEMU arguments and the guest's device table", () => {
    const dir = mkdtempSync(join(tmpdir(), "vm-options-"));
    try {
      const placed = placeDevices([
        { kind: "edu" },
        { kind: "nvme", cmb: 16 << 20 },
        { kind: "nvme", driver: "kernel" },
      ]);
      expect(prepareDisks(placed, dir)).toBe(dir);
      expect(statSync(join(dir, "nvme0.img")).size).toBe(64 << 20);
      expect(deviceArgs(placed)).toEqual([
        "-device",
        "edu,addr=0x03",
        "-drive",
        `file=${dir}/nvme0.img,if=none,id=nvmedisk1,format=raw`,
        "-device",
        "nvme,serial=iommufd-1,drive=nvmedisk1,addr=0x04,cmb_size_mb=16",
        "-drive",
        `file=${dir}/nvme1.img,if=none,id=nvmedisk2,format=raw`,
        "-device",
        "nvme,serial=iommufd-2,drive=nvmedisk2,addr=0x05",
      ]);
      const table = guestDeviceTable(placed, "intel").split("\n");
      expect(table[0]).toBe("0000:00:03.0 edu edu0 vfio VFIO,EDU -");
      expect(table[1]).toBe(
        `0000:00:04.0 nvme nvme0 vfio VFIO,NVME,NVME_CMB ,"size":67108864,"cmb":16777216,"disk":"${dir}/nvme0.img"`,
      );
      expect(table[2]).toStartWith("0000:00:05.0 nvme nvme1 kernel NVME_KERNEL ,");
      // Without an IOMMU nothing can go to vfio-pci.
      expect(guestDeviceTable(placed.slice(0, 1), "none")).toBe("0000:00:03.0 edu edu0 none - -\n");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("an existing image keeps its size; a bad one is refused", () => {
    const dir = mkdtempSync(join(tmpdir(), "vm-options-"));
    try {
      const file = join(dir, "mine.img");
      writeFileSync(file, Buffer.alloc(1 << 20));
      const [d] = placeDevices([{ kind: "nvme", file }]);
      prepareDisks([d!]);
      expect(d!.size).toBe(1 << 20);
      writeFileSync(file, "odd");
      expect(() => prepareDisks(placeDevices([{ kind: "nvme", file }]))).toThrow(/needs a non-empty multiple of 512/);
      expect(existsSync(join(dir, "nvme0.img"))).toBe(false);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("command line", () => {
  test("options before the command, the command after --", () => {
    const o = parseArgs([
      "--device",
      "edu",
      "--device",
      "nvme,cmb=16M",
      "--iommu",
      "intel",
      "--cpus",
      "1",
      "--",
      "bun",
      "test",
    ]);
    expect(o.devices).toHaveLength(2);
    expect(o.cpus).toBe(1);
    expect(o.command).toEqual(["bun", "test"]);
    expect(parseArgs(["bun", "--version"]).command).toEqual(["bun", "--version"]);
    expect(parseArgs(["--check"]).check).toBe(true);
  });

  test("bad options are usage errors", () => {
    expect(() => parseArgs(["--device", "gpu", "--", "true"])).toThrow(UsageError);
    expect(() => parseArgs(["--iommu", "arm", "--", "true"])).toThrow(/--iommu wants one of intel, virtio, none/);
    expect(() => parseArgs(["--cpus", "0", "--", "true"])).toThrow(/--cpus wants a whole number of at least 1/);
    expect(() => parseArgs(["--memory", "lots", "--", "true"])).toThrow(/--memory wants a size/);
    expect(() => parseArgs(["--frobnicate", "--", "true"])).toThrow(/unknown option --frobnicate/);
    expect(() => parseArgs(["--device", "edu"])).toThrow(/no command given/);
  });

  test("the writable share: the directory itself, or its top directory under /tmp", () => {
    expect(workShare("/work/project")).toBe("/work/project");
    expect(workShare("/tmp/ci-clone/packages/a")).toBe("/tmp/ci-clone");
  });
});
