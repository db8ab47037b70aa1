/**
 * bun-iommufd: Linux iommufd and VFIO from Bun, through bun:ffi only.
 *
 * @example
 * ```ts
 * import { Iommufd, MemfdBuffer } from "bun-iommufd";
 * using iommufd = Iommufd.open();
 * using ioas = iommufd.createIoas();
 * using buffer = MemfdBuffer.create(1 << 20);
 * using mapping = ioas.mapFile(buffer);
 * buffer.bytes.set([1, 2, 3]); // the device sees these bytes at mapping.iova
 * ```
 */
export { Iommufd, DEFAULT_IOMMU_PATH, type RlimitMode } from "./iommufd/iommufd.ts";
export { FEATURE_COMMANDS, type IommufdFeature, type IommufdFeatures } from "./iommufd/features.ts";
export { Ioas, Mapping, PreparedMapping, type Iova, type IovaRange, type IovaRanges } from "./iommufd/ioas.ts";
export type { CopyOptions, MapOptions, MappableFile, MapSource, RangeOptions } from "./iommufd/map-arguments.ts";
export { MemfdBuffer, type HugePageSize, type MemfdBufferOptions, type MemfdSeals } from "./memory/memfd.ts";
export { IommufdError, type IommufdErrorDetails } from "./sys/error.ts";
export { ERRNO, errnoCode, type ErrnoCode } from "./sys/errno.ts";
export { VfioDevice, type DeviceInfo } from "./vfio/device.ts";
export type { DmaBufRange, ExportDmaBufOptions } from "./vfio/dma-buf-export.ts";
export type { RegionCapability, RegionInfo } from "./vfio/region.ts";
export { type EnableIrqOptions, IRQ_INDEX, type IrqInfo, type IrqKind, IrqSet } from "./vfio/irq.ts";
export { IrqVector, type WaitOptions } from "./vfio/irq-vector.ts";
export { RegionMapping } from "./vfio/region.ts";
export { bindToVfioPci, findPciDevices } from "./vfio/pci.ts";
export { DmaBuf, createUdmabuf, type DmaBufOrigin } from "./memory/dmabuf.ts";
export { VfioContainer, ContainerMapping, DEFAULT_CONTAINER_PATH, type ContainerInfo } from "./type1/container.ts";
export { VfioGroup, type GroupStatus } from "./type1/group.ts";
export type { DmaBackend, DmaMapping, DmaSpace } from "./dma/space.ts";
export {
  BACKEND_ENV,
  chooseBackend,
  requestedBackend,
  type BackendChoice,
  type BackendDecision,
  type BackendFacts,
  type BackendRequest,
  type GivenBackend,
} from "./dma/backend.ts";
export { adoptDmaDevice, DmaDevice, openDmaDevice, type OpenDmaDeviceOptions } from "./dma/open-device.ts";
export { DmaHeap, DmaBuffer, AddressRule, type DmaHeapOptions, type DmaHeapStats } from "./heap/dma-heap.ts";
export { OffsetAllocator, type OffsetAllocatorOptions, type OffsetAllocatorStats } from "./heap/allocator.ts";
export { HwPageTable, DirtyBitmap, type HwPageTableOptions, type DirtyBitmapOptions } from "./vmm/hwpt.ts";
export { FaultQueue, type PageFault, type PageResponseCode } from "./vmm/fault-queue.ts";
export {
  readHwInfo,
  decodeVtd,
  explainNoDirtyTracking,
  type HwInfo,
  type HwInfoType,
  type HwCapabilities,
  type VtdHwInfo,
  type VtdCapabilities,
  type VtdExtendedCapabilities,
} from "./vmm/hw-info.ts";
export type { BoundDevice } from "./vmm/device-ref.ts";
export {
  changeProcess,
  adoptIoas,
  hasIpcLock,
  PRIVILEGED_HANDOVER_WARNING,
  type ChangeProcessOptions,
} from "./vmm/handover.ts";
