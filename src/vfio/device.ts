/**
 * VfioDevice: a VFIO device opened through its cdev (/dev/vfio/devices/vfioN), bound to an
 * iommufd and attached to an IOAS, with region info, BAR mmap for registers, config space,
 * bus mastering, reset and dma-buf export of BAR slices.
 */
import { readlinkSync } from "node:fs";
import { DmaBuf } from "../memory/dmabuf.ts";
import { Ioas } from "../iommufd/ioas.ts";
import type { Iommufd } from "../iommufd/iommufd.ts";
import { argumentError, closedError, IommufdError, ioError, stateError, syscallError } from "../sys/error.ts";
import { closeFd, fdFinalizer, openPath, preadInto, pwriteFrom, requireOpenFd, setCloseOnExec } from "../sys/fd.ts";
import type { ErrnoTable } from "../sys/errno-table.ts";
import { ioctl, isErrno } from "../sys/ioctl.ts";
import { lastErrno, libc, MAP_SHARED, O_CLOEXEC, O_RDWR, PAGE_SIZE, PROT_READ, PROT_WRITE } from "../sys/libc.ts";
import { hex, u64 } from "../sys/validate.ts";
import type { StructBuffer } from "../uapi/codec.ts";
import {
  VFIO_DEVICE_ATTACH_IOMMUFD_PT,
  VFIO_DEVICE_BIND_IOMMUFD,
  VFIO_DEVICE_DETACH_IOMMUFD_PT,
  VFIO_DEVICE_FEATURE,
  VFIO_DEVICE_FEATURE_BUS_MASTER,
  VFIO_DEVICE_FEATURE_CLEAR_MASTER,
  VFIO_DEVICE_FEATURE_DMA_BUF,
  VFIO_DEVICE_FEATURE_GET,
  VFIO_DEVICE_FEATURE_PROBE,
  VFIO_DEVICE_FEATURE_SET,
  VFIO_DEVICE_FEATURE_SET_MASTER,
  VFIO_DEVICE_FLAGS_PCI,
  VFIO_DEVICE_FLAGS_RESET,
  VFIO_DEVICE_GET_INFO,
  VFIO_DEVICE_GET_REGION_INFO,
  VFIO_DEVICE_RESET,
  VFIO_PCI_CONFIG_REGION_INDEX,
  VFIO_REGION_INFO_FLAG_CAPS,
  VFIO_REGION_INFO_FLAG_MMAP,
  VFIO_REGION_INFO_FLAG_READ,
  VFIO_REGION_INFO_FLAG_WRITE,
  vfio_device_attach_iommufd_pt,
  vfio_device_bind_iommufd,
  vfio_device_detach_iommufd_pt,
  vfio_device_feature,
  vfio_device_feature_bus_master,
  vfio_device_feature_dma_buf,
  vfio_device_info,
  vfio_info_cap_header,
  vfio_region_dma_range,
  vfio_region_info,
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
import { RegionMapping } from "./region.ts";

export { RegionMapping } from "./region.ts";

const PCI_COMMAND = 0x04;
const PCI_COMMAND_MASTER = 0x4;

export interface DeviceInfo {
  flags: number;
  numRegions: number;
  numIrqs: number;
  isPci: boolean;
  /** The device supports VFIO_DEVICE_RESET. */
  canReset: boolean;
}

export interface RegionCapability {
  id: number;
  version: number;
  /** Offset of the capability inside the region-info reply. */
  offset: number;
}

export interface RegionInfo {
  index: number;
  size: number;
  /** Offset of the region in the device fd (for pread/pwrite/mmap). */
  offset: number;
  flags: number;
  readable: boolean;
  writable: boolean;
  mmappable: boolean;
  capabilities: RegionCapability[];
}

export interface DmaBufRange {
  offset: number;
  length: number;
}

export interface ExportDmaBufOptions {
  /** Region index (BAR number for PCI). */
  region: number;
  ranges: readonly DmaBufRange[];
}

const BIND_ERRORS: ErrnoTable = {
  EBUSY: "the device is already bound to an iommufd",
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

const REGION_INFO_ERRORS: ErrnoTable = {
  EINVAL: ({ cmd }) => ({ message: `the device has no region ${cmd!.get("index")}`, argument: "index" }),
  otherwise: { argument: "index" },
};

/** The region index of a VFIO_DEVICE_FEATURE_DMA_BUF command (its payload follows the header). */
function dmaBufRegion(cmd: StructBuffer): number {
  return cmd.view.getUint32(vfio_device_feature.size + vfio_device_feature_dma_buf.fields.region_index.offset, true);
}

const DMA_BUF_UNSUPPORTED =
  "this kernel or device cannot export dma-bufs (needs CONFIG_VFIO_PCI_DMABUF and an mmappable BAR)";

const EXPORT_DMA_BUF_ERRORS: ErrnoTable = {
  ENOTTY: { message: DMA_BUF_UNSUPPORTED, argument: "options" },
  EOPNOTSUPP: { message: DMA_BUF_UNSUPPORTED, argument: "options" },
  EINVAL: ({ cmd }) => ({
    message: `the kernel refused the ranges of region ${dmaBufRegion(cmd!)}`,
    argument: "options",
  }),
  otherwise: { argument: "options" },
};

export class VfioDevice {
  readonly path: string;
  readonly pciAddress: string | undefined;
  #fd: number;
  #iommufd: Iommufd | undefined;
  #deviceId: number | undefined;
  #attachedTo: number | undefined;
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
    if (request !== VFIO_DEVICE_BIND_IOMMUFD) this.#assertBound(operation);
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

  /** VFIO_DEVICE_BIND_IOMMUFD: bind to an iommufd; returns the device id inside it. */
  bind(iommufd: Iommufd): number {
    const op = "VFIO_DEVICE_BIND_IOMMUFD";
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
    const op = "VFIO_DEVICE_GET_REGION_INFO";
    if (!Number.isInteger(index) || index < 0) throw argumentError(op, "index", `${index} is not a region index`);
    let extra = 0;
    for (;;) {
      const cmd = vfio_region_info.create(extra).fill({ argsz: vfio_region_info.size + extra, index });
      this.ioctl(VFIO_DEVICE_GET_REGION_INFO, cmd, op, REGION_INFO_ERRORS);
      const flags = cmd.get("flags");
      const wanted = cmd.get("argsz");
      // The kernel asks for a larger buffer (argsz) when the capability chain does not fit.
      if (flags & VFIO_REGION_INFO_FLAG_CAPS && wanted > vfio_region_info.size + extra) {
        extra = wanted - vfio_region_info.size;
        continue;
      }
      const capabilities: RegionCapability[] = [];
      let at = flags & VFIO_REGION_INFO_FLAG_CAPS ? cmd.get("cap_offset") : 0;
      while (at && at + vfio_info_cap_header.size <= cmd.bytes.length && capabilities.length < 64) {
        const id = cmd.view.getUint16(at, true);
        const version = cmd.view.getUint16(at + 2, true);
        capabilities.push({ id, version, offset: at });
        at = cmd.view.getUint32(at + 4, true);
      }
      return {
        index,
        size: cmd.get("size"),
        offset: cmd.get("offset"),
        flags,
        readable: (flags & VFIO_REGION_INFO_FLAG_READ) !== 0,
        writable: (flags & VFIO_REGION_INFO_FLAG_WRITE) !== 0,
        mmappable: (flags & VFIO_REGION_INFO_FLAG_MMAP) !== 0,
        capabilities,
      };
    }
  }

  /** mmap a region (a BAR) for register access: one aligned 32- or 64-bit access per call. */
  mapRegion(index: number): RegionMapping {
    const op = "VfioDevice.mapRegion";
    const info = this.region(index);
    if (!info.mmappable) throw argumentError(op, "index", `region ${index} cannot be mmapped`);
    if (info.size === 0) throw argumentError(op, "index", `region ${index} is empty`);
    const prot = (info.readable ? PROT_READ : 0) | (info.writable ? PROT_WRITE : 0);
    const address = Number(libc().mmap(null, info.size, prot, MAP_SHARED, this.assertOpen(op), info.offset) ?? -1);
    if (address === -1 || address === 0 || address >= 2 ** 64 - 1) {
      throw syscallError("mmap", lastErrno(), `cannot map region ${index} (${info.size} bytes) of ${this.path}`);
    }
    const mapping = new RegionMapping(this, index, address, info.size);
    this.#regions.add(mapping);
    return mapping;
  }

  /** @internal */
  forgetRegion(mapping: RegionMapping): void {
    this.#regions.delete(mapping);
  }

  #configOffset: number | undefined;

  #config(operation: string): number {
    this.#configOffset ??= this.region(VFIO_PCI_CONFIG_REGION_INDEX).offset;
    this.assertOpen(operation);
    return this.#configOffset;
  }

  /** Read PCI config space bytes. */
  readConfig(offset: number, length: number): Uint8Array {
    const op = "VfioDevice.readConfig";
    checkConfigRange(op, offset, length);
    const out = new Uint8Array(length);
    const n = preadInto(this.fd, out, this.#config(op) + offset, op);
    if (n !== length) throw ioError(op, `read ${n} of ${length} config bytes at ${hex(offset)}`);
    return out;
  }

  /** Write PCI config space bytes (the kernel filters what user space may change). */
  writeConfig(offset: number, bytes: Uint8Array): void {
    const op = "VfioDevice.writeConfig";
    checkConfigRange(op, offset, bytes.length);
    const n = pwriteFrom(this.fd, bytes, this.#config(op) + offset, op);
    if (n !== bytes.length) throw ioError(op, `wrote ${n} of ${bytes.length} config bytes at ${hex(offset)}`);
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
    const op = "VFIO_DEVICE_FEATURE_BUS_MASTER";
    const payload = vfio_device_feature_bus_master.size;
    const cmd = vfio_device_feature.create(payload);
    cmd.fill({
      argsz: vfio_device_feature.size + payload,
      flags: VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_BUS_MASTER,
    });
    cmd.view.setUint32(
      vfio_device_feature.size,
      enabled ? VFIO_DEVICE_FEATURE_SET_MASTER : VFIO_DEVICE_FEATURE_CLEAR_MASTER,
      true,
    );
    try {
      this.ioctl(VFIO_DEVICE_FEATURE, cmd, op);
      return;
    } catch (error) {
      // Kernels without the feature: fall back to the command register below.
      if (!isErrno(error, "ENOTTY") && !isErrno(error, "EINVAL") && !isErrno(error, "EOPNOTSUPP")) throw error;
    }
    const command = this.readConfig16(PCI_COMMAND);
    this.writeConfig16(PCI_COMMAND, enabled ? command | PCI_COMMAND_MASTER : command & ~PCI_COMMAND_MASTER);
  }

  /** Whether bus mastering is on, from the PCI command register. */
  get busMaster(): boolean {
    return (this.readConfig16(PCI_COMMAND) & PCI_COMMAND_MASTER) !== 0;
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
    const cmd = vfio_device_feature.create().fill({
      argsz: vfio_device_feature.size,
      flags: VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_BUF,
    });
    this.ioctl(VFIO_DEVICE_FEATURE, cmd, "VFIO_DEVICE_FEATURE_DMA_BUF");
  }

  /**
   * Export ranges of a region (a BAR slice) as a dma-buf (VFIO_DEVICE_FEATURE_DMA_BUF). iommufd
   * maps the result only when it has exactly one range.
   */
  exportDmaBuf(options: ExportDmaBufOptions): DmaBuf {
    const op = "VFIO_DEVICE_FEATURE_DMA_BUF";
    const { region, ranges } = options ?? ({} as ExportDmaBufOptions);
    if (!Array.isArray(ranges) || ranges.length === 0)
      throw argumentError(op, "options.ranges", "give at least one { offset, length } range");
    const info = this.region(region);
    ranges.forEach((range, i) => {
      const offset = u64(range?.offset, op, `options.ranges[${i}].offset`) as number;
      const length = u64(range?.length, op, `options.ranges[${i}].length`) as number;
      if (length === 0) throw argumentError(op, `options.ranges[${i}].length`, "length is 0");
      if (offset % PAGE_SIZE || length % PAGE_SIZE) {
        throw argumentError(
          op,
          `options.ranges[${i}]`,
          `offset ${hex(offset)} and length ${hex(length)} must be multiples of the page size`,
        );
      }
      if (offset + length > info.size) {
        throw argumentError(
          op,
          `options.ranges[${i}]`,
          `${hex(offset)}..+${hex(length)} runs past the end of region ${region} (${hex(info.size)} bytes)`,
        );
      }
    });
    const payload = vfio_device_feature_dma_buf.size + ranges.length * vfio_region_dma_range.size;
    const cmd = vfio_device_feature.create(payload);
    cmd.fill({
      argsz: vfio_device_feature.size + payload,
      flags: VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_BUF,
    });
    const base = vfio_device_feature.size;
    cmd.view.setUint32(base + vfio_device_feature_dma_buf.fields.region_index.offset, region, true);
    cmd.view.setUint32(base + vfio_device_feature_dma_buf.fields.open_flags.offset, O_RDWR | O_CLOEXEC, true);
    cmd.view.setUint32(base + vfio_device_feature_dma_buf.fields.nr_ranges.offset, ranges.length, true);
    ranges.forEach((range, i) => {
      const at = base + vfio_device_feature_dma_buf.size + i * vfio_region_dma_range.size;
      cmd.view.setBigUint64(at + vfio_region_dma_range.fields.offset.offset, BigInt(range.offset), true);
      cmd.view.setBigUint64(at + vfio_region_dma_range.fields.length.offset, BigInt(range.length), true);
    });
    const fd = this.ioctl(VFIO_DEVICE_FEATURE, cmd, op, EXPORT_DMA_BUF_ERRORS);
    const size = ranges.reduce((sum, r) => sum + r.length, 0);
    const where = ranges.map((r) => `[${hex(r.offset)}, +${hex(r.length)})`).join(" ");
    return new DmaBuf(fd, {
      origin: "vfio",
      size,
      description: `dma-buf of ${this.pciAddress ?? this.path} region ${region} ${where}`,
    });
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
    closeFd(fd, "VfioDevice.close");
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

function checkConfigRange(op: string, offset: number, length: number): void {
  if (!Number.isInteger(offset) || offset < 0 || offset > 4095)
    throw argumentError(op, "offset", `${offset} is outside PCI config space`);
  if (!Number.isInteger(length) || length <= 0 || offset + length > 4096) {
    throw argumentError(op, "length", `${length} bytes at ${hex(offset)} do not fit in PCI config space`);
  }
}
