/**
 * NVMe controller registers (NVMe Base Specification 2.0, section 3.1): offsets, fields, and one
 * accessor over BAR0 that obeys the two rules QEMU's model and real controllers share: one aligned
 * 32-bit access per register, and 64-bit registers split into two 32-bit accesses (low first).
 */

export const CAP = 0x00;
export const VS = 0x08;
export const INTMS = 0x0c;
export const INTMC = 0x10;
export const CC = 0x14;
export const CSTS = 0x1c;
export const AQA = 0x24;
export const ASQ = 0x28;
export const ACQ = 0x30;
export const CMBLOC = 0x38;
export const CMBSZ = 0x3c;
export const CMBMSC = 0x50;
/** Doorbells start here; each is (4 << CAP.DSTRD) bytes apart, SQ tail then CQ head per queue id. */
export const DOORBELLS = 0x1000;

export const CC_EN = 1 << 0;
/** CC.CSS = 0: the NVM command set. CC.MPS = 0: 4 KiB memory pages. */
export const CC_IOSQES_64 = 6 << 16;
export const CC_IOCQES_16 = 4 << 20;
export const CC_SHN_NORMAL = 1 << 14;
export const CC_SHN_MASK = 3 << 14;

export const CSTS_RDY = 1 << 0;
export const CSTS_CFS = 1 << 1;
export const CSTS_SHST_MASK = 3 << 2;
export const CSTS_SHST_COMPLETE = 2 << 2;

export const CMBMSC_CRE = 1;

/** The memory page size this driver configures (CC.MPS = 0). */
export const PAGE_SIZE = 4096;

/** The fields of CAP this driver uses. */
export interface Capabilities {
  /** Maximum queue entries supported (CAP.MQES + 1). */
  maxQueueEntries: number;
  /** Queues must be physically (here: IOVA-) contiguous. */
  contiguousQueuesRequired: boolean;
  /** Worst-case time for CSTS.RDY to follow CC.EN, in ms (CAP.TO is in 500 ms units). */
  timeoutMs: number;
  /** Doorbell stride in bytes (4 << CAP.DSTRD). */
  doorbellStride: number;
  /** Smallest memory page size, in bytes (4 KiB << CAP.MPSMIN). */
  minPageSize: number;
  /** The controller has a memory buffer (CAP.CMBS). */
  controllerMemoryBuffer: boolean;
}

export function decodeCapabilities(low: number, high: number): Capabilities {
  return {
    maxQueueEntries: (low & 0xffff) + 1,
    contiguousQueuesRequired: ((low >>> 16) & 1) === 1,
    timeoutMs: ((low >>> 24) & 0xff) * 500,
    doorbellStride: 4 << (high & 0xf),
    minPageSize: 4096 << ((high >>> 16) & 0xf),
    controllerMemoryBuffer: ((high >>> 25) & 1) === 1,
  };
}

/**
 * One aligned 32-bit access to BAR0: what the driver needs of the controller's register space.
 * A RegionMapping (the mmapped BAR) in use; a model of the controller in tests.
 */
export interface RegisterAccess {
  read32(offset: number): number;
  write32(offset: number, value: number): void;
}

/** BAR0 of an NVMe controller: registers and doorbells. */
export class ControllerRegisters {
  constructor(readonly bar: RegisterAccess) {}

  read32(offset: number): number {
    return this.bar.read32(offset);
  }

  write32(offset: number, value: number): void {
    this.bar.write32(offset, value);
  }

  /** 64-bit registers as two 32-bit reads, low half first. */
  read64(offset: number): { low: number; high: number } {
    return { low: this.bar.read32(offset), high: this.bar.read32(offset + 4) };
  }

  /** 64-bit registers as two 32-bit writes, low half first (a narrower access is undefined). */
  write64(offset: number, value: number): void {
    this.bar.write32(offset, value % 2 ** 32);
    this.bar.write32(offset + 4, Math.floor(value / 2 ** 32));
  }

  capabilities(): Capabilities {
    const { low, high } = this.read64(CAP);
    return decodeCapabilities(low, high);
  }

  /** "1.4.0" from VS. */
  version(): string {
    const vs = this.read32(VS);
    return `${vs >>> 16}.${(vs >>> 8) & 0xff}.${vs & 0xff}`;
  }
}
