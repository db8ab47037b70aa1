/**
 * The NVMe driver against a controller that is not trusted: the model of test/support/nvme-sim.ts
 * stands where the VFIO device does, and each test makes it break the protocol one way. For each,
 * the affected command (or the whole controller) fails with a typed error, no other caller's
 * promise is resolved, no buffer is written, and reset() and close() still work. The first test is
 * the control: the same model, well behaved, moves data byte-exact.
 */
import { afterEach, expect, test } from "bun:test";
import type { DmaBuffer } from "../../src/heap/dma-heap.ts";
import { NvmeController, NvmeStatusError } from "../../src/nvme/index.ts";
import type { Namespace } from "../../src/nvme/namespace.ts";
import type { NvmeControllerOptions } from "../../src/nvme/options.ts";
import { IommufdError } from "../../src/sys/error.ts";
import { libc } from "../../src/sys/libc.ts";
import { MAX_IRQ_COUNT } from "../../src/vfio/irq-vector.ts";
import { NvmeSim, SIM_STATUS, type SimCommand, type SimCompletion } from "../support/nvme-sim.ts";

/** The I/O queue's depth: 15 commands in flight at most, 4 bits of slot in a command id. */
const DEPTH = 16;
const opened: { sim: NvmeSim; controller: NvmeController }[] = [];

afterEach(() => {
  // close() must work whatever the model did; it gives everything back.
  for (const { sim, controller } of opened.splice(0)) {
    controller.close();
    expect(controller.closed).toBe(true);
    expect(sim.released).toBe(true);
    expect(sim.busMaster).toBe(false);
  }
});

function open(options: NvmeControllerOptions = {}) {
  const sim = new NvmeSim();
  // Fill the namespace with a pattern no buffer starts with.
  for (let i = 0; i < sim.media.length; i++) sim.media[i] = (i * 7 + 3) & 0xff;
  const controller = NvmeController.openOn(sim, { queueDepth: DEPTH, commandTimeoutMs: 3000, ...options });
  opened.push({ sim, controller });
  const ns = controller.namespace(1);
  return { sim, controller, ns };
}

/** A buffer of `blocks` blocks filled with `fill`. */
function buffer(controller: NvmeController, blocks: number, fill = 0xee): DmaBuffer {
  const b = controller.allocBuffer(blocks * 512);
  b.bytes.fill(fill);
  return b;
}

/** The typed failure `promise` rejects with (fails the test if it resolves). */
async function failure(promise: Promise<unknown>): Promise<IommufdError> {
  const outcome = await promise.then(
    () => "resolved",
    (error: unknown) => error,
  );
  expect(outcome).toBeInstanceOf(IommufdError);
  return outcome as IommufdError;
}

/** The namespace's bytes at `lba`, as the model holds them. */
const media = (sim: NvmeSim, lba: number, blocks: number) => sim.media.slice(lba * 512, (lba + blocks) * 512);

/** After a failure: later submissions get the same code; reset() brings the controller back and I/O is byte-exact again. */
async function expectRecovery(sim: NvmeSim, controller: NvmeController, ns: Namespace, code: string): Promise<void> {
  expect(controller.failure?.code).toBe(code);
  // A controller that broke the protocol is disabled at once (CC.EN = 0): it stops moving data.
  if (code === "EPROTO") expect(sim.enabled).toBe(false);
  const later = await failure(ns.read(0, 1, buffer(controller, 1)));
  expect(later.code).toBe(code);
  expect(later.message).toContain("the controller stopped taking commands");
  sim.tamper = undefined;
  controller.reset();
  expect(controller.failure).toBeUndefined();
  const b = buffer(controller, 8);
  await ns.read(40, 8, b);
  expect(b.bytes).toEqual(media(sim, 40, 8));
}

/** Tamper with the first I/O completion only; every other passes as the model made it. */
function once(sim: NvmeSim, change: (c: SimCompletion, command: SimCommand) => SimCompletion[]): void {
  let done = false;
  sim.tamper = (c, command) => {
    if (done) return [c];
    done = true;
    return change(c, command);
  };
}

test("control: the well-behaved model completes I/O byte-exact, in parallel and through PRP lists", async () => {
  const { sim, controller, ns } = open();
  expect(controller.identity.model).toBe("bun-iommufd simulated NVMe");
  expect(ns.blocks).toBe(2048);
  expect(() => controller.device).toThrow(expect.objectContaining({ code: "ENODEV" }));
  // 64 KiB: 16 pages, a PRP list.
  const out = buffer(controller, 128);
  for (let i = 0; i < out.size; i++) out.bytes[i] = (i * 13) & 0xff;
  await ns.write(100, 128, out);
  expect(out.bytes).toEqual(media(sim, 100, 128));
  const back = buffer(controller, 128, 0);
  await ns.read(100, 128, back);
  expect(back.bytes).toEqual(media(sim, 100, 128));
  // 40 single-block reads at once: more than the queue holds, so some wait for a slot.
  const buffers = Array.from({ length: 40 }, () => buffer(controller, 1));
  await Promise.all(buffers.map((b, i) => ns.read(500 + i, 1, b)));
  for (const [i, b] of buffers.entries()) expect(b.bytes).toEqual(media(sim, 500 + i, 1));
  expect(controller.stats().io[0]!.maxWaiting).toBeGreaterThan(0);
  expect(controller.failure).toBeUndefined();
  expect(sim.faults).toEqual([]);
});

