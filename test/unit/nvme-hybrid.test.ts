/**
 * Hybrid completion (src/nvme/interrupt-waits.ts): the window learned from recent waits, a hybrid queue's
 * spin and park on their own, and the driver in hybrid mode against the in-memory controller of
 * test/support/nvme-sim.ts, whose interrupts are real eventfds.
 */
import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import { type Completion, NvmeController } from "../../src/nvme/index.ts";
import {
  DEFAULT_SPIN_RULE,
  InterruptWaits,
  learnedSpinMs,
  MAX_SPIN_BLOCKING_MS,
  MAX_SPIN_MS,
  MIN_SPIN_MS,
  PROBE_EVERY,
  SAMPLES,
} from "../../src/nvme/interrupt-waits.ts";
import type { QueuePair } from "../../src/nvme/queue.ts";
import type { IrqSet } from "../../src/vfio/irq.ts";
import { IrqVector } from "../../src/vfio/irq-vector.ts";
import { EFD_CLOEXEC, EFD_NONBLOCK, libc } from "../../src/sys/libc.ts";
import { NvmeSim, type SimCompletion } from "../support/nvme-sim.ts";
import { countVectorWaits } from "../support/vector-waits.ts";

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
  // A queue that blocks on its eventfd before parking spins only for waits shorter than a few of
  // the block's wakes: QEMU's 60 us reads go to the block, 20 us ones are still spun for.
  expect(learnedSpinMs([], DEFAULT_SPIN_RULE, MAX_SPIN_BLOCKING_MS)).toBe(MAX_SPIN_BLOCKING_MS);
  expect(learnedSpinMs([0.06, 0.06], DEFAULT_SPIN_RULE, MAX_SPIN_BLOCKING_MS)).toBe(MIN_SPIN_MS);
  expect(learnedSpinMs([0.02, 0.02], DEFAULT_SPIN_RULE, MAX_SPIN_BLOCKING_MS)).toBeCloseTo(0.04);
});

/**
 * A clock that moves only when the code under test looks at a ring (LOOK_MS per look) or parks
 * (PARK_MS): the waits InterruptWaits measures are then exactly what each test sets up, whatever else
 * the (shared, loaded) host does meanwhile.
 */
const LOOK_MS = 0.002;
const PARK_MS = 1;
const clock = { now: 0 };

/** A queue's vector and interrupt as InterruptWaits uses them, counting what it asked of them. */
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
      clock.now += PARK_MS;
      return 1;
    },
  } as unknown as QueuePair;
  return { queue, calls };
}

/** A reap that finds one completion `afterMs` after it is first asked. */
function reapAfter(afterMs: number): () => number {
  let since = -1;
  return () => {
    clock.now += LOOK_MS;
    if (since < 0) since = clock.now;
    return clock.now - since < afterMs ? 0 : 1;
  };
}

/** A reap that never finds anything. */
function reapNothing(): number {
  clock.now += LOOK_MS;
  return 0;
}

