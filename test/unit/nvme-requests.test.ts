/**
 * The request API (src/nvme/request.ts): reusable requests called back with no Promise, against
 * the untrusting rules the promise API keeps (test/unit/nvme-sim.test.ts). The ring model of
 * test/support/nvme-model.ts checks when doorbells are written; the controller model of
 * test/support/nvme-sim.ts stands where the device does for data and failures.
 */
import { afterEach, describe, expect, test } from "bun:test";
import type { DmaBuffer } from "../../src/heap/dma-heap.ts";
import { IoOpcode } from "../../src/nvme/commands.ts";
import { NvmeController, NvmeStatusError } from "../../src/nvme/index.ts";
import type { NvmeRequest } from "../../src/nvme/request.ts";
import type { IommufdError } from "../../src/sys/error.ts";
import { NvmeModel } from "../support/nvme-model.ts";
import { NvmeSim, SIM_STATUS } from "../support/nvme-sim.ts";

const opened: NvmeController[] = [];
afterEach(() => {
  for (const controller of opened.splice(0)) controller.close();
});

function open(commandTimeoutMs = 3000) {
  const sim = new NvmeSim();
  for (let i = 0; i < sim.media.length; i++) sim.media[i] = (i * 7 + 3) & 0xff;
  const controller = NvmeController.openOn(sim, { queueDepth: 16, commandTimeoutMs });
  opened.push(controller);
  return { sim, controller, ns: controller.namespace(1), queue: controller.ioQueue };
}

const media = (sim: NvmeSim, lba: number, blocks: number) => sim.media.slice(lba * 512, (lba + blocks) * 512);

/** Resolves with the request at its next callback. */
function nextCallback(): { onComplete: (r: NvmeRequest) => void; done: Promise<NvmeRequest> } {
  let settle: (r: NvmeRequest) => void = () => {};
  const done = new Promise<NvmeRequest>((resolve) => {
    settle = resolve;
  });
  return { onComplete: (r) => settle(r), done };
}

/** A Read of `lba` prepared by hand on a model queue (no namespace there). */
function prepareRead(request: NvmeRequest, lba: number): NvmeRequest {
  request.opcode = IoOpcode.Read;
  request.nsid = 1;
  request.cdw10 = lba;
  return request;
}

