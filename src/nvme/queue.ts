/**
 * A submission/completion queue pair (NVMe Base 2.0 sections 3.3 and 4.6) as the driver uses it:
 * its two rings (rings.ts), its command tracker (tracker.ts), one PRP list page per command id,
 * all in the controller's DmaHeap, and its MSI-X vector when its completions raise one.
 *
 * Nothing here makes a system call: an entry is written into heap memory, the doorbell is one
 * 32-bit store into the mmapped BAR, and completions are found by their phase bit.
 *
 * Doorbells are batched. A doorbell store is the one costly step of a command (an MMIO write:
 * a VM exit under emulation, a PCIe write on hardware), so the rule is: every command submitted
 * in the same turn of the event loop is announced by one SQ tail write, made in a microtask
 * queued by the turn's first submission, hence before the event loop runs anything else and
 * before the poller spins (it rings too). `ringDoorbell()` announces at once, for callers that
 * spin without yielding. Completions are handed back by one CQ head write per reap; the poller's
 * reaps leave it to the same microtask, after the SQ tail: the controller hears of the next
 * commands one MMIO write sooner (at QD1 that write is on every command's path). A controller
 * whose completion queue looks full meanwhile holds its completions until the head write, which
 * follows within the turn (every compliant controller must, and QEMU's does).
 */
import type { DmaBuffer, DmaHeap } from "../heap/dma-heap.ts";
import type { IrqVector } from "../vfio/irq.ts";
import { type IommufdError, stateError } from "../sys/error.ts";
import { commandName, type Command } from "./commands.ts";
import { prp2For } from "./prp.ts";
import { PAGE_SIZE, type ControllerRegisters } from "./registers.ts";
import { CompletionRing, CQ_ENTRY_BYTES, SQ_ENTRY_BYTES, SubmissionRing } from "./rings.ts";
import { CommandTracker, type Reject, type Resolve } from "./tracker.ts";

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
  /** The controller posted a completion no correct controller could (EPROTO): fail it and everything pending. */
  protocolError(queue: number, what: string): void;
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

