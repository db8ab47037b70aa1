/**
 * openDmaDevice: a PCI device opened for DMA on the backend backend.ts chooses, as one object
 * holding the VfioDevice and its DmaSpace. Through iommufd: the cdev, bound to an iommufd and
 * attached to an IOAS. Through type1: the device from its group, in a container. Whatever it
 * opened itself it closes (on close, and at once when a later step of the open fails).
 */
import { existsSync } from "node:fs";
import { Iommufd } from "../iommufd/iommufd.ts";
import type { Ioas } from "../iommufd/ioas.ts";
import { argumentError, closedError, stateError } from "../sys/error.ts";
import { iommuGroupOf, VfioGroup } from "../type1/group.ts";
import { VfioContainer } from "../type1/container.ts";
import { VfioDevice } from "../vfio/device.ts";
import { bindVfioPciDriver, PCI_ADDRESS, pciAddressOfCdev, vfioCdevIfAny } from "../vfio/pci.ts";
import {
  type BackendChoice,
  type BackendDecision,
  chooseBackend,
  type GivenBackend,
  hostFacts,
  requestedBackend,
} from "./backend.ts";
import type { DmaBackend, DmaSpace } from "./space.ts";

export interface OpenDmaDeviceOptions {
  /** "auto" (default; $BUN_IOMMUFD_BACKEND may force one), "iommufd" or "type1". */
  backend?: BackendChoice;
  /** iommufd: bind to this iommufd (default: open one, owned by the result). */
  iommufd?: Iommufd;
  /** iommufd: attach to this IOAS (default: a new one, owned by the result). Must belong to `iommufd`. */
  ioas?: Ioas;
  /** type1: put the device's group in this container (default: open one, owned by the result). */
  container?: VfioContainer;
}

/** A VFIO device and the DmaSpace its DMA goes through; disposable. */
export class DmaDevice {
  readonly device: VfioDevice;
  /** Where to map memory for the device: the IOAS it is attached to, or its group's container. */
  readonly space: DmaSpace;
  readonly backend: DmaBackend;
  /** Why this backend: "forced by BUN_IOMMUFD_BACKEND=type1", "no /dev/iommu (...); /dev/vfio/vfio exists". */
  readonly reason: string;
  /** The iommufd and IOAS (iommufd backend), or undefined. */
  readonly iommufd: Iommufd | undefined;
  readonly ioas: Ioas | undefined;
  /** The container (type1 backend), or undefined. */
  readonly container: VfioContainer | undefined;
  #held: (() => void)[];

  /** @internal Made by openDmaDevice. */
  constructor(
    device: VfioDevice,
    decision: BackendDecision,
    parts: { iommufd?: Iommufd; ioas?: Ioas; container?: VfioContainer },
    held: (() => void)[],
  ) {
    this.device = device;
    this.backend = decision.backend;
    this.reason = decision.reason;
    this.iommufd = parts.iommufd;
    this.ioas = parts.ioas;
    this.container = parts.container;
    this.space = (parts.ioas ?? parts.container)!;
    this.#held = held;
  }

  get closed(): boolean {
    return this.device.closed;
  }

  /** The IOAS; EOPNOTSUPP on type1, whose container has none (map through `space` instead). */
  requireIoas(operation: string): Ioas {
    if (this.ioas === undefined) {
      throw stateError(
        operation,
        "EOPNOTSUPP",
        `the device's DMA goes through a VFIO type1 container (${this.reason}), which has no IOAS`,
        { hint: "map memory through the DmaSpace (`space`), which both backends have" },
      );
    }
    return this.ioas;
  }