describe("a hybrid queue on its own (a fake clock)", () => {
  const realNow = performance.now;
  beforeEach(() => {
    clock.now = 1000;
    performance.now = () => clock.now;
  });
  afterEach(() => {
    performance.now = realNow;
  });

  test("a spin that finds a completion within the window does not park; the window follows the waits", async () => {
    const { queue, calls } = fakeQueue();
    const hybrid = new InterruptWaits(queue, undefined, 0);
    expect(hybrid.stats.spinMs).toBe(MAX_SPIN_MS);
    for (let i = 0; i < SAMPLES; i++) expect(hybrid.spin(reapAfter(0.05))).toBe(1);
    expect(hybrid.stats.found).toBe(SAMPLES);
    expect(hybrid.stats.parked).toBe(0);
    expect(calls).toEqual({ polls: 0, waits: 0 });
    // Twice a wait of 0.05 ms (and a look or two: the clock is read at the start and at the find).
    expect(hybrid.stats.spinMs).toBeGreaterThanOrEqual(0.1);
    expect(hybrid.stats.spinMs).toBeLessThan(0.11);
    // The controller slows down to 0.2 ms a completion: spins of 0.1 ms end in parks, which count
    // as waits too long to spin for; the queue parks at once, its probes see 0.2 ms, and the
    // window settles at twice that.
    const waits = async (n: number, ms: number) => {
      for (let i = 0; i < n; i++) {
        const reap = reapAfter(ms);
        if (hybrid.spin(reap) === 0) await hybrid.park(reap);
      }
    };
    await waits(8, 0.2);
    expect(hybrid.stats.spinMs).toBeCloseTo(0.1, 1);
    await waits(8, 0.2);
    expect(hybrid.stats.spinMs).toBe(MIN_SPIN_MS);
    await waits(32 * PROBE_EVERY, 0.2);
    expect(hybrid.stats.spinMs).toBeGreaterThanOrEqual(0.4);
    expect(hybrid.stats.spinMs).toBeLessThan(0.41);
  });

  test("a spin that finds nothing ends at its window; the park drains the old counts, looks again, then waits", async () => {
    const { queue, calls } = fakeQueue();
    const hybrid = new InterruptWaits(queue, 0.05, 0);
    const t0 = clock.now;
    expect(hybrid.spin(reapNothing)).toBe(0);
    // The clock is read every 16 looks: the window's end is seen within 16 looks.
    expect(clock.now - t0).toBeGreaterThanOrEqual(0.05);
    expect(clock.now - t0).toBeLessThanOrEqual(0.05 + 16 * LOOK_MS);
    let looks = 0;
    expect(
      await hybrid.park(() => {
        looks++;
        return 0;
      }),
    ).toBe(0);
    expect(looks).toBe(1);
    expect(calls).toEqual({ polls: 1, waits: 1 });
    expect(hybrid.stats).toEqual({ spinMs: 0.05, found: 0, parked: 1, blocked: 0 });
    // A completion that came before the drain is found by the look after it: no wait.
    expect(hybrid.spin(reapNothing)).toBe(0);
    expect(await hybrid.park(() => 1)).toBe(1);
    expect(calls).toEqual({ polls: 2, waits: 1 });
    expect(hybrid.stats.parked).toBe(1);
    // A window of 0: no look at all before the park's own.
    const none = new InterruptWaits(queue, 0, 0);
    let spun = 0;
    expect(none.spin(() => ++spun)).toBe(0);
    expect(spun).toBe(0);
  });

  test("waits longer than a park costs teach the queue to park at once; probes see when they are short again", async () => {
    const { queue } = fakeQueue();
    const hybrid = new InterruptWaits(queue, undefined, 0);
    for (let i = 0; i < 8; i++) {
      expect(hybrid.spin(reapNothing)).toBe(0);
      await hybrid.park(reapNothing);
    }
    expect(hybrid.stats.parked).toBe(8);
    expect(hybrid.stats.spinMs).toBe(MIN_SPIN_MS);
    // The controller answers in 0.05 ms again. Parks at once teach nothing (their length is mostly
    // the wake-up); every PROBE_EVERY-th wait spins the longest window and sees the wait as it is.
    const windows: number[] = [];
    let parks = 0;
    for (let wait = 0; wait < 40 * PROBE_EVERY && hybrid.stats.spinMs === MIN_SPIN_MS; wait++) {
      const reap = reapAfter(0.05);
      if (hybrid.spin(reap) === 0 && (await hybrid.park(reap)) === 0) parks++;
      windows.push(hybrid.stats.spinMs);
    }
    expect(hybrid.stats.spinMs).toBeGreaterThanOrEqual(0.1);
    expect(hybrid.stats.spinMs).toBeLessThan(0.11);
    // 16 probes outvote the 8 parks among the samples: 128 waits, all but the probes parked.
    expect(windows.length).toBe(16 * PROBE_EVERY);
    expect(parks).toBe(windows.length - 16);
  });
});

const opened: NvmeController[] = [];
afterEach(() => {
  for (const controller of opened.splice(0)) controller.close();
});

/** The model with completions held back: each is posted (and its vector raised) `delayMs` later, from a timer. */
/** `blockMs` null: the driver's default. */
function openDelayed(
  delayMs: number,
  hybridSpin?: number,
  blockMs: number | null = 0,
  completion: Completion = "hybrid",
) {
  const sim = new NvmeSim();
  for (let i = 0; i < sim.media.length; i++) sim.media[i] = (i * 7 + 3) & 0xff;
  const controller = NvmeController.openOn(sim, {
    queueDepth: 16,
    completion,
    hybridSpin,
    blockMs: blockMs ?? undefined,
  });
  opened.push(controller);
  // A timer runs only when the thread is back in the event loop: a poller that spun on instead of
  // parking would never see these completions.
  sim.tamper = (completion: SimCompletion) => {
    setTimeout(() => sim.postRaw(completion), delayMs);
    return [];
  };
  return { sim, controller, ns: controller.namespace(1), waited: countVectorWaits(controller.ioQueue.vector!) };
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
  const stats = controller.stats().io[0]!.waits!;
  expect(stats.parked).toBeGreaterThanOrEqual(3);
  expect(stats.spinMs).toBe(0.2);
  expect(waited()).toBeGreaterThanOrEqual(3);
  expect(controller.failure).toBeUndefined();
});