test("a completion for a command id not in flight fails the controller (EPROTO); nothing pending resolves", async () => {
  const { sim, controller, ns } = open();
  once(sim, (c) => [{ ...c, cid: 0x1234 }]);
  const first = failure(ns.read(10, 1, buffer(controller, 1)));
  const second = failure(ns.read(11, 1, buffer(controller, 1))); // its completion is in the ring, after the bad one
  const error = await first;
  expect(error.code).toBe("EPROTO");
  expect(error.operation).toBe("NVMe Read");
  expect(error.message).toContain("queue 1 posted a completion for command id 0x1234, which is not in flight");
  // Rejected, not resolved, though the model completed it properly after the bad entry.
  expect((await second).code).toBe("EPROTO");
  await expectRecovery(sim, controller, ns, "EPROTO");
});

test("the same command id completed twice: the duplicate cannot settle the slot's next command", async () => {
  const { sim, controller, ns } = open();
  let firstCid = -1;
  sim.tamper = (c) => {
    if (firstCid < 0) {
      firstCid = c.cid;
      return [c];
    }
    // The next command reuses the slot; the model answers it with the first one's completion again.
    return [{ ...c, cid: firstCid }];
  };
  await ns.read(20, 1, buffer(controller, 1));
  const error = await failure(ns.read(21, 1, buffer(controller, 1)));
  expect(sim.commands.at(-1)!.cid & 0xf).toBe(firstCid & 0xf); // same slot, so only the generation tells them apart
  expect(error.code).toBe("EPROTO");
  expect(error.message).toContain(
    `command id 0x${firstCid.toString(16).padStart(4, "0")}, which was completed already (a duplicate or stale entry)`,
  );
  await expectRecovery(sim, controller, ns, "EPROTO");
});

test("a completion naming another submission queue fails the controller (EPROTO)", async () => {
  const { sim, controller, ns } = open();
  once(sim, (c) => [{ ...c, sqId: 5 }]);
  const error = await failure(ns.read(30, 1, buffer(controller, 1)));
  expect(error.code).toBe("EPROTO");
  expect(error.message).toContain("queue 1 posted a completion for submission queue 5");
  await expectRecovery(sim, controller, ns, "EPROTO");
});

test("a completion with an SQ head outside the queue fails the controller (EPROTO)", async () => {
  const { sim, controller, ns } = open();
  once(sim, (c) => [{ ...c, sqHead: DEPTH + 3 }]);
  const error = await failure(ns.read(31, 1, buffer(controller, 1)));
  expect(error.code).toBe("EPROTO");
  expect(error.message).toContain(`SQ head ${DEPTH + 3}, outside the ${DEPTH}-entry submission queue`);
  await expectRecovery(sim, controller, ns, "EPROTO");
});

test("a phase bit flipped before the entry is written: the stale entry under it completes nothing", async () => {
  const { sim, controller, ns } = open();
  // One lap and a half of single reads: every slot of the completion ring holds an entry of an
  // earlier command of the same command slot.
  for (let i = 0; i < DEPTH + 5; i++) await ns.read(i, 1, buffer(controller, 1));
  once(sim, (c) => {
    sim.flipPhase(c.cqid);
    return []; // the real entry never comes
  });
  const error = await failure(ns.read(60, 4, buffer(controller, 4)));
  expect(error.code).toBe("EPROTO");
  // The entry under the early phase bit is that of the command DEPTH reads back, in the same slot.
  const stale = sim.commands.filter((c) => c.qid === 1).at(-1 - DEPTH)!.cid;
  expect(stale & 0xf).toBe(sim.commands.at(-1)!.cid & 0xf);
  expect(error.message).toContain(`command id 0x${stale.toString(16).padStart(4, "0")}, which is not in flight`);
  expect(controller.stats().io[0]!.completed).toBe(DEPTH + 5);
  await expectRecovery(sim, controller, ns, "EPROTO");
});

