/**
 * Whether a controller takes commands, and why not: controller fatal status (CSTS.CFS, NVMe Base
 * 2.0 section 3.1.4.6), a controller gone from the bus (CSTS reads all ones), a command past its
 * deadline, or a completion no correct controller posts (found by the queue pair). Any of them
 * fails the controller and rejects everything pending on every queue; reset() brings it back.
 * Polling finds these on its way; while the poller sleeps on an interrupt, its timer looks.
 */
import type { ErrnoCode } from "../sys/errno.ts";
import { closedError, IommufdError, ioError, stateError } from "../sys/error.ts";
import { HEALTH_CHECK_MS } from "./completion.ts";
import type { QueuePair } from "./queue.ts";
import { CC, CC_EN, CSTS, CSTS_CFS, type ControllerRegisters } from "./registers.ts";

/**
 * Small integers, not strings: `usable` is read on every command's path (submit, reap, the
 * poller's spin), and in the TCG guest the string comparison cost about 130 ns a command
 * (the driver's submit phase timed alone: 1,050 -> 920 ns per command without the check).
 */
const READY = 0;
const FAILED = 1;
const CLOSED = 2;
type State = typeof READY | typeof FAILED | typeof CLOSED;

/** Builds the error a pending command is rejected with, from its name and what it was asked. */
export type Why = (command: string, detail: string) => IommufdError;

const RESET_HINT = "controller.reset() brings it back";

export class ControllerHealth {
  readonly #registers: ControllerRegisters;
  /** The admin queue first, then the I/O queue pairs (the controller's own list). */
  readonly #queues: readonly QueuePair[];
  #state: State = READY;
  #failure: IommufdError | undefined;
  #lastCheck = 0;

  constructor(registers: ControllerRegisters, queues: readonly QueuePair[]) {
    this.#registers = registers;
    this.#queues = queues;
  }

  get usable(): boolean {
    return this.#state === READY;
  }

  get closed(): boolean {
    return this.#state === CLOSED;
  }

  /** Why the controller stopped taking commands, until reset(). */
  get failure(): IommufdError | undefined {
    return this.#failure;
  }

  get lastCheck(): number {
    return this.#lastCheck;
  }

  /** Throws when the controller cannot take `command`: closed (EBADF) or failed (the failure's errno). */
  assertUsable(command: string): void {
    if (this.#state === READY) return;
    if (this.#state === CLOSED) throw closedError(`NVMe ${command}`, "the NVMe controller");
    // The failure's own code: ENODEV when the controller is gone, ETIMEDOUT after a lost command,
    // EPROTO after a completion that broke the protocol.
    throw stateError(
      `NVMe ${command}`,
      (this.#failure?.code ?? "EIO") as ErrnoCode,
      `the controller stopped taking commands: ${this.#failure?.message ?? "it failed"}`,
      { hint: RESET_HINT },
    );
  }

  /**
   * Read CSTS (unless `readStatus` is false) and the deadlines; fail the controller on fatal
   * status, absence or a late command.
   */
  check(now: number, readStatus = true): void {
    this.#lastCheck = now;
    if (this.#state !== READY) return;
    if (readStatus) {
      const csts = this.#registers.read32(CSTS);
      if (csts === 0xffffffff) {
        this.fail("ENODEV", "CSTS reads all ones: the controller is gone from the bus");
        return;
      }
      if (csts & CSTS_CFS) {
        this.fail("EIO", "the controller reported fatal status (CSTS.CFS)");
        return;
      }
    }
    for (const queue of this.#queues) {
      const late = queue.overdue(now);
      if (late) {
        this.fail("ETIMEDOUT", `${late.name} (${late.detail}) on queue ${queue.id} did not complete in time`);
        return;
      }
    }
  }

  /** check(), unless the last one is more recent than HEALTH_CHECK_MS (an MMIO read is a VM exit). */
  checkIfDue(now: number): void {
    if (now - this.#lastCheck >= HEALTH_CHECK_MS) this.check(now);
  }

  /**
   * A completion no correct controller posts (found by queue `queue`): fail the controller with
   * EPROTO. CC.EN = 0 first: a controller that lost track of its commands should stop moving data
   * into buffers their callers are about to get back (bus mastering goes off at close()).
   */
  protocolError(queue: number, what: string): void {
    if (this.#state !== READY) return;
    this.#registers.write32(CC, this.#registers.read32(CC) & ~CC_EN);
    this.fail("EPROTO", `the controller broke the NVMe protocol: queue ${queue} ${what}`);
  }

  /** Fail the controller with `code` and reject everything pending with it (once: a failed controller stays failed until reset). */
  fail(code: ErrnoCode, reason: string): void {
    if (this.#state !== READY) return;
    this.#state = FAILED;
    this.#failure = stateError("NvmeController", code, reason, { hint: RESET_HINT });
    this.failAll((name, detail) =>
      stateError(`NVMe ${name}`, code, `${detail}: not completed: ${reason}`, { hint: RESET_HINT }),
    );
  }

  /** Reject everything pending on every queue. */
  failAll(why: Why): void {
    for (const queue of this.#queues) queue.failAll(why);
  }

  /** Taking commands again (a reset is bringing the controller up). */
  markReady(): void {
    this.#state = READY;
    this.#failure = undefined;
  }

  /** Failed by `error` (a reset that did not bring the controller up, a bring-up that failed). */
  markFailed(error: unknown, operation: string): void {
    this.#state = FAILED;
    this.#failure = error instanceof IommufdError ? error : ioError(operation, String(error), error);
  }

  /** Closed for good. */
  markClosed(): void {
    this.#state = CLOSED;
  }
}
