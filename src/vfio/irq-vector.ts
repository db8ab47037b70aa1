/**
 * IrqVector: one interrupt vector of an IrqSet and its eventfd. Every count is delivered once: by
 * poll() (a non-blocking read(2)), by wait(), or by the async iterator, whichever reads first.
 * Only when nothing is pending does a vector hand the eventfd to Bun's own epoll loop through
 * `Bun.file(fd).stream()`, and it keeps that reader armed while waits follow one another (it
 * stops once none has come for READER_IDLE_MS); waiting never blocks the thread.
 */
import { ptr } from "bun:ffi";
import { ERRNO } from "../sys/errno.ts";
import { argumentError, closedError, ioError, stateError, syscallError } from "../sys/error.ts";
import { fdFinalizer } from "../sys/fd.ts";
import { lastErrno, libc, POLLIN } from "../sys/libc.ts";
import { VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_NONE } from "../uapi/vfio.ts";
import { type IrqSet, irqName } from "./irq.ts";

export interface WaitOptions {
  /** Abandon the wait: the promise rejects with the signal's reason. */
  signal?: AbortSignal;
}

const TWO_32 = 2 ** 32;

/**
 * How long a vector keeps its event-loop reader armed after its last wait ended. Arming a reader
 * (a dup, an epoll_ctl and a JS stream) and stopping it again cost more than the wake itself, and
 * a driver that waits, handles the interrupt and waits again does so well within this time; a
 * vector nobody waits on holds no reader after it. An armed reader costs no CPU (it sits in
 * epoll), but it keeps the process alive until it stops.
 */
export const READER_IDLE_MS = 5;

/**
 * The largest count a vector reports. An eventfd counter goes up to 2^64 - 2, and whoever signals
 * it (a device's MSI through the kernel, or anything holding the fd) decides how far: past 2^53 a
 * number is no longer exact and sums of such counts drift. Counts saturate here instead: still
 * "at least one interrupt", still a safe integer a caller can compare and add.
 */
export const MAX_IRQ_COUNT = Number.MAX_SAFE_INTEGER;

/** The longest waitBlocking() (ms): the whole thread stops for it, timers and I/O included. */
export const MAX_BLOCK_MS = 60_000;

/** `a + b`, held at MAX_IRQ_COUNT. */
function addCounts(a: number, b: number): number {
  return Math.min(a + b, MAX_IRQ_COUNT);
}

/**
 * Sum of the u64 counters in a chunk of eventfd reads (the loop may join several reads),
 * saturated. Read byte by byte, with no DataView over `chunk.buffer`: asking a small typed array
 * for its buffer can make the engine move it into an ArrayBuffer of its own, on every wake.
 */
