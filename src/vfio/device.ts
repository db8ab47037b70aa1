/**
 * VfioDevice: a VFIO device opened through its cdev (/dev/vfio/devices/vfioN), bound to an
 * iommufd and attached to an IOAS, and the public face of what it owns: its regions and BAR
 * mappings (region.ts), config space and bus mastering (config.ts), dma-buf export of BAR slices
 * (dma-buf-export.ts) and interrupts (irq.ts). It keeps the fd, the binding, reset and close.
 */
import { readlinkSync } from "node:fs";
import type { DmaBuf } from "../memory/dmabuf.ts";
import { Ioas } from "../iommufd/ioas.ts";
import type { Iommufd } from "../iommufd/iommufd.ts";
import { argumentError, closedError, IommufdError, stateError } from "../sys/error.ts";
import { closeFd, fdFinalizer, openPath, requireOpenFd, setCloseOnExec } from "../sys/fd.ts";
import type { ErrnoTable } from "../sys/errno-table.ts";
import { ioctl } from "../sys/ioctl.ts";
import { O_RDWR } from "../sys/libc.ts";
import type { StructBuffer } from "../uapi/codec.ts";
import {
  VFIO_DEVICE_ATTACH_IOMMUFD_PT,
  VFIO_DEVICE_BIND_IOMMUFD,
  VFIO_DEVICE_DETACH_IOMMUFD_PT,
  VFIO_DEVICE_FLAGS_PCI,
  VFIO_DEVICE_FLAGS_RESET,
  VFIO_DEVICE_GET_INFO,
  VFIO_DEVICE_RESET,
  VFIO_PCI_CONFIG_REGION_INDEX,
  vfio_device_attach_iommufd_pt,
  vfio_device_bind_iommufd,
  vfio_device_detach_iommufd_pt,
  vfio_device_info,
} from "../uapi/vfio.ts";
import { PCI_ADDRESS, pciAddressOfCdev, vfioCdevOf } from "./pci.ts";
import {
  type EnableIrqOptions,
  enableIrq,
  type IrqInfo,
  type IrqKind,
  type IrqSet,
  irqInfo,
  irqInfoOrNone,
  releaseIrqs,
} from "./irq.ts";
import { busMasterOn, readConfig, setBusMaster, writeConfig } from "./config.ts";
import { type ExportDmaBufOptions, exportDmaBuf, probeDmaBuf } from "./dma-buf-export.ts";
import { mapRegion, type RegionMapping, type RegionInfo, readRegionInfo } from "./region.ts";
import type { DmaBackend } from "../dma/space.ts";

export { RegionMapping } from "./region.ts";

export interface DeviceInfo {
  flags: number;
  numRegions: number;
  numIrqs: number;
  isPci: boolean;
  /** The device supports VFIO_DEVICE_RESET. */
  canReset: boolean;
}

const BIND_ERRORS: ErrnoTable = {
  EBUSY: "the device is already bound to an iommufd, or open through its VFIO group (a type1 container)",
  // iommufd refuses a device whose MSIs the IOMMU cannot isolate (no interrupt remapping, e.g.
  // virtio-iommu) as well as one whose group is not viable: both answer EPERM.
  EPERM: {
    message: "the kernel refused to bind: the device's IOMMU group is not viable, or its IOMMU cannot isolate its MSIs",
    hint:
      "check that every device of the group is bound to vfio-pci; without interrupt remapping (virtio-iommu, " +
      "intel-iommu without intremap) boot with iommufd.allow_unsafe_interrupts=1 if you accept the risk",
  },
};

const ATTACH_ERRORS: ErrnoTable = {
  EADDRINUSE: ({ cmd }) => ({
    message: `IOAS ${cmd!.get("pt_id")} already has mappings outside the IOVA ranges this device's IOMMU can reach`,
    argument: "target",
  }),
  ENOENT: ({ cmd }) => ({ message: `no IOAS or hw page table with id ${cmd!.get("pt_id")}`, argument: "target" }),
  otherwise: { argument: "target" },
};

/**
 * The IOMMU group a device was opened through, as the device sees it (a VfioGroup of
 * src/type1/group.ts; declared here so that vfio/ does not import the backend built on it).
 */
export interface DeviceGroup {
  /** The IOMMU group number. */
  readonly number: number;
  /** /dev/vfio/<number>. */
  readonly path: string;
  readonly closed: boolean;
  /** Close the group's devices, then the group (see VfioGroup.close). */
  close(): void;
  /** @internal The device was closed. */
  forget(device: VfioDevice): void;
}

