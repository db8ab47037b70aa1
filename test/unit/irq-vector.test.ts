/**
 * IrqVector's waiting machinery on any Linux host: a real eventfd that the test itself signals
 * with write(2), as the kernel's eventfd_signal() does for a VFIO interrupt. The VFIO side (which
 * needs a device) is covered by test/kernel/irq.test.ts; the set here only carries the index.
 */
import { afterEach, expect, spyOn, test } from "bun:test";
import { readdirSync, readlinkSync } from "node:fs";
import type { IrqSet } from "../../src/vfio/irq.ts";
import { IrqVector, READER_IDLE_MS } from "../../src/vfio/irq-vector.ts";
import { isCloseOnExec } from "../../src/sys/fd.ts";
import { EFD_CLOEXEC, EFD_NONBLOCK, libc } from "../../src/sys/libc.ts";
import { PARK } from "../../bench/irq-park-shared.ts";

// Passed as the typed array itself: a cached ptr() of a module-level array that no closure keeps
// alive points at freed memory once the engine collects it (writes of garbage counts).
const one = new BigUint64Array([1n]);
const open: IrqVector[] = [];

/** A vector on a fresh eventfd; `signal()` adds 1 to its counter. */
function vector(): { vector: IrqVector; signal: () => void } {
  const fd = libc().eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  expect(fd).toBeGreaterThanOrEqual(0);
  const set = { index: 1, info: { maskable: false } } as unknown as IrqSet;
  const v = new IrqVector(set, 0, fd);
  open.push(v);
  return { vector: v, signal: () => void libc().write(fd, one, 8) };
}

/** Open eventfds of this process (Bun closes its stream duplicates on another thread, later). */
const eventfdCount = () =>
  readdirSync("/proc/self/fd").filter((fd) => {
    try {
      return readlinkSync(`/proc/self/fd/${fd}`) === "anon_inode:[eventfd]";
    } catch {
      return false; // closed between the listing and the read
    }
  }).length;

/** The eventfd count once earlier tests' duplicates have finished closing (stable for 50 ms). */
async function settledEventfdCount(): Promise<number> {
  let last = eventfdCount();
  for (let stable = 0, i = 0; stable < 5 && i < 200; i++) {
    await Bun.sleep(10);
    const now = eventfdCount();
    stable = now === last ? stable + 1 : 0;
    last = now;
  }
  return last;
}

afterEach(() => {
  for (const v of open.splice(0)) v.release();
});

test("poll is non-blocking and returns the count since the last read", () => {
  const { vector: v, signal } = vector();
  expect(isCloseOnExec(v.fd)).toBe(true);
  expect(v.poll()).toBe(0);
  signal();
  signal();
  signal();
  expect(v.poll()).toBe(3);
  expect(v.poll()).toBe(0);
});

test("wait resolves at once when an event is pending, and later through the event loop otherwise", async () => {
  const { vector: v, signal } = vector();
  signal();
  expect(await v.wait()).toBe(1);
  let ticks = 0;
  const interval = setInterval(() => ticks++, 2);
  setTimeout(signal, 40);
  const started = performance.now();
  expect(await v.wait()).toBe(1);
  clearInterval(interval);
  expect(performance.now() - started).toBeGreaterThanOrEqual(30);
  expect(ticks).toBeGreaterThanOrEqual(3); // the thread was free while waiting
});

test("counts taken in by the event loop reach poll(); none is lost or counted twice", async () => {
  const { vector: v, signal } = vector();
  setTimeout(signal, 5);
  let total = await v.wait();
  for (let i = 0; i < 50; i++) {
    signal();
    if (i % 3 === 0) await Bun.sleep(1);
    if (i % 7 === 0) total += v.poll();
  }
  await Bun.sleep(10);
  total += v.poll();
  expect(total).toBe(51);
});

test("for await yields until the vector is released", async () => {
  const { vector: v, signal } = vector();
  const seen: number[] = [];
  const loop = (async () => {
    for await (const n of v) {
      seen.push(n);
      if (seen.length < 3) setTimeout(signal, 1);
    }
  })();
  signal();
  while (seen.length < 3) await Bun.sleep(2);
  v.release();
  await loop;
  expect(seen).toEqual([1, 1, 1]);
});

test("one waiter at a time: a second wait is EBUSY; an aborted wait frees the slot", async () => {
  const { vector: v, signal } = vector();
  const controller = new AbortController();
  const first = v.wait({ signal: controller.signal });
  await expect(v.wait()).rejects.toMatchObject({ code: "EBUSY", operation: "IrqVector.wait" });
  controller.abort(new Error("stop"));
  await expect(first).rejects.toThrow("stop");
  await expect(v.wait({ signal: AbortSignal.abort(new Error("already")) })).rejects.toThrow("already");
  signal();
  expect(await v.wait()).toBe(1);
});

