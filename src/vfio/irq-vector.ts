/**
 * IrqVector: one interrupt vector of an IrqSet and its eventfd. Every count is delivered once: by
 * poll() (a non-blocking read(2)), by wait(), or by the async iterator, whichever reads first.
 * Only when nothing is pending does a vector hand the eventfd to Bun's own epoll loop through
 * `Bun.file(fd).stream()`; waiting never blocks the thread.
 */
import { ptr } from "bun:ffi";
import { ERRNO } from "../sys/errno.ts";
import { closedError, ioError, stateError, syscallError } from "../sys/error.ts";
import { fdFinalizer } from "../sys/fd.ts";
import { lastErrno, libc } from "../sys/libc.ts";
import { VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_NONE } from "../uapi/vfio.ts";
import { type IrqSet, irqName } from "./irq.ts";

export interface WaitOptions {
  /** Abandon the wait: the promise rejects with the signal's reason. */
  signal?: AbortSignal;
}

const TWO_32 = 2 ** 32;

/**
 * The largest count a vector reports. An eventfd counter goes up to 2^64 - 2, and whoever signals
 * it (a device's MSI through the kernel, or anything holding the fd) decides how far: past 2^53 a
 * number is no longer exact and sums of such counts drift. Counts saturate here instead: still
 * "at least one interrupt", still a safe integer a caller can compare and add.
 */
export const MAX_IRQ_COUNT = Number.MAX_SAFE_INTEGER;

/** `a + b`, held at MAX_IRQ_COUNT. */
function addCounts(a: number, b: number): number {
  return Math.min(a + b, MAX_IRQ_COUNT);
}

/** Sum of the u64 counters in a chunk of eventfd reads (the loop may join several reads), saturated. */
function sumCounters(chunk: Uint8Array): number {
  const view = new DataView(chunk.buffer, chunk.byteOffset, chunk.byteLength);
  let total = 0;
  for (let at = 0; at + 8 <= chunk.byteLength; at += 8)
    total = addCounts(total, view.getUint32(at + 4, true) * TWO_32 + view.getUint32(at, true));
  return total;
}

interface EventfdReader {
  read(): Promise<{ done: boolean; value?: Uint8Array }>;
  cancel(): Promise<void>;
}

interface Waiter {
  resolve(count: number): void;
  reject(error: unknown): void;
  signal: AbortSignal | undefined;
  onAbort: (() => void) | undefined;
}

/**
 * One interrupt vector and its eventfd. Every count is delivered once: by poll(), by wait(), or
 * by the async iterator, whichever reads first.
 */
export class IrqVector implements AsyncIterable<number> {
  readonly set: IrqSet;
  /** Sub-index inside the set's interrupt index. */
  readonly vector: number;
  #fd: number;
  // The vector holds the buffer for its whole life, so the address taken once stays valid.
  readonly #word = new Uint32Array(new ArrayBuffer(8));
  readonly #wordAddress = ptr(this.#word);
  /** Counted by the event loop's reader but not yet handed out. */
  #pending = 0;
  #waiter: Waiter | undefined;
  #reader: EventfdReader | undefined;
  #stopPending = false;

  /** @internal */
  constructor(set: IrqSet, vector: number, fd: number) {
    this.set = set;
    this.vector = vector;
    this.#fd = fd;
    fdFinalizer.register(this, fd, this);
  }

  /** The eventfd (for users who poll it themselves; the vector still owns and closes it). */
  get fd(): number {
    if (this.#fd < 0) throw closedError("IrqVector.fd", this.#what());
    return this.#fd;
  }

  get closed(): boolean {
    return this.#fd < 0;
  }

  #what(): string {
    return `${irqName(this.set.index)} vector ${this.vector}`;
  }

