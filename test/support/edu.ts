/** The tests drive edu with the same small driver the examples use. */
import { findPciDevices } from "../../src/vfio/pci.ts";
import { EDU_DEVICE, EDU_VENDOR } from "../../examples/edu.ts";

export * from "../../examples/edu.ts";

/** The PCI address of the guest's first edu; the harness always adds one, so none is a broken guest. */
export function requireEduAddress(): string {
  const address = findPciDevices(EDU_VENDOR, EDU_DEVICE)[0];
  if (!address) throw new Error("no edu device (1234:11e8): the VM must be started with -device edu");
  return address;
}