describe("requests against the controller model", () => {
  test("four requests, each sent again from its onComplete, read 40 blocks byte-exact", async () => {
    const { sim, controller, ns, queue } = open();
    const buffers: DmaBuffer[] = [];
    const seen: number[] = [];
    let next = 0;
    const { promise, resolve, reject } = Promise.withResolvers<void>();
    for (let i = 0; i < 4; i++) {
      const b = controller.allocBuffer(512);
      buffers.push(b);
      const lbas: number[] = [];
      const request = queue.request((r) => {
        if (r.error) return reject(r.error);
        const lba = lbas.at(-1)!;
        if (!b.bytes.every((byte, k) => byte === sim.media[lba * 512 + k]))
          return reject(new Error(`LBA ${lba} read wrong`));
        seen.push(lba);
        if (seen.length === 40) return resolve();
        if (next < 40) send(r);
      });
      const send = (r: NvmeRequest) => {
        lbas.push(100 + next);
        ns.submitRead(r, 100 + next++, 1, b);
      };
      send(request);
    }
    await promise;
    expect(seen.toSorted((a, b) => a - b)).toEqual(Array.from({ length: 40 }, (_, i) => 100 + i));
    expect(controller.stats().io[0]).toMatchObject({ submitted: 40, completed: 40, inFlight: 0 });
  });

  test("a write through a request lands on the media; a failed status comes back typed, once, and the request is reusable", async () => {
    const { sim, controller, ns, queue } = open();
    const b = controller.allocBuffer(1024);
    for (let i = 0; i < b.size; i++) b.bytes[i] = (i * 5) & 0xff;
    const first = nextCallback();
    const request = queue.request(first.onComplete);
    ns.submitWrite(request, 200, 2, b);
    expect((await first.done).error).toBeUndefined();
    expect(b.bytes).toEqual(media(sim, 200, 2));

    let failOnce = true;
    sim.tamper = (c) => {
      if (!failOnce) return [c];
      failOnce = false;
      return [{ ...c, status: SIM_STATUS.unrecoveredReadError | SIM_STATUS.doNotRetry }];
    };
    const calls: (string | undefined)[] = [];
    const again = nextCallback();
    const retried = queue.request((r) => {
      calls.push(r.error?.name);
      again.onComplete(r);
    });
    ns.submitRead(retried, 70, 1, b);
    const failed = await again.done;
    expect(failed.error).toBeInstanceOf(NvmeStatusError);
    expect((failed.error as NvmeStatusError).nvmeStatus).toMatchObject({
      name: "Unrecovered Read Error",
      doNotRetry: true,
    });
    expect(failed.error?.message).toContain("LBA 70");
    expect(failed.idle).toBe(true);
    // Sent once: the driver does not retry behind the caller's back. The caller may.
    expect(sim.commands.filter((c) => c.qid === 1 && c.cdw10 === 70)).toHaveLength(1);
    await Bun.sleep(5);
    expect(calls).toEqual(["NvmeStatusError"]);
    const retry = nextCallback();
    const mine = queue.request(retry.onComplete);
    ns.submitRead(mine, 70, 1, b);
    expect((await retry.done).error).toBeUndefined();
    expect(b.bytes.subarray(0, 512)).toEqual(media(sim, 70, 1));
    expect(controller.failure).toBeUndefined();
  });

  test("an untrusted completion (an id not in flight) fails the request with EPROTO; submit then throws it; reset brings it back", async () => {
    const { sim, controller, ns, queue } = open();
    let tampered = false;
    sim.tamper = (c) => {
      if (tampered) return [c];
      tampered = true;
      return [{ ...c, cid: 0x1234 }];
    };
    const b = controller.allocBuffer(512);
    const cb = nextCallback();
    const request = queue.request(cb.onComplete);
    ns.submitRead(request, 10, 1, b);
    const failed = await cb.done;
    expect(failed.error?.code).toBe("EPROTO");
    expect(failed.error?.message).toContain("command id 0x1234, which is not in flight");
    expect(() => ns.submitRead(request, 10, 1, b)).toThrow(expect.objectContaining({ code: "EPROTO" }));
    controller.reset();
    const after = nextCallback();
    const fresh = queue.request(after.onComplete);
    ns.submitRead(fresh, 10, 1, b);
    expect((await after.done).error).toBeUndefined();
    expect(b.bytes).toEqual(media(sim, 10, 1));
  });

  test("CSTS all ones fails a request in flight with ENODEV; a lost completion with ETIMEDOUT", async () => {
    const gone = open(20_000);
    gone.sim.tamper = () => {
      gone.sim.gone = true;
      return [];
    };
    const cb = nextCallback();
    gone.ns.submitRead(gone.queue.request(cb.onComplete), 80, 1, gone.controller.allocBuffer(512));
    expect((await cb.done).error?.code).toBe("ENODEV");
    gone.sim.gone = false;

    const lost = open(50);
    lost.sim.tamper = () => [];
    const late = nextCallback();
    lost.ns.submitRead(lost.queue.request(late.onComplete), 81, 1, lost.controller.allocBuffer(512));
    const timedOut = await late.done;
    expect(timedOut.error?.code).toBe("ETIMEDOUT");
    expect(timedOut.error?.message).toContain("did not complete in time");
  });

  test("a request failed by deleting its queue or closing the controller is called back after, when sending again throws EBADF", async () => {
    for (const how of ["delete", "close"] as const) {
      const { sim, controller, ns } = open();
      sim.tamper = () => []; // the completion never comes: the request is in flight when it goes
      const queue = controller.createQueuePair(4);
      const outcome: string[] = [];
      const cb = nextCallback();
      const request = queue.request((r) => {
        outcome.push(r.error?.code ?? "ok");
        try {
          r.submit();
          outcome.push("sent again");
        } catch (error) {
          outcome.push((error as IommufdError).code);
        }
        cb.onComplete(r);
      });
      ns.submitRead(request, 5, 1, controller.allocBuffer(512), 0);
      if (how === "delete") controller.deleteQueuePair(queue);
      else controller.close();
      expect(outcome).toEqual([]); // not from inside deleteQueuePair/close
      await cb.done;
      expect(outcome).toEqual([how === "delete" ? "EIO" : "EBADF", "EBADF"]);
      expect(request.idle).toBe(true);
    }
  });
});

