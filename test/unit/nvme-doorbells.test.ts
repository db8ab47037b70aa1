/**
 * When the queue pair writes its doorbells (queue.ts): one SQ tail write per turn of the event
 * loop for every command submitted in it, made before the turn ends; one CQ head write per reap.
 * The controller is the in-memory model of test/support/nvme-model.ts.
 */
import { describe, expect, test } from "bun:test";
import { IoOpcode, readWrite } from "../../src/nvme/commands.ts";
import { spinWindowMs } from "../../src/nvme/completion.ts";
import { IommufdError } from "../../src/sys/error.ts";
import { NvmeModel } from "../support/nvme-model.ts";

const TIMEOUT = 10_000;
const read = (lba: number) => readWrite(IoOpcode.Read, 1, lba, 1);

/** One hop of the microtask queue: the test continues after what was queued before it. */
const hop = () => Promise.resolve();

function setup(depth: number, polled = true) {
  const model = new NvmeModel({ polled });
  const queue = model.queuePair(1, depth);
  return { model, queue, sq: model.sqDoorbell(1), cq: model.cqDoorbell(1) };
}

describe("doorbells", () => {
  test("commands submitted in one turn share one SQ tail write with the last tail, made before the turn ends", async () => {
    // No poller: the rule must hold by the queue's own doing (the poller rings too, see below).
    const { model, queue, sq } = setup(16, false);
    const pending = Array.from({ length: 5 }, (_, i) => queue.submit(read(i), 0, 0, TIMEOUT));
    expect(model.writesTo(sq)).toEqual([]);
    expect(queue.unannounced).toBe(5);
    await hop();
    expect(model.writesTo(sq)).toEqual([5]);
    expect(queue.unannounced).toBe(0);
    model.complete(1);
    queue.reap();
    await Promise.all(pending);
    expect(model.writesTo(sq)).toEqual([5]);
  });

  test("stats() counts the doorbell writes made: one SQ tail for a turn's commands, one CQ head for a reap", async () => {
    const { model, queue, sq, cq } = setup(8, false);
    const pending = [0, 1, 2, 3].map((i) => queue.submit(read(i), 0, 0, TIMEOUT));
    await hop();
    model.complete(1);
    expect(queue.reap()).toBe(4);
    await Promise.all(pending);
    expect([model.writesTo(sq).length, model.writesTo(cq).length]).toEqual([1, 1]);
    expect(queue.stats()).toMatchObject({ submitted: 4, sqDoorbellWrites: 1, cqDoorbellWrites: 1 });
    queue.ringDoorbell();
    expect(queue.stats()).toMatchObject({ sqDoorbellWrites: 1, cqDoorbellWrites: 1 });
  });

  test("a later turn's commands get a write of their own, with the tail wrapped round the ring", async () => {
    const { model, queue, sq } = setup(8);
    model.autoComplete = true;
    const first = [0, 1, 2].map((i) => queue.submit(read(i), 0, 0, TIMEOUT));
    await hop();
    const second = [3, 4, 5, 6].map((i) => queue.submit(read(i), 0, 0, TIMEOUT));
    await hop();
    await Promise.all([...first, ...second]);
    const third = [7, 8].map((i) => queue.submit(read(i), 0, 0, TIMEOUT));
    await hop();
    await Promise.all(third);
    expect(model.writesTo(sq)).toEqual([3, 7, 1]);
  });

  test("ringDoorbell() announces at once; the turn's own write then finds nothing new", async () => {
    const { model, queue, sq } = setup(16);
    const pending = [0, 1, 2].map((i) => queue.submit(read(i), 0, 0, TIMEOUT));
    expect(queue.ringDoorbell()).toBe(true);
    expect(model.writesTo(sq)).toEqual([3]);
    expect(queue.ringDoorbell()).toBe(false);
    await hop();
    expect(model.writesTo(sq)).toEqual([3]);
    model.complete(1);
    await Promise.all(pending);
  });

  test("a reap hands all the completions it took back with one CQ head write", async () => {
    const { model, queue, cq } = setup(16);
    const pending = Array.from({ length: 6 }, (_, i) => queue.submit(read(i), 0, 0, TIMEOUT));
    await hop();
    expect(model.complete(1)).toBe(6);
    expect(queue.reap()).toBe(6);
    expect(model.writesTo(cq)).toEqual([6]);
    await Promise.all(pending);
    expect(queue.inFlight).toBe(0);
  });

  test("the poller's reaps write the CQ head after the SQ tail of the commands submitted in the same turn", async () => {
    const { model, queue, sq, cq } = setup(4, false);
    const first = queue.submit(read(0), 0, 0, TIMEOUT);
    // A caller awaiting its command submits the next one in the turn of the reap.
    const second = first.then(() => queue.submit(read(1), 0, 0, TIMEOUT));
    await hop();
    model.complete(1);
    expect(queue.reap(true)).toBe(1);
    expect(model.writesTo(cq)).toEqual([]); // deferred to the end of the turn
    await hop();
    expect(model.writes.map((w) => (w.offset === sq ? `SQ ${w.value}` : `CQ ${w.value}`))).toEqual([
      "SQ 1",
      "SQ 2",
      "CQ 1",
    ]);
    model.complete(1);
    queue.reap();
    await second;
  });

  test("a deferred CQ head is written in the turn even when nothing is submitted after it", async () => {
    const { model, queue, cq } = setup(4, false);
    const only = queue.submit(read(0), 0, 0, TIMEOUT);
    await hop();
    model.complete(1);
    queue.reap(true);
    await only;
    await hop();
    expect(model.writesTo(cq)).toEqual([1]);
  });

  test("callers that waited for a slot and got one in a reap are announced together, at the reap's end", async () => {
    const { model, queue, sq, cq } = setup(4); // 3 slots
    const pending = Array.from({ length: 7 }, (_, i) => queue.submit(read(i), 0, 0, TIMEOUT));
    expect(queue.waiting).toBe(4);
    await hop();
    expect(model.writesTo(sq)).toEqual([3]);
    model.complete(1);
    expect(queue.reap()).toBe(3);
    // Three waiters took the three freed ids: one write, tail 3 + 3 wrapped in a ring of 4.
    expect(model.writesTo(sq)).toEqual([3, 2]);
    expect(model.writesTo(cq)).toEqual([3]);
    model.autoComplete = true;
    model.complete(1);
    await Promise.all(pending);
    expect(queue.stats().maxWaiting).toBe(4);
  });

  test("a synchronous command is announced before its spin starts", () => {
    const { model, queue, sq } = setup(4);
    let polls = 0;
    const dw0 = queue.submitAndWait(read(9), 0, 0, TIMEOUT, () => {
      if (++polls > 100) throw new Error("no completion after 100 polls: the command was never announced");
      model.complete(1);
      queue.reap();
    });
    expect(dw0).toBe(0);
    expect(model.writesTo(sq)).toEqual([1]);
  });

  test("nothing is announced for a controller that stopped, or a queue released, in the turn of the submission", async () => {
    const { model, queue, sq } = setup(16);
    const stopped = queue.submit(read(0), 0, 0, TIMEOUT);
    model.usable = false;
    const why = (name: string, detail: string) => new IommufdError({ operation: name, errno: 5, message: detail });
    queue.failAll(why);
    await expect(stopped).rejects.toBeInstanceOf(IommufdError);
    expect(model.writesTo(sq)).toEqual([]);

    const other = setup(16);
    const released = other.queue.submit(read(1), 0, 0, TIMEOUT);
    other.queue.failAll(why);
    other.queue.release();
    await expect(released).rejects.toBeInstanceOf(IommufdError);
    expect(other.model.writesTo(other.sq)).toEqual([]);
  });
});

