/** The NVMe driver's pure parts: status decoding, PRPs, command encoding, Identify parsing, CAP. */
import { describe, expect, test } from "bun:test";
import {
  AdminOpcode,
  type Command,
  commandName,
  describeCommand,
  encodeCommand,
  IoOpcode,
  readWrite,
} from "../../src/nvme/commands.ts";
import { parseControllerIdentity, parseNamespaceIdentity, parseNamespaceList } from "../../src/nvme/identify.ts";
import { MAX_PRP_TRANSFER, prp2For } from "../../src/nvme/prp.ts";
import { decodeCapabilities } from "../../src/nvme/registers.ts";
import { decodeStatus, NvmeStatusError } from "../../src/nvme/index.ts";
import { NvmeRequest } from "../../src/nvme/request.ts";
import { CommandTracker } from "../../src/nvme/tracker.ts";
import { IommufdError } from "../../src/sys/error.ts";

describe("status", () => {
  test("generic and NVM command set codes by name and errno", () => {
    expect(decodeStatus(0x80)).toMatchObject({
      type: 0,
      code: 0x80,
      name: "LBA Out of Range",
      doNotRetry: false,
      errno: 34,
    });
    expect(decodeStatus(0x4002)).toMatchObject({
      type: 0,
      code: 2,
      name: "Invalid Field in Command",
      doNotRetry: true,
      errno: 22,
    });
    expect(decodeStatus(0x101)).toMatchObject({ type: 1, code: 1, name: "Invalid Queue Identifier" });
    expect(decodeStatus(0x281).name).toBe("Unrecovered Read Error");
    expect(decodeStatus(0x7ff)).toMatchObject({ type: 7, code: 0xff, errno: 5 });
  });

  test("NvmeStatusError is an IommufdError naming the command, what it was asked, and the decoded status", () => {
    const error = new NvmeStatusError("Read", "namespace 1, LBA 999999, 1 block(s)", 0x4080);
    expect(error).toBeInstanceOf(NvmeStatusError);
    expect(error.name).toBe("NvmeStatusError");
    expect(error).toBeInstanceOf(IommufdError);
    expect(error.operation).toBe("NVMe Read");
    expect(error.code).toBe("ERANGE");
    expect(error.errno).toBe(34);
    expect(error.message).toContain("LBA 999999");
    expect(error.message).toContain("LBA Out of Range (SCT 0, SC 0x80, do not retry)");
    expect(error.nvmeStatus).toEqual({ type: 0, code: 0x80, name: "LBA Out of Range", doNotRetry: true, errno: 34 });
    // Spread into logs and JSON like any own field.
    expect(Object.keys(error)).toContain("nvmeStatus");
  });
});

