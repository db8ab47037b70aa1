/**
 * VfioContainer: the legacy VFIO container (/dev/vfio/vfio) with the type1v2 IOMMU, for kernels
 * without iommufd. It is a DmaSpace like an Ioas: map this process's memory at a chosen IOVA or
 * at one it picks itself (type1 has no kernel-chosen IOVA), unmap, IOVA ranges. Devices come from
 * their IOMMU group, which joins the container on the first `openDevice` of one of its devices.
 *
 * Like an Ioas, the record of what is mapped follows the kernel's answers only: a mapping is
 * forgotten when an unmap succeeded or the IOMMU went away (last group closed, container closed).
 */
import { type DmaSpace, iommufdOnlyError } from "../dma/space.ts";
import type { IovaRange, IovaRanges } from "../iommufd/ioctls.ts";
import { type MappableFile, type MapSource, type RangeOptions, resolveMemory } from "../iommufd/map-arguments.ts";
import { MemfdBuffer } from "../memory/memfd.ts";
import { argumentError, closedError, stateError } from "../sys/error.ts";
import { closeFd, fdFinalizer, openPath } from "../sys/fd.ts";
import type { ErrnoTable } from "../sys/errno-table.ts";
import { ioctl, ioctlWithArgument } from "../sys/ioctl.ts";
import { O_RDWR } from "../sys/libc.ts";
import { hex, type Iova, normaliseIova, positiveLength, rangeLength, rangeOffset, u64 } from "../sys/validate.ts";
import { getU64, putU64 } from "../uapi/codec.ts";
import {
  VFIO_API_VERSION,
  VFIO_CHECK_EXTENSION,
  VFIO_DMA_MAP_FLAG_READ,
  VFIO_DMA_MAP_FLAG_WRITE,
  VFIO_DMA_UNMAP_FLAG_ALL,
  VFIO_GET_API_VERSION,
  VFIO_IOMMU_MAP_DMA,
  VFIO_IOMMU_UNMAP_DMA,
  VFIO_SET_IOMMU,
  VFIO_TYPE1v2_IOMMU,
  VFIO_UNMAP_ALL,
  vfio_iommu_type1_dma_map,
  vfio_iommu_type1_dma_unmap,
} from "../uapi/vfio.ts";
import type { VfioDevice } from "../vfio/device.ts";
import { PCI_ADDRESS } from "../vfio/pci.ts";
import { type ContainerInfo, MAP_DMA_ERRORS, readContainerInfo, SET_IOMMU_ERRORS, UNMAP_DMA_ERRORS } from "./ioctls.ts";
import { IovaAllocator } from "./iova-allocator.ts";
import { iommuGroupOf, VfioGroup } from "./group.ts";
import { ContainerMapping } from "./mapping.ts";

export { ContainerMapping } from "./mapping.ts";
export type { ContainerInfo } from "./ioctls.ts";

export const DEFAULT_CONTAINER_PATH = "/dev/vfio/vfio";

const MAP = vfio_iommu_type1_dma_map.words;
const UNMAP = vfio_iommu_type1_dma_unmap.words;

/**
 * Groups open in this process, and the container holding each: a group can be open once. Weak,
 * so that a container dropped without close() (its fd closed by the finalizer) holds nothing.
 */
const openGroups = new Map<number, WeakRef<VfioContainer>>();

const NOT_A_CONTAINER: ErrnoTable<string> = {
  ENOTTY: ({ context }) => ({ message: `${context} is not a VFIO container`, argument: "path" }),
};

export class VfioContainer implements DmaSpace {
  readonly backend = "type1";
  readonly path: string;
  #fd: number;
  readonly #groups = new Map<number, VfioGroup>();
  /** What VFIO_IOMMU_GET_INFO said last; undefined until the IOMMU is set (first group in). */
  #info: ContainerInfo | undefined;
  /** type1's dma_entry_limit as it was when this container's IOMMU was set (the kernel reads it then). */
  #dmaLimit: number | undefined;
  readonly #mappings = new Set<ContainerMapping>();
  readonly #allocator = new IovaAllocator();
  readonly #mapCmd = vfio_iommu_type1_dma_map.create();
  readonly #unmapCmd = vfio_iommu_type1_dma_unmap.create();

  private constructor(fd: number, path: string) {
    this.#fd = fd;
    this.path = path;
    fdFinalizer.register(this, fd, this);
  }

