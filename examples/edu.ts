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
const REG_IRQ_STATUS = 0x24;
const REG_IRQ_RAISE = 0x60;
const REG_IRQ_ACK = 0x64;
const REG_DMA_SRC = 0x80;
const REG_DMA_DST = 0x88;
const REG_DMA_COUNT = 0x90;
const REG_DMA_CMD = 0x98;
const DMA_START = 0x1;
const DMA_TO_RAM = 0x2;
const DMA_RAISE_IRQ = 0x4;
/** The interrupt status bit edu sets when a DMA transfer with DMA_RAISE_IRQ completes. */
export const EDU_IRQ_DMA = 0x100;

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

  /** Set bits in the interrupt status register: edu sends an MSI (or asserts INTx) at once. */
  raiseInterrupt(bits = 1): void {
    this.bar.write32(REG_IRQ_RAISE, bits);
  }

  /** Clear bits in the interrupt status register (INTx drops when none are left). */
  ackInterrupt(bits: number): void {
    this.bar.write32(REG_IRQ_ACK, bits);
  }

  interruptStatus(): number {
    return this.bar.read32(REG_IRQ_STATUS);
  }

  /**
   * Start a DMA that raises EDU_IRQ_DMA when it completes, and return at once (edu takes about
   * 100 ms of virtual time). `toRam` picks the direction.
   */
  startDma(options: { toRam: boolean; iova: number; deviceOffset: number; count: number }): void {
    const { toRam, iova, deviceOffset, count } = options;
    this.#checkDma(iova, deviceOffset, count);
    const device = EDU_BUFFER + deviceOffset;
    this.#program(
      toRam ? device : iova,
      toRam ? iova : device,
      count,
      DMA_START | DMA_RAISE_IRQ | (toRam ? DMA_TO_RAM : 0),
    );
  }

  /** Whether a DMA is still running. */
  dmaBusy(): boolean {
    return (this.bar.read32(REG_DMA_CMD) & DMA_START) !== 0;
  }

  /** Copy `count` bytes from RAM at `iova` into the device buffer at `deviceOffset`. */
  fromRam(iova: number, deviceOffset: number, count: number): void {
    this.#dma(iova, EDU_BUFFER + deviceOffset, count, 0);
  }

  /** Copy `count` bytes from the device buffer at `deviceOffset` to RAM at `iova`. */
  toRam(deviceOffset: number, iova: number, count: number): void {
    this.#dma(EDU_BUFFER + deviceOffset, iova, count, DMA_TO_RAM);
  }

  #checkDma(iova: number, deviceOffset: number, count: number): void {
    // QEMU 7.2's edu aborts the VM on a transfer that ends exactly at the buffer's end.
    if (deviceOffset < 0 || deviceOffset + count >= EDU_BUFFER_SIZE) {
      throw new Error(
        `edu DMA must stay strictly inside the 4 KiB device buffer (offset ${deviceOffset}, count ${count})`,
      );
    }
    if (iova + count > EDU_DMA_LIMIT) throw new Error(`edu cannot reach IOVA 0x${iova.toString(16)} (28-bit DMA)`);
  }

  #program(src: number, dst: number, count: number, command: number): void {
    this.bar.write32(REG_DMA_SRC, src);
    this.bar.write32(REG_DMA_DST, dst);
    this.bar.write32(REG_DMA_COUNT, count);
    this.bar.write32(REG_DMA_CMD, command);
  }

  #dma(src: number, dst: number, count: number, direction: number): void {
    this.#checkDma(direction ? dst : src, (direction ? src : dst) - EDU_BUFFER, count);
    this.#program(src, dst, count, DMA_START | direction);
    const deadline = Date.now() + 10_000;
    while (this.bar.read32(REG_DMA_CMD) & DMA_START) {
      if (Date.now() > deadline) throw new Error("edu DMA did not complete within 10 s");
      Bun.sleepSync(1);
    }
  }
}
