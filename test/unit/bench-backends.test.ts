/**
 * The backend comparison's machinery without a kernel (bench/switching.ts, bench/backends.ts):
 * sides that cannot be live at once never are, slices alternate, a round's ratio is the median of
 * its slice pairs, failures are reported and cleaned up, and the 5% verdict reads the interval.
 */
import { describe, expect, test } from "bun:test";
import { backendCases, verdict } from "../../bench/backends.ts";
import { roundRatio, runSwitched, type SwitchedCase, SWITCH_MODES, sliceOrder } from "../../bench/switching.ts";

const mode = { ...SWITCH_MODES.quick, rounds: 3, minMs: 6, slices: 3 };

/** Spin for `ns`: a side whose operation takes about that long. */
function spin(ns: number): () => void {
  return () => {
    const until = Bun.nanoseconds() + ns;
    while (Bun.nanoseconds() < until);
  };
}

/** Two sides sharing one device: opening one while the other is open throws, as EBUSY would. */
function exclusive(aNs: number, bNs: number) {
  const log: string[] = [];
  let live: string | undefined;
  const side = (name: string, ns: number) => ({
    name,
    open: () => {
      if (live) throw new Error(`${name} opened while ${live} is open`);
      live = name;
      log.push(`open ${name}`);
      return {
        op: spin(ns),
        close: () => {
          live = undefined;
          log.push(`close ${name}`);
        },
      };
    },
  });
  const spec: SwitchedCase = { id: "t/spin", title: "spin", k: 4, a: side("type1", aNs), b: side("iommufd", bNs) };
  return { spec, log, live: () => live };
}

describe("switched rounds", () => {
  test("the first side of each slice pair alternates within a round and from round to round", () => {
    expect([0, 1, 2].map((i) => sliceOrder(0, i).join())).toEqual(["a,b", "b,a", "a,b"]);
    expect([0, 1, 2].map((i) => sliceOrder(1, i).join())).toEqual(["b,a", "a,b", "b,a"]);
  });

  test("a round's ratio is the median of its slice pairs' a / b", () => {
    expect(
      roundRatio([
        { a: 2, b: 1 },
        { a: 9, b: 3 },
        { a: 1, b: 1 },
      ]),
    ).toBe(2);
    expect(
      roundRatio([
        { a: 1, b: 1 },
        { a: 3, b: 2 },
      ]),
    ).toBe(1.25);
  });

  test("one side open at a time, every slice opens and closes its own, ratios from the pairs", async () => {
    const { spec, log, live } = exclusive(80_000, 20_000);
    const r = await runSwitched(spec, mode, () => {});
    expect(r.errors).toEqual([]);
    expect(live()).toBeUndefined();
    const plan = r.plan!;
    // Two calibration sessions, then one per side per slice.
    expect(log.filter((l) => l.startsWith("open")).length).toBe(2 + 2 * plan.slices * mode.rounds);
    expect(log.filter((l) => l.startsWith("close")).length).toBe(log.filter((l) => l.startsWith("open")).length);
    expect(r.rounds.map((x) => x.order.join())).toEqual(["type1,iommufd", "iommufd,type1", "type1,iommufd"]);
    for (const round of r.rounds) {
      expect(round.slices.length).toBe(plan.slices);
      expect(round.ratio).toBe(roundRatio(round.slices.map((s) => ({ a: s.type1!, b: s.iommufd! }))));
      expect(round.fastRatio).toBeGreaterThan(1.5);
      expect(round.a.samples).toBe(plan.slices * plan.samplesPerSlice);
    }
    // type1 spins four times as long: the ratio is a / b, not b / a. Only the direction is asserted:
    // on a shared host a preempted spin moved a 2x pair's median to 3.7 once in about 25 runs.
    expect(r.ratio!.median).toBeGreaterThan(1.5);
    expect(r.fastRatio?.n).toBe(mode.rounds);
    expect(r.openMs.type1?.n).toBe(1 + plan.slices * mode.rounds);
  }, 30_000);

  test("a case with longSlices gets the mode's longSliceMs per slice, the same number of slices", async () => {
    // 15.6 us x k = 4 is 1/16 of the 1 ms sample target: log2 lands mid-way between roundings, so a
    // calibration up to 41% off (a loaded host) still plans the same sample size; 20 us flipped at +10%.
    const short = await runSwitched(exclusive(15_625, 15_625).spec, { ...mode, rounds: 1 }, () => {});
    const long = await runSwitched(
      { ...exclusive(15_625, 15_625).spec, longSlices: true },
      { ...mode, rounds: 1, longSliceMs: 16 },
      () => {},
    );
    // 6 ms over 3 slices against 16 ms a slice: about 8x the samples per slice (both round to whole samples), the sample size unchanged
    // (the short plan adds slices to reach 12 samples a round; the long one needs none).
    expect(long.plan!.opsPerSample).toBe(short.plan!.opsPerSample);
    expect(long.plan!.slices).toBe(mode.slices);
    expect(long.plan!.samplesPerSlice / short.plan!.samplesPerSlice).toBeGreaterThanOrEqual(4);
  }, 30_000);

  test("a side that fails to open is an error in the result, and nothing stays open", async () => {
    const { spec, live } = exclusive(10_000, 10_000);
    let opens = 0;
    const failing: SwitchedCase = {
      ...spec,
      b: {
        name: "iommufd",
        open: () => {
          // Fails on its second open: mid-run, after calibration.
          if (++opens === 2) throw new Error("EBUSY: the group holds the device");
          return spec.b.open();
        },
      },
    };
    const r = await runSwitched(failing, mode, () => {});
    expect(r.errors).toEqual(["EBUSY: the group holds the device"]);
    expect(r.ratio).toBeUndefined();
    expect(live()).toBeUndefined();
  }, 30_000);

  test("an operation that throws closes its session and ends the case with the error", async () => {
    let closed = 0;
    const spec: SwitchedCase = {
      id: "t/throw",
      title: "throw",
      k: 1,
      a: { name: "type1", open: () => ({ op: spin(1000), close: () => void closed++ }) },
      b: {
        name: "iommufd",
        open: () => ({
          op: () => {
            throw new Error("the bytes did not come back");
          },
          close: () => void closed++,
        }),
      },
    };
    const r = await runSwitched(spec, mode, () => {});
    expect(r.errors).toEqual(["the bytes did not come back"]);
    expect(closed).toBe(2);
  });
});

