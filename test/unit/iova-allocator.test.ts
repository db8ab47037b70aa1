/** The type1 container's own IOVA allocator: lowest fit inside the usable ranges, exact give-back. */
import { describe, expect, test } from "bun:test";
import { IovaAllocator } from "../../src/type1/iova-allocator.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

function allocator(
  ranges: { start: number | bigint; last: number | bigint }[],
  taken: { iova: number; length: number }[] = [],
) {
  const a = new IovaAllocator();
  a.reset(ranges, 4096, taken);
  return a;
}

describe("IovaAllocator", () => {
  test("hands out the lowest fit, never page 0, aligned to the page (2 MiB for 2 MiB and more)", () => {
    const a = allocator([{ start: 0, last: 0xfedfffff }]);
    expect(a.allocate(4 * KiB)).toBe(0x1000);
    expect(a.allocate(8 * KiB)).toBe(0x2000);
    expect(a.allocate(2 * MiB)).toBe(2 * MiB);
    expect(a.allocate(4 * KiB)).toBe(0x4000);
  });

  test("skips reserved holes between ranges and fixed mappings already taken", () => {
    const a = allocator(
      [
        { start: 0, last: 0x7fff },
        { start: 0x10000, last: 0xfffff },
      ],
      [{ iova: 0x10000, length: 0x4000 }],
    );
    expect(a.allocate(0x4000)).toBe(0x1000);
    expect(a.allocate(0x4000)).toBe(0x14000);
    a.take(0x18000, 0x1000);
    // 0x5000..0x7fff (12 KiB) is too small, 0x18000 is taken: the next fit is just past it.
    expect(a.allocate(0x4000)).toBe(0x19000);
    expect(a.allocate(0x3000)).toBe(0x5000);
  });

  test("release merges neighbours so a freed run serves a larger request again", () => {
    const a = allocator([{ start: 0, last: 0xffff }]);
    const x = a.allocate(0x4000)!;
    const y = a.allocate(0x4000)!;
    const z = a.allocate(0x4000)!;
    expect([x, y, z]).toEqual([0x1000, 0x5000, 0x9000]);
    expect(a.allocate(0x8000)).toBeUndefined();
    a.release(y, 0x4000);
    a.release(x, 0x4000);
    a.release(z, 0x4000);
    expect(a.freeBytes).toBe(0xf000);
    expect(a.allocate(0xf000)).toBe(0x1000);
  });

  test("never returns what lies outside the usable ranges, nor IOVAs above 2^53", () => {
    const a = allocator([{ start: 2n ** 60n, last: 2n ** 64n - 1n }]);
    expect(a.allocate(4096)).toBeUndefined();
    const b = allocator([{ start: 0x100000, last: 0x1fffff }]);
    b.release(0, 0x100000); // a fixed mapping below the ranges went away: nothing to give back
    expect(b.freeBytes).toBe(0x100000);
  });

  test("a full space says so; a range of exactly the right size fits", () => {
    const a = allocator([{ start: 0, last: 0x2fff }]);
    expect(a.allocate(0x2000)).toBe(0x1000);
    expect(a.allocate(0x1000)).toBeUndefined();
  });
});
