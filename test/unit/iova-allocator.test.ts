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

describe("IovaAllocator against a page-by-page model", () => {
  // Every page of a small space is free or used in the model; after each random take, allocate or
  // release the allocator must agree on the free bytes and on the lowest fit it hands out.
  test("5,000 random takes, allocations and releases across three ranges", () => {
    const page = 4096;
    const ranges = [
      { start: 0, last: 64 * page - 1 },
      { start: 80 * page, last: 200 * page - 1 },
      { start: 256 * page, last: 300 * page - 1 },
    ];
    const usable = new Set<number>();
    for (const r of ranges) for (let p = Math.max(1, r.start / page); p <= r.last / page; p++) usable.add(p);
    const free = new Set(usable);
    const a = allocator(ranges);
    let seed = 7;
    const rand = (n: number) => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % n;
    };
    const live: { iova: number; length: number }[] = [];
    for (let step = 0; step < 5000; step++) {
      const pages = 1 + rand(6);
      const choice = rand(3);
      if (choice === 0 && live.length) {
        const [m] = live.splice(rand(live.length), 1);
        a.release(m!.iova, m!.length);
        for (let p = m!.iova / page; p < (m!.iova + m!.length) / page; p++) if (usable.has(p)) free.add(p);
      } else if (choice === 1) {
        // A fixed mapping the kernel accepted: only where every page is free in the model.
        const first = rand(310);
        const want = Array.from({ length: pages }, (_, i) => first + i);
        if (!want.every((p) => free.has(p))) continue;
        a.take(first * page, pages * page);
        for (const p of want) free.delete(p);
        live.push({ iova: first * page, length: pages * page });
      } else {
        let expected: number | undefined;
        for (let p = 1; p < 310 && expected === undefined; p++) {
          if (Array.from({ length: pages }, (_, i) => p + i).every((q) => free.has(q))) expected = p * page;
        }
        const got = a.allocate(pages * page);
        expect(got).toBe(expected);
        if (got === undefined) continue;
        for (let p = got / page; p < got / page + pages; p++) free.delete(p);
        live.push({ iova: got, length: pages * page });
      }
      expect(a.freeBytes).toBe(free.size * page);
    }
  });
});
