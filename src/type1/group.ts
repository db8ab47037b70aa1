/**
 * VfioGroup: an IOMMU group opened through /dev/vfio/<group>, the legacy way to reach a device.
 * A group joins one VfioContainer (which owns the IOMMU) and then hands out the fds of its
 * devices. Opened and owned by its container: `container.openDevice(pciAddress)`.
 */
import { existsSync, readdirSync, readlinkSync } from "node:fs";
import { basename, join } from "node:path";
import { argumentError, closedError, stateError } from "../sys/error.ts";
import { closeFd, cString, fdFinalizer, openPath, setCloseOnExec } from "../sys/fd.ts";
import type { ErrnoTable } from "../sys/errno-table.ts";
import { ioctl, ioctlWithArgument } from "../sys/ioctl.ts";
import { O_RDWR } from "../sys/libc.ts";
import { ptr } from "bun:ffi";
import {
  VFIO_GROUP_FLAGS_CONTAINER_SET,
  VFIO_GROUP_FLAGS_VIABLE,
  VFIO_GROUP_GET_DEVICE_FD,
  VFIO_GROUP_GET_STATUS,
  VFIO_GROUP_SET_CONTAINER,
  vfio_group_status,
} from "../uapi/vfio.ts";
import { VfioDevice } from "../vfio/device.ts";
import type { VfioContainer } from "./container.ts";

const SYSFS_PCI = "/sys/bus/pci/devices";
const SYSFS_GROUPS = "/sys/kernel/iommu_groups";

export interface GroupStatus {
  /** Every device of the group is bound to vfio-pci (or to no driver). */
  viable: boolean;
  /** The group is in a container. */
  containerSet: boolean;
}

/** A device of an IOMMU group and the driver it is bound to (undefined: none). */
export interface GroupMember {
  address: string;
  driver: string | undefined;
}

/** The IOMMU group number of a PCI device, from /sys/bus/pci/devices/<address>/iommu_group. */
export function iommuGroupOf(pciAddress: string, operation: string): number {
  const dir = join(SYSFS_PCI, pciAddress);
  if (!existsSync(dir)) throw argumentError(operation, "pciAddress", `no PCI device ${pciAddress}`, "ENODEV");
  let link: string;
  try {
    link = readlinkSync(join(dir, "iommu_group"));
  } catch {
    throw argumentError(
      operation,
      "pciAddress",
      `${pciAddress} is in no IOMMU group: the IOMMU is off or absent`,
      "ENODEV",
      "enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line, VT-d/AMD-Vi in the firmware)",
    );
  }
  return Number(basename(link));
}

/** The devices of IOMMU group `group` and their drivers, from sysfs. */
export function groupMembers(group: number, sysfsGroups = SYSFS_GROUPS): GroupMember[] {
  const dir = join(sysfsGroups, String(group), "devices");
  if (!existsSync(dir)) return [];
  return readdirSync(dir)
    .sort()
    .map((address) => {
      let driver: string | undefined;
      try {
        driver = basename(readlinkSync(join(dir, address, "driver")));
      } catch {
        driver = undefined;
      }
      return { address, driver };
    });
}

/** Why a group is not viable, in a sentence that names the devices in the way. */
export function explainNotViable(group: number, members: readonly GroupMember[]): string {
  const others = members.filter((m) => m.driver !== undefined && m.driver !== "vfio-pci");
  const listed = others.map((m) => `${m.address} (bound to ${m.driver})`).join(", ");
  return others.length > 0
    ? `IOMMU group ${group} is not viable: ${listed} ${others.length === 1 ? "is" : "are"} not bound to vfio-pci`
    : `IOMMU group ${group} is not viable: not every device in it is bound to vfio-pci`;
}

const OPEN_ERRORS: ErrnoTable<string> = {
  ENOENT: { hint: "no VFIO group node: bind the device to vfio-pci first (bindToVfioPci), with CONFIG_VFIO_GROUP" },
  EACCES: { hint: "no permission on the VFIO group node" },
  EBUSY: {
    hint:
      "a group can be open once: it is already open, in a container of another process, or a device of it is " +
      "bound through its cdev",
  },
};

const SET_CONTAINER_ERRORS: ErrnoTable<number> = {
  EPERM: ({ context }) => ({
    message: `the kernel refused IOMMU group ${context} into the container: its DMA is owned elsewhere`,
    hint: "a device of the group may be open through its cdev (iommufd), or bound to a kernel driver",
  }),
  EBUSY: ({ context }) =>
    `IOMMU group ${context} is busy: a device of it is in use through another interface (its cdev, or a kernel driver)`,
  EINVAL: ({ context }) => `IOMMU group ${context} is already in a container`,
};

