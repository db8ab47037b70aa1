/**
 * A tiny driver for QEMU's `edu` PCI device (vendor 0x1234, device 0x11e8): a 4 KiB buffer inside
 * the device and a DMA engine that copies between it and IOVAs. Register map per QEMU's
 * docs/specs/edu.rst.
 */
import type { RegionMapping } from "../src/vfio/region.ts";

export const EDU_VENDOR = 0x1234;
export const EDU_DEVICE = 0x11e8;
export const EDU_ID_VALUE = 0x010000ed;
/** Where the device's own 4 KiB buffer sits in its DMA address space. */
export const EDU_BUFFER = 0x40000;
export const EDU_BUFFER_SIZE = 4096;
/** edu drops address bits above 28: IOVAs must stay below this. */
export const EDU_DMA_LIMIT = 1 << 28;

const REG_ID = 0x00;
const REG_LIVENESS = 0x04;
const REG_DMA_SRC = 0x80;
const REG_DMA_DST = 0x88;
const REG_DMA_COUNT = 0x90;
const REG_DMA_CMD = 0x98;
const DMA_START = 0x1;
const DMA_TO_RAM = 0x2;

export class Edu {
  constructor(readonly bar: RegionMapping) {}

  id(): number {
    return this.bar.read32(REG_ID);
  }

  /** The liveness register returns the bitwise inverse of what was written. */
  liveness(value: number): number {
    this.bar.write32(REG_LIVENESS, value);
    return this.bar.read32(REG_LIVENESS);
  }

  /** Copy `count` bytes from RAM at `iova` into the device buffer at `deviceOffset`. */
  fromRam(iova: number, deviceOffset: number, count: number): void {
    this.#dma(iova, EDU_BUFFER + deviceOffset, count, 0);
  }

  /** Copy `count` bytes from the device buffer at `deviceOffset` to RAM at `iova`. */
  toRam(deviceOffset: number, iova: number, count: number): void {
    this.#dma(EDU_BUFFER + deviceOffset, iova, count, DMA_TO_RAM);
  }

  #dma(src: number, dst: number, count: number, direction: number): void {
    // QEMU 7.2's edu aborts the VM on a transfer that ends exactly at the buffer's end.
    const deviceOffset = (direction ? src : dst) - EDU_BUFFER;
    if (deviceOffset < 0 || deviceOffset + count >= EDU_BUFFER_SIZE) {
      throw new Error(
        `edu DMA must stay strictly inside the 4 KiB device buffer (offset ${deviceOffset}, count ${count})`,
      );
    }
    const iova = direction ? dst : src;
    if (iova + count > EDU_DMA_LIMIT) throw new Error(`edu cannot reach IOVA 0x${iova.toString(16)} (28-bit DMA)`);
    this.bar.write32(REG_DMA_SRC, src);
    this.bar.write32(REG_DMA_DST, dst);
    this.bar.write32(REG_DMA_COUNT, count);
    this.bar.write32(REG_DMA_CMD, DMA_START | direction);
    const deadline = Date.now() + 10_000;
    while (this.bar.read32(REG_DMA_CMD) & DMA_START) {
      if (Date.now() > deadline) throw new Error("edu DMA did not complete within 10 s");
      Bun.sleepSync(1);
    }
  }
}