  /**
   * Open the container (close-on-exec) and check that the kernel speaks VFIO API version 0 and
   * has the type1v2 IOMMU. The IOMMU itself is set when the first group joins.
   */
  static open(path: string = DEFAULT_CONTAINER_PATH): VfioContainer {
    const op = "VfioContainer.open";
    const fd = openPath(path, O_RDWR, op, {
      ENOENT: {
        hint:
          "the kernel has no VFIO container: it needs CONFIG_VFIO_CONTAINER (and vfio loaded: modprobe vfio-pci); " +
          "with iommufd, use Iommufd.open() instead",
      },
      EACCES: { hint: "no permission on the VFIO container node" },
    });
    try {
      const version = ioctlWithArgument(fd, VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION", NOT_A_CONTAINER, path);
      if (version !== VFIO_API_VERSION) {
        throw stateError(
          "VFIO_GET_API_VERSION",
          "EOPNOTSUPP",
          `the kernel's VFIO API version is ${version}; this library speaks version ${VFIO_API_VERSION}`,
        );
      }
      if (ioctlWithArgument(fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU, "VFIO_CHECK_EXTENSION") <= 0) {
        throw stateError(
          "VFIO_CHECK_EXTENSION",
          "EOPNOTSUPP",
          "the kernel has no type1v2 IOMMU driver for VFIO containers",
          {
            argument: "VFIO_TYPE1v2_IOMMU",
            hint: "it needs CONFIG_VFIO_IOMMU_TYPE1 (modprobe vfio_iommu_type1) and an IOMMU; or use iommufd",
          },
        );
      }
    } catch (error) {
      closeFd(fd, op);
      throw error;
    }
    return new VfioContainer(fd, path);
  }

  get closed(): boolean {
    return this.#fd < 0;
  }

  get fd(): number {
    return this.assertOpen("VfioContainer.fd");
  }

  /** The groups in this container. */
  get groups(): readonly VfioGroup[] {
    return [...this.#groups.values()];
  }

  /** Live mappings this container made (and has not seen unmapped). */
  get mappings(): readonly ContainerMapping[] {
    return [...this.#mappings];
  }

  /** @internal How many mappings type1 allows this container (undefined where the kernel does not say). */
  get dmaLimit(): number | undefined {
    return this.#dmaLimit;
  }

  /** @internal Throws EBADF once closed; the fd otherwise. */
  assertOpen(operation: string): number {
    if (this.#fd < 0) throw closedError(operation, `VFIO container ${this.path}`);
    return this.#fd;
  }

  /**
   * Open a PCI device bound to vfio-pci through its IOMMU group. The group joins this container
   * first (once; it must be viable), and the first group sets the type1v2 IOMMU. The device then
   * works like one opened through its cdev and bound: regions, config, bus master, reset, IRQs.
   */
  openDevice(pciAddress: string): VfioDevice {
    const op = "VfioContainer.openDevice";
    const fd = this.assertOpen(op);
    if (typeof pciAddress !== "string" || !PCI_ADDRESS.test(pciAddress)) {
      throw argumentError(op, "pciAddress", `${String(pciAddress)} is not a PCI address like 0000:00:03.0`);
    }
    const address = pciAddress.toLowerCase();
    const number = iommuGroupOf(address, op);
    const group = this.#groups.get(number) ?? this.#join(number, fd);
    return group.openDevice(address);
  }

  #join(number: number, fd: number): VfioGroup {
    const op = "VfioContainer.openDevice";
    const holder = openGroups.get(number)?.deref();
    if (holder !== undefined && holder !== this && !holder.closed) {
      throw stateError(
        op,
        "EBUSY",
        `IOMMU group ${number} is already in another VfioContainer of this process (a group can be in one)`,
        { argument: "pciAddress", hint: "open the device through that container, or close it first" },
      );
    }
    const group = VfioGroup.join(this, number, fd);
    try {
      const first = this.#info === undefined;
      if (first) ioctlWithArgument(fd, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU, "VFIO_SET_IOMMU", SET_IOMMU_ERRORS);
      this.#groups.set(number, group);
      openGroups.set(number, new WeakRef(this));
      // A new group can narrow the usable ranges (its devices' reserved regions): read them again.
      this.#refreshInfo();
      if (first) this.#dmaLimit = this.#info!.dmaAvailable;
    } catch (error) {
      group.close();
      throw error;
    }
    return group;
  }

  /** @internal The group was closed: the kernel took it out; the last one takes the IOMMU too. */
  forgetGroup(group: VfioGroup): void {
    if (this.#groups.get(group.number) !== group) return;
    this.#groups.delete(group.number);
    openGroups.delete(group.number);
    if (this.#groups.size === 0) {
      this.#info = undefined;
      this.#mappings.clear();
    } else if (!this.closed) {
      this.#refreshInfo();
    }
  }

  #refreshInfo(): void {
    this.#info = readContainerInfo(this.assertOpen("VFIO_IOMMU_GET_INFO"));
    this.#allocator.reset(this.#info.ranges, this.#info.alignment, this.#mappings);
  }

  #requireIommu(operation: string): ContainerInfo {
    this.assertOpen(operation);
    if (this.#info === undefined) {
      throw stateError(
        operation,
        "EINVAL",
        "the container has no IOMMU yet: open a device through it first (container.openDevice)",
      );
    }
    return this.#info;
  }

  /** VFIO_IOMMU_GET_INFO, read now: page sizes, usable IOVA ranges, and how many more mappings fit. */
  info(): ContainerInfo {
    this.#requireIommu("VFIO_IOMMU_GET_INFO");
    this.#refreshInfo();
    return this.#info!;
  }

  /** The IOVA ranges a mapping may use and the IOVA alignment (the smallest IOMMU page). */
  iovaRanges(): IovaRanges {
    const info = this.#requireIommu("VFIO_IOMMU_GET_INFO");
    return { ranges: info.ranges.map((r) => ({ ...r })), alignment: info.alignment };
  }

  /**
   * Map memory of this process for device DMA (VFIO_IOMMU_MAP_DMA) at `options.iova`, or at the
   * lowest free IOVA inside the usable ranges. Pins the pages. The address and length must be
   * multiples of the IOMMU page size: a MemfdBuffer always is.
   */
  mapDma(source: MapSource, options: RangeOptions = {}): ContainerMapping {
    const op = "VFIO_IOMMU_MAP_DMA";
    const fd = this.assertOpen(op);
    const info = this.#requireIommu(op);
    const { address, size } = resolveMemory(source, op);
    const offset = rangeOffset(options, size, op, "source");
    const length = rangeLength(options, offset, size, op, "source");
    const readable = options.readable ?? true;
    const writable = options.writable ?? true;
    if (!readable && !writable) throw argumentError(op, "options", "a mapping must be readable, writable or both");
    const page = info.alignment;
    if ((address + offset) % page !== 0 || length % page !== 0) {
      throw argumentError(
        op,
        "source",
        `address ${hex(address + offset)} and length ${hex(length)} must be multiples of the IOMMU page size ` +
          `${hex(page)} (type1 maps whole pages)`,
        "EINVAL",
        "map a MemfdBuffer (page-aligned), or a page-aligned { address, length }",
      );
    }
    let iova: Iova;
    const fixed = options.iova !== undefined;
    if (fixed) {
      iova = normaliseIova(u64(options.iova, op, "options.iova"));
      // Below 2^53 the check stays in numbers: a BigInt pair per map cost more than the rest of it.
      if (typeof iova === "number" ? iova % page !== 0 : BigInt(iova) % BigInt(page) !== 0n) {
        throw argumentError(
          op,
          "options.iova",
          `IOVA ${hex(iova)} is not a multiple of the IOMMU page size ${hex(page)}`,
        );
      }
    } else {
      const picked = this.#allocator.allocate(length);
      if (picked === undefined) {
        throw stateError(
          op,
          "ENOSPC",
          `no free IOVA range of ${hex(length)} bytes is left in the container's usable ranges`,
          { argument: "options.length" },
        );
      }
      iova = picked;
    }
    const w = this.#mapCmd.u32;
    w[MAP.argsz] = vfio_iommu_type1_dma_map.size;
    w[MAP.flags] = (readable ? VFIO_DMA_MAP_FLAG_READ : 0) | (writable ? VFIO_DMA_MAP_FLAG_WRITE : 0);
    putU64(w, MAP.vaddr, address + offset);
    putU64(w, MAP.iova, iova);
    putU64(w, MAP.size, length);
    try {
      ioctl(fd, VFIO_IOMMU_MAP_DMA, this.#mapCmd, op, MAP_DMA_ERRORS, this);
    } catch (error) {
      if (!fixed) this.#allocator.release(iova, length);
      throw error;
    }
    if (fixed && typeof iova === "number") this.#allocator.take(iova, length);
    const mapping = new ContainerMapping(this, iova, length, source);
    this.#mappings.add(mapping);
    return mapping;
  }

  /**
   * A MemfdBuffer maps by its address here (type1 has no map-by-file); a dma-buf or any other
   * file cannot be mapped at all: that is iommufd's IOMMU_IOAS_MAP_FILE.
   */
  mapFile(file: MappableFile | number, options: RangeOptions = {}): ContainerMapping {
    if (file instanceof MemfdBuffer) return this.mapDma(file, options);
    throw iommufdOnlyError("VfioContainer.mapFile", "mapping a dma-buf or a file by fd (IOMMU_IOAS_MAP_FILE)", "file");
  }

  /**
   * Unmap every mapping inside `iova..+length` (VFIO_IOMMU_UNMAP_DMA; type1v2 refuses to split a
   * mapping). Returns the bytes unmapped: 0 when nothing was mapped there.
   */
  unmap(iova: number | bigint, length: number | bigint): number {
    const op = "VFIO_IOMMU_UNMAP_DMA";
    const fd = this.assertOpen(op);
    this.#requireIommu(op);
    const start = u64(iova, op, "iova");
    const len = typeof length === "bigint" ? u64(length, op, "length") : positiveLength(length, op, "length");
    if (len === 0n) throw argumentError(op, "length", "length is 0; there is nothing to unmap");
    const unmapped = this.#unmapRaw(fd, start, len, 0, op);
    const end = BigInt(start) + BigInt(len);
    for (const mapping of this.#mappings) {
      const at = BigInt(mapping.iova);
      if (at >= BigInt(start) && at + BigInt(mapping.length) <= end) this.#forget(mapping);
    }
    return unmapped;
  }

  /** Unmap everything in the container (VFIO_DMA_UNMAP_FLAG_ALL where the kernel has it). Returns the bytes unmapped. */
  unmapAll(): number {
    const op = "VFIO_IOMMU_UNMAP_DMA";
    const fd = this.assertOpen(op);
    this.#requireIommu(op);
    let unmapped = 0;
    if (ioctlWithArgument(fd, VFIO_CHECK_EXTENSION, VFIO_UNMAP_ALL, "VFIO_CHECK_EXTENSION") > 0) {
      unmapped = this.#unmapRaw(fd, 0, 0, VFIO_DMA_UNMAP_FLAG_ALL, op);
      for (const mapping of this.#mappings) this.#forget(mapping);
    } else {
      for (const mapping of this.#mappings) {
        unmapped += this.#unmapRaw(fd, mapping.iova, mapping.length, 0, op);
        this.#forget(mapping);
      }
    }
    return unmapped;
  }

  #unmapRaw(fd: number, iova: Iova, length: number | bigint, flags: number, op: string): number {
    const w = this.#unmapCmd.u32;
    w[UNMAP.argsz] = vfio_iommu_type1_dma_unmap.size;
    w[UNMAP.flags] = flags;
    putU64(w, UNMAP.iova, iova);
    putU64(w, UNMAP.size, length);
    ioctl(fd, VFIO_IOMMU_UNMAP_DMA, this.#unmapCmd, op, UNMAP_DMA_ERRORS);
    return Number(getU64(w, UNMAP.size));
  }

  /** @internal Unmap one mapping exactly. */
  unmapMapping(mapping: ContainerMapping): void {
    const op = "ContainerMapping.unmap";
    if (!this.#mappings.has(mapping)) {
      throw stateError(op, "ENOENT", `the mapping at IOVA ${hex(mapping.iova)} is already unmapped`);
    }
    const unmapped = this.#unmapRaw(this.assertOpen(op), mapping.iova, mapping.length, 0, op);
    this.#forget(mapping);
    if (unmapped !== mapping.length) {
      throw stateError(
        op,
        "ENOENT",
        `the kernel unmapped ${hex(unmapped)} of ${hex(mapping.length)} bytes at IOVA ${hex(mapping.iova)}`,
      );
    }
  }

  /** @internal */
  isLive(mapping: ContainerMapping): boolean {
    return this.#mappings.has(mapping);
  }

  #forget(mapping: ContainerMapping): void {
    if (this.#mappings.delete(mapping)) this.#allocator.release(mapping.iova, mapping.length);
  }

  /**
   * Close the container: its groups (and their devices) first, then its fd; the kernel drops the
   * IOMMU and every mapping with it. Idempotent.
   */
  close(): void {
    if (this.#fd < 0) return;
    const errors: unknown[] = [];
    for (const group of this.#groups.values()) {
      try {
        group.close();
      } catch (error) {
        errors.push(error);
      }
    }
    const fd = this.#fd;
    this.#fd = -1;
    this.#info = undefined;
    this.#mappings.clear();
    fdFinalizer.unregister(this);
    closeFd(fd, "VfioContainer.close");
    if (errors.length > 0) throw errors[0];
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

export type { IovaRange };