test("hybrid mode, the defaults: a block that no interrupt ends times out and the poller parks; data byte-exact", async () => {
  // The model's completions come from a timer, which cannot run while the thread is blocked: each
  // wait blocks its 1 ms in vain, then parks, and the timer's interrupt wakes the poller.
  const { sim, controller, ns, waited } = openDelayed(3, undefined, 1);
  const b = controller.allocBuffer(4096);
  const t0 = performance.now();
  for (let i = 0; i < 4; i++) {
    await ns.read(8 * i, 8, b);
    expect(b.bytes).toEqual(sim.media.slice(8 * i * 512, 8 * (i + 1) * 512));
  }
  expect(performance.now() - t0).toBeGreaterThanOrEqual(4 * 3);
  const stats = controller.stats().io[0]!.waits!;
  expect(stats).toMatchObject({ parked: 4, blocked: 0 });
  expect(waited()).toBeGreaterThanOrEqual(4);
});

test("interrupt mode blocks on the vector before it sleeps (1 ms by default, none with blockMs 0); data byte-exact", async () => {
  for (const blockMs of [null, 0]) {
    // The model's completions come from a timer, which cannot run while the thread is blocked:
    // each wait that blocks does so in vain for its whole time, then parks.
    const { sim, controller, ns, waited } = openDelayed(3, undefined, blockMs, "interrupt");
    const vector = controller.ioQueue.vector!;
    const blocks: number[] = [];
    const block = vector.blockAfterDrain.bind(vector);
    vector.blockAfterDrain = (ms: number) => {
      blocks.push(ms);
      return block(ms);
    };
    const b = controller.allocBuffer(4096);
    for (let i = 0; i < 4; i++) {
      await ns.read(8 * i, 8, b);
      expect(b.bytes).toEqual(sim.media.slice(8 * i * 512, 8 * (i + 1) * 512));
    }
    expect(blocks).toEqual(blockMs === 0 ? [] : [1, 1, 1, 1]);
    expect(controller.stats().io[0]!.waits).toMatchObject({ spinMs: 0, parked: 4, blocked: 0 });
    expect(waited()).toBeGreaterThanOrEqual(4);
  }
});

test("hybrid mode with completions at once: found without a park; the options are checked", async () => {
  const sim = new NvmeSim();
  const controller = NvmeController.openOn(sim, { completion: "hybrid" });
  opened.push(controller);
  const ns = controller.namespace(1);
  const b = controller.allocBuffer(4096);
  for (let i = 0; i < 50; i++) await ns.read(i * 8, 8, b);
  expect(controller.stats().io[0]!.waits!.parked).toBe(0);
  expect(controller.stats().io[0]!.completed).toBe(50);
  const bad = (hybridSpin: unknown) => () =>
    controller.createQueuePair(8, { completion: "hybrid", hybridSpin: hybridSpin as number });
  expect(bad(-1)).toThrow(expect.objectContaining({ code: "EINVAL", argument: "options.hybridSpin" }));
  expect(bad({ percentile: 0, multiple: 2 })).toThrow(/percentile 0 is outside 1..100/);
  expect(bad({ percentile: 50 })).toThrow(/multiple undefined/);
  expect(bad({ percentile: 50, multiple: 2, maxMs: 20 })).toThrow(/maxMs 20 is outside 0.01..10/);
  // The longest window: 0.05 ms for a queue that blocks, unless the rule says otherwise.
  const ceiling = (hybridSpin?: unknown) =>
    controller.createQueuePair(8, { completion: "hybrid", hybridSpin: hybridSpin as number });
  const spins = () => controller.stats().io.at(-1)!.waits!.spinMs;
  ceiling();
  expect(spins()).toBe(MAX_SPIN_BLOCKING_MS);
  ceiling({ percentile: 50, multiple: 2, maxMs: 0.5 });
  expect(spins()).toBe(0.5);
  expect(() => controller.createQueuePair(8, { completion: "hybrid", blockMs: 0.5 })).toThrow(
    /\(options.blockMs\): 0.5 is not a whole number of ms in 0..10/,
  );
  expect(() => controller.createQueuePair(8, { completion: "sometimes" as never })).toThrow(
    /not "poll", "interrupt" or "hybrid"/,
  );
  // A polled queue has no hybrid stats.
  controller.createQueuePair(8);
  expect(controller.stats().io.map((q) => q.waits === undefined)).toEqual([false, false, false, true]);
});