export class VfioDevice {
  readonly path: string;
  readonly pciAddress: string | undefined;
  #fd: number;
  #iommufd: Iommufd | undefined;
  #deviceId: number | undefined;
  #attachedTo: number | undefined;
  /** The group it was opened through (type1); undefined for a cdev. */
  #group: DeviceGroup | undefined;
  readonly #regions = new Set<RegionMapping>();

  private constructor(fd: number, path: string, pciAddress: string | undefined) {
    this.#fd = fd;
    this.path = path;
    this.pciAddress = pciAddress;
    fdFinalizer.register(this, fd, this);
  }

  /** Open a VFIO cdev by path (`/dev/vfio/devices/vfio0`) or PCI address (`0000:00:03.0`). */
  static open(pathOrPciAddress: string): VfioDevice {
    const op = "VfioDevice.open";
    if (typeof pathOrPciAddress !== "string" || pathOrPciAddress === "") {
      throw argumentError(
        op,
        "pathOrPciAddress",
        "expected a /dev/vfio/devices path or a PCI address like 0000:00:03.0",
      );
    }
    let path = pathOrPciAddress;
    let pciAddress: string | undefined;
    if (PCI_ADDRESS.test(pathOrPciAddress)) {
      pciAddress = pathOrPciAddress.toLowerCase();
      path = vfioCdevOf(pciAddress, op);
    } else {
      pciAddress = pciAddressOfCdev(path);
    }
    const fd = openPath(path, O_RDWR, op, {
      ENOENT: {
        hint: "no such VFIO device node: is the device bound to vfio-pci and the kernel built with CONFIG_VFIO_DEVICE_CDEV?",
      },
      EACCES: { hint: "no permission on the VFIO device node" },
      EBUSY: { hint: "the device is already open through its VFIO group or another cdev user" },
    });
    return new VfioDevice(fd, path, pciAddress);
  }

  /**
   * @internal A device fd from VFIO_GROUP_GET_DEVICE_FD: usable at once, its DMA goes through the
   * group's type1 container. Open one with `container.openDevice(pciAddress)`.
   */
  static fromGroup(fd: number, group: DeviceGroup, pciAddress: string): VfioDevice {
    const device = new VfioDevice(fd, group.path, pciAddress);
    device.#group = group;
    return device;
  }

  /**
   * Adopt a VFIO device fd this process received (a live hand-over from another process). The
   * fd keeps its binding to the iommufd (`deviceId` there) and its attachment; this takes
   * ownership of the fd and makes it close-on-exec.
   */
  static fromFd(fd: number, options: { iommufd: Iommufd; deviceId: number; attachedTo?: number }): VfioDevice {
    const op = "VfioDevice.fromFd";
    requireOpenFd(fd, op, "fd");
    if (!Number.isInteger(options?.deviceId) || options.deviceId <= 0)
      throw argumentError(op, "options.deviceId", "the device id from the sender's bind() is required");
    let path: string;
    try {
      path = readlinkSync(`/proc/self/fd/${fd}`);
    } catch {
      path = `fd ${fd}`;
    }
    if (!path.startsWith("/dev/vfio/")) throw argumentError(op, "fd", `fd ${fd} is ${path}, not a VFIO device`);
    setCloseOnExec(fd, op);
    const device = new VfioDevice(fd, path, pciAddressOfCdev(path));
    device.#iommufd = options.iommufd;
    device.#deviceId = options.deviceId;
    device.#attachedTo = options.attachedTo;
    return device;
  }

  get fd(): number {
    return this.assertOpen("VfioDevice.fd");
  }

  get closed(): boolean {
    return this.#fd < 0;
  }

  /** The iommufd device id from bind(), or undefined. */
  get deviceId(): number | undefined {
    return this.#deviceId;
  }

  /** The group the device was opened through (a VFIO type1 container's), or undefined for a cdev. */
  get group(): DeviceGroup | undefined {
    return this.#group;
  }

  /** Whose IOMMU the device's DMA goes through: "iommufd" once bound, "type1" through a group. */
  get backend(): DmaBackend | undefined {
    return this.#group ? "type1" : this.#deviceId !== undefined ? "iommufd" : undefined;
  }

  /** The hw page table id the device is attached to, or undefined. */
  get attachedTo(): number | undefined {
    return this.#attachedTo;
  }