function sumCounters(chunk: Uint8Array): number {
  let total = 0;
  for (let at = 0; at + 8 <= chunk.length; at += 8) {
    const low = (chunk[at]! | (chunk[at + 1]! << 8) | (chunk[at + 2]! << 16) | (chunk[at + 3]! << 24)) >>> 0;
    const high = (chunk[at + 4]! | (chunk[at + 5]! << 8) | (chunk[at + 6]! << 16) | (chunk[at + 7]! << 24)) >>> 0;
    total = addCounts(total, high * TWO_32 + low);
  }
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
  /** waitBlocking()'s struct pollfd: fd, then events and revents (two shorts). */
  readonly #pollfd = new Int32Array(2);
  readonly #pollfdAddress = ptr(this.#pollfd);
  /** Counted by the event loop's reader but not yet handed out. */
  #pending = 0;
  #waiter: Waiter | undefined;
  #reader: EventfdReader | undefined;
  /** Stops the reader READER_IDLE_MS after the last wait ended; none while a wait is parked. */
  #idleTimer: ReturnType<typeof setTimeout> | undefined;

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
    // Counts the loop's reader already took in. What the eventfd holds is read in a microtask
    // below: one read(2) serves both a count already there and one raised by the caller's own
    // code before it awaits (each read(2) costs microseconds in a guest).
    const count = this.#pending;
    if (count > 0) {
      this.#pending = 0;
      return Promise.resolve(count);
    }
    const signal = options?.signal;
    if (signal?.aborted) return Promise.reject(signal.reason);
    return new Promise<number>((resolve, reject) => {
      const waiter: Waiter = { resolve, reject, signal, onAbort: undefined };
      if (signal) {
        waiter.onAbort = () => {
          if (this.#waiter !== waiter) return;
          this.#waiter = undefined;
          reject(signal.reason);
          this.#waitEnded();
        };
        signal.addEventListener("abort", waiter.onAbort, { once: true });
      }
      this.#waiter = waiter;
      // Read the eventfd just before the thread goes back to the event loop: an interrupt raised
      // by the code that called wait() (a doorbell write, then `await`) is often here by now,
      // and one read(2) costs far less than a wake through the loop's epoll and the stream.
      queueMicrotask(() => {
        if (this.#waiter !== waiter) return;
        this.#readNow();
        if (this.#waiter !== waiter) return;
        // Parked. No timer pending meanwhile: with the idle timer left pending, a wake measured
        // some microseconds slower (bench/irq-park.ts); the idle clock restarts when this wait
        // ends. Waits answered above leave it alone (no timer churn per wait).
        clearTimeout(this.#idleTimer);
        this.#idleTimer = undefined;
        this.#listen();
      });
    });
  }

  /**
   * Block the thread in poll(2) on the eventfd until an interrupt comes or `timeoutMs` (whole ms)
   * pass: the interrupts since the last read, 0 on a timeout. For code that owns its thread (a
   * Worker; a driver between a spin and a park, as the NVMe hybrid mode does): the kernel wakes a
   * blocked thread microseconds after the interrupt, where a wake through the event loop costs
   * far more under emulation. Nothing else runs on this thread meanwhile.
   */
  waitBlocking(timeoutMs: number): number {
    this.#checkBlock("IrqVector.waitBlocking", timeoutMs);
    const count = this.poll();
    if (count > 0 || timeoutMs === 0) return count;
    return this.#block(timeoutMs);
  }

  /**
   * @internal waitBlocking() for a caller that has just drained the eventfd with poll(): no
   * read(2) before the block, which would find nothing almost always. A count raised since the
   * drain still ends the block at once (poll(2) sees it). One system call fewer per wait of the
   * NVMe driver's interrupt and hybrid queues.
   */
  blockAfterDrain(timeoutMs: number): number {
    this.#checkBlock("IrqVector.waitBlocking", timeoutMs);
    return timeoutMs === 0 ? this.poll() : this.#block(timeoutMs);
  }

  #checkBlock(op: string, timeoutMs: number): void {
    if (this.#fd < 0) throw closedError(op, this.#what());
    if (!Number.isInteger(timeoutMs) || timeoutMs < 0 || timeoutMs > MAX_BLOCK_MS) {
      throw argumentError(op, "timeoutMs", `expected whole milliseconds from 0 to ${MAX_BLOCK_MS}, got ${timeoutMs}`);
    }
    if (this.#waiter) {
      throw stateError(op, "EBUSY", `a wait() on ${this.#what()} is pending: one waiter per vector`);
    }
  }

  /** poll(2) on the eventfd for up to `timeoutMs` (> 0), then the read: the count, 0 on a timeout. */
  #block(timeoutMs: number): number {
    this.#pollfd[0] = this.#fd;
    this.#pollfd[1] = POLLIN; // events; revents (the high half) cleared
    const deadline = performance.now() + timeoutMs;
    for (let left = timeoutMs; ; ) {
      const ready = libc().poll(this.#pollfdAddress, 1, left);
      if (ready > 0) return this.poll();
      if (ready === 0) return 0;
      const errno = lastErrno();
      if (errno !== ERRNO.EINTR) throw syscallError("poll", errno, `cannot wait on the eventfd of ${this.#what()}`);
      left = Math.max(0, Math.ceil(deadline - performance.now()));
    }
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
   * Hand the eventfd to Bun's event loop. A read is always pending on the reader, so Bun hands
   * over every chunk as soon as it reads it: nothing sits in the stream's queue, and stopping the
   * reader loses no count. The reader stays armed between waits (see READER_IDLE_MS).
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
        this.#deliver(false);
        // After the waiter's continuation: the next read (a read(2) and an epoll re-arm by Bun) and
        // the idle clock are not on the wake's path. A read still pends before the thread goes
        // back to the event loop, so no count waits in the stream's queue.
        queueMicrotask(() => {
          if (this.#reader !== reader) return;
          this.#readNext(reader);
          if (!this.#waiter) this.#waitEnded();
        });
      },
      (error: unknown) => {
        if (this.#reader !== reader) return;
        this.#reader = undefined;
        const waiter = this.#takeWaiter();
        waiter?.reject(ioError("IrqVector.wait", `reading the eventfd of ${this.#what()} failed`, error));
      },
    );
  }

  /** The waiter's non-blocking read(2) of the eventfd: resolves it if a count was there. */
  #readNow(): void {
    const n = libc().read(this.#fd, this.#wordAddress, 8);
    if (n === 8) {
      this.#pending = addCounts(this.#pending, this.#word[1]! * TWO_32 + this.#word[0]!);
      this.#deliver();
    } else if (n < 0) {
      const errno = lastErrno();
      if (errno !== ERRNO.EAGAIN) {
        this.#takeWaiter()?.reject(syscallError("read", errno, `cannot read the eventfd of ${this.#what()}`));
      }
    }
  }

  /** A wait ended: stop the reader unless another wait comes within READER_IDLE_MS. */
  #waitEnded(): void {
    if (this.#idleTimer || !this.#reader) return;
    this.#idleTimer = setTimeout(() => {
      this.#idleTimer = undefined;
      if (!this.#waiter) this.#stopReader();
    }, READER_IDLE_MS);
  }

  #stopReader(): void {
    clearTimeout(this.#idleTimer);
    this.#idleTimer = undefined;
    const reader = this.#reader;
    this.#reader = undefined;
    // Bun reads a duplicate of the fd; cancelling closes that duplicate (on Bun's own schedule).
    reader?.cancel().catch(() => {});
  }

  #takeWaiter(): Waiter | undefined {
    const waiter = this.#waiter;
    this.#waiter = undefined;
    if (waiter?.signal && waiter.onAbort) waiter.signal.removeEventListener("abort", waiter.onAbort);
    return waiter;
  }

  #deliver(idleClock = true): void {
    if (!this.#waiter || this.#pending === 0) return;
    const count = this.#pending;
    this.#pending = 0;
    this.#takeWaiter()!.resolve(count);
    if (idleClock) this.#waitEnded();
  }

  /** @internal Called by the set once the kernel no longer signals the eventfd. */
  release(): void {
    if (this.#fd < 0) return;
    const fd = this.#fd;
    this.#fd = -1;
    this.#stopReader();
    this.#takeWaiter()?.reject(closedError("IrqVector.wait", this.#what()));
    fdFinalizer.unregister(this);
    libc().close(fd);
  }
}
