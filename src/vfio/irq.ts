/**
 * VFIO interrupts as eventfds a Bun program awaits: the interrupt indexes of a device and their
 * info, and `device.enableIrq("msi")`, which gives an IrqSet that owns one close-on-exec,
 * non-blocking eventfd per vector and keeps the kernel's VFIO_DEVICE_SET_IRQS state in step with
 * them. The vectors themselves (reading and waiting) are in irq-vector.ts.
 */
import { argumentError, closedError, stateError, syscallError } from "../sys/error.ts";
import type { ErrnoTable } from "../sys/errno-table.ts";
import { isErrno } from "../sys/ioctl.ts";
import { EFD_CLOEXEC, EFD_NONBLOCK, lastErrno, libc } from "../sys/libc.ts";
import type { StructBuffer } from "../uapi/codec.ts";
import {
  VFIO_DEVICE_GET_IRQ_INFO,
  VFIO_DEVICE_SET_IRQS,
  VFIO_IRQ_INFO_AUTOMASKED,
  VFIO_IRQ_INFO_EVENTFD,
  VFIO_IRQ_INFO_MASKABLE,
  VFIO_IRQ_INFO_NORESIZE,
  VFIO_IRQ_SET_ACTION_TRIGGER,
  VFIO_IRQ_SET_DATA_EVENTFD,
  VFIO_IRQ_SET_DATA_NONE,
  VFIO_PCI_ERR_IRQ_INDEX,
  VFIO_PCI_INTX_IRQ_INDEX,
  VFIO_PCI_MSI_IRQ_INDEX,
  VFIO_PCI_MSIX_IRQ_INDEX,
  VFIO_PCI_REQ_IRQ_INDEX,
  vfio_irq_info,
  vfio_irq_set,
} from "../uapi/vfio.ts";
import { IrqVector } from "./irq-vector.ts";

// An IrqSet hands out its vectors: their class and options are part of this module's surface.
export { IrqVector, type WaitOptions } from "./irq-vector.ts";

/** The PCI interrupt indexes of vfio-pci. */
export type IrqKind = "intx" | "msi" | "msix" | "err" | "req";

export const IRQ_INDEX: Readonly<Record<IrqKind, number>> = {
  intx: VFIO_PCI_INTX_IRQ_INDEX,
  msi: VFIO_PCI_MSI_IRQ_INDEX,
  msix: VFIO_PCI_MSIX_IRQ_INDEX,
  err: VFIO_PCI_ERR_IRQ_INDEX,
  req: VFIO_PCI_REQ_IRQ_INDEX,
};

const KIND_OF_INDEX = Object.fromEntries(Object.entries(IRQ_INDEX).map(([k, i]) => [i, k])) as Record<number, IrqKind>;

const DESCRIPTION: Record<IrqKind, string> = {
  intx: "INTx",
  msi: "MSI",
  msix: "MSI-X",
  err: "ERR (PCIe error reporting)",
  req: "REQ (release request)",
};

export interface IrqInfo {
  kind: IrqKind | undefined;
  index: number;
  /** How many vectors the index has; 0 means the device lacks it. */
  count: number;
  flags: number;
  /** The index can signal an eventfd. */
  eventfd: boolean;
  /** The index supports mask and unmask (INTx). */
  maskable: boolean;
  /** The kernel masks the line after each interrupt until unmask() (level-triggered INTx). */
  automasked: boolean;
  /** The vectors are enabled as one block: changing the count means disabling the index first. */
  noresize: boolean;
}

export interface EnableIrqOptions {
  /** How many vectors to enable, from vector 0. Default 1. */
  vectors?: number;
}

/** What the interrupt code needs from a VfioDevice (kept narrow so the device stays the owner). */
export interface IrqDevice {
  readonly path: string;
  readonly closed: boolean;
  /** Undefined while the device cannot take ioctls yet (a cdev before bind). */
  readonly backend: "iommufd" | "type1" | undefined;
  readonly busMaster: boolean;
  setBusMaster(enabled: boolean): void;
  /** The device's ioctl path: EBADF once closed, EINVAL before bind, throws on failure. */
  ioctl(request: number, cmd: StructBuffer | null, operation: string, errors?: ErrnoTable): number;
}

/** Interrupt sets per device; the device disables them before it closes its fd. */
const enabledSets = new WeakMap<IrqDevice, Map<number, IrqSet>>();

