/**
 * How the VMM-side calls (hw info, hw page tables) name a device bound to an iommufd: its device
 * id, or any object that knows it (a bound VfioDevice, a selftest MockDomain).
 */
import { iommufdOnlyError } from "../dma/space.ts";
import { argumentError } from "../sys/error.ts";

export type BoundDevice = number | { readonly deviceId: number | undefined; readonly backend?: string };

/** The iommufd device id of `device`; EINVAL naming `argument` when it has none. */
export function deviceIdOf(device: BoundDevice, operation: string, argument = "device"): number {
  if (typeof device === "object" && device?.backend === "type1") {
    throw iommufdOnlyError(operation, "a device opened through its VFIO group (type1): this call", argument);
  }
  const id = typeof device === "number" ? device : device?.deviceId;
  if (id === undefined && typeof device === "object" && device !== null) {
    throw argumentError(operation, argument, "the device is not bound to an iommufd: call device.bind(iommufd) first");
  }
  if (typeof id !== "number" || !Number.isInteger(id) || id <= 0 || id > 0xffffffff) {
    throw argumentError(operation, argument, `expected a bound device or its iommufd device id, got ${String(id)}`);
  }
  return id;
}
