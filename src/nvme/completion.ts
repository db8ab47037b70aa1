/**
 * Finding completions (NVMe Base 2.0 section 4.6): one poller per controller runs while any
 * command is pending. It reads phase bits in heap memory (no system call), spins briefly when
 * nothing is there, and lets the event loop run in between; when every queue with work raises
 * MSI-X it waits for the interrupt instead (interrupt-waits.ts): a hybrid queue spins for its learned
 * window first, then, as an interrupt queue does at once, blocks the thread on the interrupt for
 * up to its block time, and sleeps in the event loop only when nothing came by then.
 */
import { type HybridSpin, type WaitStats, InterruptWaits } from "./interrupt-waits.ts";
import type { QueuePair } from "./queue.ts";

/**
 * The shortest spin on the completion queues before the event loop runs, and how often a spin
 * lets pending promise continuations run (their submissions would otherwise wait for its end).
 */
const SPIN_MS = 0.25;
/**
 * A turn of the event loop is not free: about 3 us natively, 55-230 us in the TCG guest (1 vCPU),
 * where yielding every 0.25 ms spent a third of the time there. So the spin lasts this many
 * times the recent turns' cost (the turns then take at most a tenth of the time), but never
 * longer than MAX_SPIN_MS, which bounds how long timers and I/O wait for a polling driver.
 */
const TURN_SHARE = 9;
const MAX_SPIN_MS = 2;

/** How long to spin before the next turn of the event loop, given what recent turns cost (ms). */
export function spinWindowMs(turnMs: number): number {
  return Math.min(MAX_SPIN_MS, Math.max(SPIN_MS, TURN_SHARE * turnMs));
}
/** How often the poller reads CSTS and checks deadlines when it finds nothing (an MMIO read is a VM exit). */
export const HEALTH_CHECK_MS = 10;
/** How often a timer checks the controller's health while the poller sleeps on an interrupt. */
const ASLEEP_CHECK_MS = 100;
/** Looks at the completion queues per clock read while spinning. */
const CLOCK_EVERY = 16;
/** Continuations of a completed command run before the poller looks again (a few promise hops). */
const HOPS_AFTER_COMPLETION = 4;
/** What #spin returns when a promise hop is due (not a count of completions). */
const HOP_DUE = -1;

/** What the poller needs from its controller. */
export interface PollerOwner {
  /** The admin queue first, then the I/O queue pairs. */
  readonly queues: readonly QueuePair[];
  /** False once the controller failed or closed: the poller stops. */
  readonly usable: boolean;
  /** Deadlines, and fatal status (an MMIO read of CSTS) when `readStatus`; may fail the controller. */
  checkHealth(now: number, readStatus: boolean): void;
  readonly lastHealthCheck: number;
}

export class CompletionPoller {
  readonly #owner: PollerOwner;
  #running = false;
  /**
   * Whether completions came since the last health check (or the poller started): a clock read
   * per completion would cost 1-4 us in the TCG guest, on every command's path at QD1. Checks are
   * at least HEALTH_CHECK_MS apart, so none since the last means none for that long.
   */
  #completedSinceCheck = false;
  /** Recent cost of letting the event loop run once (a moving average, ms). */
  #turnMs = 0;
  /** When the current spin's window ends (performance.now() ms; infinite until its first clock read). */
  #spinUntil = Number.POSITIVE_INFINITY;
  /** The queues' promisesSettled summed when the poller last yielded to promise continuations. */
  #settled = 0;
  /** How each queue pair with a vector waits for it (every such queue has one). */
  readonly #sleepers = new WeakMap<QueuePair, InterruptWaits>();
  readonly #reap = (): number => this.#reapAll();
  /**
   * Checks health while the poller sleeps on an interrupt (interrupts never tell of a fatal status
   * or a lost command), and only then: a timer ticking on an idle controller cost the TCG guest
   * 15-40 ms of CPU per second (bench/nvme.ts idle figures). It stops itself at the first tick
   * with nothing pending.
   */
  #watchdog: ReturnType<typeof setInterval> | undefined;

