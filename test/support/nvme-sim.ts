/**
 * A model of an NVMe controller in JS, for testing the driver against a device that misbehaves:
 * a register file (CAP, VS, CC, CSTS, AQA, ASQ, ACQ, doorbells), the admin commands bring-up needs
 * (Identify, Set Features Number of Queues, Create/Delete I/O queues), Read, Write and Flush on an
 * in-memory namespace, and MSI-X as real eventfds. It sits where the VFIO device does, behind
 * ControllerHost (src/nvme/resources.ts): the driver runs unchanged on it.
 *
 * The model reads submission entries and PRPs from, and writes completions and data into, a real
 * DmaHeap (memfd memory) that its own DmaSpace "maps" by recording which IOVAs lead to which bytes:
 * what the model can reach is exactly what the driver mapped, as behind an IOMMU.
 *
 * Commands run when their doorbell is written, inside the driver's call. Every completion of an
 * I/O command passes through `tamper`, which may change it, drop it (the command stays with the
 * device), or post others; `postRaw`, `flipPhase` and `gone` do what no completion can.
 */
import type { DmaMapping, DmaSpace } from "../../src/dma/space.ts";
import { DmaHeap } from "../../src/heap/dma-heap.ts";
import type { MapSource, RangeOptions } from "../../src/iommufd/map-arguments.ts";
import { MemfdBuffer } from "../../src/memory/memfd.ts";
import type { ControllerHost } from "../../src/nvme/resources.ts";
import { EFD_CLOEXEC, EFD_NONBLOCK, libc } from "../../src/sys/libc.ts";
import type { IrqSet } from "../../src/vfio/irq.ts";
import { IrqVector } from "../../src/vfio/irq-vector.ts";
import { VFIO_PCI_MSIX_IRQ_INDEX } from "../../src/uapi/vfio.ts";

const CAP = 0x00;
const VS = 0x08;
const CC = 0x14;
const CSTS = 0x1c;
const AQA = 0x24;
const ASQ = 0x28;
const ACQ = 0x30;
const DOORBELLS = 0x1000;
const PAGE = 4096;

/** A submission entry as the model read it. */
export interface SimCommand {
  qid: number;
  opcode: number;
  cid: number;
  nsid: number;
  prp1: number;
  prp2: number;
  cdw10: number;
  cdw11: number;
  cdw12: number;
}

/** A completion entry about to be posted on completion queue `cqid`. */
export interface SimCompletion {
  cqid: number;
  dw0: number;
  sqHead: number;
  sqId: number;
  cid: number;
  /** The 15-bit status field (SCT, SC, M, DNR). */
  status: number;
}

interface SubmissionQueue {
  id: number;
  iova: number;
  depth: number;
  cqid: number;
  head: number;
}

interface CompletionQueue {
  id: number;
  iova: number;
  depth: number;
  tail: number;
  phase: number;
  /** The MSI-X vector it raises, or undefined (polled). */
  vector: number | undefined;
}

/** Status fields (SCT << 8 | SC, DNR = bit 14). */
export const SIM_STATUS = {
  invalidOpcode: 0x4001,
  invalidField: 0x4002,
  dataTransferError: 0x0004,
  lbaOutOfRange: 0x0080,
  unrecoveredReadError: 0x0281,
  doNotRetry: 0x4000,
} as const;

export interface NvmeSimOptions {
  /** Logical blocks of 512 bytes in namespace 1. Default 2048 (1 MiB). */
  blocks?: number;
  /** MSI-X vectors the "device" has. Default 9. */
  msixVectors?: number;
  /** Bytes of the DMA heap. Default 4 MiB. */
  heapSize?: number;
}

export class NvmeSim implements ControllerHost {
  /** A model has no VFIO device. */
  readonly dma = undefined;
  readonly heap: DmaHeap;
  readonly bar = {
    read32: (offset: number) => this.#read32(offset),
    write32: (o: number, v: number) => this.#write32(o, v),
  };
  /** Namespace 1's contents. */
  readonly media: Uint8Array;
  readonly blockSize = 512;
  /** Every command the model took from a submission queue, in order. */
  readonly commands: SimCommand[] = [];
  /** Accesses to IOVAs nothing was mapped at (an IOMMU fault on real hardware). */
  readonly faults: string[] = [];
  /** Each completion of an I/O command goes through here; returns the entries to post instead. */
  tamper: ((completion: SimCompletion, command: SimCommand) => SimCompletion[]) | undefined;
  /** The device fell off the bus: every register reads all ones, writes are lost. */
  gone = false;
  /** What an interrupt adds to the vector's eventfd counter. */
  interruptCount = 1n;
  readonly #regs = new Uint32Array(DOORBELLS / 4);
  readonly #space: SimSpace;
  readonly #msixVectors: number;
  readonly #sqs = new Map<number, SubmissionQueue>();
  readonly #cqs = new Map<number, CompletionQueue>();
  #vectors: IrqVector[] = [];
  #busMaster = false;
  #released = false;

