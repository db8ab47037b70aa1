/**
 * What a controller holds from the operating system: the VFIO device and the DMA space it maps
 * into (opened on the backend src/dma/backend.ts chooses, or as given), BAR0's mapping, the DMA
 * heap, and later bus mastering and MSI-X vectors. Each is recorded with its release as it is
 * acquired, and released in reverse, by one function: open's failure path and close() cannot
 * disagree on the order.
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

export interface ResourceOptions extends OpenDmaDeviceOptions {
  heapSize?: number;
  hugePages?: "auto" | "2MB" | false;
}

export class ControllerResources {
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

  /** Record something acquired after open (bus mastering, MSI-X): it is released first. */
  hold(release: () => void): void {
    this.#held.push(release);
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