describe("the poller's spin", () => {
  test("spins nine times what a turn of the event loop costs, between 0.25 ms and 2 ms", () => {
    expect(spinWindowMs(0)).toBe(0.25);
    expect(spinWindowMs(0.003)).toBe(0.25); // a native turn: as before
    expect(spinWindowMs(0.1)).toBeCloseTo(0.9); // a turn in the TCG guest
    expect(spinWindowMs(0.5)).toBe(2);
  });

  test("while a command is still out, microtasks run every 0.25 ms of a spin (a hop), not only when its window ends", async () => {
    // A fake clock: a read advances it 2 us and a turn of the event loop 0.5 ms, so the poller
    // learns a window of 2 ms, longer than the 0.25 ms between hops.
    const realNow = performance.now;
    const realImmediate = globalThis.setImmediate;
    let t = 0;
    let turns = 0;
    performance.now = () => (t += 0.002);
    globalThis.setImmediate = ((fn: (...args: unknown[]) => void, ...args: unknown[]) =>
      realImmediate(() => {
        t += 0.5;
        turns++;
        fn(...args);
      })) as typeof setImmediate;
    try {
      const model = new NvmeModel();
      const slow = model.queuePair(1, 4);
      const fast = model.queuePair(2, 4);
      // Out until the end: the poller keeps spinning (and learning its window from the turns).
      const held = slow.submit(read(0), 0, 0, TIMEOUT);
      while (turns < 4) await new Promise((resolve) => realImmediate(resolve));
      // A command on the other queue completes at its doorbell; its callback starts a promise
      // chain, which can run only when the poller lets the microtask queue run.
      model.autoComplete = true;
      const { promise, resolve } = Promise.withResolvers<number>();
      const request = fast.request(() => {
        const completedAt = t;
        void Promise.resolve()
          .then(() => {})
          .then(() => resolve(t - completedAt));
      });
      Object.assign(request, read(1));
      request.submit();
      const waitedMs = await promise;
      expect(waitedMs).toBeGreaterThan(0.2);
      expect(waitedMs).toBeLessThan(1);
      model.complete(1);
      await held;
    } finally {
      performance.now = realNow;
      globalThis.setImmediate = realImmediate;
    }
  });
});

