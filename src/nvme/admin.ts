/**
 * The admin commands the driver itself sends, waited for synchronously on the admin queue
 * (NVMe Base 2.0 section 5): Identify, Set Features (Number of Queues), and Create/Delete I/O
 * Completion and Submission Queue. These tell the controller; the host side of a queue (its rings
 * in the heap, cleared and released) is QueuePair's and rings.ts's.
 */
import type { DmaBuffer } from "../heap/dma-heap.ts";
import {
  createIoCompletionQueue,
  createIoSubmissionQueue,
  deleteIoCompletionQueue,
  deleteIoSubmissionQueue,
  identify,
  IdentifyCns,
  setNumberOfQueues,
  type Command,
} from "./commands.ts";
import {
  parseControllerIdentity,
  parseNamespaceIdentity,
  parseNamespaceList,
  type ControllerIdentity,
  type NamespaceIdentity,
} from "./identify.ts";
import type { QueuePair } from "./queue.ts";
import { PAGE_SIZE } from "./registers.ts";

export class AdminCommands {
  readonly #queue: QueuePair;
  /** One page the controller writes Identify data into. */
  readonly #scratch: DmaBuffer;
  readonly #timeoutMs: number;
  /** Called while a command is out: reaps the admin queue and checks the controller's health. */
  readonly #poll: () => void;

  constructor(queue: QueuePair, scratch: DmaBuffer, timeoutMs: number, poll: () => void) {
    this.#queue = queue;
    this.#scratch = scratch;
    this.#timeoutMs = timeoutMs;
    this.#poll = poll;
  }

  #send(command: Command, iova = 0, length = 0, timeoutMs = this.#timeoutMs): number {
    return this.#queue.submitAndWait(command, iova, length, timeoutMs, this.#poll);
  }

  #identify(command: Command): Uint8Array {
    const scratch = this.#scratch;
    scratch.bytes.fill(0);
    this.#send(command, scratch.iova, PAGE_SIZE);
    return scratch.bytes;
  }

  identifyController(): ControllerIdentity {
    return parseControllerIdentity(this.#identify(identify(IdentifyCns.Controller)));
  }

  identifyNamespace(nsid: number): NamespaceIdentity {
    return parseNamespaceIdentity(this.#identify(identify(IdentifyCns.Namespace, nsid)));
  }

  activeNamespaces(): number[] {
    return parseNamespaceList(this.#identify(identify(IdentifyCns.ActiveNamespaces)));
  }

  /** Ask for `requested` I/O queue pairs; returns how many the controller granted (the fewer of SQs and CQs). */
  setNumberOfQueues(requested: number): number {
    const granted = this.#send(setNumberOfQueues(requested));
    return Math.min(granted & 0xffff, granted >>> 16) + 1;
  }

  /**
   * Create the completion queue, then the submission queue of `queue` on the controller. When the
   * second fails the first is deleted again (if the controller still answers).
   */
  createIoQueuePair(queue: QueuePair): void {
    this.#send(createIoCompletionQueue(queue.id, queue.depth, queue.vectorNumber), queue.cqIova);
    try {
      this.#send(createIoSubmissionQueue(queue.id, queue.depth, queue.id), queue.sqIova);
    } catch (error) {
      try {
        this.#send(deleteIoCompletionQueue(queue.id));
      } catch {
        // The creation's error is the one worth reporting.
      }
      throw error;
    }
  }

  /** Delete the submission queue, then the completion queue of `queue` (the controller aborts what is pending). */
  deleteIoQueuePair(queue: QueuePair, timeoutMs = this.#timeoutMs): void {
    this.#send(deleteIoSubmissionQueue(queue.id), 0, 0, timeoutMs);
    this.#send(deleteIoCompletionQueue(queue.id), 0, 0, timeoutMs);
  }
}
