/**
 * Kernel fault injection from the test's own thread, and the sweep built on it.
 *
 * /proc/self/task/<tid>/fail-nth makes the N-th fault point (slab or page allocation, with the
 * guest's fault-injection settings: ignore-gfp-wait N, fail_page_alloc min-order 0 and
 * ignore-gfp-highmem N) of this thread fail. Arming, the call and the read-back sit back to back,
 * with preallocated buffers, so nothing else on this thread consumes the armed fault.
 *
 * ## Adding a sweep for a new operation
 *
 *     const failNth = new FailNth();            // once per file (beforeAll); close() in afterAll
 *     sweep(failNth, {
 *       name: "VfioDevice.enableMsi (edu)",
 *       setup: () => freshState(),               // everything the call needs; nothing is armed yet
 *       run: (env) => env.device.enableMsi(...), // exactly the operation under test, nothing else
 *       verify(env, { result, error }) { ... },  // strong checks for BOTH outcomes (see below)
 *       release: (env, result) => result.close(),// undo a success (not called after an error)
 *       dispose: (env) => env.close(),           // undo setup
 *     });
 *
 * sweep() runs the operation with the kernel failing its 1st, 2nd, ... fault point until a call
 * runs without hitting one. For every point it checks that an error is an IommufdError with an
 * errno and a sentence, calls verify, and compares open fds and pinned pages (VmPin, VmLck) after
 * verify and release, *before* dispose (closing an iommufd releases every pin whatever the library
 * did), against the figure right after setup (or what `expectUsage` says); and once more after
 * dispose against the figure before setup. The report says how far the pin figures moved
 * (`pinnedKiB`): a sweep whose pins never moved had nothing for that comparison to see.
 *
 * verify must be strong both ways. After an error: the library's state says nothing happened AND
 * the kernel agrees (the IOVA is free, the page table does not point at the buffer, the device is
 * not attached...), and the operation works when retried. After success, which includes faults the
 * kernel tolerated (a fallback, a retry): what the operation promises really happened, checked
 * through the kernel or the device (checkMap on the mock domain, a DMA through edu, attachedTo
 * plus a DMA), not only through the library's own bookkeeping.
 *
 * A sweep must prove it can fail: at least one injected fault has to surface as an error, or the
 * sweep tested nothing but the success path. When the kernel path really has no fault point that
 * can fail the call (it allocates nothing, or every allocation has a fallback), say so: set
 * `cannotFail` to a sentence naming the kernel function(s) that show it, e.g.
 * "iommufd_option_rlimit_mode() allocates nothing", and put "cannot fail" in the name. The sweep then
 * asserts the opposite: no fault surfaced as an error.
 */
import { ptr } from "bun:ffi";
import { expect } from "bun:test";
import { existsSync, readFileSync } from "node:fs";
import { IommufdError } from "../../src/sys/error.ts";
import { closeFd, openPath } from "../../src/sys/fd.ts";
import { lastErrno, libc, O_RDWR } from "../../src/sys/libc.ts";
import { openFdCount, pinnedKiB } from "./kernel.ts";

export class FailNth {
  readonly #fd: number;
  readonly #out = new Uint8Array(16);
  readonly #outAddress = ptr(this.#out);
  readonly #in = new Uint8Array(16);
  readonly #inAddress = ptr(this.#in);

  static available(): boolean {
    return existsSync(`/proc/self/task/${libc().gettid()}/fail-nth`);
  }

  constructor() {
    this.#fd = openPath(`/proc/self/task/${libc().gettid()}/fail-nth`, O_RDWR, "fail-nth");
  }