  constructor(options: NvmeSimOptions = {}) {
    this.media = new Uint8Array((options.blocks ?? 2048) * this.blockSize);
    this.#msixVectors = options.msixVectors ?? 9;
    this.#space = new SimSpace();
    this.heap = DmaHeap.create(this.#space, { size: options.heapSize ?? 4 << 20, hugePages: false, name: "nvme-sim" });
    // CAP: MQES 1023, CQR, TO 1 (500 ms); DSTRD 0, CSS NVM (bit 37), MPSMIN 0.
    this.#regs[CAP / 4] = 1023 | (1 << 16) | (1 << 24);
    this.#regs[CAP / 4 + 1] = 1 << 5;
    this.#regs[VS / 4] = 0x00010400;
  }

  /** CC.EN as the driver last wrote it. */
  get enabled(): boolean {
    return (this.#regs[CC / 4]! & 1) === 1;
  }

  get busMaster(): boolean {
    return this.#busMaster;
  }

  get released(): boolean {
    return this.#released;
  }

  /** The bytes at `iova` as the device sees them (throws where nothing is mapped). */
  memory(iova: number, length: number): Uint8Array {
    return this.#space.translate(iova, length);
  }

  // ControllerHost

  enableBusMaster(): void {
    this.#busMaster = true;
  }

  msixVectorCount(): number {
    return this.#msixVectors;
  }

  enableMsix(count: number): readonly IrqVector[] {
    // An IrqSet with only what a vector asks of it: the index (for messages) and no masking.
    const set = { index: VFIO_PCI_MSIX_IRQ_INDEX, info: { maskable: false } } as unknown as IrqSet;
    for (let i = 0; i < count; i++) {
      const fd = libc().eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
      if (fd < 0) throw new Error("eventfd failed");
      this.#vectors.push(new IrqVector(set, i, fd));
    }
    return this.#vectors;
  }

  release(): void {
    if (this.#released) return;
    this.#released = true;
    this.#busMaster = false;
    for (const vector of this.#vectors) vector.release();
    this.#vectors = [];
    this.heap.close();
  }

  // Misbehaviour that no completion carries

  /** Write a completion entry at the tail of `cqid` as given, phase included (and raise its vector). */
  postRaw(completion: SimCompletion): void {
    this.#post(completion);
  }

  /**
   * Set the current phase bit in the entry at the tail of `cqid` and nothing else: the entry keeps
   * whatever an earlier lap left there, as when a controller flips the phase before writing the
   * entry. The tail does not move (the real entry would come later, over it).
   */
  flipPhase(cqid: number): void {
    const cq = this.#cqs.get(cqid)!;
    const entry = this.#space.translate(cq.iova + cq.tail * 16, 16);
    const words = new Uint32Array(entry.buffer, entry.byteOffset, 4);
    words[3] = (words[3]! & ~(1 << 16)) | (cq.phase << 16);
  }

  // Registers

  #read32(offset: number): number {
    if (this.gone) return 0xffffffff;
    if (offset >= DOORBELLS) return 0;
    return this.#regs[offset / 4]!;
  }

  #write32(offset: number, value: number): void {
    if (this.gone) return;
    value >>>= 0;
    if (offset >= DOORBELLS) {
      const index = (offset - DOORBELLS) / 4;
      const qid = index >>> 1;
      if (index & 1) return; // CQ head: the model never fills a queue the driver has not emptied
      this.#ring(qid, value);
      return;
    }
    const was = this.#regs[offset / 4]!;
    this.#regs[offset / 4] = value;
    if (offset === CC) this.#controllerConfiguration(was, value);
  }

  #controllerConfiguration(was: number, cc: number): void {
    const regs = this.#regs;
    if ((cc & 1) === 1 && (was & 1) === 0) {
      const aqa = regs[AQA / 4]!;
      this.#sqs.set(0, { id: 0, iova: this.#reg64(ASQ), depth: (aqa & 0xfff) + 1, cqid: 0, head: 0 });
      this.#cqs.set(0, {
        id: 0,
        iova: this.#reg64(ACQ),
        depth: ((aqa >>> 16) & 0xfff) + 1,
        tail: 0,
        phase: 1,
        vector: undefined,
      });
      regs[CSTS / 4] = 1; // RDY
    } else if ((cc & 1) === 0 && (was & 1) === 1) {
      this.#sqs.clear();
      this.#cqs.clear();
      regs[CSTS / 4] = 0;
    }
    if (((cc >>> 14) & 3) !== 0) regs[CSTS / 4] = (regs[CSTS / 4]! & ~0xc) | (2 << 2); // SHST complete
  }

  #reg64(offset: number): number {
    return this.#regs[offset / 4]! + this.#regs[offset / 4 + 1]! * 2 ** 32;
  }

  // Commands

  /** The SQ tail doorbell of `qid`: run every entry up to `tail`. */
  #ring(qid: number, tail: number): void {
    const sq = this.#sqs.get(qid);
    if (sq === undefined || !this.#busMaster) return;
    while (sq.head !== tail) {
      const entry = this.#space.translate(sq.iova + sq.head * 64, 64);
      const w = new Uint32Array(entry.buffer, entry.byteOffset, 16);
      sq.head = (sq.head + 1) % sq.depth;
      const command: SimCommand = {
        qid,
        opcode: w[0]! & 0xff,
        cid: w[0]! >>> 16,
        nsid: w[1]!,
        prp1: w[6]! + w[7]! * 2 ** 32,
        prp2: w[8]! + w[9]! * 2 ** 32,
        cdw10: w[10]!,
        cdw11: w[11]!,
        cdw12: w[12]!,
      };
      this.commands.push(command);
      const { status, dw0 } = qid === 0 ? this.#admin(command) : this.#io(command);
      const completion: SimCompletion = { cqid: sq.cqid, dw0, sqHead: sq.head, sqId: qid, cid: command.cid, status };
      const posted = qid !== 0 && this.tamper ? this.tamper(completion, command) : [completion];
      for (const entry of posted) this.#post(entry);
    }
  }

  #post(completion: SimCompletion): void {
    const cq = this.#cqs.get(completion.cqid)!;
    const entry = this.#space.translate(cq.iova + cq.tail * 16, 16);
    const words = new Uint32Array(entry.buffer, entry.byteOffset, 4);
    words[0] = completion.dw0;
    words[1] = 0;
    words[2] = (completion.sqHead & 0xffff) | (completion.sqId << 16);
    // The phase bit goes last, in the same store as the rest of DW3: the entry is whole when seen.
    words[3] = (completion.cid & 0xffff) | (cq.phase << 16) | ((completion.status & 0x7fff) << 17);
    cq.tail++;
    if (cq.tail === cq.depth) {
      cq.tail = 0;
      cq.phase ^= 1;
    }
    if (cq.vector !== undefined) this.#interrupt(cq.vector);
  }

  #interrupt(vector: number): void {
    const v = this.#vectors[vector];
    if (v === undefined || v.closed) return;
    // Passed as the typed array itself (a cached ptr() of a collected array would point at freed memory).
    libc().write(v.fd, new BigUint64Array([this.interruptCount]), 8);
  }

  #admin(c: SimCommand): { status: number; dw0: number } {
    const ok = { status: 0, dw0: 0 };
    switch (c.opcode) {
      case 0x06: {
        const page = this.#space.translate(c.prp1, PAGE);
        page.fill(0);
        const view = new DataView(page.buffer, page.byteOffset, PAGE);
        const cns = c.cdw10 & 0xff;
        if (cns === 1) {
          view.setUint16(0, 0x1b36, true);
          page.set(new TextEncoder().encode("SIM0001".padEnd(20)), 4);
          page.set(new TextEncoder().encode("bun-iommufd simulated NVMe".padEnd(40)), 24);
          page.set(new TextEncoder().encode("1.0".padEnd(8)), 64);
          page[77] = 5; // MDTS: 128 KiB
          view.setUint32(516, 1, true);
        } else if (cns === 0) {
          if (c.nsid !== 1) return ok; // inactive: all zeros
          const blocks = this.media.length / this.blockSize;
          view.setBigUint64(0, BigInt(blocks), true);
          view.setBigUint64(8, BigInt(blocks), true);
          page[130] = 9; // LBA format 0: 2^9-byte blocks
        } else if (cns === 2) {
          view.setUint32(0, 1, true);
        } else return { status: SIM_STATUS.invalidField, dw0: 0 };
        return ok;
      }
      case 0x09: {
        if ((c.cdw10 & 0xff) !== 0x07) return { status: SIM_STATUS.invalidField, dw0: 0 };
        const granted = Math.min(c.cdw11 & 0xffff, 7);
        return { status: 0, dw0: granted | (granted << 16) };
      }
      case 0x05: {
        const id = c.cdw10 & 0xffff;
        const interrupts = (c.cdw11 & 2) !== 0;
        this.#cqs.set(id, {
          id,
          iova: c.prp1,
          depth: (c.cdw10 >>> 16) + 1,
          tail: 0,
          phase: 1,
          vector: interrupts ? c.cdw11 >>> 16 : undefined,
        });
        return ok;
      }
      case 0x01: {
        const id = c.cdw10 & 0xffff;
        this.#sqs.set(id, { id, iova: c.prp1, depth: (c.cdw10 >>> 16) + 1, cqid: c.cdw11 >>> 16, head: 0 });
        return ok;
      }
      case 0x00:
        this.#sqs.delete(c.cdw10 & 0xffff);
        return ok;
      case 0x04:
        this.#cqs.delete(c.cdw10 & 0xffff);
        return ok;
      default:
        return { status: SIM_STATUS.invalidOpcode, dw0: 0 };
    }
  }

  #io(c: SimCommand): { status: number; dw0: number } {
    if (c.opcode === 0x00) return { status: 0, dw0: 0 };
    if (c.opcode !== 0x01 && c.opcode !== 0x02) return { status: SIM_STATUS.invalidOpcode, dw0: 0 };
    const lba = c.cdw10 + c.cdw11 * 2 ** 32;
    const bytes = ((c.cdw12 & 0xffff) + 1) * this.blockSize;
    if (c.nsid !== 1 || lba * this.blockSize + bytes > this.media.length)
      return { status: SIM_STATUS.lbaOutOfRange | SIM_STATUS.doNotRetry, dw0: 0 };
    let at = lba * this.blockSize;
    try {
      for (const [iova, length] of this.#prpSegments(c.prp1, c.prp2, bytes)) {
        const memory = this.#space.translate(iova, length);
        if (c.opcode === 0x02) memory.set(this.media.subarray(at, at + length));
        else this.media.set(memory, at);
        at += length;
      }
    } catch (error) {
      this.faults.push((error as Error).message);
      return { status: SIM_STATUS.dataTransferError, dw0: 0 };
    }
    return { status: 0, dw0: 0 };
  }

  /** The (IOVA, length) pieces PRP1 and PRP2 describe for `bytes` bytes (NVMe Base 2.0 section 4.1.1). */
  #prpSegments(prp1: number, prp2: number, bytes: number): [number, number][] {
    const first = Math.min(bytes, PAGE - (prp1 % PAGE));
    const segments: [number, number][] = [[prp1, first]];
    let rest = bytes - first;
    if (rest === 0) return segments;
    if (rest <= PAGE) {
      segments.push([prp2, rest]);
      return segments;
    }
    const entries = Math.ceil(rest / PAGE);
    const list = this.#space.translate(prp2, entries * 8);
    const view = new DataView(list.buffer, list.byteOffset, entries * 8);
    for (let i = 0; i < entries; i++) {
      const length = Math.min(PAGE, rest);
      segments.push([view.getUint32(i * 8, true) + view.getUint32(i * 8 + 4, true) * 2 ** 32, length]);
      rest -= length;
    }
    return segments;
  }
}