  /** @internal Throws EBADF once closed; the fd otherwise. */
  assertOpen(operation: string): number {
    if (this.#fd < 0) throw closedError(operation, `VFIO device ${this.path}`);
    return this.#fd;
  }

  /**
   * @internal One ioctl on the device through the library's one path (src/sys/ioctl.ts). A cdev
   * grants no ioctl but BIND before it is bound; say so instead of the kernel's bare EINVAL.
   */
  ioctl(request: number, cmd: StructBuffer | null, operation: string, errors?: ErrnoTable): number {
    const fd = this.assertOpen(operation);
    if (request !== VFIO_DEVICE_BIND_IOMMUFD && this.#group === undefined) this.#assertBound(operation);
    return ioctl(fd, request, cmd, operation, errors);
  }

  #assertBound(operation: string): void {
    if (this.#deviceId === undefined) {
      throw stateError(
        operation,
        "EINVAL",
        `${this.path} is not bound to an iommufd yet: call device.bind(iommufd) first`,
      );
    }
  }

  /** Binding and attaching are for cdevs: a device from a group has its DMA in the group's container. */
  #refuseOnGroup(operation: string): void {
    if (this.#group !== undefined) {
      throw stateError(
        operation,
        "EOPNOTSUPP",
        `${this.pciAddress} was opened through its VFIO group into a type1 container, which owns its DMA; ` +
          "binding and attaching to iommufd need the device's cdev (VfioDevice.open)",
      );
    }
  }

  /** VFIO_DEVICE_BIND_IOMMUFD: bind to an iommufd; returns the device id inside it. */
  bind(iommufd: Iommufd): number {
    const op = "VFIO_DEVICE_BIND_IOMMUFD";
    this.#refuseOnGroup(op);
    if (this.#deviceId !== undefined) {
      throw stateError(op, "EBUSY", `${this.path} is already bound (device id ${this.#deviceId})`);
    }
    const cmd = vfio_device_bind_iommufd.create().fill({
      argsz: vfio_device_bind_iommufd.size,
      iommufd: iommufd.assertOpen(op),
    });
    this.ioctl(VFIO_DEVICE_BIND_IOMMUFD, cmd, op, BIND_ERRORS);
    this.#iommufd = iommufd;
    this.#deviceId = cmd.get("out_devid");
    return this.#deviceId;
  }

  /**
   * VFIO_DEVICE_ATTACH_IOMMUFD_PT: attach to an IOAS (the kernel makes or reuses a domain) or a hw
   * page table id. Returns the hw page table id now in use.
   */
  attach(target: Ioas | number): number {
    const op = "VFIO_DEVICE_ATTACH_IOMMUFD_PT";
    this.#refuseOnGroup(op);
    this.#assertBound(op);
    const ptId = target instanceof Ioas ? target.id : target;
    if (target instanceof Ioas && target.iommufd !== this.#iommufd) {
      throw argumentError(op, "target", "the IOAS belongs to another iommufd than the one the device is bound to");
    }
    if (target instanceof Ioas) target.assertOpen(op);
    if (!Number.isInteger(ptId) || ptId <= 0) throw argumentError(op, "target", `${ptId} is not an object id`);
    const cmd = vfio_device_attach_iommufd_pt.create().fill({ argsz: vfio_device_attach_iommufd_pt.size, pt_id: ptId });
    this.ioctl(VFIO_DEVICE_ATTACH_IOMMUFD_PT, cmd, op, ATTACH_ERRORS);
    this.#attachedTo = cmd.get("pt_id");
    return this.#attachedTo;
  }

  /** VFIO_DEVICE_DETACH_IOMMUFD_PT. */
  detach(): void {
    const op = "VFIO_DEVICE_DETACH_IOMMUFD_PT";
    this.#refuseOnGroup(op);
    const cmd = vfio_device_detach_iommufd_pt.create().fill({ argsz: vfio_device_detach_iommufd_pt.size });
    this.ioctl(VFIO_DEVICE_DETACH_IOMMUFD_PT, cmd, op);
    this.#attachedTo = undefined;
  }

  /** VFIO_DEVICE_GET_INFO. */
  info(): DeviceInfo {
    const op = "VFIO_DEVICE_GET_INFO";
    const cmd = vfio_device_info.create().fill({ argsz: vfio_device_info.size });
    this.ioctl(VFIO_DEVICE_GET_INFO, cmd, op);
    const flags = cmd.get("flags");
    return {
      flags,
      numRegions: cmd.get("num_regions"),
      numIrqs: cmd.get("num_irqs"),
      isPci: (flags & VFIO_DEVICE_FLAGS_PCI) !== 0,
      canReset: (flags & VFIO_DEVICE_FLAGS_RESET) !== 0,
    };
  }

  /** VFIO_DEVICE_GET_REGION_INFO, with the capability chain when the kernel reports one. */
  region(index: number): RegionInfo {
    return readRegionInfo(this, index);
  }

  /** mmap a region (a BAR) for register access: one aligned 32- or 64-bit access per call. */
  mapRegion(index: number): RegionMapping {
    const mapping = mapRegion(this, index);
    this.#regions.add(mapping);
    return mapping;
  }

  /** @internal */
  forgetRegion(mapping: RegionMapping): void {
    this.#regions.delete(mapping);
  }