describe("command tracker", () => {
  const queue = { id: 1, issue() {} };
  /** A request for `lba`, or an admin command, with a callback that does nothing (the tracker never calls back). */
  const request = (lba = 7, timeoutMs = 1000, command: Command = readWrite(IoOpcode.Read, 1, lba, 1)) =>
    Object.assign(new NvmeRequest(queue, () => {}, timeoutMs), command);

  test("slots come from a free stack; a completion settles its own command only, once", () => {
    const tracker = new CommandTracker(3, false);
    const slots = [tracker.take(), tracker.take(), tracker.take()];
    expect(slots).toEqual([0, 1, 2]);
    expect(tracker.take()).toBe(-1);
    const requests = slots.map(() => request());
    const cids = slots.map((slot, i) => tracker.track(slot, requests[i]!));
    expect(requests.map((r) => r.stateName)).toEqual(["in flight", "in flight", "in flight"]);
    // Three slots take two bits; the first generation is 1, in the bits above.
    expect(cids).toEqual([0b100, 0b101, 0b110]);
    expect(tracker.inFlight).toBe(3);
    expect(tracker.slotOf(cids[1]!)).toBe(1);
    expect(tracker.finish(1, 0xabc, 0)).toBe(requests[1]!);
    expect(requests[1]).toMatchObject({ result: 0xabc, error: undefined, idle: true });
    expect(tracker.handOff(1)).toBeUndefined();
    expect(tracker.slotOf(cids[1]!)).toBe(-1); // stale: already settled
    expect(tracker.describeStale(cids[1]!)).toBe(
      "command id 0x0005, which was completed already (a duplicate or stale entry)",
    );
    expect(tracker.slotOf(1)).toBe(-1); // generation 0 is never sent: a zeroed entry matches nothing
    expect(tracker.slotOf(0b111)).toBe(-1); // slot 3 does not exist
    expect(tracker.describeStale(0b111)).toBe("command id 0x0007, which is not in flight");
    tracker.finish(2, 0, 0x80);
    expect(tracker.handOff(2)).toBeUndefined();
    expect(requests[2]!.error?.code).toBe("ERANGE");
    expect(tracker.inFlight).toBe(1);
    expect(tracker.take()).toBe(2);
    // The slot's next command goes out under its next generation: the old id stays stale.
    expect(tracker.track(2, request())).toBe(0b1010);
    expect(tracker.slotOf(cids[2]!)).toBe(-1);
    expect({ submitted: tracker.submitted, completed: tracker.completed }).toEqual({ submitted: 4, completed: 2 });
  });

  test("generations wrap past the largest without 0 or the id 0xFFFF", () => {
    // 64 slots: 6 slot bits, generations 1..1023; slot 63 at generation 1023 would be 0xFFFF.
    const tracker = new CommandTracker(64, false);
    const seen = new Set<number>();
    const r = request();
    for (let i = 0; i < 2100; i++) {
      const cid = tracker.track(63, r);
      expect(cid & 63).toBe(63);
      expect(cid >>> 6).toBeGreaterThan(0);
      expect(cid).toBeLessThan(0xffff);
      seen.add(cid);
      tracker.finish(63, 0, 0);
    }
    expect(seen.size).toBe(1022);
  });

  test("a freed id goes to the oldest waiter first; failAll fails in flight and waiting", () => {
    const tracker = new CommandTracker(1, false);
    const inFlight = request(1);
    tracker.track(tracker.take(), inFlight);
    const first = request(2);
    const second = request(3);
    tracker.wait(first);
    tracker.wait(second);
    expect(first.stateName).toBe("waiting for a free slot");
    expect(tracker.waiting).toBe(2);
    expect(tracker.finish(0, 0, 0)).toBe(inFlight);
    expect(tracker.handOff(0)).toBe(first);
    expect(tracker.take()).toBe(-1); // the id went to the waiter, not to the free stack
    tracker.track(0, first);
    const failed = tracker.failAll((name, detail) => new IommufdError({ operation: name, errno: 5, message: detail }));
    expect(failed).toEqual([first, second]);
    expect(second.error?.message).toBe("Read: namespace 1, LBA 3, 1 block(s) [EIO]");
    expect(first.stateName).toBe("failed and about to be called back");
    expect(tracker.inFlight).toBe(0);
    expect(tracker.waiting).toBe(0);
    expect(tracker.maxWaiting).toBe(2);
  });

  test("overdue names a command past its deadline", () => {
    const tracker = new CommandTracker(2, true);
    tracker.track(tracker.take(), request(0, 50, { opcode: AdminOpcode.Identify, cdw10: 1 }));
    // The first look stamps the deadline (no clock read per command); the next finds it past.
    const now = performance.now();
    expect(tracker.overdue(now)).toBeUndefined();
    expect(tracker.overdue(now + 40)).toBeUndefined();
    expect(tracker.overdue(now + 100)?.name).toBe("Identify");
  });
});

