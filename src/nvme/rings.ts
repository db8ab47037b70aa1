/**
 * The two rings of a queue pair (NVMe Base 2.0 sections 3.3.1 and 4.6) and their doorbells:
 * the host writes submission entries at the tail and tells the controller by the SQ tail
 * doorbell; the controller posts completion entries, found by their phase bit, and the host
 * hands the slots back by the CQ head doorbell.
 *
 * Host-side only: the controller learns of a ring by Create I/O Submission/Completion Queue
 * (admin.ts) or, for the admin queue, by ASQ and ACQ (bringup.ts). Nothing here makes a system
 * call: entries are heap memory, a doorbell is one 32-bit store into the mmapped BAR.
 */
import { encodeCommand, type Command } from "./commands.ts";
import { DOORBELLS, type ControllerRegisters } from "./registers.ts";

export const SQ_ENTRY_BYTES = 64;
export const CQ_ENTRY_BYTES = 16;

/**
 * One doorbell and the value the controller was last told. Posting and telling are separate
 * steps (a doorbell is an MMIO write: a VM exit under emulation, a posted PCIe write on
 * hardware), so what was posted or taken together costs one write.
 */
class Doorbell {
  readonly #registers: ControllerRegisters;
  readonly #offset: number;
  announced = 0;
  /** Writes made, ever (a reset does not clear them): what the driver costs in MMIO, per command. */
  writes = 0;

  constructor(registers: ControllerRegisters, offset: number) {
    this.#registers = registers;
    this.#offset = offset;
  }

  /** Write `value` unless the controller was told it last; returns whether it wrote. */
  tell(value: number): boolean {
    if (value === this.announced) return false;
    this.#registers.write32(this.#offset, value);
    this.announced = value;
    this.writes++;
    return true;
  }
}

export class SubmissionRing {
  readonly #entries: Uint32Array;
  readonly #depth: number;
  /** The SQ tail doorbell; the controller was last told `announced`. */
  readonly #doorbell: Doorbell;
  #tail = 0;

  /** `memory`: depth * 64 bytes of the heap; `doorbellStride` from CAP.DSTRD. */
  constructor(memory: Uint8Array, depth: number, registers: ControllerRegisters, qid: number, doorbellStride: number) {
    this.#entries = new Uint32Array(memory.buffer, memory.byteOffset, (depth * SQ_ENTRY_BYTES) / 4);
    this.#depth = depth;
    this.#doorbell = new Doorbell(registers, DOORBELLS + 2 * qid * doorbellStride);
  }

  /** Write the entry at the tail and move the tail on; the controller sees it at the next doorbell. */
  post(cid: number, command: Command, prp1: number, prp2: number): void {
    encodeCommand(this.#entries, this.#tail, cid, command, prp1, prp2);
    this.#tail = this.#tail + 1 === this.#depth ? 0 : this.#tail + 1;
  }

  /** SQ tail doorbell writes, ever. */
  get doorbellWrites(): number {
    return this.#doorbell.writes;
  }

  /** Entries posted since the controller was last told the tail. */
  get unannounced(): number {
    const n = this.#tail - this.#doorbell.announced;
    return n < 0 ? n + this.#depth : n;
  }

  /**
   * Tell the controller the tail, if entries were posted since it was last told; returns whether
   * it wrote. The entries are in memory before this store (x86 keeps stores in order).
   */
  ringDoorbell(): boolean {
    return this.#doorbell.tell(this.#tail);
  }

  /** Empty, as after Create I/O Submission Queue or a controller reset. */
  clear(): void {
    this.#tail = 0;
    this.#doorbell.announced = 0;
  }
}

export class CompletionRing {
  readonly #entries: Uint32Array;
  readonly #depth: number;
  /** The CQ head doorbell; the controller was last told `announced`. */
  readonly #doorbell: Doorbell;
  #head = 0;
  #phase = 1;
  /** The entry last taken by next(). */
  cid = 0;
  dw0 = 0;
  /** The 15-bit status field (DW3 bits 31:17). */
  status = 0;
  /** Where the controller says the submission queue's head is (DW2 bits 15:0), and which queue (DW2 bits 31:16). */
  sqHead = 0;
  sqId = 0;

  /** `memory`: depth * 16 bytes of the heap. */
  constructor(memory: Uint8Array, depth: number, registers: ControllerRegisters, qid: number, doorbellStride: number) {
    this.#entries = new Uint32Array(memory.buffer, memory.byteOffset, (depth * CQ_ENTRY_BYTES) / 4);
    this.#depth = depth;
    this.#doorbell = new Doorbell(registers, DOORBELLS + (2 * qid + 1) * doorbellStride);
  }

  /**
   * Take the entry at the head if the controller has posted it (its phase bit is the current
   * phase) into `cid`, `dw0`, `status`, `sqHead` and `sqId`; false when there is none. The
   * controller may reuse the slot only after updateHead(). The fields are the controller's word:
   * the queue pair checks them before believing them.
   */
  next(): boolean {
    const at = this.#head * 4;
    const dw3 = this.#entries[at + 3]!;
    if (((dw3 >>> 16) & 1) !== this.#phase) return false;
    this.dw0 = this.#entries[at]!;
    const dw2 = this.#entries[at + 2]!;
    this.sqHead = dw2 & 0xffff;
    this.sqId = dw2 >>> 16;
    this.cid = dw3 & 0xffff;
    this.status = (dw3 >>> 17) & 0x7fff;
    if (++this.#head === this.#depth) {
      this.#head = 0;
      this.#phase ^= 1;
    }
    return true;
  }

  /** Whether the controller has posted the entry at the head (next() would take it). */
  get posted(): boolean {
    return ((this.#entries[this.#head * 4 + 3]! >>> 16) & 1) === this.#phase;
  }

  /** CQ head doorbell writes, ever. */
  get doorbellWrites(): number {
    return this.#doorbell.writes;
  }

  /** Whether entries were taken since the controller was last told the head. */
  get headDue(): boolean {
    return this.#head !== this.#doorbell.announced;
  }

  /** Hand the slots taken so far back to the controller, if any were; returns whether it wrote. */
  updateHead(): boolean {
    return this.#doorbell.tell(this.#head);
  }

  /** Empty with phase 1 and every entry zero, as after creation or a controller reset. */
  clear(): void {
    this.#head = 0;
    this.#doorbell.announced = 0;
    this.#phase = 1;
    this.#entries.fill(0);
  }
}
