/**
 * How a queue pair with an MSI-X vector waits for its interrupt: spin, block, park.
 *
 * Hybrid completion (the idea of the kernel's hybrid polling and io_uring's
 * IORING_SETUP_HYBRID_IOPOLL): the poller spins on a queue's completion ring for a window learned
 * from how long completions took to come lately, and parks on the queue's MSI-X vector when none
 * came within it. A completion that comes soon is found at polling's latency; a wait that would be
 * long costs no CPU past the window.
 *
 * The queue's completions always raise its vector (the controller cannot be told to raise it only
 * while someone sleeps): while spinning, the counts pile up on the eventfd unread, and are drained
 * before each park so that a park waits for a new interrupt, not an old one.
 *
 * An interrupt queue ("interrupt" completion) is the same with a window of 0: a look after the
 * drain, the block, the park.
 */
import type { QueuePair } from "./queue.ts";

/**
 * How the window is learned: spin for `multiple` times the `percentile`-th of the last SAMPLES
 * waits (the time from the first empty look to a completion, as the poller saw it). Park at once
 * when that wait is longer than MAX_SPIN_MS: spinning through it would cost more than a park.
 *
 * Only a spin sees a wait exactly. A wait that ended in a park counts as longer than any window:
 * its measured length is mostly the wake-up (120-300 us in the TCG guest against 50-70 us for the
 * completion itself), and counting that made a queue that parked once park for good (seen in
 * `bun bench nvme`: the window stuck at its least on a controller answering in 60 us). A queue
 * that parks at once learns nothing from its parks, so every PROBE_EVERY-th of its waits spins
 * the longest window instead, to see whether completions come sooner again.
 */
export interface SpinRule {
  percentile: number;
  multiple: number;
  /** The longest window (ms); past it, park at once. Default MAX_SPIN_MS, MAX_SPIN_BLOCKING_MS for a queue that blocks. */
  maxMs?: number;
}

/** What `hybridSpin` may be: a window fixed in ms, or the rule that learns it. */
export type HybridSpin = number | SpinRule;

/**
 * The default rule. Twice the median covers a wait a little slower than the typical one, and a
 * tail that is not typical (a slow command, a host that took the CPU away) ends in a park
 * instead of a spin that long.
 */
export const DEFAULT_SPIN_RULE: SpinRule = { percentile: 50, multiple: 2 };

/**
 * The longest spin before a park. Parking is not free: in the TCG guest (1 vCPU) a wait woken by
 * MSI-X cost 120-300 us of latency and about that much CPU per wake (`bun bench nvme`, MSI-X QD1:
 * 250 us of CPU per I/O against 88 polled). Spinning longer than a park costs is never worth it
 * (the rule of renting skis: spin until you have paid what buying would have cost, then park), and
 * it bounds how long the thread is held with nothing to show.
 */
export const MAX_SPIN_MS = 0.5;
/**
 * The longest spin of a queue that blocks on its eventfd before parking (blockMs). A block
 * is woken by the kernel microseconds after the interrupt, not the event loop's 120-300 us, so a
 * spin pays only for waits shorter than a few such wakes: QEMU's 60-100 us reads in the TCG guest
 * are left to the block, a real controller's 10-20 us ones are still spun for.
 */
export const MAX_SPIN_BLOCKING_MS = 0.05;
/**
 * The shortest window: a few looks at the ring, so that a completion already on its way when the
 * last one was reaped (the next of a batch) is not left for an interrupt.
 */
export const MIN_SPIN_MS = 0.01;
/** Waits the window is learned from: enough for a percentile, few enough to follow a change of load. */
export const SAMPLES = 32;
/**
 * Waits between two updates of the window: sorting the samples per completion would cost a few us
 * of every command's path in the TCG guest, and the window need not follow faster than this.
 */
const LEARN_EVERY = 8;
/**
 * The longest a queue may block the thread in poll(2) on its eventfd between the spin and the
 * park (`blockMs`). The kernel wakes a thread blocked on an eventfd microseconds after the
 * interrupt (C's blocking read: 3.7-3.9 us in the TCG guest, issue 27), where a wait parked in the
 * event loop took 120-300 us and about as much CPU; a blocked thread costs no CPU. The thread is
 * held meanwhile, as a spin holds it: timers and I/O wait up to this long.
 */
