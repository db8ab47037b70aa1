/**
 * PCI devices in sysfs: finding them, binding them to vfio-pci, and the VFIO cdev of a bound one.
 * No ioctl here: only /sys/bus/pci and /sys/class/vfio-dev.
 */
import { existsSync, readdirSync, readFileSync, readlinkSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import { ERRNO } from "../sys/errno.ts";
import { argumentError, syscallError } from "../sys/error.ts";

/** A full PCI address: domain:bus:device.function (0000:00:03.0). */
export const PCI_ADDRESS = /^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$/i;
const SYSFS_PCI = "/sys/bus/pci/devices";

/** The sysfs directory of a PCI device; ENODEV naming `argument` when there is none. */
function pciDeviceDir(pciAddress: string, operation: string, argument: string): string {
  const dir = join(SYSFS_PCI, pciAddress);
  if (!existsSync(dir)) {
    throw argumentError(operation, argument, `no PCI device ${pciAddress}`, "ENODEV");
  }
  return dir;
}

/** /dev/vfio/devices/vfioN of a PCI device bound to vfio-pci. */
export function vfioCdevOf(pciAddress: string, op: string): string {
  pciDeviceDir(pciAddress, op, "pathOrPciAddress");
  const cdev = vfioCdevIfAny(pciAddress);
  if (cdev === undefined) {
    const driver = driverOf(pciAddress);
    throw argumentError(
      op,
      "pathOrPciAddress",
      `${pciAddress} has no VFIO cdev (driver: ${driver ?? "none"})`,
      "ENODEV",
      driver === "vfio-pci"
        ? "this kernel gives VFIO devices no cdev (CONFIG_VFIO_DEVICE_CDEV unset): open it through its group, " +
            'with a VfioContainer or the "type1" backend'
        : `bind it to vfio-pci first: bindToVfioPci("${pciAddress}")`,
    );
  }
  return cdev;
}

/** The PCI address behind a VFIO cdev path, when it is a PCI device. */
export function pciAddressOfCdev(path: string): string | undefined {
  const name = basename(path);
  try {
    const link = readlinkSync(join("/sys/class/vfio-dev", name, "device"));
    const address = basename(link);
    return PCI_ADDRESS.test(address) ? address : undefined;
  } catch {
    return undefined;
  }
}

function driverOf(pciAddress: string): string | undefined {
  try {
    return basename(readlinkSync(join(SYSFS_PCI, pciAddress, "driver")));
  } catch {
    return undefined;
  }
}

/**
 * Bind a PCI device to vfio-pci (driver_override, unbind, probe) and return its VFIO cdev path.
 * Needs root. Idempotent when the device is already bound to vfio-pci.
 */
export function bindToVfioPci(pciAddress: string, options: { timeoutMs?: number } = {}): string {
  const op = "bindToVfioPci";
  const deadline = Date.now() + (options.timeoutMs ?? 5000);
  const address = bindVfioPciDriver(pciAddress, { operation: op, deadline });
  for (;;) {
    try {
      return vfioCdevOf(address, op);
    } catch (error) {
      if (Date.now() > deadline) throw error;
      Bun.sleepSync(20);
    }
  }
}

/**
 * Bind a PCI device to vfio-pci and return its address in lower case, without asking for a
 * cdev: a kernel without CONFIG_VFIO_DEVICE_CDEV reaches the device through its group only.
 * Needs root. Idempotent when the device is already bound to vfio-pci.
 */
export function bindVfioPciDriver(pciAddress: string, options: { operation?: string; deadline?: number } = {}): string {
  const op = options.operation ?? "bindVfioPciDriver";
  if (typeof pciAddress !== "string" || !PCI_ADDRESS.test(pciAddress))
    throw argumentError(op, "pciAddress", `"${pciAddress}" is not a PCI address like 0000:00:03.0`);
  const address = pciAddress.toLowerCase();
  const dir = pciDeviceDir(address, op, "pciAddress");
  const write = (path: string, value: string) => {
    try {
      writeFileSync(path, value);
    } catch (error) {
      const errno = (error as { errno?: number }).errno;
      throw syscallError(
        op,
        errno !== undefined ? Math.abs(errno) : ERRNO.EIO,
        `writing "${value}" to ${path} failed: ${(error as Error).message}`,
        { hint: "binding drivers needs root, and vfio-pci must be built in or loaded" },
      );
    }
  };
  if (driverOf(address) !== "vfio-pci") {
    write(join(dir, "driver_override"), "vfio-pci");
    if (driverOf(address)) write(join(dir, "driver", "unbind"), address);
    write("/sys/bus/pci/drivers_probe", address);
  }
  // The probe runs in the write; the wait covers a kernel that defers it.
  const deadline = options.deadline ?? Date.now() + 5000;
  while (driverOf(address) !== "vfio-pci") {
    if (Date.now() > deadline) {
      throw syscallError(
        op,
        ERRNO.ENODEV,
        `${address} did not bind to vfio-pci (driver: ${driverOf(address) ?? "none"})`,
        {
          argument: "pciAddress",
          hint: "see the kernel log (dmesg) for vfio-pci's reason; the device needs an IOMMU group (IOMMU on)",
        },
      );
    }
    Bun.sleepSync(20);
  }
  return address;
}

/**
 * The VFIO cdev of a device bound to vfio-pci, or undefined when the kernel gave it none. Kernels
 * from 6.1 list vfio-dev/vfioN in sysfs for every VFIO device, but only those with
 * CONFIG_VFIO_DEVICE_CDEV give it a device number (its `dev` file) and so a node (seen on 6.1).
 */
export function vfioCdevIfAny(pciAddress: string, sysfsPci = SYSFS_PCI): string | undefined {
  const vfioDev = join(sysfsPci, pciAddress, "vfio-dev");
  const nodes = existsSync(vfioDev) ? readdirSync(vfioDev).filter((n) => n.startsWith("vfio")) : [];
  const node = nodes.find((n) => existsSync(join(vfioDev, n, "dev")));
  return node === undefined ? undefined : join("/dev/vfio/devices", node);
}

/** PCI addresses of devices with this vendor and device id (e.g. 0x1234, 0x11e8 for QEMU's edu). */
export function findPciDevices(vendor: number, device: number): string[] {
  if (!existsSync(SYSFS_PCI)) return [];
  return readdirSync(SYSFS_PCI).filter((address) => {
    try {
      const v = Number(readFileSync(join(SYSFS_PCI, address, "vendor"), "utf8").trim());
      const d = Number(readFileSync(join(SYSFS_PCI, address, "device"), "utf8").trim());
      return v === vendor && d === device;
    } catch {
      return false;
    }
  });
}
