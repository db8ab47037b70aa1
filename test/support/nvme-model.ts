/**
 * An NVMe controller's doorbells and rings modelled in memory, for unit tests of the queue pair's
 * rules (when doorbells are written, with which values) without a device. It is not a controller:
 * it records every register write, and on request takes the announced submission entries and
 * posts a successful completion for each, the way the spec's ring protocol says (cid from the
 * entry, phase bit flipping at each wrap).
 */
import type { DmaHeap } from "../../src/heap/dma-heap.ts";
import type { RegionMapping } from "../../src/vfio/region.ts";
import { CompletionPoller } from "../../src/nvme/completion.ts";
import { QueuePair } from "../../src/nvme/queue.ts";
import { ControllerRegisters, DOORBELLS } from "../../src/nvme/registers.ts";

export interface RegisterWrite {
  offset: number;
  value: number;
}

/** Heap memory with IOVAs, in plain ArrayBuffers (what QueuePair asks of a DmaHeap). */
class ModelHeap {
  readonly closed = false;
  readonly #memory = new Map<number, Uint8Array>();
  #next = 0x10000;

  alloc(size: number): { bytes: Uint8Array; iova: number; freed: boolean; heap: ModelHeap; free(): void } {
    const iova = this.#next;
    this.#next += Math.ceil(size / 4096) * 4096;
    const bytes = new Uint8Array(size);
    this.#memory.set(iova, bytes);
    return { bytes, iova, freed: false, heap: this, free() {} };
  }

  at(iova: number): Uint8Array {
    const bytes = this.#memory.get(iova);
    if (bytes === undefined) throw new Error(`no model allocation at IOVA ${iova}`);
    return bytes;
  }
}

interface QueueState {
  sq: Uint32Array;
  cq: Uint32Array;
  depth: number;
  /** Where the model takes the next entry from: the SQ head. */
  sqHead: number;
  /** The tail the host last announced. */
  sqTail: number;
  cqTail: number;
  phase: number;
}

export class NvmeModel {
  readonly writes: RegisterWrite[] = [];
  readonly heap = new ModelHeap();
  readonly registers: ControllerRegisters;
  readonly doorbellStride = 4;
  readonly commandTimeoutMs = 10_000;
  usable = true;
  readonly queues: QueuePair[] = [];
  readonly #poller: CompletionPoller;
  readonly #state = new Map<number, QueueState>();
  /** Complete every announced command as soon as its doorbell is written (else only on complete()). */
  autoComplete = false;
  lastHealthCheck = 0;
  readonly #polled: boolean;
  readonly #record: boolean;

  /**
   * `polled: false` leaves reaping to the test (kick() starts no poller, which would also ring);
   * `record: false` keeps no list of register writes (for long profiling runs).
   */
  constructor(options: { polled?: boolean; record?: boolean } = {}) {
    this.#polled = options.polled ?? true;
    this.#record = options.record ?? true;
    const bar = {
      read32: () => 0,
      write32: (offset: number, value: number) => this.#write(offset, value),
    } as unknown as RegionMapping;
    this.registers = new ControllerRegisters(bar);
    this.#poller = new CompletionPoller(this);
  }

  assertUsable(command: string): void {
    if (!this.usable) throw new Error(`${command}: model controller not usable`);
  }

  kick(): void {
    if (this.#polled) this.#poller.kick();
  }

  /** What the queues reported as protocol violations (none, for a model that completes correctly). */
  readonly protocolErrors: string[] = [];

  protocolError(queue: number, what: string): void {
    this.protocolErrors.push(`queue ${queue}: ${what}`);
  }

  /** Health checks the poller made, and for each CSTS read it asked for, the ms since the model last completed a command. */
  healthChecks = 0;
  readonly statusReads: number[] = [];
  #lastCompleted = performance.now();

  checkHealth(now: number, readStatus: boolean): void {
    this.lastHealthCheck = now;
    this.healthChecks++;
    if (readStatus) this.statusReads.push(now - this.#lastCompleted);
  }

  /** A queue pair of `depth` entries with id `id`, known to the model and to the poller. */
  queuePair(id: number, depth: number): QueuePair {
    const queue = new QueuePair(this, this.heap as unknown as DmaHeap, id, depth, false);
    const sq = this.heap.at(queue.sqIova);
    const cq = this.heap.at(queue.cqIova);
    this.#state.set(id, {
      sq: new Uint32Array(sq.buffer, sq.byteOffset, depth * 16),
      cq: new Uint32Array(cq.buffer, cq.byteOffset, depth * 4),
      depth,
      sqHead: 0,
      sqTail: 0,
      cqTail: 0,
      phase: 1,
    });
    this.queues.push(queue);
    return queue;
  }

  sqDoorbell(id: number): number {
    return DOORBELLS + 2 * id * this.doorbellStride;
  }

  cqDoorbell(id: number): number {
    return DOORBELLS + (2 * id + 1) * this.doorbellStride;
  }

  /** The register writes to `offset` so far. */
  writesTo(offset: number): number[] {
    return this.writes.filter((w) => w.offset === offset).map((w) => w.value);
  }

  /** Post a successful completion for every entry announced and not yet completed on queue `id`; returns how many. */
  complete(id: number): number {
    const s = this.#state.get(id)!;
    let n = 0;
    while (s.sqHead !== s.sqTail) {
      const cid = s.sq[s.sqHead * 16]! >>> 16;
      s.sqHead = (s.sqHead + 1) % s.depth;
      const at = s.cqTail * 4;
      s.cq[at] = 0;
      s.cq[at + 2] = s.sqHead | (id << 16);
      s.cq[at + 3] = cid | (s.phase << 16);
      if (++s.cqTail === s.depth) {
        s.cqTail = 0;
        s.phase ^= 1;
      }
      n++;
    }
    if (n > 0) this.#lastCompleted = performance.now();
    return n;
  }

  #write(offset: number, value: number): void {
    if (this.#record) this.writes.push({ offset, value });
    const index = (offset - DOORBELLS) / this.doorbellStride;
    const s = this.#state.get(index >> 1);
    if (s === undefined || index & 1) return;
    s.sqTail = value;
    if (this.autoComplete) this.complete(index >> 1);
  }
}