const GET_DEVICE_FD_ERRORS: ErrnoTable<string> = {
  EINVAL: ({ context }) => ({
    message: `${context} is not a device of this group, or its group has no IOMMU set yet`,
    argument: "pciAddress",
  }),
  ENODEV: ({ context }) => ({ message: `no device ${context} in this group`, argument: "pciAddress" }),
  EBUSY: ({ context }) => ({
    message: `${context} is already open (through this group, or through its cdev)`,
    argument: "pciAddress",
  }),
};

export class VfioGroup {
  /** The IOMMU group number. */
  readonly number: number;
  readonly path: string;
  readonly container: VfioContainer;
  #fd: number;
  readonly #devices = new Set<VfioDevice>();

  private constructor(container: VfioContainer, number: number, path: string, fd: number) {
    this.container = container;
    this.number = number;
    this.path = path;
    this.#fd = fd;
    fdFinalizer.register(this, fd, this);
  }

  /**
   * @internal Open /dev/vfio/<number>, refuse it unless viable, and put it in `container`
   * (VFIO_GROUP_SET_CONTAINER with the container's fd). Nothing stays open on failure.
   */
  static join(container: VfioContainer, number: number, containerFd: number): VfioGroup {
    const op = "VfioGroup.open";
    const path = `/dev/vfio/${number}`;
    const fd = openPath(path, O_RDWR, op, OPEN_ERRORS);
    try {
      const status = readStatus(fd);
      if (!status.viable) {
        throw stateError(op, "EPERM", explainNotViable(number, groupMembers(number)), {
          argument: "pciAddress",
          hint: "bind every device of the group to vfio-pci (bindToVfioPci), or unbind it from its driver",
        });
      }
      const arg = new Int32Array([containerFd]);
      ioctlWithArgument(
        fd,
        VFIO_GROUP_SET_CONTAINER,
        ptr(arg),
        "VFIO_GROUP_SET_CONTAINER",
        SET_CONTAINER_ERRORS,
        number,
      );
    } catch (error) {
      closeFd(fd, op);
      throw error;
    }
    return new VfioGroup(container, number, path, fd);
  }

  get closed(): boolean {
    return this.#fd < 0;
  }

  get fd(): number {
    return this.#assertOpen("VfioGroup.fd");
  }

  /** The devices opened through this group and still open. */
  get devices(): readonly VfioDevice[] {
    return [...this.#devices];
  }

  /** VFIO_GROUP_GET_STATUS. */
  status(): GroupStatus {
    return readStatus(this.#assertOpen("VFIO_GROUP_GET_STATUS"));
  }

  /** @internal VFIO_GROUP_GET_DEVICE_FD: the device, open and ready (its DMA is the container's). */
  openDevice(pciAddress: string): VfioDevice {
    const op = "VFIO_GROUP_GET_DEVICE_FD";
    const groupFd = this.#assertOpen(op);
    const name = cString(pciAddress);
    const fd = ioctlWithArgument(groupFd, VFIO_GROUP_GET_DEVICE_FD, ptr(name), op, GET_DEVICE_FD_ERRORS, pciAddress);
    try {
      setCloseOnExec(fd, op);
    } catch (error) {
      closeFd(fd, op);
      throw error;
    }
    const device = VfioDevice.fromGroup(fd, this, pciAddress);
    this.#devices.add(device);
    return device;
  }

  /** @internal A device of this group was closed. */
  forget(device: VfioDevice): void {
    this.#devices.delete(device);
  }

  /**
   * Close the group's devices, then the group: the kernel takes it out of its container. When it
   * was the container's last group, the container's IOMMU and every mapping in it go with it.
   * Idempotent.
   */
  close(): void {
    if (this.#fd < 0) return;
    for (const device of this.#devices) device.close();
    const fd = this.#fd;
    this.#fd = -1;
    fdFinalizer.unregister(this);
    try {
      closeFd(fd, "VfioGroup.close");
    } finally {
      this.container.forgetGroup(this);
    }
  }

  [Symbol.dispose](): void {
    this.close();
  }

  #assertOpen(operation: string): number {
    if (this.#fd < 0) throw closedError(operation, `VFIO group ${this.path}`);
    return this.#fd;
  }
}

function readStatus(fd: number): GroupStatus {
  const cmd = vfio_group_status.create().fill({ argsz: vfio_group_status.size });
  ioctl(fd, VFIO_GROUP_GET_STATUS, cmd, "VFIO_GROUP_GET_STATUS");
  const flags = cmd.get("flags");
  return {
    viable: (flags & VFIO_GROUP_FLAGS_VIABLE) !== 0,
    containerSet: (flags & VFIO_GROUP_FLAGS_CONTAINER_SET) !== 0,
  };
}