test("release rejects a pending wait with EBADF, closes the eventfd (and Bun's duplicate)", async () => {
  const before = await settledEventfdCount();
  const { vector: v } = vector();
  const pending = v.wait(); // hands the eventfd to the event loop (Bun reads a duplicate)
  await Bun.sleep(5);
  v.release();
  await expect(pending).rejects.toMatchObject({ code: "EBADF", operation: "IrqVector.wait" });
  expect(() => v.poll()).toThrow(/closed/);
  await expect(v.wait()).rejects.toMatchObject({ code: "EBADF" });
  for (let i = 0; i < 100 && eventfdCount() !== before; i++) await Bun.sleep(10);
  expect(eventfdCount()).toBe(before);
});

test("a count raised after wait() in the same job resolves it before the event loop turns", async () => {
  const { vector: v, signal } = vector();
  let turned = false;
  setImmediate(() => {
    turned = true;
  });
  const pending = v.wait(); // parks: nothing is pending yet
  signal(); // as a doorbell write whose interrupt lands before the caller awaits
  expect(await pending).toBe(1);
  expect(turned).toBe(false);
  expect(v.poll()).toBe(0);
});

test("waits that follow one another share one event-loop reader; it stops once they stop", async () => {
  const before = await settledEventfdCount();
  const file = spyOn(Bun, "file");
  try {
    const { vector: v, signal } = vector();
    let total = 0;
    for (let i = 0; i < 10; i++) {
      setTimeout(signal, 1); // after the wait has parked: each count comes through the reader
      total += await v.wait();
    }
    expect(total).toBe(10);
    expect(file).toHaveBeenCalledTimes(1);
    // Idle for READER_IDLE_MS: the reader and its duplicate fd go; only the vector's own stays.
    for (let i = 0; i < 100 && eventfdCount() !== before + 1; i++) await Bun.sleep(READER_IDLE_MS);
    expect(eventfdCount()).toBe(before + 1);
    // A count that arrives while nothing waits stays in the eventfd for the next reader.
    signal();
    await Bun.sleep(READER_IDLE_MS * 2);
    expect(await v.wait()).toBe(1);
  } finally {
    file.mockRestore();
  }
});

test("a count the armed reader took in while nothing waited goes to the next wait, once", async () => {
  const { vector: v, signal } = vector();
  setTimeout(signal, 1);
  expect(await v.wait()).toBe(1); // the reader stays armed for READER_IDLE_MS
  signal();
  await Bun.sleep(1); // the loop's reader reads it: it is the vector's now, not the eventfd's
  expect(await v.wait()).toBe(1);
  expect(v.poll()).toBe(0);
});

test("waitBlocking: a pending count at once; a count raised by another thread wakes the block; none times out", async () => {
  const { vector: v, signal } = vector();
  signal();
  signal();
  expect(v.waitBlocking(1000)).toBe(2);
  // Nothing pending: the block ends at its timeout with 0 and takes nothing.
  let t0 = performance.now();
  expect(v.waitBlocking(20)).toBe(0);
  expect(performance.now() - t0).toBeGreaterThanOrEqual(19);
  expect(v.waitBlocking(0)).toBe(0);
  // A Worker adds 1 to the eventfd 30 ms after it is told to, while this thread is blocked.
  const worker = new Worker(new URL("../../bench/irq-park-worker.ts", import.meta.url).href);
  try {
    const shared = new SharedArrayBuffer(PARK.bytes);
    const control = new Int32Array(shared, 0, PARK.words);
    control[PARK.fd] = v.fd;
    control[PARK.delayUs] = 30_000;
    worker.postMessage(shared);
    await Bun.sleep(50); // the worker is listening
    Atomics.store(control, PARK.sequence, 1);
    Atomics.notify(control, PARK.sequence);
    t0 = performance.now();
    expect(v.waitBlocking(5000)).toBe(1);
    const waited = performance.now() - t0;
    expect(waited).toBeGreaterThanOrEqual(20);
    expect(waited).toBeLessThan(4000);
    Atomics.store(control, PARK.sequence, -1);
    Atomics.notify(control, PARK.sequence);
  } finally {
    worker.terminate();
  }
});

test("waitBlocking: bad timeouts are EINVAL, a pending wait() is EBUSY, a released vector EBADF", async () => {
  const { vector: v, signal } = vector();
  for (const bad of [-1, 1.5, Number.NaN, 60_001]) {
    expect(() => v.waitBlocking(bad)).toThrow(
      expect.objectContaining({ code: "EINVAL", operation: "IrqVector.waitBlocking" }),
    );
  }
  const pending = v.wait();
  expect(() => v.waitBlocking(10)).toThrow(expect.objectContaining({ code: "EBUSY" }));
  signal();
  expect(await pending).toBe(1);
  v.release();
  expect(() => v.waitBlocking(10)).toThrow(expect.objectContaining({ code: "EBADF" }));
});
