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
import { argumentError, closedError, type IommufdError, stateError } from "../sys/error.ts";
import { commandName, type Command } from "./commands.ts";
import { prp2For } from "./prp.ts";
import { PAGE_SIZE, type ControllerRegisters } from "./registers.ts";
import { CompletionRing, CQ_ENTRY_BYTES, SQ_ENTRY_BYTES, SubmissionRing } from "./rings.ts";
import { assertIdle, NvmeRequest, type RequestCallback, RequestState } from "./request.ts";
import { CommandTracker } from "./tracker.ts";

/** What a queue needs from its controller. */
export interface QueueOwner {
  readonly registers: ControllerRegisters;
  readonly doorbellStride: number;
  /** The default timeout of a command (ms). */
  readonly commandTimeoutMs: number;
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
  /** MMIO writes ever, SQ tail and CQ head doorbells: per command, what the batching saves. */
  sqDoorbellWrites: number;
  cqDoorbellWrites: number;
}

type Resolve = (dw0: number) => void;
type Reject = (error: IommufdError) => void;
const unset = (): void => {};

/** A request of a queue's promise pool: its completion settles the Promise submit() returned. */
class PromiseRequest extends NvmeRequest {
  resolve: Resolve = unset;
  reject: Reject = unset;
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
  /** Inside reap(): what callbacks post is announced at its end, with no microtask of its own. */
  #reaping = false;
  /** Advanced by clear() and release(): a reap whose callback reset or deleted the queue stops. */
  #epoch = 0;
  /** The first error a callback threw in the current reap (thrown by the reap once its work is done). */
  #callbackError: unknown = undefined;
  /** Idle requests of the promise API, reused; as many as were ever pending at once. */
  readonly #pool: PromiseRequest[] = [];
  /** Promises settled by completions, ever: the poller yields to their continuations only when this moved. */
  promisesSettled = 0;
  readonly #settlePromise = (request: NvmeRequest): void => {
    const r = request as PromiseRequest;
    const resolve = r.resolve;
    const reject = r.reject;
    r.resolve = unset;
    r.reject = unset;
    this.#pool.push(r);
    this.promisesSettled++;
    if (r.error === undefined) resolve(r.result);
    else reject(r.error);
  };
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
    this.#epoch++;
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
      sqDoorbellWrites: this.#submissions.doorbellWrites,
      cqDoorbellWrites: this.#completions.doorbellWrites,
    };
  }

  /**
   * A request of this queue pair for callers that want no Promise and no allocation per command:
   * prepare it with Namespace.submitRead/submitWrite (which send it), and `onComplete(request)`
   * runs once per submission with `result` or `error` set (request.ts says when).
   */
  request(onComplete: RequestCallback, options: { timeoutMs?: number } = {}): NvmeRequest {
    const op = "QueuePair.request";
    if (typeof onComplete !== "function") throw argumentError(op, "onComplete", "expected a function");
    const timeoutMs = options.timeoutMs ?? this.#owner.commandTimeoutMs;
    if (!(timeoutMs > 0)) throw argumentError(op, "options.timeoutMs", `${timeoutMs} is not a positive number`);
    if (this.#released) throw closedError(op, `I/O queue pair ${this.id} (deleted)`);
    return new NvmeRequest(this, onComplete, timeoutMs);
  }

  /**
   * Send a command whose data (if any) is `length` bytes at `iova`. Resolves with the completion's
   * DW0; rejects with the decoded status. A full queue makes the promise wait for a free slot.
   * The controller is told at the end of the current turn, with every other command of the turn.
   * Built on requests: a pooled PromiseRequest carries it.
   */
  submit(command: Command, iova: number, length: number, timeoutMs: number): Promise<number> {
    if (this.#released || !this.#owner.usable) {
      try {
        this.#assertOpen(command.opcode, "QueuePair.submit");
      } catch (error) {
        return Promise.reject(error);
      }
    }
    const request = this.#pool.pop() ?? new PromiseRequest(this, this.#settlePromise, timeoutMs);
    request.opcode = command.opcode;
    request.nsid = command.nsid ?? 0;
    request.cdw10 = command.cdw10 ?? 0;
    request.cdw11 = command.cdw11 ?? 0;
    request.cdw12 = command.cdw12 ?? 0;
    request.cdw13 = command.cdw13 ?? 0;
    request.cdw14 = command.cdw14 ?? 0;
    request.cdw15 = command.cdw15 ?? 0;
    request.iova = iova;
    request.length = length;
    request.timeoutMs = timeoutMs;
    // The shared executor only hands out the settle functions: no closure per command.
    const promise = new Promise<number>(capture);
    request.resolve = captured.resolve;
    request.reject = captured.reject;
    this.#send(request);
    return promise;
  }

  /**
   * Send `request` (request.submit() and Namespace.submitRead/submitWrite come here). Throws, and
   * sends nothing, when the request is not idle (EBUSY), its queue pair was deleted (EBADF) or the
   * controller takes no commands (its error).
   */
  issue(request: NvmeRequest): void {
    // One guard, errors in a cold method, #send's body inline: the JIT inlines small calls only, and shallow ones.
    if (request.state !== RequestState.Idle || request.queue !== this || this.#released || !this.#owner.usable)
      this.#refuse(request);
    const slot = this.#tracker.take();
    if (slot < 0) this.#tracker.wait(request);
    else this.#post(slot, request);
    this.#owner.kick();
  }

  /** Throws why issue() cannot send `request` (cold path: called only when one of its checks failed). */
  #refuse(request: NvmeRequest): void {
    if (request.queue !== this)
      throw argumentError("NvmeRequest.submit", "request", `it belongs to another queue pair than ${this.id}`);
    assertIdle(request, "NvmeRequest.submit");
    this.#assertOpen(request.opcode, "NvmeRequest.submit");
  }

  #assertOpen(opcode: number, operation: string): void {
    if (this.#released) throw closedError(operation, `I/O queue pair ${this.id} (deleted)`);
    this.#owner.assertUsable(commandName(this.admin, opcode));
  }

  #send(request: NvmeRequest): void {
    const slot = this.#tracker.take();
    if (slot < 0) this.#tracker.wait(request);
    else this.#post(slot, request);
    this.#owner.kick();
  }

  /** Send a command and spin until it completes (bring-up and teardown only). */
  submitAndWait(command: Command, iova: number, length: number, timeoutMs: number, poll: () => void): number {
    const name = commandName(this.admin, command.opcode);
    this.#owner.assertUsable(name);
    const slot = this.#tracker.take();
    if (slot < 0) {
      throw stateError(`NVMe ${name}`, "EBUSY", `queue ${this.id} has no free slot for a synchronous command`);
    }
    const request = new NvmeRequest(this, unset, timeoutMs);
    Object.assign(request, command);
    request.iova = iova;
    request.length = length;
    this.#post(slot, request);
    // The spin below never yields, so the turn's microtask would come too late.
    this.#submissions.ringDoorbell();
    // Failed without a completion (timeout, controller failure) it leaves InFlight too.
    while (request.state === RequestState.InFlight) poll();
    if (request.error) throw request.error;
    return request.result;
  }

  #post(slot: number, request: NvmeRequest): void {
    const length = request.length;
    const iova = request.iova;
    // Data within its first page (no data, or a 4 KiB aligned block) needs no PRP2: decided here
    // with an AND (exact: the low 12 bits survive ToInt32), without a call.
    const prp2 =
      length <= PAGE_SIZE - (iova & (PAGE_SIZE - 1))
        ? 0
        : prp2For(iova, length, this.#prpLists, slot * (PAGE_SIZE / 4), this.#prpListsIova + slot * PAGE_SIZE);
    const cid = this.#tracker.track(slot, request);
    this.#submissions.post(cid, request, iova, prp2);
    if (!this.#reaping) this.#scheduleDoorbells();
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
   * controller (EPROTO) before anything in it is believed: nothing of it settles a command.
   *
   * Each request is called back as its completion is taken; what the callbacks send, and requests
   * that waited for the freed slots, are announced by one SQ tail write at the end, after one CQ
   * head write for all the completions; with `deferHead` (the poller's way) and promises settled,
   * the CQ head is left to the turn's doorbell microtask, after their continuations' commands
   * (a caller that spins without yielding must not defer). A callback that
   * throws does not stop the reap: its error is thrown once the reap's work is done.
   */
  reap(deferHead = false): number {
    const ring = this.#completions;
    const tracker = this.#tracker;
    // With nothing in flight nothing in the ring is ours: a queue pair lent to other code
    // (bench/nvme-loop.ts drives one with its own ids) keeps that code's entries there, and judging
    // them would fail the controller. A stray entry on an idle queue is judged by the first reap
    // once a command is in flight. The poller looks at every queue on every spin: an empty one
    // costs a load or two.
    if (tracker.inFlight === 0 || !ring.posted) return 0;
    const epoch = this.#epoch;
    const settledBefore = this.promisesSettled;
    const outer = this.#reaping;
    this.#reaping = true;
    let count = 0;
    try {
      while (ring.next()) {
        count++;
        const slot = tracker.slotOf(ring.cid);
        if (slot < 0 || ring.sqId !== this.id || ring.sqHead >= this.depth) {
          // The rest of the ring is not to be trusted either, and the head is not handed back.
          this.#owner.protocolError(this.id, this.#violation());
          return count;
        }
        const request = tracker.finish(slot, ring.dw0, ring.status);
        const next = tracker.handOff(slot);
        if (next !== undefined) this.#post(slot, next);
        try {
          request.onComplete(request);
        } catch (error) {
          if (this.#callbackError === undefined) this.#callbackError = error;
        }
        // A callback that reset, closed or failed the controller, or deleted the queue: its
        // pending commands were failed there and the ring cleared or freed.
        if (this.#epoch !== epoch || !this.#owner.usable) return count;
      }
      if (count > 0) {
        if (deferHead && this.promisesSettled !== settledBefore) {
          this.#submissions.ringDoorbell();
          this.#scheduleDoorbells();
        } else {
          // The CQ head first, then the SQ tail: QEMU's controller answered the next command
          // sooner that way (a loop on reap() at QD1 in the TCG guest, four rounds of one boot:
          // 10-20% more IOPS and a lower median each round than with the SQ tail first).
          ring.updateHead();
          this.#submissions.ringDoorbell();
        }
      }
      return count;
    } finally {
      this.#reaping = outer;
      const error = this.#callbackError;
      if (error !== undefined && !outer) {
        this.#callbackError = undefined;
        // biome-ignore lint/correctness/noUnsafeFinally: the reap's own result is complete; the callback's error is the news
        throw error;
      }
    }
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

  /**
   * Fail everything in flight and waiting, each with an error naming its own command; they are
   * called back in a microtask (promises rejected), once the operation that failed them is done.
   * Returns how many.
   */
  failAll(why: (command: string, detail: string) => IommufdError): number {
    const failed = this.#tracker.failAll(why);
    if (failed.length > 0) queueMicrotask(() => callBackFailed(failed));
    return failed.length;
  }

  /** Give the rings and list pages back to the heap; requests of this queue can no longer be sent. */
  release(): void {
    this.#released = true;
    this.#epoch++;
    for (const buffer of this.#memory) if (!buffer.freed && !buffer.heap.closed) buffer.free();
  }
}

/** Call back requests failed without a completion; a callback's error is thrown after all had theirs. */
function callBackFailed(failed: NvmeRequest[]): void {
  let first: unknown;
  for (const request of failed) {
    request.state = RequestState.Idle;
    try {
      request.onComplete(request);
    } catch (error) {
      first ??= error;
    }
  }
  if (first !== undefined) throw first;
}