/** A DmaSpace that maps by remembering: IOVA -> the bytes of the mapped memfd. */
class SimSpace implements DmaSpace {
  // The DmaSpace interface names the two kernel backends; the model stands where an IOAS would.
  readonly backend = "iommufd" as const;
  readonly #mappings: { iova: number; bytes: Uint8Array; mapping: DmaMapping }[] = [];
  #nextIova = 0x10_0000;

  mapDma(source: MapSource, options: RangeOptions = {}): DmaMapping {
    if (!(source instanceof MemfdBuffer)) throw new Error("the model maps MemfdBuffers only");
    const iova = typeof options.iova === "number" ? options.iova : this.#nextIova;
    this.#nextIova = iova + source.size + PAGE;
    const mappings = this.#mappings;
    const record = { iova, bytes: source.bytes, mapping: undefined as unknown as DmaMapping };
    const mapping: DmaMapping = {
      iova,
      length: source.size,
      get mapped() {
        return mappings.includes(record);
      },
      unmap() {
        const at = mappings.indexOf(record);
        if (at >= 0) mappings.splice(at, 1);
      },
      [Symbol.dispose]() {
        this.unmap();
      },
    };
    record.mapping = mapping;
    mappings.push(record);
    return mapping;
  }

  unmap(iova: number | bigint, length: number | bigint): number {
    let bytes = 0;
    for (const record of [...this.#mappings]) {
      if (record.iova >= Number(iova) && record.iova + record.bytes.length <= Number(iova) + Number(length)) {
        bytes += record.bytes.length;
        record.mapping.unmap();
      }
    }
    return bytes;
  }

  iovaRanges() {
    return { ranges: [{ start: 0, last: 2 ** 48 - 1 }], alignment: PAGE };
  }

  /** The bytes at `iova`; throws where nothing is mapped, as the IOMMU would fault. */
  translate(iova: number, length: number): Uint8Array {
    for (const { iova: base, bytes } of this.#mappings) {
      if (iova >= base && iova + length <= base + bytes.length)
        return bytes.subarray(iova - base, iova - base + length);
    }
    throw new Error(`IOMMU fault: nothing mapped at IOVA 0x${iova.toString(16)} (+${length})`);
  }
}
