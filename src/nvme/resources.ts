/**
 * What a controller holds from the operating system: the iommufd and IOAS (when it opened them),
 * the VFIO device (when it opened it), BAR0's mapping, the DMA heap, and later bus mastering and
 * MSI-X vectors. Each is recorded with its release as it is acquired, and released in reverse,
 * by one function: open's failure path and close() cannot disagree on the order.
 */
import { DmaHeap } from "../heap/dma-heap.ts";
import { Iommufd } from "../iommufd/iommufd.ts";
import type { Ioas } from "../iommufd/ioas.ts";
import { VfioDevice, type RegionMapping } from "../vfio/device.ts";
import { bindToVfioPci, PCI_ADDRESS } from "../vfio/pci.ts";

export interface ResourceOptions {
  iommufd?: Iommufd;
  ioas?: Ioas;
  heapSize?: number;
  hugePages?: "auto" | "2MB" | false;
}

/** Run the releases last first; every one runs, and the first error is returned, not thrown. */
function releaseAll(held: (() => void)[]): unknown {
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

export class ControllerResources {
  readonly iommufd: Iommufd;
  readonly ioas: Ioas;
  readonly device: VfioDevice;
  /** BAR0: the controller's registers and doorbells. */
  readonly bar: RegionMapping;
  readonly heap: DmaHeap;
  readonly #held: (() => void)[];

  private constructor(
    iommufd: Iommufd,
    ioas: Ioas,
    device: VfioDevice,
    bar: RegionMapping,
    heap: DmaHeap,
    held: (() => void)[],
  ) {
    this.iommufd = iommufd;
    this.ioas = ioas;
    this.device = device;
    this.bar = bar;
    this.heap = heap;
    this.#held = held;
  }

  /**
   * Open (or take as given) the iommufd, the IOAS and the device, map BAR0 and create the heap.
   * On failure everything acquired so far is released before the error is thrown. A given
   * VfioDevice must be bound and attached to `options.ioas` already (the caller checks).
   */
  static acquire(target: string | VfioDevice, options: ResourceOptions): ControllerResources {
    const held: (() => void)[] = [];
    try {
      const iommufd = options.ioas?.iommufd ?? options.iommufd ?? Iommufd.open();
      const ownsIommufd = options.ioas === undefined && options.iommufd === undefined;
      if (ownsIommufd) held.push(() => iommufd.close());
      const ioas = options.ioas ?? iommufd.createIoas();
      // Closing an iommufd destroys its IOASes: an own IOAS needs its own release only in a given iommufd.
      if (!options.ioas && !ownsIommufd) held.push(() => ioas.destroy());
      let device: VfioDevice;
      if (target instanceof VfioDevice) {
        device = target;
      } else {
        const opened = VfioDevice.open(PCI_ADDRESS.test(target) ? bindToVfioPci(target) : target);
        held.push(() => opened.close());
        opened.bind(iommufd);
        opened.attach(ioas);
        device = opened;
      }
      const bar = device.mapRegion(0);
      held.push(() => bar.unmap());
      const heap = DmaHeap.create(ioas, {
        size: options.heapSize ?? 16 << 20,
        hugePages: options.hugePages ?? "auto",
        name: "nvme",
      });
      held.push(() => heap.close());
      return new ControllerResources(iommufd, ioas, device, bar, heap, held);
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
   * device, the IOAS or iommufd. Every step runs; the first error is thrown after. Idempotent.
   */
  release(): void {
    const first = releaseAll(this.#held);
    if (first !== undefined) throw first;
  }
}
