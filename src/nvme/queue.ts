/**
 * A submission/completion queue pair (NVMe Base 2.0 sections 3.3 and 4.6): rings and PRP list
 * pages in the controller's DmaHeap, doorbells in BAR0, command ids as the unit of back-pressure.
 *
 * Nothing here makes a system call: an entry is written into heap memory, the doorbell is one
 * 32-bit store into the mmapped BAR, and completions are found by their phase bit.
 */
import type { DmaBuffer, DmaHeap } from "../heap/dma-heap.ts";
import type { IrqVector } from "../vfio/irq.ts";
import { ERRNO } from "../sys/errno.ts";
import { IommufdError } from "../sys/error.ts";
import { commandName, describeCommand, encodeCommand, type Command } from "./commands.ts";
import { prp2For } from "./prp.ts";
import { DOORBELLS, PAGE_SIZE, type ControllerRegisters } from "./registers.ts";
import { statusError } from "./status.ts";

const SQ_ENTRY = 64;
const CQ_ENTRY = 16;

type Resolve = (dw0: number) => void;
type Reject = (error: IommufdError) => void;

interface Waiter {
  command: Command;
  iova: number;
  length: number;
  resolve: Resolve;
  reject: Reject;
  timeoutMs: number;
}

/** What a queue needs from its controller. */
export interface QueueOwner {
  readonly registers: ControllerRegisters;
  readonly doorbellStride: number;
  /** Whether the controller takes commands now (not closed, not failed). */
  readonly usable: boolean;
  /** Throws when the controller cannot take commands (closed, failed, being reset). */
  assertUsable(command: string): void;
  /** Start polling for completions if nobody is. */
  kick(): void;
}

export interface QueueStats {
  submitted: number;
  completed: number;
  /** Commands in the controller's hands now. */
  inFlight: number;
  /** Commands waiting for a free slot now (back-pressure). */
  waiting: number;
  /** The most that ever waited at once. */
  maxWaiting: number;
}

export class QueuePair {
  readonly id: number;
  /** Entries per ring; at most depth - 1 commands are in flight (a full ring is tail + 1 == head). */
  readonly depth: number;
  readonly admin: boolean;
  /** The MSI-X vector this queue's completions raise, or undefined when they are polled. */
  readonly vector: IrqVector | undefined;
  /** The interrupt vector number on the controller (the queue id), when interrupts are on. */
  readonly vectorNumber: number | undefined;
  #interrupt: Promise<number> | undefined;
  readonly #owner: QueueOwner;
  readonly #memory: DmaBuffer[];
  readonly sqIova: number;
  readonly cqIova: number;
  readonly #sq: Uint32Array;
  readonly #cq: Uint32Array;
  readonly #prpLists: Uint32Array;
  readonly #prpListsIova: number;
  readonly #sqDoorbell: number;
  readonly #cqDoorbell: number;
  #sqTail = 0;
  #cqHead = 0;
  #phase = 1;
  readonly #freeIds: number[] = [];
  readonly #resolve: (Resolve | undefined)[];
  readonly #reject: (Reject | undefined)[];
  readonly #commands: (Command | undefined)[];
  readonly #deadlines: Float64Array;
  readonly #waiters: Waiter[] = [];
  #waiterHead = 0;
  #submitted = 0;
  #completed = 0;
  #maxWaiting = 0;

  constructor(owner: QueueOwner, heap: DmaHeap, id: number, depth: number, admin: boolean, vector?: IrqVector) {
    this.#owner = owner;
    this.vector = vector;
    this.vectorNumber = vector === undefined ? undefined : id;
    this.id = id;
    this.depth = depth;
    this.admin = admin;
    const slots = depth - 1;
    const sq = heap.alloc(depth * SQ_ENTRY, { align: PAGE_SIZE });
    const cq = heap.alloc(depth * CQ_ENTRY, { align: PAGE_SIZE });
    const lists = heap.alloc(slots * PAGE_SIZE, { align: PAGE_SIZE });
    this.#memory = [sq, cq, lists];
    this.sqIova = sq.iova;
    this.cqIova = cq.iova;
    this.#sq = new Uint32Array(sq.bytes.buffer, sq.bytes.byteOffset, (depth * SQ_ENTRY) / 4);
    this.#cq = new Uint32Array(cq.bytes.buffer, cq.bytes.byteOffset, (depth * CQ_ENTRY) / 4);
    this.#prpLists = new Uint32Array(lists.bytes.buffer, lists.bytes.byteOffset, (slots * PAGE_SIZE) / 4);
    this.#prpListsIova = lists.iova;
    this.#sqDoorbell = DOORBELLS + 2 * id * owner.doorbellStride;
    this.#cqDoorbell = DOORBELLS + (2 * id + 1) * owner.doorbellStride;
    this.#resolve = new Array(slots).fill(undefined);
    this.#reject = new Array(slots).fill(undefined);
    this.#commands = new Array(slots).fill(undefined);
    this.#deadlines = new Float64Array(slots);
    this.clear();
  }

