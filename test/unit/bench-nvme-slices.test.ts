/** bench/nvme-slices.ts's round logic, without a controller: the order of the sides and the per-round ratios. */
import { expect, test } from "bun:test";
import { roundRatios, SIDES, sliceOrder } from "../../bench/nvme-slices.ts";

test("the sides run in the given order in even rounds and reversed in odd ones", () => {
  expect(sliceOrder(SIDES, 0)).toEqual(["bare-ts", "bare-c", "request-spin", "request", "interrupt", "hybrid"]);
  expect(sliceOrder(SIDES, 1)).toEqual(["hybrid", "interrupt", "request", "request-spin", "bare-c", "bare-ts"]);
  expect(sliceOrder(SIDES, 2)).toEqual(SIDES);
  // over two rounds every side's mean position is the same: no side always runs first
  const mean = (side: string) =>
    (sliceOrder(SIDES, 0).indexOf(side as never) + sliceOrder(SIDES, 1).indexOf(side as never)) / 2;
  expect(new Set(SIDES.map(mean))).toEqual(new Set([2.5]));
});

test("a ratio is taken within a round, never across rounds; empty rounds are left out", () => {
  expect(roundRatios([10, 20, 30], [5, 40, 30])).toEqual([2, 0.5, 1]);
  expect(roundRatios([10, 0, 30], [5, 40, 0])).toEqual([2]);
  expect(roundRatios([10, 20], [5])).toEqual([2]);
});