function indexOf(kind: IrqKind | number, operation: string): number {
  if (typeof kind === "number" && Number.isInteger(kind) && kind >= 0) return kind;
  if (typeof kind === "string" && Object.hasOwn(IRQ_INDEX, kind)) return IRQ_INDEX[kind];
  throw argumentError(
    operation,
    "kind",
    `${String(kind)} is not an interrupt kind: use "intx", "msi", "msix", "err" or "req"`,
  );
}

/** "MSI-X", "INTx", or "interrupt index 7": how messages name an index. */
export function irqName(index: number): string {
  const kind = KIND_OF_INDEX[index];
  return kind ? DESCRIPTION[kind] : `interrupt index ${index}`;
}

const IRQ_INFO_ERRORS: ErrnoTable = {
  EINVAL: ({ cmd }) => {
    const index = cmd!.get("index");
    const why = index === VFIO_PCI_ERR_IRQ_INDEX ? " (ERR exists only on PCI Express devices)" : "";
    return { message: `the device has no ${irqName(index)} interrupt${why}`, argument: "kind" };
  },
};

const ENABLE_ERRORS: ErrnoTable = {
  EINVAL: {
    message: "the kernel refused the interrupt setup",
    hint: "another interrupt type may be enabled on this device through another handle",
  },
};

/** VFIO_DEVICE_GET_IRQ_INFO for one index; EINVAL when the device lacks it (vfio-pci: ERR off PCIe). */
export function irqInfo(device: IrqDevice, kind: IrqKind | number): IrqInfo {
  const op = "VFIO_DEVICE_GET_IRQ_INFO";
  const index = indexOf(kind, op);
  const cmd = vfio_irq_info.create().fill({ argsz: vfio_irq_info.size, index });
  device.ioctl(VFIO_DEVICE_GET_IRQ_INFO, cmd, op, IRQ_INFO_ERRORS);
  return decodeInfo(index, cmd.get("flags"), cmd.get("count"));
}

/**
 * The info of an index below the device's num_irqs, with count 0 where the kernel refuses the
 * query (vfio-pci answers EINVAL for ERR on a conventional PCI device instead of a count of 0).
 */
export function irqInfoOrNone(device: IrqDevice, index: number): IrqInfo {
  try {
    return irqInfo(device, index);
  } catch (error) {
    // Only the kernel's answer means "no such index": not the library's own bind-first EINVAL.
    if (isErrno(error, "EINVAL") && device.backend !== undefined) return decodeInfo(index, 0, 0);
    throw error;
  }
}

function decodeInfo(index: number, flags: number, count: number): IrqInfo {
  return {
    kind: KIND_OF_INDEX[index],
    index,
    count,
    flags,
    eventfd: (flags & VFIO_IRQ_INFO_EVENTFD) !== 0,
    maskable: (flags & VFIO_IRQ_INFO_MASKABLE) !== 0,
    automasked: (flags & VFIO_IRQ_INFO_AUTOMASKED) !== 0,
    noresize: (flags & VFIO_IRQ_INFO_NORESIZE) !== 0,
  };
}

/** The interrupt sets currently enabled on a device. */
export function enabledIrqs(device: IrqDevice): IrqSet[] {
  return [...(enabledSets.get(device)?.values() ?? [])];
}

/**
 * Enable `vectors` vectors of an index, each signalling its own eventfd. One set per index at a
 * time; INTx, MSI and MSI-X exclude each other (the kernel runs one of them per device).
 */
