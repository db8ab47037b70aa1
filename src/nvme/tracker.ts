/**
 * The command tracker of one queue pair: which command slots are in the controller's hands, the
 * promise and deadline of each, the free stack of slots, and the callers waiting for a slot when
 * all are taken (back-pressure, first come first served).
 *
 * The command id (CID, NVMe Base 2.0 section 4.2) sent with a slot's command is the slot number in
 * the low bits and a generation in the bits above it, advanced each time the slot is reused and
 * never 0. The controller is not trusted to echo ids faithfully: a completion is accepted only for
 * the exact id in flight, so a duplicate, a stale entry from an earlier lap of the ring (a phase bit
 * set before the entry was written), or a zeroed entry cannot settle the slot's next command.
 *
 * It knows nothing of rings or doorbells: the queue pair posts the entry under the id track()
 * returns and reports each completion back by slot.
 */
import type { IommufdError } from "../sys/error.ts";
import { commandName, describeCommand, type Command } from "./commands.ts";
import { NvmeStatusError } from "./status.ts";

export type Resolve = (dw0: number) => void;
export type Reject = (error: IommufdError) => void;

/** A command that found no free slot; it is posted when one comes back. */
export interface Waiter {
  command: Command;
  iova: number;
  length: number;
  resolve: Resolve;
  reject: Reject;
  timeoutMs: number;
}

export class CommandTracker {
  /** Command slots 0..slots-1 (one PRP list page each). */
  readonly slots: number;
  readonly #admin: boolean;
  /** Bits of a command id that name the slot; the generation sits above them. */
  readonly #slotBits: number;
  readonly #slotMask: number;
  /** The largest generation (0 when the slot number takes all 16 bits and none fits). */
  readonly #maxGeneration: number;
  /** The id in flight per slot value of `cid & #slotMask`, -1 when none (sized to the mask: no bounds check on a wild id). */
  readonly #inFlightCids: Int32Array;
  /** The id each slot last completed, to name a duplicate in the error. */
  readonly #lastCids: Int32Array;
  readonly #generations: Uint16Array;
  readonly #free: number[] = [];
  readonly #resolve: (Resolve | undefined)[];
  readonly #reject: (Reject | undefined)[];
  readonly #commands: (Command | undefined)[];
  readonly #timeouts: Float64Array;
  /**
   * When each command is late; NaN until the first overdue() after its submission stamps it
   * from that check's clock. Reading the clock per command cost a seventh of the driver's own
   * time per command (a host profile at QD32); the price is that a command times out up to one
   * check interval (10 ms polled, 100 ms with interrupts) after its timeout.
   */
  readonly #deadlines: Float64Array;
  readonly #waiters: Waiter[] = [];
  #waiterHead = 0;
  submitted = 0;
  completed = 0;
  /** The most callers that ever waited at once. */
  maxWaiting = 0;

  constructor(slots: number, admin: boolean) {
    this.slots = slots;
    this.#admin = admin;
    this.#slotBits = slots > 1 ? 32 - Math.clz32(slots - 1) : 0;
    this.#slotMask = (1 << this.#slotBits) - 1;
    this.#maxGeneration = (1 << (16 - this.#slotBits)) - 1;
    this.#inFlightCids = new Int32Array(this.#slotMask + 1).fill(-1);
    this.#lastCids = new Int32Array(this.#slotMask + 1).fill(-1);
    this.#generations = new Uint16Array(slots);
    this.#resolve = new Array(slots).fill(undefined);
    this.#reject = new Array(slots).fill(undefined);
    this.#commands = new Array(slots).fill(undefined);
    this.#timeouts = new Float64Array(slots);
    this.#deadlines = new Float64Array(slots);
    this.clear();
  }

  /** Every slot free, nobody waiting. Pending work must be failed first. Generations go on. */
  clear(): void {
    this.#free.length = 0;
    for (let slot = this.slots - 1; slot >= 0; slot--) this.#free.push(slot);
    this.#inFlightCids.fill(-1);
    this.#resolve.fill(undefined);
    this.#reject.fill(undefined);
    this.#commands.fill(undefined);
    this.#waiters.length = 0;
    this.#waiterHead = 0;
  }

  get inFlight(): number {
    return this.slots - this.#free.length;
  }

  get waiting(): number {
    return this.#waiters.length - this.#waiterHead;
  }

  /** A free slot, or -1 when every slot is in flight. */
  take(): number {
    return this.#free.length === 0 ? -1 : this.#free.pop()!;
  }

  /**
   * Remember the command posted in `slot` until it completes or `timeoutMs` passes (its deadline
   * is stamped by the next health check: no clock read per command). Returns the command id to
   * post it under: the slot with its next generation.
   */
  track(slot: number, command: Command, resolve: Resolve, reject: Reject, timeoutMs: number): number {
    const cid = this.#nextCid(slot);
    this.#inFlightCids[slot] = cid;
    this.#resolve[slot] = resolve;
    this.#reject[slot] = reject;
    this.#commands[slot] = command;
    this.#timeouts[slot] = timeoutMs;
    this.#deadlines[slot] = Number.NaN;
    this.submitted++;
    return cid;
  }

