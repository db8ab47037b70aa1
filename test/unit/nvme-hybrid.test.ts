/**
 * Hybrid completion (src/nvme/hybrid.ts): the window learned from recent waits, a hybrid queue's
 * spin and park on their own, and the driver in hybrid mode against the in-memory controller of
 * test/support/nvme-sim.ts, whose interrupts are real eventfds.
 */
import { afterEach, expect, test } from "bun:test";
import { NvmeController } from "../../src/nvme/index.ts";
import {
  DEFAULT_SPIN_RULE,
  HybridQueue,
  learnedSpinMs,
  MAX_SPIN_MS,
  MIN_SPIN_MS,
  SAMPLES,
} from "../../src/nvme/hybrid.ts";
import type { QueuePair } from "../../src/nvme/queue.ts";
import { NvmeSim, type SimCompletion } from "../support/nvme-sim.ts";

test("the window is twice the median recent wait, within its bounds", () => {
  expect(DEFAULT_SPIN_RULE).toEqual({ percentile: 50, multiple: 2 });
  // Nothing learned yet: spin up to the most, so the first waits are measured by spinning.
  expect(learnedSpinMs([])).toBe(MAX_SPIN_MS);
  expect(learnedSpinMs([0.05, 0.05, 0.05])).toBeCloseTo(0.1);
  // The median, not the mean: one slow command does not stretch every spin.
  expect(learnedSpinMs([0.04, 0.06, 0.05, 0.05, 9])).toBeCloseTo(0.1);
  // Completions that come almost at once still get a few looks before a park.
  expect(learnedSpinMs([0.001, 0.001])).toBe(MIN_SPIN_MS);
  // Waits longer than a park costs: park at once instead of spinning the most every time.
  expect(learnedSpinMs([0.3, 0.3, 0.3])).toBe(MIN_SPIN_MS);
  expect(learnedSpinMs([0.24, 0.24])).toBeCloseTo(0.48);
  // Another rule: 1.25 x the 90th percentile.
  const waits = Array.from({ length: 10 }, (_, i) => 0.01 * (i + 1));
  expect(learnedSpinMs(waits, { percentile: 90, multiple: 1.25 })).toBeCloseTo(0.125);
  expect(learnedSpinMs(waits, { percentile: 100, multiple: 1 })).toBeCloseTo(0.1);
});

/** A queue's vector and interrupt as HybridQueue uses them, counting what it asked of them. */
function fakeQueue() {
  const calls = { polls: 0, waits: 0 };
  const queue = {
    vector: {
      poll: () => {
        calls.polls++;
        return 3; // counts the spin left on the eventfd
      },
    },
    interrupt: async () => {
      calls.waits++;
      await Bun.sleep(1);
      return 1;
    },
  } as unknown as QueuePair;
  return { queue, calls };
}

/** A reap that finds one completion `afterMs` after it is first asked. */
function reapAfter(afterMs: number): () => number {
  let since = -1;
  return () => {
    const now = performance.now();
    if (since < 0) since = now;
    if (now - since < afterMs) return 0;
    since = -1;
    return 1;
  };
}

test("a spin that finds a completion within the window does not park; the window follows the waits", () => {
  const { queue, calls } = fakeQueue();
  const hybrid = new HybridQueue(queue, undefined);
  expect(hybrid.stats.spinMs).toBe(MAX_SPIN_MS);
  for (let i = 0; i < SAMPLES; i++) expect(hybrid.spin(reapAfter(0.05))).toBe(1);
  expect(hybrid.stats.found).toBe(SAMPLES);
  expect(hybrid.stats.parked).toBe(0);
  expect(calls).toEqual({ polls: 0, waits: 0 });
  // Twice a wait of at least 0.05 ms (the clock is read every 16 looks: a little more).
  expect(hybrid.stats.spinMs).toBeGreaterThanOrEqual(0.1);
  expect(hybrid.stats.spinMs).toBeLessThan(0.3);
});

test("a spin that finds nothing ends at its window; the park drains the old counts, looks again, then waits", async () => {
  const { queue, calls } = fakeQueue();
  const hybrid = new HybridQueue(queue, 0.05);
  const t0 = performance.now();
  expect(hybrid.spin(() => 0)).toBe(0);
  const spun = performance.now() - t0;
  expect(spun).toBeGreaterThanOrEqual(0.05);
  expect(spun).toBeLessThan(5);
  let looks = 0;
  expect(
    await hybrid.park(() => {
      looks++;
      return 0;
    }),
  ).toBe(0);
  expect(looks).toBe(1);
  expect(calls).toEqual({ polls: 1, waits: 1 });
  expect(hybrid.stats).toEqual({ spinMs: 0.05, found: 0, parked: 1 });
  // A completion that came before the drain is found by the look after it: no wait.
  expect(hybrid.spin(() => 0)).toBe(0);
  expect(await hybrid.park(() => 1)).toBe(1);
  expect(calls).toEqual({ polls: 2, waits: 1 });
  expect(hybrid.stats.parked).toBe(1);
});