  /**
   * Interrupts since the last read, without waiting: one non-blocking read(2) of the eventfd
   * (plus whatever the event loop already took in). 0 when none arrived.
   */
  poll(): number {
    const fd = this.#fd;
    if (fd < 0) throw closedError("IrqVector.poll", this.#what());
    let count = this.#pending;
    this.#pending = 0;
    const n = libc().read(fd, this.#wordAddress, 8);
    if (n === 8) {
      count = addCounts(count, this.#word[1]! * TWO_32 + this.#word[0]!);
    } else if (n < 0) {
      const errno = lastErrno();
      if (errno !== ERRNO.EAGAIN) {
        this.#pending = count;
        throw syscallError("read", errno, `cannot read the eventfd of ${this.#what()}`);
      }
    }
    return count;
  }

  /**
   * Resolves with the number of interrupts since the last read (at least 1). The thread stays
   * free: timers, I/O and other promises run while it waits. One wait at a time per vector.
   */
  wait(options?: WaitOptions): Promise<number> {
    const op = "IrqVector.wait";
    if (this.#fd < 0) return Promise.reject(closedError(op, this.#what()));
    if (this.#waiter) {
      return Promise.reject(
        stateError(op, "EBUSY", `another wait() on ${this.#what()} is still pending: one waiter per vector`),
      );
    }
    let count: number;
    try {
      count = this.poll();
    } catch (error) {
      return Promise.reject(error);
    }
    if (count > 0) return Promise.resolve(count);
    const signal = options?.signal;
    if (signal?.aborted) return Promise.reject(signal.reason);
    return new Promise<number>((resolve, reject) => {
      const waiter: Waiter = { resolve, reject, signal, onAbort: undefined };
      if (signal) {
        waiter.onAbort = () => {
          if (this.#waiter !== waiter) return;
          this.#waiter = undefined;
          reject(signal.reason);
          this.#stopWhenIdle();
        };
        signal.addEventListener("abort", waiter.onAbort, { once: true });
      }
      this.#waiter = waiter;
      this.#listen();
    });
  }

  /** Yields the count of each batch of interrupts; ends when the vector is closed. */
  async *[Symbol.asyncIterator](): AsyncIterator<number> {
    while (this.#fd >= 0) {
      let count: number;
      try {
        count = await this.wait();
      } catch (error) {
        if (this.#fd < 0) return;
        throw error;
      }
      yield count;
    }
  }

  /** Re-arm an automasked INTx line after acknowledging the interrupt on the device. */
  unmask(): void {
    const op = "IrqVector.unmask";
    if (this.#fd < 0) throw closedError(op, this.#what());
    if (!this.set.info.maskable) {
      throw stateError(op, "EINVAL", `${irqName(this.set.index)} cannot be masked or unmasked by VFIO (only INTx can)`);
    }
    this.set.control(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK, this.vector, 1, op);
  }

  /** Signal this vector's eventfd from the kernel, as the device would (loopback test of the wiring). */
  trigger(): void {
    const op = "IrqVector.trigger";
    if (this.#fd < 0) throw closedError(op, this.#what());
    this.set.control(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, this.vector, 1, op);
  }

  /**
   * Hand the eventfd to Bun's event loop while someone waits. A read is always pending on the
   * reader, so Bun hands over every chunk as soon as it reads it: nothing sits in the stream's
   * queue, and stopping the reader (once no wait follows) loses no count.
   */
  #listen(): void {
    if (this.#reader) return;
    const reader: EventfdReader = Bun.file(this.#fd).stream().getReader();
    this.#reader = reader;
    this.#readNext(reader);
  }

  #readNext(reader: EventfdReader): void {
    reader.read().then(
      ({ done, value }) => {
        // Counted even from a reader being stopped: Bun read it from the eventfd.
        if (value && this.#fd >= 0) this.#pending = addCounts(this.#pending, sumCounters(value));
        if (done || this.#reader !== reader) return;
        this.#readNext(reader);
        this.#deliver();
      },
      (error: unknown) => {
        if (this.#reader !== reader) return;
        this.#reader = undefined;
        const waiter = this.#takeWaiter();
        waiter?.reject(ioError("IrqVector.wait", `reading the eventfd of ${this.#what()} failed`, error));
      },
    );
  }

  /**
   * Stop the reader when no wait() follows within this turn of the event loop: a loop of awaits
   * keeps one reader, an idle vector holds none (and does not keep the process alive).
   */
  #stopWhenIdle(): void {
    if (this.#stopPending || !this.#reader) return;
    this.#stopPending = true;
    setImmediate(() => {
      this.#stopPending = false;
      if (this.#waiter || !this.#reader) return;
      const reader = this.#reader;
      this.#reader = undefined;
      reader.cancel().catch(() => {});
    });
  }

  #takeWaiter(): Waiter | undefined {
    const waiter = this.#waiter;
    this.#waiter = undefined;
    if (waiter?.signal && waiter.onAbort) waiter.signal.removeEventListener("abort", waiter.onAbort);
    return waiter;
  }

  #deliver(): void {
    if (!this.#waiter || this.#pending === 0) return;
    const count = this.#pending;
    this.#pending = 0;
    this.#takeWaiter()!.resolve(count);
    this.#stopWhenIdle();
  }

  /** @internal Called by the set once the kernel no longer signals the eventfd. */
  release(): void {
    if (this.#fd < 0) return;
    const fd = this.#fd;
    this.#fd = -1;
    const reader = this.#reader;
    this.#reader = undefined;
    // Bun reads a duplicate of the fd; cancelling closes that duplicate (on Bun's own schedule).
    reader?.cancel().catch(() => {});
    this.#takeWaiter()?.reject(closedError("IrqVector.wait", this.#what()));
    fdFinalizer.unregister(this);
    libc().close(fd);
  }
}
