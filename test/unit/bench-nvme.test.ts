/** bench/nvme.ts's ratios: ours over each reference per workload and depth, the deep-queue rows included, one queue pair only. */
import { expect, test } from "bun:test";
import { type NvmeRaceRow, parseHybridRule, ratios } from "../../bench/nvme.ts";

function row(driver: NvmeRaceRow["driver"], queueDepth: number, iops: number, extra: Partial<NvmeRaceRow> = {}) {
  return {
    driver,
    mode: "polled",
    workload: "randread",
    queueDepth,
    iops,
    p50us: 1,
    p99us: 2,
    ops: iops,
    seconds: 1,
    cpuUsPerIo: 1,
    ...extra,
  } satisfies NvmeRaceRow;
}

test("deep-queue rows get ratios against the bare loops at their depth; rows spread over several queue pairs get none", () => {
  const rows: NvmeRaceRow[] = [
    row("bare-ts", 64, 1000),
    row("bare-c", 64, 2000),
    row("bun-iommufd", 64, 900, { api: "request" }),
    // 2 queue pairs x QD32: the same total depth, a different shape; compared with nothing.
    row("bun-iommufd", 64, 1500, { api: "request", queuePairs: 2 }),
    row("bare-ts", 1, 100),
    row("bun-iommufd", 1, 110, { api: "request-spin" }),
    row("bun-iommufd", 1, 90, { api: "promise" }),
  ];
  expect(ratios(rows)).toEqual([
    { mode: "polled", api: "request-spin", workload: "randread", queueDepth: 1, against: "bare-ts", ratio: 1.1 },
    { mode: "polled", api: "promise", workload: "randread", queueDepth: 1, against: "bare-ts", ratio: 0.9 },
    { mode: "polled", api: "request", workload: "randread", queueDepth: 64, against: "bare-ts", ratio: 0.9 },
    { mode: "polled", api: "request", workload: "randread", queueDepth: 64, against: "bare-c", ratio: 0.45 },
  ]);
});

test("--hybrid rules: pNNxM is a learned rule, fixedMS a fixed window; anything else is refused", () => {
  expect(parseHybridRule("p50x2")).toEqual({ label: "p50x2", spin: { percentile: 50, multiple: 2 } });
  expect(parseHybridRule("p90x1.25")).toEqual({ label: "p90x1.25", spin: { percentile: 90, multiple: 1.25 } });
  expect(parseHybridRule("fixed0.1")).toEqual({ label: "fixed0.1", spin: 0.1 });
  expect(parseHybridRule("fixed0.01+block1")).toEqual({ label: "fixed0.01+block1", spin: 0.01, blockMs: 1 });
  expect(parseHybridRule("p50x2+block2")).toEqual({
    label: "p50x2+block2",
    spin: { percentile: 50, multiple: 2 },
    blockMs: 2,
  });
  expect(parseHybridRule("default")).toEqual({ label: "default" });
  expect(parseHybridRule("p50x2max0.5+block1")).toEqual({
    label: "p50x2max0.5+block1",
    spin: { percentile: 50, multiple: 2, maxMs: 0.5 },
    blockMs: 1,
  });
  expect(() => parseHybridRule("median")).toThrow(/--hybrid: median is not/);
  expect(() => parseHybridRule("p50x2+blockX")).toThrow(/--hybrid: p50x2\+blockX is not/);
});