  /**
   * Close the device, then what openDmaDevice opened for it (the IOAS or iommufd, the container);
   * what the caller handed in stays open. Every step runs; the first error is thrown. Idempotent.
   */
  close(): void {
    const first = releaseAll(this.#held);
    if (first !== undefined) throw first;
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** Run the releases last first; every one runs, and the first error is returned, not thrown. */
export function releaseAll(held: (() => void)[]): unknown {
  let first: unknown;
  while (held.length > 0) {
    try {
      held.pop()!();
    } catch (error) {
      first ??= error;
    }
  }
  return first;
}

/**
 * Open a PCI device for DMA: `target` is a PCI address (bound to vfio-pci on the way if needed,
 * which needs root) or a VFIO cdev path. The backend is chosen once (see backend.ts); the result
 * says which and why. On failure nothing stays open and the device stays bound to vfio-pci.
 */
export function openDmaDevice(target: string, options: OpenDmaDeviceOptions = {}): DmaDevice {
  const op = "openDmaDevice";
  if (typeof target !== "string" || target === "") {
    throw argumentError(op, "target", "expected a PCI address like 0000:00:04.0 or a /dev/vfio/devices path");
  }
  if (options.ioas && options.iommufd && options.ioas.iommufd !== options.iommufd) {
    throw argumentError(op, "options.ioas", "the IOAS belongs to another iommufd than options.iommufd");
  }
  if (options.container && (options.ioas || options.iommufd)) {
    throw argumentError(op, "options.container", "a VFIO container and an iommufd or IOAS exclude each other");
  }
  const request = requestedBackend(options.backend, op);
  const byAddress = PCI_ADDRESS.test(target);
  const address = byAddress ? bindVfioPciDriver(target, { operation: op }) : pciAddressOfCdev(target);
  const cdev = byAddress ? vfioCdevIfAny(address!) : existsSync(target) ? target : undefined;
  const given: GivenBackend | undefined = options.container
    ? { backend: "type1", argument: "options.container", reason: "options.container is a VFIO type1 container" }
    : options.ioas || options.iommufd
      ? {
          backend: "iommufd",
          argument: options.ioas ? "options.ioas" : "options.iommufd",
          reason: `${options.ioas ? "options.ioas is an IOAS" : "options.iommufd is an iommufd"}`,
        }
      : undefined;
  const decision = chooseBackend(request, { ...hostFacts(cdev), given }, address ?? target, op);
  if (given && given.backend !== decision.backend) {
    throw argumentError(
      op,
      given.argument,
      `${given.reason}, but the backend is ${decision.backend} (${decision.reason})`,
    );
  }
  if (decision.backend === "type1") {
    if (address === undefined) {
      throw argumentError(op, "target", `${target} is no PCI device's VFIO cdev: type1 opens a device by PCI address`);
    }
    return openThroughGroup(address, decision, options.container);
  }
  return openThroughCdev(cdev ?? target, decision, options);
}

function openThroughCdev(path: string, decision: BackendDecision, options: OpenDmaDeviceOptions): DmaDevice {
  const held: (() => void)[] = [];
  try {
    const iommufd = options.ioas?.iommufd ?? options.iommufd ?? Iommufd.open();
    const ownsIommufd = options.ioas === undefined && options.iommufd === undefined;
    if (ownsIommufd) held.push(() => iommufd.close());
    const ioas = options.ioas ?? iommufd.createIoas();
    // Closing an iommufd destroys its IOASes: an own IOAS needs its own release only in a given iommufd.
    if (!options.ioas && !ownsIommufd) held.push(() => ioas.destroy());
    const device = VfioDevice.open(path);
    held.push(() => device.close());
    device.bind(iommufd);
    device.attach(ioas);
    return new DmaDevice(device, decision, { iommufd, ioas }, held);
  } catch (error) {
    releaseAll(held);
    throw error;
  }
}

function openThroughGroup(address: string, decision: BackendDecision, given: VfioContainer | undefined): DmaDevice {
  const op = "openDmaDevice";
  if (given?.closed) throw closedError(op, `VFIO container ${given.path}`, "is closed", "options.container");
  waitForGroupNode(address, op);
  const held: (() => void)[] = [];
  try {
    const container = given ?? VfioContainer.open();
    if (!given) held.push(() => container.close());
    const device = container.openDevice(address);
    held.push(() => device.close());
    return new DmaDevice(device, decision, { container }, held);
  } catch (error) {
    releaseAll(held);
    throw error;
  }
}

/** devtmpfs makes /dev/vfio/<group> a moment after the bind: give it that moment. */
function waitForGroupNode(address: string, op: string): void {
  const node = `/dev/vfio/${iommuGroupOf(address, op)}`;
  const deadline = Date.now() + 2000;
  while (!existsSync(node) && Date.now() < deadline) Bun.sleepSync(10);
}

/**
 * A DmaDevice around a VfioDevice the caller opened and keeps (closing the result leaves it
 * open): one bound and attached to `options.ioas`, or one opened through a container's group.
 * A backend forced by the option or the environment must be the one the device is on.
 */
export function adoptDmaDevice(device: VfioDevice, options: OpenDmaDeviceOptions = {}): DmaDevice {
  const op = "adoptDmaDevice";
  device.assertOpen(op);
  const group = device.group;
  const given: GivenBackend = group
    ? { backend: "type1", argument: "target", reason: `the device was opened through VFIO group ${group.number}` }
    : { backend: "iommufd", argument: "target", reason: "the device was opened through its cdev" };
  const facts = { iommu: false, cdev: undefined, container: false, given };
  const decision = chooseBackend(requestedBackend(options.backend, op), facts, device.pciAddress ?? device.path, op);
  if (decision.backend !== given.backend) {
    throw argumentError(op, "target", `${given.reason}, but the backend is ${decision.backend} (${decision.reason})`);
  }
  if (group) {
    const container = group instanceof VfioGroup ? group.container : undefined;
    if (container === undefined) throw argumentError(op, "target", "the device's group is not in a VfioContainer");
    if (options.container && options.container !== container) {
      throw argumentError(op, "options.container", "the device's group is in another container");
    }
    return new DmaDevice(device, decision, { container }, []);
  }
  const ioas = options.ioas;
  if (!ioas || device.attachedTo === undefined) {
    throw argumentError(
      op,
      "target",
      "a VfioDevice must be bound and attached already, with its IOAS given as options.ioas",
    );
  }
  if (options.iommufd && ioas.iommufd !== options.iommufd) {
    throw argumentError(op, "options.ioas", "the IOAS belongs to another iommufd than options.iommufd");
  }
  return new DmaDevice(device, decision, { iommufd: ioas.iommufd, ioas }, []);
}