test("blockMs: the thread blocks on the eventfd after the spin; an interrupt ends the block, none lets it time out and park", async () => {
  const fd = libc().eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  expect(fd).toBeGreaterThanOrEqual(0);
  const word = new BigUint64Array(1);
  const raise = () => libc().write(fd, word.fill(1n), 8);
  // A real IrqVector over the eventfd (the set only carries the index): the block is its waitBlocking().
  const vector = new IrqVector({ index: 4, info: { maskable: false } } as unknown as IrqSet, 0, fd);
  const drain = () => vector.poll();
  let waits = 0;
  const queue = {
    vector,
    interrupt: async () => {
      waits++;
      return 1;
    },
  } as unknown as QueuePair;
  try {
    const hybrid = new InterruptWaits(queue, 0, 1);
    // The look after the drain finds nothing, and the controller's interrupt comes right after it:
    // poll(2) returns at once, and the look after it finds the completion. No park.
    let looks = 0;
    const reap = () => {
      looks++;
      if (looks === 1) raise();
      return looks === 2 ? 1 : 0;
    };
    expect(hybrid.spin(reap)).toBe(0);
    expect(await hybrid.park(reap)).toBe(1);
    expect(hybrid.stats).toMatchObject({ found: 1, blocked: 1, parked: 0 });
    expect(waits).toBe(0);
    // The block consumed the count: nothing left for a later wait to mistake for a new interrupt.
    expect(drain()).toBe(0);
    // No interrupt: the block ends after its 1 ms and the queue parks in the event loop. The
    // eventfd is read once, by the drain: the block, straight after it, reads nothing first.
    const lib = libc() as unknown as { read: (...args: unknown[]) => number };
    const realRead = lib.read;
    let reads = 0;
    lib.read = (...args: unknown[]) => {
      reads++;
      return realRead(...args);
    };
    const t0 = performance.now();
    try {
      expect(await hybrid.park(() => 0)).toBe(0);
    } finally {
      lib.read = realRead;
    }
    expect(performance.now() - t0).toBeGreaterThanOrEqual(0.9);
    expect(reads).toBe(1);
    expect(hybrid.stats).toMatchObject({ found: 1, blocked: 1, parked: 1 });
    expect(waits).toBe(1);
  } finally {
    vector.release();
  }
});

/** setInterval/clearInterval counted while `body` runs: how many were started, and which still tick. */
async function withIntervalsCounted(body: (count: { started: number; live: Set<unknown> }) => Promise<void>) {
  const count = { started: 0, live: new Set<unknown>() };
  const realSet = globalThis.setInterval;
  const realClear = globalThis.clearInterval;
  globalThis.setInterval = ((handler: () => void, ms?: number) => {
    const id = realSet(handler, ms);
    count.started++;
    count.live.add(id);
    return id;
  }) as typeof setInterval;
  globalThis.clearInterval = ((id?: Parameters<typeof clearInterval>[0]) => {
    count.live.delete(id);
    realClear(id);
  }) as typeof clearInterval;
  try {
    await body(count);
  } finally {
    globalThis.setInterval = realSet;
    globalThis.clearInterval = realClear;
  }
  return count;
}

test("interrupt mode: the health timer runs only while the poller sleeps with commands pending, and finds a lost one", async () => {
  for (const completion of ["interrupt", "hybrid"] as const) {
    const sim = new NvmeSim();
    const count = await withIntervalsCounted(async (count) => {
      const controller = NvmeController.openOn(sim, { queueDepth: 16, completion, commandTimeoutMs: 150 });
      opened.push(controller);
      expect(controller.ioQueue.vector).toBeDefined();
      expect(count.started).toBe(0);
      const b = controller.allocBuffer(4096);
      // A completion 20 ms late: the poller sleeps on the interrupt, and a timer watches meanwhile.
      sim.tamper = (c: SimCompletion) => {
        setTimeout(() => sim.postRaw(c), 20);
        return [];
      };
      await controller.namespace(1).read(0, 8, b);
      expect(count.started).toBe(1);
      // Nothing pending: the timer stops at its next tick (an idle controller costs no wake-ups).
      await Bun.sleep(250);
      expect(count.live.size).toBe(0);
      // The completion is lost: no interrupt ever wakes the poller, only its timer finds the deadline.
      sim.tamper = () => [];
      const t0 = performance.now();
      const error = await controller
        .namespace(1)
        .read(8, 8, b)
        .then(
          () => undefined,
          (e: unknown) => e as { code?: string; message?: string },
        );
      expect(error?.code).toBe("ETIMEDOUT");
      expect(error?.message).toContain("did not complete in time");
      expect(performance.now() - t0).toBeLessThan(2000);
      await Bun.sleep(250);
    });
    expect(count.started).toBe(2);
    expect(count.live.size).toBe(0);
  }
});
