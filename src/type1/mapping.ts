/** ContainerMapping: one range a VfioContainer mapped (VFIO_IOMMU_MAP_DMA). */
import type { DmaMapping } from "../dma/space.ts";
import { addIova, type Iova } from "../sys/validate.ts";
import type { VfioContainer } from "./container.ts";

export class ContainerMapping implements DmaMapping {
  readonly container: VfioContainer;
  readonly iova: Iova;
  readonly length: number;
  /** What was mapped; kept referenced so it cannot be collected while the device may use it. */
  readonly source: unknown;

  /** @internal Created by VfioContainer.mapDma(). */
  constructor(container: VfioContainer, iova: Iova, length: number, source: unknown) {
    this.container = container;
    this.iova = iova;
    this.length = length;
    this.source = source;
  }

  get mapped(): boolean {
    return this.container.isLive(this);
  }

  /** The IOVA just past the end. */
  get end(): Iova {
    return addIova(this.iova, this.length);
  }

  /** Unmap exactly this range. If the kernel fails, it stays recorded as live and can be retried. */
  unmap(): void {
    this.container.unmapMapping(this);
  }

  [Symbol.dispose](): void {
    if (this.mapped) this.unmap();
  }
}
