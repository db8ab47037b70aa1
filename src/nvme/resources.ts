/**
 * What a controller holds from the operating system: the VFIO device and the DMA space it maps
 * into (opened on the backend src/dma/backend.ts chooses, or as given), BAR0's mapping, the DMA
 * heap, and later bus mastering and MSI-X vectors. Each is recorded with its release as it is
 * acquired, and released in reverse, by one function: open's failure path and close() cannot
 * disagree on the order.
 *
 * The controller sees these through ControllerHost alone, so a model of a controller in JS
 * (test/support/nvme-sim.ts: a register file and memory it reads and writes by IOVA) can stand
 * where the VFIO device is, and the driver can be tested against a device that misbehaves.
 */
import {
  adoptDmaDevice,
  type DmaDevice,
  openDmaDevice,
  type OpenDmaDeviceOptions,
  releaseAll,
} from "../dma/open-device.ts";
import { DmaHeap } from "../heap/dma-heap.ts";
import type { RegionMapping, VfioDevice } from "../vfio/device.ts";
import type { IrqVector } from "../vfio/irq-vector.ts";
import type { RegisterAccess } from "./registers.ts";

/** What the driver needs from the machine a controller sits in, and nothing more. */
export interface ControllerHost {
  /** The VFIO device and its DMA space; undefined for a model, which has none. */
  readonly dma: DmaDevice | undefined;
  /** BAR0: registers and doorbells. */
  readonly bar: RegisterAccess;
  /** DMA memory the controller can reach: rings, PRP lists, data buffers. */
  readonly heap: DmaHeap;
  /** Let the controller master the bus (DMA); turned off again by release(). */
  enableBusMaster(): void;
  /** How many MSI-X vectors the device has (0: none). */
  msixVectorCount(): number;
  /** Enable MSI-X vectors 0..count-1, each an eventfd; disabled again by release(). */
  enableMsix(count: number): readonly IrqVector[];
  /** Give back everything, last acquired first. Idempotent. */
  release(): void;
}

export interface ResourceOptions extends OpenDmaDeviceOptions {
  heapSize?: number;
  hugePages?: "auto" | "2MB" | false;
}

export class ControllerResources implements ControllerHost {
  /** The device and its DMA space, with the backend and the reason it was chosen. */
  readonly dma: DmaDevice;
  /** BAR0: the controller's registers and doorbells. */
  readonly bar: RegionMapping;
  readonly heap: DmaHeap;
  readonly #held: (() => void)[];

  private constructor(dma: DmaDevice, bar: RegionMapping, heap: DmaHeap, held: (() => void)[]) {
    this.dma = dma;
    this.bar = bar;
    this.heap = heap;
    this.#held = held;
  }

  /**
   * Open the device on its backend (or adopt a given VfioDevice, which stays the caller's), map
   * BAR0 and create the heap in the device's DMA space. On failure everything acquired so far is
   * released before the error is thrown.
   */
  static acquire(target: string | VfioDevice, options: ResourceOptions): ControllerResources {
    const held: (() => void)[] = [];
    try {
      const dma = typeof target === "string" ? openDmaDevice(target, options) : adoptDmaDevice(target, options);
      held.push(() => dma.close());
      const bar = dma.device.mapRegion(0);
      held.push(() => bar.unmap());
      const heap = DmaHeap.create(dma.space, {
        size: options.heapSize ?? 16 << 20,
        hugePages: options.hugePages ?? "auto",
        name: "nvme",
      });
      held.push(() => heap.close());
      return new ControllerResources(dma, bar, heap, held);
    } catch (error) {
      releaseAll(held);
      throw error;
    }
  }

  enableBusMaster(): void {
    const device = this.dma.device;
    device.setBusMaster(true);
    this.#held.push(() => device.setBusMaster(false));
  }

  msixVectorCount(): number {
    return this.dma.device.irqInfo("msix").count;
  }

  enableMsix(count: number): readonly IrqVector[] {
    const irqs = this.dma.device.enableIrq("msix", { vectors: count });
    this.#held.push(() => irqs.close());
    return irqs.vectors;
  }

  /**
   * Release everything held, last acquired first: MSI-X, bus mastering, the heap, BAR0, the
   * device and what was opened for it (IOAS or iommufd, container). Every step runs; the first
   * error is thrown after. Idempotent.
   */
  release(): void {
    const first = releaseAll(this.#held);
    if (first !== undefined) throw first;
  }
}