describe("requests on the ring model", () => {
  test("a request sent again from its onComplete is announced by the reap's own SQ write, after the CQ head, before the reap returns", async () => {
    const model = new NvmeModel({ polled: false });
    const queue = model.queuePair(1, 4);
    let calls = 0;
    const request = queue.request((r) => {
      if (++calls === 1) prepareRead(r, 2).submit();
    });
    prepareRead(request, 1).submit();
    await Promise.resolve();
    expect(model.writes.map((w) => w.value)).toEqual([1]);
    model.complete(1);
    expect(queue.reap(true)).toBe(1);
    // No microtask ran: the reap itself wrote both, the CQ head first.
    const sq = model.sqDoorbell(1);
    expect(model.writes.map((w) => `${w.offset === sq ? "SQ" : "CQ"} ${w.value}`)).toEqual(["SQ 1", "CQ 1", "SQ 2"]);
    model.complete(1);
    queue.reap();
    expect(calls).toBe(2);
  });

  test("while callbacks keep the poller spinning, what they send to another queue is announced", async () => {
    const model = new NvmeModel();
    const a = model.queuePair(1, 4);
    const b = model.queuePair(2, 4);
    // The model completes what was announced at every third look of the poller at queue 1: a
    // controller slower than the poller's first look, so the poller spins for each completion.
    let looks = 0;
    const reap = a.reap.bind(a);
    a.reap = (deferHead?: boolean) => {
      if (++looks % 3 === 0) {
        model.complete(1);
        model.complete(2);
      }
      return reap(deferHead);
    };
    let laps = 0;
    let bAt = -1;
    const { promise, resolve } = Promise.withResolvers<void>();
    const other = prepareRead(
      b.request(() => {
        bAt = laps;
      }),
      9,
    );
    const cycling = prepareRead(
      a.request((r) => {
        laps++;
        if (laps === 1) other.submit(); // another queue: its doorbell is not this reap's
        if (laps < 2000) r.submit();
        else resolve();
      }),
      1,
    );
    cycling.submit();
    await promise;
    // B's command was announced while A's callbacks kept the poller from yielding.
    expect(bAt).toBeGreaterThan(0);
    expect(bAt).toBeLessThan(50);
    expect(model.protocolErrors).toEqual([]);
  });

  test("misuse is refused, typed, and sends nothing", async () => {
    const model = new NvmeModel({ polled: false });
    const queue = model.queuePair(1, 2); // one slot
    expect(() => queue.request(42 as unknown as () => void)).toThrow(
      expect.objectContaining({ code: "EINVAL", argument: "onComplete" }),
    );
    const a = prepareRead(
      queue.request(() => {}),
      1,
    );
    const b = prepareRead(
      queue.request(() => {}),
      2,
    );
    a.submit();
    b.submit(); // no free slot: it waits
    expect(() => a.submit()).toThrow(
      expect.objectContaining({ code: "EBUSY", message: expect.stringContaining("in flight") }),
    );
    expect(() => b.submit()).toThrow(
      expect.objectContaining({ code: "EBUSY", message: expect.stringContaining("waiting") }),
    );
    expect(queue.stats()).toMatchObject({ submitted: 1, inFlight: 1, waiting: 1 });
    expect(queue.unannounced).toBe(1);
    const other = model.queuePair(2, 2);
    expect(() =>
      other.issue(
        prepareRead(
          queue.request(() => {}),
          3,
        ),
      ),
    ).toThrow(expect.objectContaining({ code: "EINVAL", argument: "request" }));
    for (let i = 0; i < 2; i++) {
      queue.ringDoorbell();
      model.complete(1);
      queue.reap();
    }
    expect(a.idle && b.idle).toBe(true);
    queue.release();
    expect(() => a.submit()).toThrow(
      expect.objectContaining({ code: "EBADF", message: expect.stringContaining("deleted") }),
    );
    expect(() => queue.request(() => {})).toThrow(expect.objectContaining({ code: "EBADF" }));
    await expect(queue.submit({ opcode: IoOpcode.Read }, 0, 0, 1000)).rejects.toMatchObject({ code: "EBADF" });
  });

  test("Namespace.submitRead splits an LBA over 2^32 into CDW10 and CDW11", async () => {
    const { controller, ns, queue } = open();
    const [high, low] = [nextCallback(), nextCallback()];
    const [far, near] = [queue.request(high.onComplete), queue.request(low.onComplete)];
    ns.submitRead(far, 2 ** 32 + 5, 1, controller.allocBuffer(512));
    ns.submitRead(near, 5, 1, controller.allocBuffer(512));
    expect([far.cdw10, far.cdw11, near.cdw10, near.cdw11]).toEqual([5, 1, 5, 0]);
    await Promise.all([high.done, low.done]);
  });

  test("Namespace.submitRead refuses a request in flight without touching its command, and more blocks than one command moves", async () => {
    const { controller, ns, queue } = open();
    const b = controller.allocBuffer(4096);
    const cb = nextCallback();
    const request = queue.request(cb.onComplete);
    ns.submitRead(request, 7, 1, b);
    expect(() => ns.submitRead(request, 9, 1, b)).toThrow(expect.objectContaining({ code: "EBUSY" }));
    expect(request.cdw10).toBe(7);
    await cb.done;
    expect(() => ns.submitRead(request, 0, ns.maxBlocksPerCommand + 1, controller.allocBuffer(1 << 20))).toThrow(
      expect.objectContaining({ code: "EINVAL", argument: "blocks" }),
    );
    expect(() => ns.submitRead(request, 0, 1, new Uint8Array(512) as unknown as DmaBuffer)).toThrow(
      expect.objectContaining({ code: "EINVAL", argument: "buffer" }),
    );
    expect(request.idle).toBe(true);
  });

  test("Namespace.submitRead and read refuse every malformed LBA, count, offset and buffer with EINVAL naming it, and send nothing", async () => {
    const { controller, ns, queue } = open();
    const b = controller.allocBuffer(4096);
    const freed = controller.allocBuffer(4096);
    freed.free();
    const request = queue.request(() => {});
    const cases: [lba: number, blocks: number, buffer: DmaBuffer, offset: number, argument: string][] = [
      [-1, 1, b, 0, "lba"],
      [1.5, 1, b, 0, "lba"],
      [Number.NaN, 1, b, 0, "lba"],
      [2 ** 53, 1, b, 0, "lba"],
      [0, 0, b, 0, "blocks"],
      [0, -1, b, 0, "blocks"],
      [0, 1.5, b, 0, "blocks"],
      [0, Number.NaN, b, 0, "blocks"],
      [0, 2 ** 32, b, 0, "blocks"],
      [0, 1, b, 2, "options.offset"],
      [0, 1, b, -4, "options.offset"],
      [0, 1, b, 0.5, "options.offset"],
      [0, 8, b, 4, "buffer"],
      [0, 1, b, 2 ** 32, "buffer"],
      [0, 1, freed, 0, "buffer"],
    ];
    for (const [lba, blocks, buffer, offset, argument] of cases) {
      expect(() => ns.submitRead(request, lba, blocks, buffer, offset)).toThrow(
        expect.objectContaining({ code: "EINVAL", argument }),
      );
    }
    // The promise API rejects the same; a count over one command's reach is split there, so
    // 2^32 blocks fail on the buffer instead.
    for (const [lba, blocks, buffer, offset, argument] of cases) {
      await expect(ns.read(lba, blocks, buffer, { offset })).rejects.toMatchObject({
        code: "EINVAL",
        argument: blocks === 2 ** 32 ? "buffer" : argument,
      });
    }
    expect(queue.stats().submitted).toBe(0);
    expect(request.idle).toBe(true);
    // The edges that are allowed: an LBA past 2^32, a whole buffer, a dword offset.
    const cb = nextCallback();
    const edge = queue.request(cb.onComplete);
    ns.submitRead(edge, 0, 7, b, 512);
    expect((await cb.done).error).toBeUndefined();
    expect(edge.iova).toBe(b.iova + 512);
    ns.submitRead(edge, 2 ** 32 + 1, 1, b, 4);
    expect(edge.cdw11).toBe(1);
    while (!edge.idle) await Bun.sleep(1);
    // Sent: the model's namespace is smaller, and the controller's answer says so.
    expect(edge.error).toBeInstanceOf(NvmeStatusError);
    expect(queue.stats().submitted).toBe(2);
  });

  test("a posted entry has a PRP2 only when its data leaves the first page, and the high dwords of IOVAs over 4 GiB", async () => {
    const model = new NvmeModel({ polled: false });
    const queue = model.queuePair(1, 8);
    const sq = model.heap.at(queue.sqIova);
    const words = new Uint32Array(sq.buffer, sq.byteOffset, 8 * 16);
    const cases: [iova: number, length: number, prp2: number][] = [
      [0x10000, 4096, 0],
      [0x10800, 512, 0],
      // 512 bytes left in the first page: the rest is in the next.
      [0x10e00, 1024, 0x11000],
      [0x10800, 4096, 0x11000],
      [0x1_0000_0800, 4096, 0x1_0000_1000],
      [0x10000, 0, 0],
    ];
    cases.forEach(([iova, length], i) => {
      const request = prepareRead(
        queue.request(() => {}),
        i,
      );
      request.iova = iova;
      request.length = length;
      request.submit();
    });
    const dwords = (entry: number, at: number) => words[entry * 16 + at]! + words[entry * 16 + at + 1]! * 2 ** 32;
    expect(cases.map((_, i) => [dwords(i, 6), dwords(i, 8)])).toEqual(cases.map(([iova, , prp2]) => [iova, prp2]));
    await Promise.resolve();
  });

  test("a callback that throws does not stop the reap: the others are called back, the head written, then the error thrown", async () => {
    const model = new NvmeModel({ polled: false });
    const queue = model.queuePair(1, 4);
    const called: number[] = [];
    const boom = new Error("caller's bug");
    const first = prepareRead(
      queue.request(() => {
        called.push(1);
        throw boom;
      }),
      1,
    );
    const second = prepareRead(
      queue.request(() => called.push(2)),
      2,
    );
    first.submit();
    second.submit();
    await Promise.resolve();
    model.complete(1);
    expect(() => queue.reap()).toThrow(boom);
    expect(called).toEqual([1, 2]);
    expect(model.writesTo(model.cqDoorbell(1))).toEqual([2]);
    expect(first.idle && second.idle).toBe(true);
    expect(queue.inFlight).toBe(0);
  });
});