export const MAX_BLOCK_MS = 10;
/**
 * The default block: 1 ms, poll(2)'s least, long enough for most waits of QEMU's controller at
 * QD32 in the TCG guest (`bun bench nvme`: 0-1% of waits parked with it, 90-99% without), short
 * enough that timers and I/O of the program are held no longer than a polled spin holds them.
 */
export const DEFAULT_BLOCK_MS = 1;
/** In park-at-once mode, one wait in this many is a probe (a spin of the longest window): at most 1/8 of one per wait. */
export const PROBE_EVERY = 8;
/** Looks at the rings per clock read while spinning (a clock read costs 1-4 us in the TCG guest). */
const CLOCK_EVERY = 16;

/**
 * The spin window (ms) for these recent waits (ms): `multiple` times their `percentile`-th,
 * at least MIN_SPIN_MS; MIN_SPIN_MS when that exceeds `maxMs` (MAX_SPIN_MS, or
 * MAX_SPIN_BLOCKING_MS for a queue that blocks: completions come too late for a spin to pay). A
 * wait that ended in a park is Infinity here. With no waits yet, `maxMs`: the first waits are then
 * measured by spinning, which sees them exactly.
 */
export function learnedSpinMs(
  waits: ArrayLike<number>,
  rule: SpinRule = DEFAULT_SPIN_RULE,
  maxMs = MAX_SPIN_MS,
): number {
  if (waits.length === 0) return maxMs;
  const sorted = Float64Array.from(waits).sort(); // SAMPLES numbers, every LEARN_EVERY waits
  const at = Math.min(sorted.length - 1, Math.floor((rule.percentile / 100) * sorted.length));
  const window = rule.multiple * sorted[at]!;
  if (window > maxMs) return MIN_SPIN_MS;
  return Math.max(MIN_SPIN_MS, window);
}

/** What the waits of a queue with a vector (interrupt or hybrid) did, for stats and the bench. */
export interface WaitStats {
  /** The window the next spin will last (ms; 0 for an interrupt queue, which does not spin). */
  spinMs: number;
  /** Spins that found a completion within the window. */
  found: number;
  /** Spins that ended in a park on the vector. */
  parked: number;
  /** Of `found`, the waits that ended while the thread was blocked on the eventfd (blockMs). */
  blocked: number;
}

/**
 * How one queue pair with a vector waits for it: its spin window (learned, fixed, or 0 for an
 * interrupt queue), its block time, and what came of its waits.
 */
export class InterruptWaits {
  readonly queue: QueuePair;
  readonly #rule: SpinRule | undefined;
  readonly #waits = new Float64Array(SAMPLES);
  #count = 0;
  #spinMs: number;
  #found = 0;
  #parked = 0;
  #blocked = 0;
  readonly #blockMs: number;
  /** MAX_SPIN_MS, or MAX_SPIN_BLOCKING_MS when the queue blocks before parking. */
  readonly #maxSpinMs: number;
  /** When the last spin began, and how long it was to last. */
  #spinStart = 0;
  #window = 0;
  /** Waits since the last probe, while parking at once. */
  #sinceProbe = 0;

  constructor(queue: QueuePair, spin: HybridSpin | undefined, blockMs = DEFAULT_BLOCK_MS) {
    this.queue = queue;
    this.#blockMs = blockMs;
    this.#maxSpinMs =
      (typeof spin === "object" ? spin.maxMs : undefined) ?? (blockMs > 0 ? MAX_SPIN_BLOCKING_MS : MAX_SPIN_MS);
    if (typeof spin === "number") {
      this.#rule = undefined;
      this.#spinMs = spin;
    } else {
      this.#rule = spin ?? DEFAULT_SPIN_RULE;
      this.#spinMs = learnedSpinMs([], this.#rule, this.#maxSpinMs);
    }
  }

