/**
 * The driver's per-command u64 arithmetic (PRP1/PRP2, the starting LBA, PRP list entries) at the
 * boundaries of its integer fast paths: 2^31 (the last int32), 2^32 (the first value with a high
 * dword) and above, each checked against BigInt.
 */
import { describe, expect, test } from "bun:test";
import { encodeCommand, high32, IoOpcode, readWrite } from "../../src/nvme/commands.ts";
import type { DataBuffer } from "../../src/nvme/data-buffer.ts";
import { Namespace } from "../../src/nvme/namespace.ts";
import { PRP_LIST_ENTRIES, prp2For } from "../../src/nvme/prp.ts";
import { NvmeRequest, type RequestQueue } from "../../src/nvme/request.ts";

const P31 = 2 ** 31;
const P32 = 2 ** 32;
/** Every side of both boundaries, and far above them. */
const VALUES = [
  0,
  1,
  4096,
  P31 - 4096,
  P31 - 1,
  P31,
  P31 + 1,
  P31 + 4096,
  P32 - 4096,
  P32 - 1,
  P32,
  P32 + 1,
  P32 + 4096,
  2 ** 33 + 5,
  2 ** 52 + 4096,
  Number.MAX_SAFE_INTEGER,
];
const lowOf = (value: number) => Number(BigInt(value) & 0xffff_ffffn);
const highOf = (value: number) => Number(BigInt(value) >> 32n);

test("high32 is the upper dword of every value, 0 through 2^32 - 1", () => {
  for (const value of VALUES) expect([value, high32(value)]).toEqual([value, highOf(value)]);
});

test("an entry's PRP1 and PRP2 dwords hold both halves of each address", () => {
  const sq = new Uint32Array(16);
  for (const prp1 of VALUES) {
    const prp2 = VALUES[VALUES.length - 1 - VALUES.indexOf(prp1)]!;
    encodeCommand(sq, 0, 1, readWrite(IoOpcode.Read, 1, 0, 1), prp1, prp2);
    expect([prp1, prp2, ...sq.subarray(6, 10)]).toEqual([
      prp1,
      prp2,
      lowOf(prp1),
      highOf(prp1),
      lowOf(prp2),
      highOf(prp2),
    ]);
  }
});

describe("the starting LBA in CDW10 (low) and CDW11 (high)", () => {
  test("readWrite, the promise API's builder", () => {
    for (const lba of VALUES) {
      const command = readWrite(IoOpcode.Write, 1, lba, 8);
      expect([lba, command.cdw10, command.cdw11]).toEqual([lba, lowOf(lba), highOf(lba)]);
    }
  });

  test("Namespace.submitRead, the request API's", () => {
    const sent: number[][] = [];
    const queue: RequestQueue = { id: 1, issue: (r) => sent.push([r.cdw10, r.cdw11, r.iova]) };
    const owner = {
      ioQueue: undefined as never,
      commandTimeoutMs: 1000,
      maxTransferBytes: 1 << 20,
      dataIova: (buffer: DataBuffer, offset: number) => (buffer as unknown as { iova: number }).iova + offset,
    };
    const ns = new Namespace(owner, 1, { size: 2 ** 40, capacity: 2 ** 40, blockSize: 512, metadataSize: 0 } as never);
    const request = new NvmeRequest(queue, () => {}, 1000);
    const buffer = { iova: 0x20_0000 } as unknown as DataBuffer;
    for (const lba of VALUES) ns.submitRead(request, lba, 8, buffer);
    expect(sent).toEqual(VALUES.map((lba) => [lowOf(lba), highOf(lba), 0x20_0000]));
  });
});

describe("PRP lists across 2^31 and 2^32", () => {
  const list = new Uint32Array(2 * PRP_LIST_ENTRIES);
  /** The list's entries as BigInts, and what they should be: every page after the first, in order. */
  const check = (iova: number, length: number) => {
    list.fill(0xdead_beef);
    expect(prp2For(iova, length, list, 0, 0x9000)).toBe(0x9000);
    const firstPage = 4096 - (iova % 4096);
    const pages = Math.ceil((length - firstPage) / 4096);
    const entries = Array.from({ length: pages }, (_, i) => BigInt(list[2 * i]!) | (BigInt(list[2 * i + 1]!) << 32n));
    const expected = Array.from({ length: pages }, (_, i) => BigInt(iova + firstPage) + BigInt(i * 4096));
    expect(entries).toEqual(expected);
    // Nothing past the last entry is written.
    expect(list[2 * pages]).toBe(0xdead_beef);
  };

  test("pages that step over 2^31, 2^32 and 2^33, from aligned and unaligned starts", () => {
    for (const boundary of [P31, P32, 2 ** 33, 2 ** 52]) {
      check(boundary - 3 * 4096, 8 * 4096);
      check(boundary - 3 * 4096 + 0x200, 8 * 4096 - 0x100);
      check(boundary, 5 * 4096 + 1);
    }
  });

  test("a second page at 2^31 or 2^32 is PRP2 itself", () => {
    expect(prp2For(P31 - 4096, 8192, list, 0, 0x9000)).toBe(P31);
    expect(prp2For(P32 - 4096 + 0x800, 4096, list, 0, 0x9000)).toBe(P32);
  });
});