test("a status with Do Not Retry fails that command once with its status; the controller carries on", async () => {
  const { sim, controller, ns } = open();
  once(sim, (c) => [{ ...c, status: SIM_STATUS.unrecoveredReadError | SIM_STATUS.doNotRetry }]);
  const a = buffer(controller, 1);
  const b = buffer(controller, 1);
  const [bad, good] = await Promise.allSettled([ns.read(70, 1, a), ns.read(71, 1, b)]);
  expect(bad.status).toBe("rejected");
  const error = (bad as PromiseRejectedResult).reason;
  expect(error).toBeInstanceOf(NvmeStatusError);
  expect(error.nvmeStatus).toMatchObject({ type: 2, code: 0x81, name: "Unrecovered Read Error", doNotRetry: true });
  expect(error.message).toContain("LBA 70");
  expect(good.status).toBe("fulfilled");
  expect(b.bytes).toEqual(media(sim, 71, 1));
  // Sent once: the driver does not retry it behind the caller's back.
  expect(sim.commands.filter((c) => c.qid === 1 && c.cdw10 === 70)).toHaveLength(1);
  expect(controller.failure).toBeUndefined();
  const c = buffer(controller, 1);
  await ns.read(70, 1, c);
  expect(c.bytes).toEqual(media(sim, 70, 1));
});

test("CSTS reads all ones mid-command: pending commands fail with ENODEV instead of waiting forever", async () => {
  const { sim, controller, ns } = open({ commandTimeoutMs: 20_000 });
  once(sim, () => {
    sim.gone = true; // surprise removal while the command is out
    return [];
  });
  const started = performance.now();
  const error = await failure(ns.read(80, 1, buffer(controller, 1)));
  expect(performance.now() - started).toBeLessThan(2000); // found by the health check, not the 20 s deadline
  expect(error.code).toBe("ENODEV");
  expect(error.message).toContain("CSTS reads all ones");
  // A reset while it is gone is refused, typed; once it is back, reset brings it up.
  expect(() => controller.reset()).toThrow(expect.objectContaining({ code: "ENODEV" }));
  sim.gone = false;
  await expectRecovery(sim, controller, ns, "ENODEV");
});

test("an interrupt vector whose eventfd reports an absurd count: I/O goes on, counts saturate", async () => {
  const { sim, controller, ns } = open({ completion: "interrupt" });
  // 2^64 - 2: the most an eventfd counter holds.
  sim.interruptCount = 0xfffffffffffffffen;
  const buffers = Array.from({ length: 20 }, () => buffer(controller, 2));
  await Promise.all(buffers.map((b, i) => ns.read(200 + 2 * i, 2, b)));
  for (const [i, b] of buffers.entries()) expect(b.bytes).toEqual(media(sim, 200 + 2 * i, 2));
  const vector = controller.ioQueue.vector!;
  vector.poll(); // whatever the poller left
  // Two more absurd signals, read by poll() and by wait(): each count stays a safe integer.
  const raise = () => libc().write(vector.fd, new BigUint64Array([0xfffffffffffffffen]), 8);
  raise();
  const count = vector.poll();
  expect(Number.isSafeInteger(count)).toBe(true);
  expect(count).toBe(MAX_IRQ_COUNT);
  raise();
  expect(await vector.wait()).toBe(MAX_IRQ_COUNT);
  const last = buffer(controller, 1);
  await ns.read(0, 1, last);
  expect(last.bytes).toEqual(media(sim, 0, 1));
});

/**
 * A controller with a queue pair lent as bench/nvme-loop.ts lends one: driven by other code with
 * its own command id `cid` and handed back idle, that code's completion still in its ring.
 */
function lentQueueWithForeignEntry(cid: number) {
  const opened = open();
  const lent = opened.controller.createQueuePair(4, { completion: "poll" });
  opened.sim.postRaw({ cqid: lent.id, dw0: 0, sqHead: 1, sqId: lent.id, cid, status: 0 });
  return { ...opened, lent };
}

/** The driver's own I/O still works and lands byte for byte. */
async function readBack(controller: NvmeController, ns: Namespace, sim: NvmeSim): Promise<void> {
  const b = buffer(controller, 8);
  await ns.read(0, 8, b);
  expect(controller.failure).toBeUndefined();
  expect(b.bytes).toEqual(media(sim, 0, 8));
}

test("deleting a queue pair with nothing in flight leaves entries someone else's loop left in its ring unjudged", async () => {
  const { sim, controller, ns, lent } = lentQueueWithForeignEntry(0x0005);
  controller.deleteQueuePair(lent);
  expect(controller.failure).toBeUndefined();
  await readBack(controller, ns, sim);
});

test("the poller leaves a lent queue pair's ring alone while the driver's own I/O runs on another", async () => {
  // Seen in \`bun bench\`: EPROTO "queue 3 posted a completion for command id 0x0000, which is not in flight".
  const { sim, controller, ns, lent } = lentQueueWithForeignEntry(0x0000);
  await readBack(controller, ns, sim);
  controller.deleteQueuePair(lent);
});