  get stats(): WaitStats {
    return { spinMs: this.#spinMs, found: this.#found, parked: this.#parked, blocked: this.#blocked };
  }

  /**
   * Spin until `reap` finds completions or the window ends; returns what it found (0: park now).
   * The clock is read at the start and every CLOCK_EVERY looks, and once more at a find.
   */
  spin(reap: () => number): number {
    const start = performance.now();
    this.#spinStart = start;
    let window = this.#spinMs;
    if (this.#rule !== undefined && window <= MIN_SPIN_MS && ++this.#sinceProbe >= PROBE_EVERY) {
      this.#sinceProbe = 0;
      window = this.#maxSpinMs;
    }
    this.#window = window;
    // A window of 0: the park's own look is the only one (interrupt mode with a look first).
    if (window <= 0) return 0;
    const until = start + window;
    for (let looks = 1; ; looks++) {
      const found = reap();
      if (found > 0) {
        this.#found++;
        this.#learn(performance.now() - start);
        return found;
      }
      if (looks % CLOCK_EVERY === 0 && performance.now() >= until) return 0;
    }
  }

  /**
   * Park until the queue's vector fires (after a spin that found nothing). The counts raised
   * while spinning are drained first and the ring looked at once more after the drain: a
   * completion posted before it is found there, one posted after it raises a count the wait sees.
   * With a block time, the thread then blocks in poll(2) on the eventfd for up to that long
   * (MAX_BLOCK_MS says why) before it parks in the event loop. Returns what the last look found
   * (the caller goes on without parking) or 0 after the wake.
   */
  async park(reap: () => number): Promise<number> {
    const queue = this.queue;
    const vector = queue.vector;
    vector?.poll();
    let found = reap();
    if (found === 0 && vector !== undefined && this.#blockMs > 0) {
      // Drained just above: the block needs no read(2) of its own first.
      if (vector.blockAfterDrain(this.#blockMs) > 0) {
        found = reap();
        if (found > 0) this.#blocked++;
      }
    }
    if (found > 0) {
      this.#found++;
      this.#learn(performance.now() - this.#spinStart);
      return found;
    }
    this.#parked++;
    // Longer than the window; a park at once (not a probe) says nothing new.
    if (this.#window > MIN_SPIN_MS) this.#learn(Number.POSITIVE_INFINITY);
    await queue.interrupt();
    return 0;
  }

  #learn(waitMs: number): void {
    if (this.#rule === undefined) return;
    this.#waits[this.#count++ % SAMPLES] = waitMs;
    if (this.#count % LEARN_EVERY !== 0) return;
    const waits = this.#count < SAMPLES ? this.#waits.subarray(0, this.#count) : this.#waits;
    this.#spinMs = learnedSpinMs(waits, this.#rule, this.#maxSpinMs);
  }
}

/** `blockMs` checked: whole ms (poll(2) counts in ms), 0..MAX_BLOCK_MS. */
export function checkBlockMs(blockMs: unknown): string | undefined {
  if (blockMs === undefined) return undefined;
  if (Number.isInteger(blockMs) && (blockMs as number) >= 0 && (blockMs as number) <= MAX_BLOCK_MS) return undefined;
  return `${String(blockMs)} is not a whole number of ms in 0..${MAX_BLOCK_MS}`;
}

/** `hybridSpin` checked: a window of 0..MAX_SPIN_MS * 20 ms, or a rule of a percentile 1..100 and a multiple > 0. */
export function checkHybridSpin(spin: unknown): string | undefined {
  if (spin === undefined) return undefined;
  if (typeof spin === "number") {
    return spin >= 0 && spin <= 10 ? undefined : `${spin} ms is outside 0..10`;
  }
  const rule = spin as Partial<SpinRule> | null;
  if (typeof rule !== "object" || rule === null)
    return `${String(spin)} is not a window in ms or a { percentile, multiple } rule`;
  const { percentile, multiple } = rule;
  if (typeof percentile !== "number" || !(percentile >= 1 && percentile <= 100)) {
    return `percentile ${String(percentile)} is outside 1..100`;
  }
  if (typeof multiple !== "number" || !(multiple > 0 && multiple <= 100))
    return `multiple ${String(multiple)} is outside (0, 100]`;
  const { maxMs } = rule;
  if (maxMs !== undefined && !(typeof maxMs === "number" && maxMs >= MIN_SPIN_MS && maxMs <= 10))
    return `maxMs ${String(maxMs)} is outside ${MIN_SPIN_MS}..10`;
  return undefined;
}