  /** Make the n-th fault point from now fail (n >= 1); 0 disarms. */
  arm(n: number): void {
    const text = String(n);
    for (let i = 0; i < text.length; i++) this.#out[i] = text.charCodeAt(i);
    const written = Number(libc().pwrite(this.#fd, this.#outAddress as never, text.length, 0));
    // A write that did not land would leave the sweep running with nothing armed: every call
    // would "succeed without a fault" and the sweep would end green at point 1.
    if (written !== text.length) {
      const errno = written < 0 ? lastErrno() : 0;
      throw new Error(
        `fail-nth: writing "${text}" returned ${written}${errno ? ` (errno ${errno})` : ""}: fault injection is not armed`,
      );
    }
  }

  /** True when the armed fault was injected; otherwise disarms and returns false. */
  hit(): boolean {
    const n = Number(libc().pread(this.#fd, this.#inAddress as never, this.#in.length, 0));
    if (n <= 0) throw new Error(`fail-nth: reading back returned ${n}: cannot tell whether the fault was injected`);
    const hit = this.#in[0] === 0x30 && (n === 1 || this.#in[1] === 0x0a);
    if (!hit) this.arm(0);
    return hit;
  }

  close(): void {
    this.arm(0);
    closeFd(this.#fd, "fail-nth");
  }
}

/** The guest's fault-injection knobs, as read from debugfs (undefined where absent). */
export function faultInjectionSettings(): Record<string, string | undefined> {
  const read = (path: string) => {
    try {
      return readFileSync(path, "utf8").trim();
    } catch {
      return undefined;
    }
  };
  const base = "/sys/kernel/debug";
  return {
    "fail_page_alloc/min-order": read(`${base}/fail_page_alloc/min-order`),
    "fail_page_alloc/ignore-gfp-highmem": read(`${base}/fail_page_alloc/ignore-gfp-highmem`),
    "fail_page_alloc/ignore-gfp-wait": read(`${base}/fail_page_alloc/ignore-gfp-wait`),
    "failslab/ignore-gfp-wait": read(`${base}/failslab/ignore-gfp-wait`),
  };
}

/** Open fds and pinned memory of this process. */
export interface Usage {
  fds: number;
  pinned: { pin: number; lck: number };
}

export function usage(): Usage {
  return { fds: openFdCount(), pinned: pinnedKiB() };
}

export interface SweepCase<E, T> {
  /** Shown in the report; must contain "cannot fail" when `cannotFail` is set. */
  name: string;
  setup(): E;
  run(env: E): T;
  /** Checks after the call, with its outcome (see the file's comment: strong both ways). */
  verify(env: E, outcome: { result?: T; error?: IommufdError; injected: boolean }): void;
  /** Releases what a successful call made. */
  release?(env: E, result: T): void;
  dispose(env: E): void;
  /**
   * Why no injected fault can make this call fail, naming the kernel function(s) that show it.
   * Leave out for every operation that can fail: the sweep then demands that one did.
   */
  cannotFail?: string;
  /**
   * What fds and pins must be after verify and release, before dispose. Default: as right after
   * setup. An operation that releases what setup made (an unmap, a destroy) says so here.
   */
  expectUsage?(figures: { beforeSetup: Usage; afterSetup: Usage }): Usage;
  /** Give up after this many points (default 400). */
  maxPoints?: number;
}

export interface SweepReport {
  name: string;
  /** Fault points the call passed through (the first point not hit, minus one). */
  points: number;
  /** How often each errno surfaced. */
  errnos: Record<string, number>;
  /** Injected faults after which the call still succeeded (the kernel fell back or retried). */
  tolerated: number;
  /** Whole sweeps run: more than 1 when a pass saw no injected fault surface as an error. */
  passes: number;
  /**
   * The most the pinned figures (VmPin + VmLck) rose above their value before setup, after setup or
   * after the call: 0 means the sweep's pin comparison had nothing to see.
   */
  pinnedKiB: number;
  cannotFail?: string;
}

/** Every sweep of this process, in order (fault-injection.test.ts prints them at the end). */
export const sweepReports: SweepReport[] = [];

/** What sweep() needs of FailNth (a unit test gives it a simulated kernel). */
export type FaultInjector = Pick<FailNth, "arm" | "hit">;

export function sweep<E, T>(failNth: FaultInjector, c: SweepCase<E, T>): SweepReport {
  if (c.cannotFail !== undefined) {
    if (!/cannot fail/.test(c.name)) throw new Error(`${c.name}: a sweep that cannot fail must say so in its name`);
    if (!/\w+\(\)/.test(c.cannotFail))
      throw new Error(`${c.name}: cannotFail must name the kernel function that shows it, as fn()`);
  }
  // Warm-up: the first call through a new FFI path may do work of its own on this thread.
  {
    const env = c.setup();
    const result = c.run(env);
    c.release?.(env, result);
    c.dispose(env);
  }
  // A pass in which no injected fault surfaced is tried again before it counts against the
  // operation: the armed point can be taken by another allocation of this thread that the kernel
  // tolerates (a user page fault, Bun's own heap), which hides the ioctl's failing point that once.
  let report = sweepPass(failNth, c);
  for (
    let attempt = 2;
    attempt <= SWEEP_PASSES && c.cannotFail === undefined && surfacedErrors(report) === 0;
    attempt++
  ) {
    report = { ...sweepPass(failNth, c), passes: attempt };
  }
  sweepReports.push(report);
  const surfaced = surfacedErrors(report);
  if (c.cannotFail === undefined && surfaced === 0) {
    throw new Error(
      `${c.name}: none of its ${report.points} fault point(s) surfaced as an error (${report.tolerated} tolerated) ` +
        `in ${report.passes} pass(es), so the sweep proved nothing about failure: make it reach a fault point that fails, ` +
        "or set cannotFail naming the kernel function that shows why it cannot",
    );
  }
  if (c.cannotFail !== undefined && surfaced > 0) {
    throw new Error(
      `${c.name}: claims it cannot fail (${c.cannotFail}), but ${JSON.stringify(report.errnos)} surfaced`,
    );
  }
  return report;
}

/** Passes a sweep may take to see one injected fault surface as an error. */
const SWEEP_PASSES = 3;

function surfacedErrors(report: SweepReport): number {
  return Object.values(report.errnos).reduce((a, b) => a + b, 0);
}

function sweepPass<E, T>(failNth: FaultInjector, c: SweepCase<E, T>): SweepReport {
  const report: SweepReport = {
    name: c.name,
    points: 0,
    errnos: {},
    tolerated: 0,
    passes: 1,
    pinnedKiB: 0,
    cannotFail: c.cannotFail,
  };
  const pinnedAbove = (before: Usage) => {
    const now = pinnedKiB();
    report.pinnedKiB = Math.max(report.pinnedKiB, now.pin + now.lck - before.pinned.pin - before.pinned.lck);
  };
  const maxPoints = c.maxPoints ?? 400;
  for (let n = 1; n <= maxPoints; n++) {
    const beforeSetup = usage();
    const env = c.setup();
    const afterSetup = usage();
    pinnedAbove(beforeSetup);
    let result: T | undefined;
    let error: unknown;
    // The armed fault hits whatever this thread allocates next, Bun's own heap growth included
    // (with order-0 pages failing, a JS heap page or mmap can take it, and Bun aborts): collect
    // first, so the armed window is as unlikely as possible to need more JS heap.
    Bun.gc(true);
    failNth.arm(n);
    try {
      result = c.run(env);
    } catch (e) {
      error = e;
    }
    const injected = failNth.hit();
    pinnedAbove(beforeSetup);
    let typed: IommufdError | undefined;
    try {
      if (error !== undefined && !(error instanceof IommufdError)) {
        throw new Error(`${c.name}, fault point ${n}: not an IommufdError: ${String(error)}`, { cause: error });
      }
      typed = error as IommufdError | undefined;
      if (typed) {
        expect(typed.errno).toBeGreaterThan(0);
        expect(typed.message.length).toBeGreaterThan(20);
      }
      c.verify(env, { result, error: typed, injected });
      if (!typed) c.release?.(env, result as T);
      // Before dispose: closing the iommufd would release every pin whatever the library did.
      const expected = c.expectUsage?.({ beforeSetup, afterSetup }) ?? afterSetup;
      expect({ point: n, ...usage() }).toEqual({ point: n, ...expected });
    } catch (failure) {
      // Release what this point holds (an open device stays bound otherwise, and the next test's
      // bind would fail for a reason that is not its own), then report the first failure.
      try {
        c.dispose(env);
      } catch {
        // the failure above is the one to report
      }
      throw failure;
    }
    c.dispose(env);
    expect({ point: n, ...usage() }).toEqual({ point: n, ...beforeSetup });
    if (!injected) {
      if (typed) throw new Error(`${c.name}: failed with ${typed.code} with no fault injected: ${typed.message}`);
      report.points = n - 1;
      break;
    }
    if (typed) report.errnos[typed.code] = (report.errnos[typed.code] ?? 0) + 1;
    else report.tolerated++;
    if (n === maxPoints) throw new Error(`${c.name}: still hitting fault points after ${maxPoints}`);
  }
  return report;
}

/** One line per sweep: points, errnos, tolerated faults, and why a sweep cannot fail. */
export function formatSweepReports(reports: readonly SweepReport[] = sweepReports): string {
  return reports
    .map(
      (r) =>
        `  ${r.name.padEnd(44)} ${String(r.points).padStart(3)} points  ` +
        `${
          Object.entries(r.errnos)
            .map(([code, n]) => `${code} x${n}`)
            .join(", ") || "-"
        }` +
        (r.tolerated ? `  (tolerated by the kernel: ${r.tolerated})` : "") +
        (r.passes > 1 ? `  (${r.passes} passes)` : "") +
        (r.pinnedKiB > 0 ? `  (pinned up to ${r.pinnedKiB} KiB)` : "") +
        (r.cannotFail ? `  [cannot fail: ${r.cannotFail}]` : ""),
    )
    .join("\n");
}