describe("promise continuations after completions the spin found", () => {
  test("a caller awaiting a command the spin completed resumes at once, not at the spin's next 0.25 ms hop", async () => {
    // A fake clock as above; the controller model posts the completion from inside a clock read,
    // so the poller finds it in the middle of a spin (with another command still out).
    const realNow = performance.now;
    let t = 0;
    let postAt = Number.POSITIVE_INFINITY;
    let postedAt = 0;
    const model = new NvmeModel();
    performance.now = () => {
      t += 0.002;
      if (t >= postAt) {
        postAt = Number.POSITIVE_INFINITY;
        postedAt = t;
        model.complete(1);
      }
      return t;
    };
    try {
      const queue = model.queuePair(1, 8);
      const other = model.queuePair(2, 8);
      // Out until the end on another queue: the poller keeps spinning after these two complete.
      const held = other.submit(read(9), 0, 0, TIMEOUT);
      const first = queue.submit(read(0), 0, 0, TIMEOUT);
      const second = queue.submit(read(1), 0, 0, TIMEOUT);
      await hop();
      await hop();
      // Let the poller start spinning, then post both completions 0.1 ms into the spin.
      postAt = t + 0.1;
      await first;
      const waitedMs = t - postedAt;
      await second;
      expect(postedAt).toBeGreaterThan(0);
      expect(waitedMs).toBeLessThan(0.05);
      model.complete(2);
      await held;
    } finally {
      performance.now = realNow;
    }
  });
});

describe("health checks of the poller", () => {
  test("CSTS is read only after 10 ms without a completion; deadlines are checked as before", async () => {
    const { model, queue } = setup(4);
    // Completions every 2 ms or so for 100 ms: the poller runs out of spin between them and
    // checks deadlines every 10 ms, but needs no status read while commands keep completing
    // (a timer late by 10 ms on a loaded host may earn one: allowed, it came 10 ms after).
    const until = performance.now() + 100;
    let ios = 0;
    while (performance.now() < until) {
      const done = queue.submit(read(ios++), 0, 0, TIMEOUT);
      setTimeout(() => model.complete(1), 2);
      await done;
    }
    expect(model.healthChecks).toBeGreaterThan(2);
    for (const since of model.statusReads) expect(since).toBeGreaterThanOrEqual(10);
    // A command that does not complete: the status is read once completions have stopped 10 ms.
    const reads = model.statusReads.length;
    const stalled = queue.submit(read(0), 0, 0, TIMEOUT);
    await Bun.sleep(40);
    expect(model.statusReads.length).toBeGreaterThan(reads);
    for (const since of model.statusReads) expect(since).toBeGreaterThanOrEqual(10);
    model.complete(1);
    await stalled;
  });
});