  /** The slot's id with the generation after its last (1.., never 0, skipping 0xFFFF, which the Error Information log reserves). */
  #nextCid(slot: number): number {
    const max = this.#maxGeneration;
    if (max === 0) return slot;
    let generation = this.#generations[slot]! + 1;
    if (generation > max) generation = 1;
    let cid = slot | (generation << this.#slotBits);
    if (cid === 0xffff && max > 1) {
      generation = 1;
      cid = slot | (1 << this.#slotBits);
    }
    this.#generations[slot] = generation;
    return cid;
  }

  /** The slot whose command is in flight under exactly `cid`, or -1 (a protocol violation by the controller). */
  slotOf(cid: number): number {
    const slot = cid & this.#slotMask;
    return this.#inFlightCids[slot] === cid ? slot : -1;
  }

  /** Why `cid` is not in flight, for the error (cold path). */
  describeStale(cid: number): string {
    const hex = `0x${cid.toString(16).padStart(4, "0")}`;
    const slot = cid & this.#slotMask;
    if (this.#lastCids[slot] === cid)
      return `command id ${hex}, which was completed already (a duplicate or stale entry)`;
    return `command id ${hex}, which is not in flight`;
  }

  /** Queue a caller for the next free slot. */
  wait(waiter: Waiter): void {
    this.#waiters.push(waiter);
    const waiting = this.#waiters.length - this.#waiterHead;
    if (waiting > this.maxWaiting) this.maxWaiting = waiting;
  }

  /**
   * Settle the command in flight in `slot` (from slotOf) with its completion. The slot goes
   * straight to the oldest waiter, which is returned for the caller to post in `slot`; with nobody
   * waiting it is freed.
   */
  complete(slot: number, dw0: number, status: number): Waiter | undefined {
    const resolve = this.#resolve[slot]!;
    const reject = this.#reject[slot]!;
    const command = this.#commands[slot]!;
    this.#lastCids[slot] = this.#inFlightCids[slot]!;
    this.#inFlightCids[slot] = -1;
    this.#resolve[slot] = undefined;
    this.#reject[slot] = undefined;
    this.#commands[slot] = undefined;
    this.completed++;
    // Settled once, with its own status: Do Not Retry or not, a failed command is the caller's to
    // retry; the driver never sends it again behind the caller's back.
    if (status === 0) resolve(dw0);
    else
      reject(
        new NvmeStatusError(commandName(this.#admin, command.opcode), describeCommand(this.#admin, command), status),
      );
    if (this.#waiterHead < this.#waiters.length) {
      const next = this.#waiters[this.#waiterHead]!;
      this.#waiters[this.#waiterHead++] = undefined as unknown as Waiter;
      if (this.#waiterHead === this.#waiters.length) {
        this.#waiters.length = 0;
        this.#waiterHead = 0;
      }
      return next;
    }
    this.#free.push(slot);
    return undefined;
  }

  /** A command in flight past its deadline, if any; stamps the deadlines of commands submitted since the last call. */
  overdue(now: number): { name: string; detail: string } | undefined {
    const deadlines = this.#deadlines;
    let late: Command | undefined;
    for (let slot = 0; slot < this.slots; slot++) {
      const command = this.#commands[slot];
      if (command === undefined) continue;
      const deadline = deadlines[slot]!;
      if (Number.isNaN(deadline)) deadlines[slot] = now + this.#timeouts[slot]!;
      else if (deadline < now && late === undefined) late = command;
    }
    if (late === undefined) return undefined;
    return { name: commandName(this.#admin, late.opcode), detail: describeCommand(this.#admin, late) };
  }

  /** Reject everything in flight and waiting, each with an error naming its own command; every slot is free after. */
  failAll(why: (command: string, detail: string) => IommufdError): number {
    const admin = this.#admin;
    let failed = 0;
    for (let slot = 0; slot < this.slots; slot++) {
      const command = this.#commands[slot];
      const reject = this.#reject[slot];
      if (command === undefined || reject === undefined) continue;
      this.#inFlightCids[slot] = -1;
      this.#resolve[slot] = undefined;
      this.#reject[slot] = undefined;
      this.#commands[slot] = undefined;
      this.#free.push(slot);
      reject(why(commandName(admin, command.opcode), describeCommand(admin, command)));
      failed++;
    }
    for (let i = this.#waiterHead; i < this.#waiters.length; i++) {
      const waiter = this.#waiters[i]!;
      waiter.reject(why(commandName(admin, waiter.command.opcode), describeCommand(admin, waiter.command)));
      failed++;
    }
    this.#waiters.length = 0;
    this.#waiterHead = 0;
    return failed;
  }
}