/** Where `capture`, the executor every submit() passes to its Promise, leaves the settle functions. */
const captured: { resolve: Resolve; reject: Reject } = { resolve: () => {}, reject: () => {} };
function capture(resolve: Resolve, reject: Reject): void {
  captured.resolve = resolve;
  captured.reject = reject;
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
  readonly #submissions: SubmissionRing;
  readonly #completions: CompletionRing;
  readonly #tracker: CommandTracker;
  readonly #prpLists: Uint32Array;
  readonly #prpListsIova: number;
  /** A microtask to write the doorbells (SQ tail, then CQ head) is queued. */
  #doorbellDue = false;
  #released = false;
  /** Runs once per turn with submissions or deferred reaps, after all of them (see the file comment). */
  readonly #ringDue = (): void => {
    this.#doorbellDue = false;
    // A queue deleted or a controller closed, failed or reset in the same turn: its pending
    // commands were failed there and the ring cleared; nothing may be announced.
    if (this.#released || !this.#owner.usable) return;
    this.ringDoorbell();
  };

  constructor(owner: QueueOwner, heap: DmaHeap, id: number, depth: number, admin: boolean, vector?: IrqVector) {
    this.#owner = owner;
    this.vector = vector;
    this.vectorNumber = vector === undefined ? undefined : id;
    this.id = id;
    this.depth = depth;
    this.admin = admin;
    const slots = depth - 1;
    const sq = heap.alloc(depth * SQ_ENTRY_BYTES, { align: PAGE_SIZE });
    const cq = heap.alloc(depth * CQ_ENTRY_BYTES, { align: PAGE_SIZE });
    const lists = heap.alloc(slots * PAGE_SIZE, { align: PAGE_SIZE });
    this.#memory = [sq, cq, lists];
    this.sqIova = sq.iova;
    this.cqIova = cq.iova;
    this.#submissions = new SubmissionRing(sq.bytes, depth, owner.registers, id, owner.doorbellStride);
    this.#completions = new CompletionRing(cq.bytes, depth, owner.registers, id, owner.doorbellStride);
    this.#tracker = new CommandTracker(slots, admin);
    this.#prpLists = new Uint32Array(lists.bytes.buffer, lists.bytes.byteOffset, (slots * PAGE_SIZE) / 4);
    this.#prpListsIova = lists.iova;
    this.clear();
  }

  /** Back to the state of a freshly created queue (after a controller reset). Pending work must be failed first. */
  clear(): void {
    this.#submissions.clear();
    this.#completions.clear();
    this.#tracker.clear();
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
    return this.#tracker.inFlight;
  }

  get waiting(): number {
    return this.#tracker.waiting;
  }

  stats(): QueueStats {
    const tracker = this.#tracker;
    return {
      submitted: tracker.submitted,
      completed: tracker.completed,
      inFlight: tracker.inFlight,
      waiting: tracker.waiting,
      maxWaiting: tracker.maxWaiting,
    };
  }

  /**
   * Send a command whose data (if any) is `length` bytes at `iova`. Resolves with the completion's
   * DW0; rejects with the decoded status. A full queue makes the promise wait for a free slot.
   * The controller is told at the end of the current turn, with every other command of the turn.
   */
  submit(command: Command, iova: number, length: number, timeoutMs: number): Promise<number> {
    if (!this.#owner.usable) {
      try {
        this.#owner.assertUsable(commandName(this.admin, command.opcode));
      } catch (error) {
        return Promise.reject(error);
      }
    }
    // The shared executor only hands out the settle functions: no closure per command.
    const promise = new Promise<number>(capture);
    const resolve = captured.resolve;
    const reject = captured.reject;
    const slot = this.#tracker.take();
    if (slot < 0) this.#tracker.wait({ command, iova, length, resolve, reject, timeoutMs });
    else this.#issue(slot, command, iova, length, resolve, reject, timeoutMs);
    this.#owner.kick();
    return promise;
  }

  /** Send a command and spin until it completes (bring-up and teardown only). */
  submitAndWait(command: Command, iova: number, length: number, timeoutMs: number, poll: () => void): number {
    const name = commandName(this.admin, command.opcode);
    this.#owner.assertUsable(name);
    const slot = this.#tracker.take();
    if (slot < 0) {
      throw stateError(`NVMe ${name}`, "EBUSY", `queue ${this.id} has no free slot for a synchronous command`);
    }
    let done = false;
    let result = 0;
    let failure: IommufdError | undefined;
    this.#issue(
      slot,
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
    // The spin below never yields, so the turn's microtask would come too late.
    this.#submissions.ringDoorbell();
    while (!done) poll();
    if (failure) throw failure;
    return result;
  }

  #issue(
    slot: number,
    command: Command,
    iova: number,
    length: number,
    resolve: Resolve,
    reject: Reject,
    timeoutMs: number,
  ): void {
    const prp2 =
      length > 0
        ? prp2For(iova, length, this.#prpLists, slot * (PAGE_SIZE / 4), this.#prpListsIova + slot * PAGE_SIZE)
        : 0;
    const cid = this.#tracker.track(slot, command, resolve, reject, timeoutMs);
    this.#submissions.post(cid, command, iova, prp2);
    this.#scheduleDoorbells();
  }

  #scheduleDoorbells(): void {
    if (this.#doorbellDue) return;
    this.#doorbellDue = true;
    queueMicrotask(this.#ringDue);
  }

  /**
   * Write the doorbells now: the SQ tail if commands were posted since it was last written, then
   * the CQ head if completions were taken since. Returns whether the SQ tail was written. Both
   * happen at the end of the turn anyway; this is for code that submits and then spins without
   * yielding to the event loop.
   */
  ringDoorbell(): boolean {
    const rang = this.#submissions.ringDoorbell();
    this.#completions.updateHead();
    return rang;
  }

  /** Commands posted and not yet announced to the controller. */
  get unannounced(): number {
    return this.#submissions.unannounced;
  }

  /**
   * Handle every completion the controller has posted; returns how many. An entry that names
   * another submission queue, an SQ head outside this one, or a command id not in flight fails the
   * controller (EPROTO) before anything in it is believed: nothing of it settles a command. The CQ
   * head is written once for all of them, at once, or with `deferHead` by the turn's doorbell
   * microtask after the SQ tail (the poller's way; a caller that spins without yielding must not
   * defer). Waiters that got a freed slot are posted and announced by one SQ write.
   */
  reap(deferHead = false): number {
    const ring = this.#completions;
    const tracker = this.#tracker;
    let count = 0;
    let reissued = false;
    while (ring.next()) {
      count++;
      const slot = tracker.slotOf(ring.cid);
      if (slot < 0 || ring.sqId !== this.id || ring.sqHead >= this.depth) {
        // The rest of the ring is not to be trusted either, and the head is not handed back.
        this.#owner.protocolError(this.id, this.#violation());
        return count;
      }
      const next = tracker.complete(slot, ring.dw0, ring.status);
      if (next !== undefined) {
        this.#issue(slot, next.command, next.iova, next.length, next.resolve, next.reject, next.timeoutMs);
        reissued = true;
      }
    }
    if (reissued) this.#submissions.ringDoorbell();
    if (count > 0) {
      if (deferHead) this.#scheduleDoorbells();
      else ring.updateHead();
    }
    return count;
  }

  /** What is wrong with the entry reap() just took (the first of its faults). */
  #violation(): string {
    const ring = this.#completions;
    if (ring.sqId !== this.id) return `posted a completion for submission queue ${ring.sqId}`;
    if (ring.sqHead >= this.depth) {
      return `posted a completion with SQ head ${ring.sqHead}, outside the ${this.depth}-entry submission queue`;
    }
    return `posted a completion for ${this.#tracker.describeStale(ring.cid)}`;
  }

  /** The command that has waited longest past its deadline, if any. */
  overdue(now: number): { name: string; detail: string } | undefined {
    return this.#tracker.overdue(now);
  }

  /** Reject everything in flight and waiting, each with an error naming its own command. */
  failAll(why: (command: string, detail: string) => IommufdError): number {
    return this.#tracker.failAll(why);
  }

  /** Give the rings and list pages back to the heap. */
  release(): void {
    this.#released = true;
    for (const buffer of this.#memory) if (!buffer.freed && !buffer.heap.closed) buffer.free();
  }
}