export function enableIrq(device: IrqDevice, kind: IrqKind, options: EnableIrqOptions = {}): IrqSet {
  const op = "VfioDevice.enableIrq";
  const index = indexOf(kind, op);
  const vectors = options?.vectors ?? 1;
  if (!Number.isInteger(vectors) || vectors < 1)
    throw argumentError(op, "options.vectors", `${vectors} is not a vector count (1 or more)`);
  const info = irqInfoOrNone(device, index);
  const name = irqName(index);
  if (info.count === 0) {
    throw argumentError(op, "kind", `${device.path} has no ${name} interrupt (the kernel reports 0 vectors)`);
  }
  if (vectors > info.count) {
    throw argumentError(
      op,
      "options.vectors",
      `${vectors} vectors asked, but the device's ${name} index has ${info.count}`,
    );
  }
  const sets = enabledSets.get(device) ?? new Map<number, IrqSet>();
  const existing = sets.get(index);
  if (existing) {
    throw stateError(
      op,
      "EBUSY",
      `${name} is already enabled on ${device.path} (${existing.vectors.length} vectors): close that IrqSet first`,
      { argument: "kind" },
    );
  }
  const exclusive = [VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX];
  const other = exclusive.includes(index) ? exclusive.find((i) => i !== index && sets.has(i)) : undefined;
  if (other !== undefined) {
    throw stateError(
      op,
      "EBUSY",
      `${irqName(other)} is enabled on ${device.path}; a device runs one of INTx, MSI and MSI-X ` +
        "at a time: close that IrqSet first",
      { argument: "kind" },
    );
  }
  // An MSI is a memory write by the device: with bus mastering off SET_IRQS succeeds and no
  // interrupt ever arrives.
  if ((index === VFIO_PCI_MSI_IRQ_INDEX || index === VFIO_PCI_MSIX_IRQ_INDEX) && !device.busMaster)
    device.setBusMaster(true);

  const fds: number[] = [];
  const closeAll = () => {
    for (const fd of fds) libc().close(fd);
  };
  for (let i = 0; i < vectors; i++) {
    const fd = libc().eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (fd < 0) {
      const errno = lastErrno();
      closeAll();
      throw syscallError("eventfd", errno, `cannot create the eventfd of ${name} vector ${i}`);
    }
    fds.push(fd);
  }
  const cmd = vfio_irq_set.create(4 * vectors).fill({
    argsz: vfio_irq_set.size + 4 * vectors,
    flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
    index,
    start: 0,
    count: vectors,
  });
  for (const [i, fd] of fds.entries()) cmd.view.setInt32(vfio_irq_set.size + 4 * i, fd, true);
  try {
    device.ioctl(VFIO_DEVICE_SET_IRQS, cmd, "VFIO_DEVICE_SET_IRQS", ENABLE_ERRORS);
  } catch (error) {
    closeAll();
    throw error;
  }
  const set = new IrqSet(device, index, info, fds);
  sets.set(index, set);
  enabledSets.set(device, sets);
  return set;
}

/** Disable every interrupt set of a device; called by VfioDevice.close() before its fd goes. */
export function releaseIrqs(device: IrqDevice): void {
  const sets = enabledSets.get(device);
  if (!sets) return;
  for (const set of [...sets.values()]) set.release(true);
  enabledSets.delete(device);
}

/**
 * The enabled vectors of one interrupt index. close() (or `using`) detaches the eventfds in the
 * kernel first, then closes them; pending waits reject with EBADF and `for await` loops end.
 */
export class IrqSet implements Disposable {
  readonly kind: IrqKind | undefined;
  readonly index: number;
  readonly info: IrqInfo;
  readonly vectors: readonly IrqVector[];
  readonly #device: IrqDevice;
  readonly #control: StructBuffer;
  #closed = false;

  /** @internal */
  constructor(device: IrqDevice, index: number, info: IrqInfo, fds: number[]) {
    this.#device = device;
    this.index = index;
    this.kind = KIND_OF_INDEX[index];
    this.info = info;
    this.#control = vfio_irq_set.create();
    this.vectors = fds.map((fd, i) => new IrqVector(this, i, fd));
  }

  get closed(): boolean {
    return this.#closed;
  }

  get device(): IrqDevice {
    return this.#device;
  }

  /** Vector `i` (0-based). */
  vector(i: number): IrqVector {
    const vector = this.vectors[i];
    if (!vector)
      throw argumentError("IrqSet.vector", "i", `${i} is not one of the ${this.vectors.length} enabled vectors`);
    return vector;
  }

  /** @internal SET_IRQS with no data (trigger, unmask, disable); throws on failure. */
  control(flags: number, start: number, count: number, operation: string, errors?: ErrnoTable): void {
    if (this.#closed) throw closedError(operation, `${irqName(this.index)} interrupt set of ${this.#device.path}`);
    this.#control.fill({ argsz: vfio_irq_set.size, flags, index: this.index, start, count });
    this.#device.ioctl(VFIO_DEVICE_SET_IRQS, this.#control, operation, errors);
  }

  /**
   * Disable the index in the kernel, then close the eventfds. Idempotent. If the kernel refuses,
   * the set stays whole (the kernel still signals its eventfds) and close() can be retried.
   */
  close(): void {
    if (this.#closed) return;
    this.control(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0, "IrqSet.close");
    this.release(false);
  }

  /**
   * @internal Forget the set and close its eventfds. From VfioDevice.close() a failed disable is
   * not fatal: closing the device fd right after disables every interrupt in the kernel.
   */
  release(disable: boolean): void {
    if (this.#closed) return;
    if (disable && !this.#device.closed) {
      try {
        this.control(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0, "IrqSet.close");
      } catch {
        // the device fd closes next, which disables the index in the kernel
      }
    }
    this.#closed = true;
    enabledSets.get(this.#device)?.delete(this.index);
    for (const vector of this.vectors) vector.release();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
