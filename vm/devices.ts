// The guest's devices: parsing `--device` specs, placing them on the PCI bus, creating NVMe disk
// images, and the description the guest's init reads to bind them. Pure apart from the disk files.
// The shape of what the command sees is documented in the README section on the test guest.

import { existsSync, mkdirSync, mkdtempSync, statSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

export type DeviceKind = "edu" | "nvme";
export const DEVICE_KINDS: readonly DeviceKind[] = ["edu", "nvme"];

/** Which driver the guest leaves a device on: vfio-pci (default) or the kernel's own driver. */
export type DeviceDriver = "vfio" | "kernel";

export interface DeviceSpec {
  kind: DeviceKind;
  /** Label in IOMMUFD_VM_DEVICES; default kind + index among devices of that kind (nvme0, nvme1). */
  name?: string;
  /** NVMe namespace size in bytes (default 64 MiB). */
  size?: number;
  /** NVMe controller memory buffer in bytes, a whole number of MiB (default none). */
  cmb?: number;
  /** NVMe: use this raw image (created with `size` if missing) instead of a new one. */
  file?: string;
  driver?: DeviceDriver;
}

/** A device as placed in one guest: its PCI address and, for NVMe, its disk image on the host. */
export interface PlacedDevice {
  name: string;
  kind: DeviceKind;
  /** PCI address in the guest, e.g. 0000:00:03.0. */
  addr: string;
  driver: DeviceDriver;
  size?: number;
  cmb?: number;
  /** Host path of the NVMe disk image. */
  disk?: string;
}

export type IommuModel = "intel" | "virtio" | "none";
export const IOMMU_MODELS: readonly IommuModel[] = ["intel", "virtio", "none"];

export const DEFAULT_NVME_SIZE = 64 << 20;
// Devices get fixed slots from here on, in command-line order, so their addresses are known before
// boot; the 9p shares (auto-placed) take the free slots below and after.
const FIRST_SLOT = 0x03;
const LAST_SLOT = 0x1e; // 0x1f is the ICH9 LPC/SMBus on q35

const UNITS: Record<string, number> = { "": 1 << 20, K: 1 << 10, M: 1 << 20, G: 1 << 30 };

/** "64M", "1G", "512K"; a bare number means MiB. Returns bytes, or undefined if malformed. */
export function parseMiBSize(text: string): number | undefined {
  const m = /^(\d+)\s*([KMG]?)(i?B)?$/i.exec(text.trim());
  if (!m) return undefined;
  const bytes = Number(m[1]) * UNITS[m[2]!.toUpperCase()]!;
  return Number.isSafeInteger(bytes) && bytes > 0 ? bytes : undefined;
}

export class DeviceSpecError extends Error {}

/** Parses `edu` or `nvme[,size=64M][,cmb=16M][,name=N][,file=PATH][,driver=vfio|kernel]`. */
export function parseDeviceSpec(text: string): DeviceSpec {
  const [kind, ...params] = text.split(",");
  if (!DEVICE_KINDS.includes(kind as DeviceKind)) {
    throw new DeviceSpecError(`unknown device "${kind}" in --device ${text}; known: ${DEVICE_KINDS.join(", ")}`);
  }
  const spec: DeviceSpec = { kind: kind as DeviceKind };
  const allowed = kind === "nvme" ? ["name", "size", "cmb", "file", "driver"] : ["name"];
  for (const param of params) {
    const eq = param.indexOf("=");
    const key = eq < 0 ? param : param.slice(0, eq);
    const value = eq < 0 ? "" : param.slice(eq + 1);
    if (!allowed.includes(key)) {
      throw new DeviceSpecError(
        `--device ${text}: ${kind} has no parameter "${key}" (it takes: ${allowed.join(", ") || "none"})`,
      );
    }
    if (value === "") throw new DeviceSpecError(`--device ${text}: ${key} needs a value (${key}=...)`);
    switch (key) {
      case "name":
        if (!/^[A-Za-z0-9_-]{1,32}$/.test(value)) {
          throw new DeviceSpecError(`--device ${text}: name may hold letters, digits, - and _ (at most 32)`);
        }
        spec.name = value;
        break;
      case "size": {
        const bytes = parseMiBSize(value);
        if (bytes === undefined || bytes % 4096 !== 0) {
          throw new DeviceSpecError(
            `--device ${text}: size wants a size like 64M or 1G (a multiple of 4 KiB), not "${value}"`,
          );
        }
        spec.size = bytes;
        break;
      }
      case "cmb": {
        const bytes = parseMiBSize(value);
        if (bytes === undefined || bytes % (1 << 20) !== 0) {
          throw new DeviceSpecError(`--device ${text}: cmb wants whole MiB like 16M, not "${value}"`);
        }
        spec.cmb = bytes;
        break;
      }
      case "file":
        spec.file = resolve(value);
        break;
      case "driver":
        if (value !== "vfio" && value !== "kernel") {
          throw new DeviceSpecError(
            `--device ${text}: driver is vfio (bound to vfio-pci) or kernel (the kernel's nvme driver)`,
          );
        }
        spec.driver = value;
        break;
    }
  }
  return spec;
}

/** Gives each device a name and a PCI slot; rejects duplicate names and too many devices. */
export function placeDevices(specs: readonly DeviceSpec[]): PlacedDevice[] {
  if (specs.length > LAST_SLOT - FIRST_SLOT + 1) {
    throw new DeviceSpecError(
      `at most ${LAST_SLOT - FIRST_SLOT + 1} devices fit on the guest's PCI bus (got ${specs.length})`,
    );
  }
  const perKind = new Map<DeviceKind, number>();
  const names = new Set<string>();
  return specs.map((spec, i) => {
    const index = perKind.get(spec.kind) ?? 0;
    perKind.set(spec.kind, index + 1);
    const name = spec.name ?? `${spec.kind}${index}`;
    if (names.has(name)) throw new DeviceSpecError(`two devices are named "${name}"`);
    names.add(name);
    const slot = FIRST_SLOT + i;
    const placed: PlacedDevice = {
      name,
      kind: spec.kind,
      addr: `0000:00:${slot.toString(16).padStart(2, "0")}.0`,
      driver: spec.driver ?? "vfio",
    };
    if (spec.kind === "nvme") {
      placed.size = spec.size ?? DEFAULT_NVME_SIZE;
      placed.cmb = spec.cmb ?? 0;
      if (spec.file) placed.disk = spec.file;
    }
    return placed;
  });
}

/**
 * Creates the NVMe disk images that do not exist yet (sparse files: a 64 MiB image costs nothing
 * until written) and returns the directory new ones went to. An existing `file=` image keeps its
 * contents and its size.
 */
export function prepareDisks(devices: PlacedDevice[], diskDir?: string): string | undefined {
  const needDir = devices.some((d) => d.kind === "nvme" && !d.disk);
  let dir = diskDir;
  if (needDir) {
    if (dir) mkdirSync(dir, { recursive: true });
    else dir = mkdtempSync(join(tmpdir(), "bun-iommufd-disks-"));
  }
  for (const d of devices) {
    if (d.kind !== "nvme") continue;
    d.disk ??= join(dir!, `${d.name}.img`);
    if (existsSync(d.disk)) {
      d.size = statSync(d.disk).size;
      if (d.size === 0 || d.size % 512 !== 0) {
        throw new DeviceSpecError(
          `disk image ${d.disk} is ${d.size} bytes; an NVMe namespace needs a non-empty multiple of 512`,
        );
      }
    } else {
      writeFileSync(d.disk, "");
      truncateSync(d.disk, d.size);
    }
  }
  return dir;
}

// QEMU's option syntax doubles a comma inside a value.
const qemuValue = (s: string) => s.replaceAll(",", ",,");

export function iommuArgs(model: IommuModel): string[] {
  switch (model) {
    case "intel":
      return ["-device", "intel-iommu,intremap=on,caching-mode=on"];
    case "virtio":
      return ["-device", "virtio-iommu-pci"];
    case "none":
      return [];
  }
}

/** Kernel command-line words for the IOMMU model. */
export function iommuKernelArgs(model: IommuModel): string[] {
  if (model === "intel") return ["intel_iommu=on"];
  // virtio-iommu on x86 has no interrupt remapping, so iommufd refuses to bind a device (EPERM)
  // unless told that MSIs need no isolation: true enough inside a throwaway guest.
  if (model === "virtio") return ["iommufd.allow_unsafe_interrupts=1"];
  return [];
}

export function deviceArgs(devices: readonly PlacedDevice[]): string[] {
  const args: string[] = [];
  devices.forEach((d, i) => {
    const addr = `addr=0x${d.addr.slice(8, 10)}`;
    if (d.kind === "edu") {
      args.push("-device", `edu,${addr}`);
      return;
    }
    const drive = `nvmedisk${i}`;
    args.push("-drive", `file=${qemuValue(d.disk!)},if=none,id=${drive},format=raw`);
    const cmb = d.cmb ? `,cmb_size_mb=${d.cmb / (1 << 20)}` : "";
    args.push("-device", `nvme,serial=iommufd-${i},drive=${drive},${addr}${cmb}`);
  });
  return args;
}

/**
 * The variables (IOMMUFD_VM_<list>) a device is listed in; the guest appends `addr=node` to each.
 * IOMMUFD_VM_DEVICES (JSON) holds every device.
 */
export const DEVICE_LISTS = ["VFIO", "EDU", "NVME", "NVME_CMB", "NVME_KERNEL"] as const;

function listsOf(d: PlacedDevice, iommu: IommuModel): string[] {
  if (d.kind === "nvme" && d.driver === "kernel") return ["NVME_KERNEL"];
  if (iommu === "none") return []; // vfio-pci refuses devices without an IOMMU
  if (d.kind === "edu") return ["VFIO", "EDU"];
  return d.cmb ? ["VFIO", "NVME", "NVME_CMB"] : ["VFIO", "NVME"];
}

/**
 * One line per device for the guest's init (vm/guest-init.sh):
 * `addr kind name bind lists extra-json`, where bind is vfio, kernel or none and extra-json is the
 * rest of the device's JSON object (starting with a comma) or "-".
 */
export function guestDeviceTable(devices: readonly PlacedDevice[], iommu: IommuModel): string {
  return devices
    .map((d) => {
      const bind = d.driver === "kernel" ? "kernel" : iommu === "none" ? "none" : "vfio";
      const extra = d.kind === "nvme" ? `,"size":${d.size},"cmb":${d.cmb ?? 0},"disk":${JSON.stringify(d.disk)}` : "";
      return `${d.addr} ${d.kind} ${d.name} ${bind} ${listsOf(d, iommu).join(",") || "-"} ${extra || "-"}\n`;
    })
    .join("");
}