describe("the backend comparison's plan and verdict", () => {
  const all = { edu: "0000:00:03.0", nvme: "0000:00:04.0", type1: true, iommufd: true };
  test("edu DMA and NVMe QD1/QD32, type1 over iommufd, each NVMe case beside its iommufd-against-itself control", () => {
    const { cases, skipped } = backendCases(all);
    expect(cases.map((c) => c.id)).toEqual([
      "dma/edu/2KiB",
      "nvme/read/4KiB/qd1/poll",
      "nvme/read/4KiB/qd1/poll/control",
      "nvme/read/4KiB/qd32/poll",
      "nvme/read/4KiB/qd32/poll/control",
    ]);
    const sides = (c: (typeof cases)[number]) => `${c.a.name}/${c.b.name}`;
    expect(cases.filter((c) => !c.id.endsWith("/control")).every((c) => sides(c) === "type1/iommufd")).toBe(true);
    expect(cases.filter((c) => c.id.endsWith("/control")).every((c) => sides(c) === "iommufd/iommufd-again")).toBe(
      true,
    );
    // NVMe completes on QEMU's main loop: its slices are long; edu's 200 ms operation needs no such help.
    expect(cases.map((c) => c.longSlices ?? false)).toEqual([false, true, true, true, true]);
    expect(skipped).toEqual([]);
  });
  test("what the guest lacks is skipped with its reason; --filter narrows", () => {
    expect(backendCases({ ...all, nvme: undefined }).skipped.map((s) => s.reason)).toEqual([
      "no NVMe controller on vfio-pci",
      "no NVMe controller on vfio-pci",
      "no NVMe controller on vfio-pci",
      "no NVMe controller on vfio-pci",
    ]);
    expect(backendCases({ ...all, type1: false }).skipped[0]?.reason).toContain("/dev/vfio/vfio");
    expect(backendCases(all, /^dma/).cases.map((c) => c.id)).toEqual(["dma/edu/2KiB"]);
  });
  test("5%: the whole interval, the median alone, or neither", () => {
    const iv = (median: number, lo: number, hi: number) => ({ median, lo, hi, confidence: 0.99, n: 8 });
    expect(verdict(iv(1.01, 0.98, 1.04))).toBe("within 5% (whole interval)");
    expect(verdict(iv(1.03, 0.99, 1.09))).toBe("median within 5%, interval not");
    expect(verdict(iv(0.93, 0.9, 0.96))).toBe("NOT within 5%");
    expect(verdict(undefined)).toBe("no ratio");
  });
});