  /** Back to the state of a freshly created queue (after a controller reset). Pending work must be failed first. */
  clear(): void {
    this.#sqTail = 0;
    this.#cqHead = 0;
    this.#phase = 1;
    this.#cq.fill(0);
    this.#freeIds.length = 0;
    for (let cid = this.depth - 2; cid >= 0; cid--) this.#freeIds.push(cid);
    this.#resolve.fill(undefined);
    this.#reject.fill(undefined);
    this.#commands.fill(undefined);
    this.#waiters.length = 0;
    this.#waiterHead = 0;
  }

  /**
   * Resolves at this queue's next interrupt (or at once if one came since the last wait). One
   * wait is kept per queue, so several pollers can share it.
   */
  interrupt(): Promise<number> {
    if (this.vector === undefined) return Promise.resolve(0);
    this.#interrupt ??= this.vector.wait().finally(() => {
      this.#interrupt = undefined;
    });
    return this.#interrupt;
  }

  get inFlight(): number {
    return this.depth - 1 - this.#freeIds.length;
  }

  get waiting(): number {
    return this.#waiters.length - this.#waiterHead;
  }

  stats(): QueueStats {
    return {
      submitted: this.#submitted,
      completed: this.#completed,
      inFlight: this.inFlight,
      waiting: this.waiting,
      maxWaiting: this.#maxWaiting,
    };
  }

  /**
   * Send a command whose data (if any) is `length` bytes at `iova`. Resolves with the completion's
   * DW0; rejects with the decoded status. A full queue makes the promise wait for a free slot.
   */
  submit(command: Command, iova: number, length: number, timeoutMs: number): Promise<number> {
    if (!this.#owner.usable) {
      try {
        this.#owner.assertUsable(commandName(this.admin, command.opcode));
      } catch (error) {
        return Promise.reject(error);
      }
    }
    return new Promise<number>((resolve, reject) => {
      if (this.#freeIds.length === 0) {
        this.#waiters.push({ command, iova, length, resolve, reject, timeoutMs });
        const waiting = this.#waiters.length - this.#waiterHead;
        if (waiting > this.#maxWaiting) this.#maxWaiting = waiting;
      } else {
        this.#issue(this.#freeIds.pop()!, command, iova, length, resolve, reject, timeoutMs);
      }
      this.#owner.kick();
    });
  }

  /** Send a command and spin until it completes (bring-up and teardown only). */
  submitAndWait(command: Command, iova: number, length: number, timeoutMs: number, poll: () => void): number {
    const name = commandName(this.admin, command.opcode);
    this.#owner.assertUsable(name);
    if (this.#freeIds.length === 0) {
      throw new IommufdError({
        operation: `NVMe ${name}`,
        errno: ERRNO.EBUSY,
        message: `queue ${this.id} has no free slot for a synchronous command`,
      });
    }
    let done = false;
    let result = 0;
    let failure: IommufdError | undefined;
    this.#issue(
      this.#freeIds.pop()!,
      command,
      iova,
      length,
      (dw0) => {
        done = true;
        result = dw0;
      },
      (error) => {
        done = true;
        failure = error;
      },
      timeoutMs,
    );
    while (!done) poll();
    if (failure) throw failure;
    return result;
  }

  #issue(
    cid: number,
    command: Command,
    iova: number,
    length: number,
    resolve: Resolve,
    reject: Reject,
    timeoutMs: number,
  ): void {
    const prp2 =
      length > 0
        ? prp2For(iova, length, this.#prpLists, cid * (PAGE_SIZE / 4), this.#prpListsIova + cid * PAGE_SIZE)
        : 0;
    encodeCommand(this.#sq, this.#sqTail, cid, command, iova, prp2);
    this.#resolve[cid] = resolve;
    this.#reject[cid] = reject;
    this.#commands[cid] = command;
    this.#deadlines[cid] = performance.now() + timeoutMs;
    this.#sqTail = this.#sqTail + 1 === this.depth ? 0 : this.#sqTail + 1;
    this.#submitted++;
    // The entry is in memory before the doorbell store (x86 keeps stores in order).
    this.#owner.registers.write32(this.#sqDoorbell, this.#sqTail);
  }

  /** Handle every completion the controller has posted; returns how many. */
  reap(): number {
    const cq = this.#cq;
    let head = this.#cqHead;
    let phase = this.#phase;
    let count = 0;
    for (;;) {
      const dw3 = cq[head * 4 + 3]!;
      if (((dw3 >>> 16) & 1) !== phase) break;
      const dw0 = cq[head * 4]!;
      const cid = dw3 & 0xffff;
      const status = (dw3 >>> 17) & 0x7fff;
      head++;
      if (head === this.depth) {
        head = 0;
        phase ^= 1;
      }
      count++;
      this.#complete(cid, dw0, status);
    }
    if (count > 0) {
      this.#cqHead = head;
      this.#phase = phase;
      this.#owner.registers.write32(this.#cqDoorbell, head);
    }
    return count;
  }

  #complete(cid: number, dw0: number, status: number): void {
    const resolve = this.#resolve[cid];
    const reject = this.#reject[cid];
    const command = this.#commands[cid];
    if (resolve === undefined || reject === undefined || command === undefined) return; // not ours: a stale entry
    this.#resolve[cid] = undefined;
    this.#reject[cid] = undefined;
    this.#commands[cid] = undefined;
    this.#completed++;
    // Hand the slot straight to the oldest waiter, so back-pressure is first come, first served.
    if (this.#waiterHead < this.#waiters.length) {
      const next = this.#waiters[this.#waiterHead]!;
      this.#waiters[this.#waiterHead++] = undefined as unknown as Waiter;
      if (this.#waiterHead === this.#waiters.length) {
        this.#waiters.length = 0;
        this.#waiterHead = 0;
      }
      this.#issue(cid, next.command, next.iova, next.length, next.resolve, next.reject, next.timeoutMs);
    } else {
      this.#freeIds.push(cid);
    }
    if (status === 0) resolve(dw0);
    else reject(statusError(commandName(this.admin, command.opcode), describeCommand(this.admin, command), status));
  }

  /** The command that has waited longest past its deadline, if any. */
  overdue(now: number): { name: string; detail: string } | undefined {
    for (let cid = 0; cid < this.#deadlines.length; cid++) {
      const command = this.#commands[cid];
      if (command !== undefined && this.#deadlines[cid]! < now) {
        return { name: commandName(this.admin, command.opcode), detail: describeCommand(this.admin, command) };
      }
    }
    return undefined;
  }

  /** Reject everything in flight and waiting, each with an error naming its own command. */
  failAll(why: (command: string, detail: string) => IommufdError): number {
    let failed = 0;
    for (let cid = 0; cid < this.#commands.length; cid++) {
      const command = this.#commands[cid];
      const reject = this.#reject[cid];
      if (command === undefined || reject === undefined) continue;
      this.#resolve[cid] = undefined;
      this.#reject[cid] = undefined;
      this.#commands[cid] = undefined;
      this.#freeIds.push(cid);
      reject(why(commandName(this.admin, command.opcode), describeCommand(this.admin, command)));
      failed++;
    }
    for (let i = this.#waiterHead; i < this.#waiters.length; i++) {
      const waiter = this.#waiters[i]!;
      waiter.reject(why(commandName(this.admin, waiter.command.opcode), describeCommand(this.admin, waiter.command)));
      failed++;
    }
    this.#waiters.length = 0;
    this.#waiterHead = 0;
    return failed;
  }

  /** Give the rings and list pages back to the heap. */
  release(): void {
    for (const buffer of this.#memory) if (!buffer.freed && !buffer.heap.closed) buffer.free();
  }
}
