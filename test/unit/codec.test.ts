import { describe, expect, test } from "bun:test";
import { getU64, IO, IOW, putU64, struct } from "../../src/uapi/codec.ts";

describe("struct codec", () => {
  const layout = struct(
    [
      ["size", "u32"],
      ["flag", "u16"],
      ["big", "u64"],
      ["fd", "s32"],
      ["bytes", "u8", 3],
    ],
    { cName: "struct example" },
  );

  test("offsets follow C's natural alignment and the size is padded to the largest member", () => {
    expect(layout.fieldList.map((f) => [f.name, f.offset])).toEqual([
      ["size", 0],
      ["flag", 4],
      ["big", 8],
      ["fd", 16],
      ["bytes", 20],
    ]);
    expect(layout.size).toBe(24);
  });

  test("u64 round trips numbers up to 2^53 without BigInt and any value as bigint", () => {
    const buf = layout.create();
    buf.set("big", 2 ** 53 - 1);
    expect(buf.get("big")).toBe(2 ** 53 - 1);
    expect(buf.getBig("big")).toBe(2n ** 53n - 1n);
    buf.set("big", 0xfedcba9876543210n);
    expect(buf.getBig("big")).toBe(0xfedcba9876543210n);
    buf.set("fd", -1);
    expect(buf.get("fd")).toBe(-1);
    buf.set("bytes", 7, 2);
    expect(buf.get("bytes", 2)).toBe(7);
  });

  test("putU64/getU64 (the hot paths' words) agree with DataView at every boundary of their fast paths", () => {
    const words = new Uint32Array(2);
    const view = new DataView(words.buffer);
    const numbers = [0, 1, 4096, 2 ** 24, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 4096, 2 ** 53 - 1];
    for (const value of numbers) {
      words.fill(0xdeadbeef);
      putU64(words, 0, value);
      expect(view.getBigUint64(0, true)).toBe(BigInt(value));
      expect(getU64(words, 0)).toBe(value);
    }
    for (const value of [2n ** 53n, 2n ** 63n + 5n, 2n ** 64n - 1n]) {
      putU64(words, 0, value);
      expect(view.getBigUint64(0, true)).toBe(value);
      expect(getU64(words, 0)).toBe(value);
    }
  });

  test("fill() zeroes what it does not set, so reserved fields never carry garbage", () => {
    const buf = layout.create();
    buf.bytes.fill(0xff);
    buf.fill({ size: layout.size });
    expect(buf.get("size")).toBe(24);
    expect(buf.get("flag")).toBe(0);
    expect(buf.getBig("big")).toBe(0n);
  });

  test("the buffer's address is stable and 8-byte aligned", () => {
    const buf = layout.create(40);
    expect(buf.address % 8).toBe(0);
    expect(buf.bytes.length).toBe(64);
  });

  test("word indices come from the layout: every 4-byte aligned field of 4 or 8 bytes, none other", () => {
    const layout = struct(
      [
        ["a", "u32"],
        ["b", "u16"],
        ["c", "u16"],
        ["d", "u64"],
        ["e", "u8"],
        ["f", "u32"],
      ],
      { cName: "struct t" },
    );
    expect(layout.words as Record<string, number>).toEqual({ a: 0, d: 2, f: 5 });
    const buffer = layout.create();
    buffer.u32[layout.words.f] = 7;
    expect(buffer.get("f")).toBe(7);
  });

  test("ioctl request encodings", () => {
    expect(IO(";", 0x80)).toBe(0x3b80);
    expect(IOW("u", 0x42, 24)).toBe(0x40187542);
  });
});
