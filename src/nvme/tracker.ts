/**
 * The command tracker of one queue pair: which command slots are in the controller's hands, the
 * request (request.ts) and deadline of each, the free stack of slots, and the requests waiting for
 * a slot when all are taken (back-pressure, first come first served).
 *
 * The command id (CID, NVMe Base 2.0 section 4.2) sent with a slot's command is the slot number in
 * the low bits and a generation in the bits above it, advanced each time the slot is reused and
 * never 0. The controller is not trusted to echo ids faithfully: a completion is accepted only for
 * the exact id in flight, so a duplicate, a stale entry from an earlier lap of the ring (a phase bit
 * set before the entry was written), or a zeroed entry cannot settle the slot's next command.
 *
 * It knows nothing of rings, doorbells or callbacks: the queue pair posts the entry under the id
 * track() returns, reports each completion back by slot, and calls the request back.
 */
import type { IommufdError } from "../sys/error.ts";
import { commandName, describeCommand } from "./commands.ts";
import { type NvmeRequest, RequestState } from "./request.ts";
import { NvmeStatusError } from "./status.ts";

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
  /** The request in flight per slot. */
  readonly #requests: (NvmeRequest | undefined)[];
  /**
   * When each command is late; NaN until the first overdue() after its submission stamps it
   * from that check's clock. Reading the clock per command cost a seventh of the driver's own
   * time per command (a host profile at QD32); the price is that a command times out up to one
   * check interval (10 ms polled, 100 ms with interrupts) after its timeout.
   */
  readonly #deadlines: Float64Array;
  readonly #waiters: NvmeRequest[] = [];
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
    this.#requests = new Array(slots).fill(undefined);
    this.#deadlines = new Float64Array(slots);
    this.clear();
  }

  /** Every slot free, nobody waiting. Pending work must be failed first. Generations go on. */
  clear(): void {
    this.#free.length = 0;
    for (let slot = this.slots - 1; slot >= 0; slot--) this.#free.push(slot);
    this.#inFlightCids.fill(-1);
    this.#requests.fill(undefined);
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
   * Remember the request posted in `slot` until it completes or its timeoutMs passes (its deadline
   * is stamped by the next health check: no clock read per command). Returns the command id to
   * post it under: the slot with its next generation.
   */
  track(slot: number, request: NvmeRequest): number {
    // The next generation inline (this runs per command, and a call more would not be inlined);
    // #nextCid takes the rare ends: no generation bits, the wrap, and 0xFFFF.
    const generation = this.#generations[slot]! + 1;
    let cid = slot | (generation << this.#slotBits);
    if (generation > this.#maxGeneration || cid === 0xffff) cid = this.#nextCid(slot);
    else this.#generations[slot] = generation;
    this.#inFlightCids[slot] = cid;
    this.#requests[slot] = request;
    request.state = RequestState.InFlight;
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

  /** Queue a request for the next free slot. */
  wait(request: NvmeRequest): void {
    request.state = RequestState.Waiting;
    this.#waiters.push(request);
    const waiting = this.#waiters.length - this.#waiterHead;
    if (waiting > this.maxWaiting) this.maxWaiting = waiting;
  }

  /**
   * The request in flight in `slot` (from slotOf) completed: its result and error (the decoded
   * status) are set on it and it is returned, idle, for the caller to call back. The slot stays
   * taken until handOff().
   */
  finish(slot: number, dw0: number, status: number): NvmeRequest {
    const request = this.#requests[slot]!;
    this.#lastCids[slot] = this.#inFlightCids[slot]!;
    this.#inFlightCids[slot] = -1;
    this.#requests[slot] = undefined;
    this.completed++;
    request.result = dw0;
    // Settled once, with its own status: Do Not Retry or not, a failed command is the caller's to
    // retry; the driver never sends it again behind the caller's back.
    request.error =
      status === 0
        ? undefined
        : new NvmeStatusError(commandName(this.#admin, request.opcode), describeCommand(this.#admin, request), status);
    request.state = RequestState.Idle;
    return request;
  }

  /**
   * A finished slot goes straight to the oldest waiting request, which is returned for the caller
   * to post in `slot`; with nobody waiting it is freed.
   */
  handOff(slot: number): NvmeRequest | undefined {
    if (this.#waiterHead < this.#waiters.length) {
      const next = this.#waiters[this.#waiterHead]!;
      this.#waiters[this.#waiterHead++] = undefined as unknown as NvmeRequest;
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
    let late: NvmeRequest | undefined;
    for (let slot = 0; slot < this.slots; slot++) {
      const command = this.#requests[slot];
      if (command === undefined) continue;
      const deadline = deadlines[slot]!;
      if (Number.isNaN(deadline)) deadlines[slot] = now + command.timeoutMs;
      else if (deadline < now && late === undefined) late = command;
    }
    if (late === undefined) return undefined;
    return { name: commandName(this.#admin, late.opcode), detail: describeCommand(this.#admin, late) };
  }

  /**
   * Fail everything in flight and waiting, each with an error naming its own command; every slot
   * is free after. Returns the failed requests (error set, state Failing) for the caller to call
   * back, in flight first, then waiting in order.
   */
  failAll(why: (command: string, detail: string) => IommufdError): NvmeRequest[] {
    const admin = this.#admin;
    const failed: NvmeRequest[] = [];
    for (let slot = 0; slot < this.slots; slot++) {
      const request = this.#requests[slot];
      if (request === undefined) continue;
      this.#inFlightCids[slot] = -1;
      this.#requests[slot] = undefined;
      this.#free.push(slot);
      failed.push(request);
    }
    for (let i = this.#waiterHead; i < this.#waiters.length; i++) failed.push(this.#waiters[i]!);
    this.#waiters.length = 0;
    this.#waiterHead = 0;
    for (const request of failed) {
      request.result = 0;
      request.error = why(commandName(admin, request.opcode), describeCommand(admin, request));
      request.state = RequestState.Failing;
    }
    return failed;
  }
}