  /** @internal Where config space starts in the device fd (the config region's offset). */
  configOffset(operation: string): number {
    this.#configOffset ??= this.region(VFIO_PCI_CONFIG_REGION_INDEX).offset;
    this.assertOpen(operation);
    return this.#configOffset;
  }

  #configOffset: number | undefined;

  /** Read PCI config space bytes. */
  readConfig(offset: number, length: number): Uint8Array {
    return readConfig(this, offset, length);
  }

  /** Write PCI config space bytes (the kernel filters what user space may change). */
  writeConfig(offset: number, bytes: Uint8Array): void {
    writeConfig(this, offset, bytes);
  }

  readConfig16(offset: number): number {
    const b = this.readConfig(offset, 2);
    return b[0]! | (b[1]! << 8);
  }

  readConfig32(offset: number): number {
    const b = this.readConfig(offset, 4);
    return new DataView(b.buffer).getUint32(0, true);
  }

  writeConfig16(offset: number, value: number): void {
    this.writeConfig(offset, new Uint8Array([value & 0xff, (value >> 8) & 0xff]));
  }

  /** Vendor and device id from config space. */
  pciId(): { vendor: number; device: number } {
    const v = this.readConfig32(0);
    return { vendor: v & 0xffff, device: v >>> 16 };
  }

  /**
   * Enable or disable bus mastering (the device's permission to DMA). Uses the
   * VFIO_DEVICE_FEATURE_BUS_MASTER feature where the kernel has it, else the PCI command register.
   */
  setBusMaster(enabled: boolean): void {
    setBusMaster(this, enabled);
  }

  /** Whether bus mastering is on, from the PCI command register. */
  get busMaster(): boolean {
    return busMasterOn(this);
  }

  /** VFIO_DEVICE_RESET. Devices without reset support get EINVAL saying so. */
  reset(): void {
    const op = "VFIO_DEVICE_RESET";
    if (!this.info().canReset) {
      throw stateError(op, "EINVAL", `${this.path} does not support reset (no FLR, PM or bus reset)`);
    }
    this.ioctl(VFIO_DEVICE_RESET, null, op);
  }

  /** Whether the kernel can export this device's memory as dma-bufs (VFIO_DEVICE_FEATURE_DMA_BUF). */
  supportsDmaBuf(): boolean {
    const op = "VFIO_DEVICE_FEATURE_DMA_BUF";
    this.assertOpen(op);
    this.#assertBound(op);
    try {
      this.probeDmaBuf();
      return true;
    } catch (error) {
      if (error instanceof IommufdError) return false;
      throw error;
    }
  }

  /**
   * @internal The VFIO_DEVICE_FEATURE_DMA_BUF probe itself: returns when the kernel can export
   * dma-bufs of this device, throws the kernel's answer otherwise (the doctor reports its errno).
   */
  probeDmaBuf(): void {
    probeDmaBuf(this);
  }

  /**
   * Export ranges of a region (a BAR slice) as a dma-buf (VFIO_DEVICE_FEATURE_DMA_BUF). iommufd
   * maps the result only when it has exactly one range.
   */
  exportDmaBuf(options: ExportDmaBufOptions): DmaBuf {
    return exportDmaBuf(this, options);
  }

  /** VFIO_DEVICE_GET_IRQ_INFO of one interrupt index ("intx", "msi", "msix", "err", "req" or a number). */
  irqInfo(kind: IrqKind | number): IrqInfo {
    return irqInfo(this, kind);
  }

  /** The info of every index (vfio-pci: INTx, MSI, MSI-X, ERR, REQ); count 0 where the device lacks one. */
  irqs(): IrqInfo[] {
    return Array.from({ length: this.info().numIrqs }, (_, index) => irqInfoOrNone(this, index));
  }

  /**
   * Enable vectors 0..n-1 of an interrupt index, each with its own eventfd (see IrqSet). MSI and
   * MSI-X turn bus mastering on: an MSI is a memory write by the device.
   */
  enableIrq(kind: IrqKind, options?: EnableIrqOptions): IrqSet {
    return enableIrq(this, kind, options);
  }

  /**
   * Close the device. Its interrupts are disabled first, its register mappings unmapped; the
   * kernel detaches it, unbinds it and revokes dma-bufs exported from it. Idempotent.
   */
  close(): void {
    if (this.#fd < 0) return;
    releaseIrqs(this);
    for (const region of this.#regions) region.unmap();
    const fd = this.#fd;
    this.#fd = -1;
    this.#deviceId = undefined;
    this.#attachedTo = undefined;
    fdFinalizer.unregister(this);
    this.#group?.forget(this);
    closeFd(fd, "VfioDevice.close");
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
