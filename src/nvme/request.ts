/**
 * A request: one command's fields, where its data is, and what to call when it completes, made
 * once and sent again and again (the idea of libvfn's request tracker, include/vfn/nvme/rq.h: a
 * preallocated object per command in flight, taken and given back, nothing allocated per I/O).
 *
 * It is the driver's one way to send a command. The promise API (QueuePair.submit, Namespace.read
 * and .write) sends PromiseRequests, kept in a per-queue pool, whose completion settles a Promise;
 * a caller that wants no Promise and no allocation per command makes its own requests with
 * QueuePair.request(onComplete) and sends them with Namespace.submitRead/submitWrite or submit().
 *
 * onComplete runs once per submission: synchronously inside the reap that found the completion
 * (the poller's, or the caller's own queue.reap()), so a request sent again from it is announced
 * by the same reap's doorbell write, before anything else runs. A request failed without a
 * completion (timeout, EPROTO, ENODEV, reset, queue deleted, controller closed) is called back
 * in a microtask after the operation that failed it returns, when the controller's new state
 * (failed, closed, reset, queue gone) already holds for whatever the callback sends next.
 */
import { type IommufdError, stateError } from "../sys/error.ts";
import type { Command } from "./commands.ts";

/** The state of a request; only an idle one may be sent. */
export const RequestState = {
  Idle: 0,
  /** Queued for a free command slot (the queue pair is full). */
  Waiting: 1,
  /** Posted to the submission queue, not yet completed. */
  InFlight: 2,
  /** Failed without a completion; its callback is queued. */
  Failing: 3,
} as const;

const STATE_NAMES = ["idle", "waiting for a free slot", "in flight", "failed and about to be called back"];

/** The queue pair a request belongs to (queue.ts), as the request sees it. */
export interface RequestQueue {
  readonly id: number;
  issue(request: NvmeRequest): void;
}

export type RequestCallback = (request: NvmeRequest) => void;

export class NvmeRequest implements Command {
  /** The command's dwords as last prepared (by Namespace.submitRead/submitWrite); the driver adds the id and PRPs. */
  opcode = 0;
  nsid = 0;
  cdw10 = 0;
  cdw11 = 0;
  cdw12 = 0;
  cdw13 = 0;
  cdw14 = 0;
  cdw15 = 0;
  /** The data's IOVA and length in bytes (0: no data), checked against the controller's heap when prepared. */
  iova = 0;
  length = 0;
  timeoutMs: number;
  /** After completion: the completion's DW0, and the error (undefined when the command succeeded). */
  result = 0;
  error: IommufdError | undefined = undefined;
  /** @internal RequestState; the queue pair changes it. */
  state: number = RequestState.Idle;
  readonly queue: RequestQueue;
  readonly onComplete: RequestCallback;

  /** @internal Made by QueuePair.request() (and the queue's promise pool). */
  constructor(queue: RequestQueue, onComplete: RequestCallback, timeoutMs: number) {
    this.queue = queue;
    this.onComplete = onComplete;
    this.timeoutMs = timeoutMs;
  }

  /** Whether the request may be sent (not waiting, in flight or about to be called back). */
  get idle(): boolean {
    return this.state === RequestState.Idle;
  }

  /** Where the request is, in words (for errors). */
  get stateName(): string {
    return STATE_NAMES[this.state] ?? "unknown";
  }

  /**
   * Send the command as last prepared, again (e.g. after a failure the caller chose to retry).
   * Throws EBUSY while the request is not idle, EBADF when its queue pair was deleted, and the
   * controller's error when it takes no commands; everything after that comes to onComplete.
   */
  submit(): void {
    this.queue.issue(this);
  }
}

/** Throws EBUSY unless `request` is idle (a request carries one command at a time). */
export function assertIdle(request: NvmeRequest, operation: string): void {
  if (request.state === RequestState.Idle) return;
  throw stateError(operation, "EBUSY", `the request is ${request.stateName}: a request carries one command at a time`, {
    hint: "send it again from its onComplete, or make one request per command in flight",
  });
}
