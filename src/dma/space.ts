/**
 * DmaSpace: what the rest of the library needs from an I/O address space, whichever kernel API
 * provides it. Two backends sit behind it: an iommufd IOAS (`Ioas`) and a legacy VFIO container
 * with the type1 IOMMU (`VfioContainer`). The heap and drivers ask for this and never for which
 * one they have; what only iommufd can do stays on `Ioas` and `Iommufd`.
 */
import { type IommufdError, stateError } from "../sys/error.ts";
import type { Iova } from "../sys/validate.ts";
import type { IovaRanges } from "../iommufd/ioctls.ts";
import type { MapSource, RangeOptions } from "../iommufd/map-arguments.ts";

/** Which kernel API backs a DmaSpace. */
export type DmaBackend = "iommufd" | "type1";

/** One range mapped into a DmaSpace. */
export interface DmaMapping {
  readonly iova: Iova;
  readonly length: number;
  readonly mapped: boolean;
  /** Unmap exactly this range; on failure it stays recorded as mapped and can be retried. */
  unmap(): void;
  [Symbol.dispose](): void;
}

export interface DmaSpace {
  readonly backend: DmaBackend;
  /**
   * Map memory for device DMA, the best way the backend has (an IOAS maps a MemfdBuffer by file,
   * a container maps every source by address). Pins the pages until unmapped.
   */
  mapDma(source: MapSource, options?: RangeOptions): DmaMapping;
  /** Unmap every mapping inside `iova..+length` (no mapping may be split). Returns the bytes unmapped. */
  unmap(iova: number | bigint, length: number | bigint): number;
  /** The IOVA ranges a mapping may use, and the alignment of fixed IOVAs and lengths. */
  iovaRanges(): IovaRanges;
}

/**
 * The typed refusal of what only iommufd can do (MAP_FILE of a dma-buf, hw page tables, dirty
 * tracking, fault queues, hand-over), asked of a VFIO type1 container or a device opened through
 * its group: EOPNOTSUPP naming iommufd, never a wrong result.
 */
export function iommufdOnlyError(operation: string, what: string, argument?: string): IommufdError {
  return stateError(
    operation,
    "EOPNOTSUPP",
    `${what} needs iommufd (/dev/iommu); a VFIO type1 container cannot do it`,
    {
      argument,
      hint: "open the device through its cdev with an Iommufd (kernel 6.2+ with CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV)",
    },
  );
}