  constructor(owner: PollerOwner) {
    this.#owner = owner;
  }

  /** Commands in flight or waiting for a slot, on every queue. */
  pending(): number {
    let n = 0;
    for (const queue of this.#owner.queues) n += queue.inFlight + queue.waiting;
    return n;
  }

  /**
   * `queue` (which has a vector) waits for its interrupt: spin for `spin` (a window, 0 for none,
   * or the rule learning it), block for up to `blockMs`, then sleep in the event loop.
   */
  sleepOn(queue: QueuePair, spin: HybridSpin | undefined, blockMs?: number): void {
    this.#sleepers.set(queue, new InterruptWaits(queue, spin, blockMs));
  }

  /** What a queue's waits for its interrupt did, or undefined for a polled queue. */
  waitStats(queue: QueuePair): WaitStats | undefined {
    return this.#sleepers.get(queue)?.stats;
  }

  /** Start polling if nobody is. */
  kick(): void {
    if (this.#running) return;
    this.#running = true;
    this.#completedSinceCheck = true;
    void this.#loop();
  }

  #reapAll(): number {
    let n = 0;
    for (const queue of this.#owner.queues) {
      try {
        // The CQ head goes with the turn's SQ tail, after it (queue.ts).
        n += queue.reap(true);
      } catch (error) {
        // A request's callback threw (after the reap had done its work): the poller goes on, and
        // the error surfaces as an uncaught one, as a callback's error does anywhere else.
        n++;
        queueMicrotask(() => {
          throw error;
        });
      }
    }
    return n;
  }

  /** The queues' promisesSettled summed. */
  #settledCount(): number {
    let n = 0;
    for (const queue of this.#owner.queues) n += queue.promisesSettled;
    return n;
  }

  /** Whether completions settled promises since the poller last yielded to their continuations; it yields now. */
  #promisesSettled(): boolean {
    const n = this.#settledCount();
    if (n === this.#settled) return false;
    this.#settled = n;
    return true;
  }

  /**
   * Announce what the queues hold unannounced before spinning: a submission's own doorbell
   * microtask may be queued behind this poller's turn, and the spin would then wait for a
   * command the controller has not been told of.
   */
  #ringAll(): void {
    for (const queue of this.#owner.queues) queue.ringDoorbell();
  }

  /**
   * After completions that settled promises it yields a few promise hops, so the callers'
   * continuations can submit more before it looks again (callbacks did so inside the reap); when nothing comes it spins (spinWindowMs, with a promise hop every
   * SPIN_MS), checks the controller's health now and then, and lets the event loop run.
   */
  async #loop(): Promise<void> {
    const owner = this.#owner;
    // Start after the current task: the caller may be submitting a whole batch.
    await null;
    try {
      while (owner.usable && this.pending() > 0) {
        this.#ringAll();
        let found = this.#reapAll();
        const sleeper = found === 0 ? this.#interruptOnlyQueue() : undefined;
        if (sleeper !== undefined) {
          // Every queue with work raises interrupts: wait for one (a hybrid queue spins first).
          this.#watchWhileAsleep();
          found = sleeper.spin(this.#reap);
          if (found === 0) found = await sleeper.park(this.#reap);
          if (found === 0) continue;
        }
        if (found === 0) {
          this.#spinUntil = Number.POSITIVE_INFINITY;
          for (;;) {
            found = this.#spin();
            if (found !== HOP_DUE) break;
            // A microtask hop, not a turn: a continuation a few promises deep submits now.
            await null;
            if (!owner.usable) break;
            // Their doorbell microtask is queued behind this continuation: ring here.
            this.#ringAll();
          }
          if (found < 0) found = 0;
        }
        if (found > 0) {
          this.#completedSinceCheck = true;
          // Callbacks (request.ts) sent their next commands inside the reap; only promise
          // continuations need the microtask queue to run before the next look.
          if (this.#promisesSettled()) for (let i = 0; i < HOPS_AFTER_COMPLETION; i++) await null;
          continue;
        }
        const now = performance.now();
        // CSTS only when nothing has completed for a while: completions prove the controller
        // alive, and an MMIO read waits for the device model (in the TCG guest at QD32 about
        // 1 ms a read, a tenth of the run when read every 10 ms).
        if (now - owner.lastHealthCheck >= HEALTH_CHECK_MS) {
          owner.checkHealth(now, !this.#completedSinceCheck);
          this.#completedSinceCheck = false;
        }
        const before = performance.now();
        await new Promise<void>((resolve) => setImmediate(resolve));
        this.#turnMs += (performance.now() - before - this.#turnMs) / 4;
      }
    } catch {
      // A wait ended by close(): the pending commands were rejected there.
    } finally {
      this.#running = false;
    }
  }

  /**
   * Look at the queues until completions need the microtask queue (promises settled; returns
   * what the last look found), nothing is pending any more, the spin window ends (0) or a promise
   * hop is due (HOP_DUE, every SPIN_MS). Completions whose callbacks sent the next commands (inside
   * the reap) do not end it: it spins on for those with a fresh window.
   *
   * A plain method, not a part of #loop: a loop inside an async function runs as a generator's
   * body, which the JIT compiles less well, and this loop is the poller's hot one. In the TCG
   * guest (requests at QD32, random 4 KiB reads, poller-driven) moving it here won 11 of 13
   * same-boot A/B pairs: 50.1k -> 63.8k IOPS on average over six ABBA pairs of one boot.
   */
  #spin(): number {
    const owner = this.#owner;
    let hopAt = Number.POSITIVE_INFINITY;
    // The clock is read once per CLOCK_EVERY looks, and first after that many: a read costs
    // 1-4 us in the TCG guest, and a completion that comes during one waits for its end.
    for (let looks = 1; ; looks++) {
      const found = this.#reapAll();
      if (found > 0) {
        // Only looked at, not taken as yielded to: #loop's hops after the return do that (taking it
        // here left the continuations to the next 0.25 ms hop of a spin).
        if (this.#settledCount() !== this.#settled || !owner.usable || this.pending() === 0) return found;
        this.#completedSinceCheck = true;
        // What callbacks sent to other queues waits for their doorbell microtask: ring here.
        this.#ringAll();
        looks = 0;
        this.#spinUntil = Number.POSITIVE_INFINITY;
        hopAt = Number.POSITIVE_INFINITY;
        continue;
      }
      if (looks % CLOCK_EVERY !== 0) continue;
      const now = performance.now();
      if (this.#spinUntil === Number.POSITIVE_INFINITY) this.#spinUntil = now + spinWindowMs(this.#turnMs);
      if (hopAt === Number.POSITIVE_INFINITY) hopAt = now + SPIN_MS;
      if (now >= this.#spinUntil) return 0;
      if (now >= hopAt) return HOP_DUE;
    }
  }

  #watchWhileAsleep(): void {
    if (this.#watchdog !== undefined) return;
    const owner = this.#owner;
    this.#watchdog = setInterval(() => {
      if (owner.usable && this.pending() > 0) {
        owner.checkHealth(performance.now(), true);
      } else {
        clearInterval(this.#watchdog);
        this.#watchdog = undefined;
      }
    }, ASLEEP_CHECK_MS);
    this.#watchdog.unref?.();
  }

  /** The queue to sleep on when every queue with pending work is interrupt-driven (one, for now). */
  #interruptOnlyQueue(): InterruptWaits | undefined {
    let sleeper: InterruptWaits | undefined;
    for (const queue of this.#owner.queues) {
      if (queue.inFlight + queue.waiting === 0) continue;
      // A polled queue (no vector) answers from a field, without the map: this runs per spin.
      if (queue.vector === undefined || sleeper !== undefined) return undefined;
      sleeper = this.#sleepers.get(queue);
      if (sleeper === undefined) return undefined;
    }
    return sleeper;
  }
}
