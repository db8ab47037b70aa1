/**
 * The command tracker of one queue pair: which command ids (CID, NVMe Base 2.0 section 4.2) are
 * in the controller's hands, the promise and deadline of each, the free stack of ids, and the
 * callers waiting for an id when all are taken (back-pressure, first come first served).
 *
 * It knows nothing of rings or doorbells: the queue pair posts the entry for an id it hands out
 * and reports each completion back by id.
 */
import type { IommufdError } from "../sys/error.ts";
import { commandName, describeCommand, type Command } from "./commands.ts";
import { NvmeStatusError } from "./status.ts";

export type Resolve = (dw0: number) => void;
export type Reject = (error: IommufdError) => void;

/** A command that found no free id; it is posted when one comes back. */
export interface Waiter {
  command: Command;
  iova: number;
  length: number;
  resolve: Resolve;
  reject: Reject;
  timeoutMs: number;
}

export class CommandTracker {
  /** Command ids 0..slots-1. */
  readonly slots: number;
  readonly #admin: boolean;
  readonly #free: number[] = [];
  readonly #resolve: (Resolve | undefined)[];
  readonly #reject: (Reject | undefined)[];
  readonly #commands: (Command | undefined)[];
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
    this.#resolve = new Array(slots).fill(undefined);
    this.#reject = new Array(slots).fill(undefined);
    this.#commands = new Array(slots).fill(undefined);
    this.#deadlines = new Float64Array(slots);
    this.clear();
  }

  /** Every id free, nobody waiting. Pending work must be failed first. */
  clear(): void {
    this.#free.length = 0;
    for (let cid = this.slots - 1; cid >= 0; cid--) this.#free.push(cid);
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

  /** A free command id, or -1 when every id is in flight. */
  take(): number {
    return this.#free.length === 0 ? -1 : this.#free.pop()!;
  }

  /** Remember the command posted under `cid` until it completes or `timeoutMs` passes. */
  track(cid: number, command: Command, resolve: Resolve, reject: Reject, timeoutMs: number): void {
    this.#resolve[cid] = resolve;
    this.#reject[cid] = reject;
    this.#commands[cid] = command;
    this.#deadlines[cid] = performance.now() + timeoutMs;
    this.submitted++;
  }

  /** Queue a caller for the next free id. */
  wait(waiter: Waiter): void {
    this.#waiters.push(waiter);
    const waiting = this.#waiters.length - this.#waiterHead;
    if (waiting > this.maxWaiting) this.maxWaiting = waiting;
  }

  /**
   * Settle the command of `cid` with its completion. The id goes straight to the oldest waiter,
   * which is returned for the caller to post under `cid`; with nobody waiting it is freed.
   * A completion for an id not in flight (a stale entry) changes nothing.
   */
  complete(cid: number, dw0: number, status: number): Waiter | undefined {
    const resolve = this.#resolve[cid];
    const reject = this.#reject[cid];
    const command = this.#commands[cid];
    if (resolve === undefined || reject === undefined || command === undefined) return undefined;
    this.#resolve[cid] = undefined;
    this.#reject[cid] = undefined;
    this.#commands[cid] = undefined;
    this.completed++;
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
    this.#free.push(cid);
    return undefined;
  }

  /** A command in flight past its deadline, if any. */
  overdue(now: number): { name: string; detail: string } | undefined {
    for (let cid = 0; cid < this.slots; cid++) {
      const command = this.#commands[cid];
      if (command !== undefined && this.#deadlines[cid]! < now) {
        return { name: commandName(this.#admin, command.opcode), detail: describeCommand(this.#admin, command) };
      }
    }
    return undefined;
  }

  /** Reject everything in flight and waiting, each with an error naming its own command; every id is free after. */
  failAll(why: (command: string, detail: string) => IommufdError): number {
    const admin = this.#admin;
    let failed = 0;
    for (let cid = 0; cid < this.slots; cid++) {
      const command = this.#commands[cid];
      const reject = this.#reject[cid];
      if (command === undefined || reject === undefined) continue;
      this.#resolve[cid] = undefined;
      this.#reject[cid] = undefined;
      this.#commands[cid] = undefined;
      this.#free.push(cid);
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