test("waits longer than a park costs teach the queue to park at once", async () => {
  const { queue } = fakeQueue();
  const hybrid = new HybridQueue(queue, undefined);
  // Each wait: the whole spin, then a park of at least 1 ms.
  for (let i = 0; i < 8; i++) {
    expect(hybrid.spin(() => 0)).toBe(0);
    await hybrid.park(() => 0);
  }
  expect(hybrid.stats.parked).toBe(8);
  expect(hybrid.stats.spinMs).toBe(MIN_SPIN_MS);
});

const opened: NvmeController[] = [];
afterEach(() => {
  for (const controller of opened.splice(0)) controller.close();
});

/** The model with completions held back: each is posted (and its vector raised) `delayMs` later, from a timer. */
function openDelayed(delayMs: number, hybridSpin?: number) {
  const sim = new NvmeSim();
  for (let i = 0; i < sim.media.length; i++) sim.media[i] = (i * 7 + 3) & 0xff;
  const controller = NvmeController.openOn(sim, { queueDepth: 16, completion: "hybrid", hybridSpin });
  opened.push(controller);
  // A timer runs only when the thread is back in the event loop: a poller that spun on instead of
  // parking would never see these completions.
  sim.tamper = (completion: SimCompletion) => {
    setTimeout(() => sim.postRaw(completion), delayMs);
    return [];
  };
  const vector = controller.ioQueue.vector!;
  let waited = 0;
  const wait = vector.wait.bind(vector);
  vector.wait = async (options) => {
    const n = await wait(options);
    waited += n;
    return n;
  };
  return { sim, controller, ns: controller.namespace(1), waited: () => waited };
}

test("hybrid mode: nothing within the window, the poller parks and the interrupt wakes it; data byte-exact", async () => {
  const { sim, controller, ns, waited } = openDelayed(3, 0.2);
  expect(controller.ioQueue.vector).toBeDefined();
  const buffers = Array.from({ length: 4 }, () => controller.allocBuffer(1024));
  for (let round = 0; round < 3; round++) {
    await Promise.all(buffers.map((b, i) => ns.read(100 + 2 * i, 2, b)));
    for (const [i, b] of buffers.entries())
      expect(b.bytes).toEqual(sim.media.slice((100 + 2 * i) * 512, (102 + 2 * i) * 512));
  }
  const stats = controller.stats().io[0]!.hybrid!;
  expect(stats.parked).toBeGreaterThanOrEqual(3);
  expect(stats.spinMs).toBe(0.2);
  expect(waited()).toBeGreaterThanOrEqual(3);
  expect(controller.failure).toBeUndefined();
});

test("hybrid mode with completions at once: found without a park; the options are checked", async () => {
  const sim = new NvmeSim();
  const controller = NvmeController.openOn(sim, { completion: "hybrid" });
  opened.push(controller);
  const ns = controller.namespace(1);
  const b = controller.allocBuffer(4096);
  for (let i = 0; i < 50; i++) await ns.read(i * 8, 8, b);
  expect(controller.stats().io[0]!.hybrid!.parked).toBe(0);
  expect(controller.stats().io[0]!.completed).toBe(50);
  const bad = (hybridSpin: unknown) => () =>
    controller.createQueuePair(8, { completion: "hybrid", hybridSpin: hybridSpin as number });
  expect(bad(-1)).toThrow(expect.objectContaining({ code: "EINVAL", argument: "options.hybridSpin" }));
  expect(bad({ percentile: 0, multiple: 2 })).toThrow(/percentile 0 is outside 1..100/);
  expect(bad({ percentile: 50 })).toThrow(/multiple undefined/);
  expect(() => controller.createQueuePair(8, { completion: "sometimes" as never })).toThrow(
    /not "poll", "interrupt" or "hybrid"/,
  );
  // A polled queue has no hybrid stats.
  controller.createQueuePair(8);
  expect(controller.stats().io.map((q) => q.hybrid === undefined)).toEqual([false, true]);
});