describe("PRPs", () => {
  const list = new Uint32Array(1024);
  const entry = (i: number) => list[2 * i]! + list[2 * i + 1]! * 2 ** 32;

  test("one page needs no PRP2; two pages put the second page in PRP2", () => {
    expect(prp2For(0x10000, 512, list, 0, 0x9000)).toBe(0);
    expect(prp2For(0x10000, 4096, list, 0, 0x9000)).toBe(0);
    expect(prp2For(0x10000, 8192, list, 0, 0x9000)).toBe(0x11000);
    // An offset into the first page: the rest of it, then one whole page.
    expect(prp2For(0x10800, 4096, list, 0, 0x9000)).toBe(0x11000);
  });

  test("more than two pages: PRP2 is the list, with every later page in order", () => {
    list.fill(0);
    expect(prp2For(0x1_0000_0000, 5 * 4096, list, 0, 0x9000)).toBe(0x9000);
    expect([0, 1, 2, 3].map(entry)).toEqual([0x1_0000_1000, 0x1_0000_2000, 0x1_0000_3000, 0x1_0000_4000]);
    expect(entry(4)).toBe(0);
  });

  test("the largest transfer fills one list page exactly, even from an offset", () => {
    list.fill(0);
    prp2For(0x200, MAX_PRP_TRANSFER, list, 0, 0x9000);
    expect(entry(511)).toBe(512 * 4096);
  });
});

describe("commands", () => {
  test("a Read entry has opcode, cid, nsid, PRPs, SLBA and a zero-based NLB in their dwords", () => {
    const sq = new Uint32Array(32);
    encodeCommand(sq, 1, 7, readWrite(IoOpcode.Read, 1, 2 ** 33 + 5, 8), 0x1_2345_6000, 0x7000);
    expect(Array.from(sq.subarray(16, 32))).toEqual([
      0x02 | (7 << 16),
      1,
      0,
      0,
      0,
      0,
      0x2345_6000,
      1,
      0x7000,
      0,
      5,
      2,
      7,
      0,
      0,
      0,
    ]);
  });

  test("names and descriptions follow the spec", () => {
    expect(commandName(true, AdminOpcode.CreateIoCompletionQueue)).toBe("Create I/O Completion Queue");
    expect(commandName(false, IoOpcode.Write)).toBe("Write");
    expect(commandName(false, 0x99)).toBe("I/O opcode 0x99");
    expect(describeCommand(false, readWrite(IoOpcode.Write, 2, 100, 3))).toBe("namespace 2, LBA 100, 3 block(s)");
  });
});

describe("Identify and CAP", () => {
  test("controller identity fields", () => {
    const bytes = new Uint8Array(4096);
    const view = new DataView(bytes.buffer);
    view.setUint16(0, 0x1b36, true);
    bytes.set(new TextEncoder().encode("deadbeef            "), 4);
    bytes.set(new TextEncoder().encode("QEMU NVMe Ctrl"), 24);
    bytes[77] = 7;
    view.setUint32(516, 256, true);
    expect(parseControllerIdentity(bytes)).toMatchObject({
      vendorId: 0x1b36,
      serial: "deadbeef",
      model: "QEMU NVMe Ctrl",
      mdts: 7,
      namespaceCount: 256,
    });
  });

  test("namespace size and the block size of the format in use", () => {
    const bytes = new Uint8Array(4096);
    const view = new DataView(bytes.buffer);
    view.setBigUint64(0, 131072n, true);
    bytes[26] = 1; // FLBAS: format 1
    bytes[128 + 2] = 9;
    bytes[132 + 2] = 12;
    expect(parseNamespaceIdentity(bytes)).toMatchObject({ size: 131072, blockSize: 4096 });
    view.setUint32(0, 1, true);
    view.setUint32(4, 3, true);
    expect(parseNamespaceList(bytes)).toEqual([1, 3]);
  });

  test("CAP: MQES, CQR, TO, DSTRD, MPSMIN, CMBS", () => {
    const caps = decodeCapabilities(0x0f0107ff, (1 << 25) | 0x0000_0002);
    expect(caps).toEqual({
      maxQueueEntries: 2048,
      contiguousQueuesRequired: true,
      timeoutMs: 7500,
      doorbellStride: 16,
      minPageSize: 4096,
      controllerMemoryBuffer: true,
    });
  });
});
