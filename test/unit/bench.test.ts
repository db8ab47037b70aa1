/**
 * The benchmark's machinery without a kernel: intervals, the regression rule, the smoke test's
 * failure conditions, results without host paths, the C side's build (rebuilt when a source
 * changes, an error without a compiler) and its descriptor hand-over.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { appendFileSync, closeSync, cpSync, mkdtempSync, openSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { innerInterval } from "../../bench/backends-pair.ts";
import { BaselineError, buildBaseline, CProcess } from "../../bench/baseline.ts";
import { plan, smokeProblems } from "../../bench/main.ts";
import { compare, hostPaths, scrubbed, type Results } from "../../bench/results.ts";
import {
  interval,
  planSlices,
  runCase,
  runInterleaved,
  runMode,
  type CaseResult,
  type Interval,
} from "../../bench/runner.ts";
import { dlopen, FFIType } from "bun:ffi";
import { type BenchCase, TIERS, type BenchEnv } from "../../bench/suite.ts";

const env: BenchEnv = {
  mock: true,
  edu: "0000:00:03.0",
  type1: true,
  hugeFree: 512 << 20,
  memAvailable: 3 * 2 ** 30,
  pagemap: true,
  vm: true,
  extra: {},
};

function iv(median: number, lo: number, hi: number): Interval {
  return { median, lo, hi, confidence: 0.97, n: 6 };
}

function caseResult(id: string, ratio: Interval | undefined, extra: Partial<CaseResult> = {}): CaseResult {
  return {
    id,
    suite: "map",
    title: id,
    k: 1,
    tier: "default",
    tracked: true,
    cPlanned: true,
    refPlanned: false,
    rounds: [],
    lib: iv(100, 90, 110),
    c: iv(80, 75, 85),
    ratio,
    warmupOps: {},
    errors: [],
    ...extra,
  };
}

function results(cases: CaseResult[]): Results {
  return { cases } as unknown as Results;
}

describe("interval of the median", () => {
  test("6 rounds: min..max, 97% coverage", () => {
    const i = interval([5, 1, 4, 2, 6, 3])!;
    expect([i.median, i.lo, i.hi]).toEqual([3.5, 1, 6]);
    expect(i.confidence).toBeCloseTo(1 - 2 / 64, 6);
  });
  test("10 rounds: min..max, 99.8%", () => {
    const i = interval([10, 1, 9, 2, 8, 3, 7, 4, 6, 5])!;
    expect([i.median, i.lo, i.hi]).toEqual([5.5, 1, 10]);
    expect(i.confidence).toBeCloseTo(1 - 2 / 1024, 6);
  });
  test("no rounds, no interval", () => expect(interval([])).toBeUndefined());
  test("backends-pair's inner interval: the narrowest order statistics covering the median with 95%", () => {
    const i = innerInterval([10, 1, 9, 2, 8, 3, 7, 4, 6, 5]);
    expect([i.median, i.lo, i.hi]).toEqual([5.5, 2, 9]);
    expect(i.confidence).toBeCloseTo(1 - (2 * 11) / 1024, 9);
    const twenty = innerInterval(Array.from({ length: 20 }, (_, j) => j + 1));
    expect([twenty.lo, twenty.hi]).toEqual([6, 15]);
    expect(twenty.confidence).toBeCloseTo(1 - (2 * (1 + 20 + 190 + 1140 + 4845 + 15504)) / 2 ** 20, 9);
  });
});

describe("slices of a round", () => {
  const mode = runMode("default");
  test("a fast op is batched to about 1 ms a sample and 12 ms a slice", () => {
    // 1 us an op, 32 ops an iteration: 32 iterations (the power of two nearest 31) a sample, 12 a slice.
    expect(planSlices(1000, 32, mode)).toEqual({ opsPerSample: 1024, samplesPerSlice: 12, slices: 10 });
  });
  test("an op longer than a slice gets one sample a slice and at least 12 slices", () => {
    expect(planSlices(40e6, 1, mode)).toEqual({ opsPerSample: 1, samplesPerSlice: 1, slices: 12 });
  });
  test("a sample is never less than one iteration of k ops", () => {
    const p = planSlices(100e3, 128, mode);
    expect(p.opsPerSample).toBe(128);
    expect(p.samplesPerSlice * p.slices).toBeGreaterThanOrEqual(12);
  });
});

describe("regressions only when the intervals part", () => {
  test("overlapping intervals: nothing flagged, whatever the medians", () => {
    const then = results([caseResult("a", iv(1.1, 1.0, 1.3))]);
    const now = results([caseResult("a", iv(1.3, 1.2, 1.4))]);
    expect(compare(now, then)).toEqual([]);
  });
  test("apart by less than the threshold: nothing flagged", () => {
    const then = results([caseResult("a", iv(1.1, 1.0, 1.2))]);
    const now = results([caseResult("a", iv(1.25, 1.22, 1.3))]);
    expect(compare(now, then, 0.05)).toEqual([]);
  });
  test("apart by more: a regression, with the C side's change beside it", () => {
    const then = results([caseResult("a", iv(1.1, 1.0, 1.2))]);
    const now = results([caseResult("a", iv(1.4, 1.3, 1.5), { c: iv(160, 150, 170) })]);
    const [change] = compare(now, then, 0.05);
    expect(change?.kind).toBe("regression");
    expect(change?.cChange).toBeCloseTo(2, 6);
    expect(change?.text).toContain("C itself +100.0%");
  });
  test("better by more: an improvement, not a regression", () => {
    const then = results([caseResult("a", iv(1.4, 1.3, 1.5))]);
    const now = results([caseResult("a", iv(1.0, 0.9, 1.1))]);
    expect(compare(now, then).map((c) => c.kind)).toEqual(["improvement"]);
  });
  test("untracked cases are not compared", () => {
    const then = results([caseResult("a", iv(1.1, 1.0, 1.2), { tracked: false })]);
    const now = results([caseResult("a", iv(2, 1.9, 2.1), { tracked: false })]);
    expect(compare(now, then)).toEqual([]);
  });
  test("a lower speedup is a regression", () => {
    const ref = { cPlanned: false, refPlanned: true, c: undefined };
    const then = results([caseResult("h", undefined, { ...ref, speedup: iv(20, 18, 22) })]);
    const now = results([caseResult("h", undefined, { ...ref, speedup: iv(10, 9, 11) })]);
    expect(compare(now, then).map((c) => [c.kind, c.metric])).toEqual([["regression", "speedup"]]);
  });
});

describe("the smoke test fails", () => {
  const good = caseResult("a", iv(1.1, 1, 1.2));
  const hostJs = { mapFile: 40, map: 41, copy: 42, prepared: 3, pairs: 1, repeats: 1 };
  test("passes when every planned case has both sides and a ratio", () => {
    expect(smokeProblems({ planned: ["a"], cases: [good], skipped: [], hostJs }, true)).toEqual([]);
  });
  test("when a planned case did not report", () => {
    expect(smokeProblems({ planned: ["a", "b"], cases: [good], skipped: [], hostJs }, false)).toEqual([
      "b: planned but did not report",
    ]);
  });
  test("when a case has no C figure or ratio", () => {
    const noC = caseResult("a", undefined, { c: undefined });
    expect(smokeProblems({ planned: ["a"], cases: [noC], skipped: [], hostJs }, false)).toEqual([
      "a: no C figure",
      "a: no ratio",
    ]);
  });
  test("when a case skipped under CI, not outside it", () => {
    const skipped = [{ id: "b", reason: "no mock domain" }];
    expect(smokeProblems({ planned: ["a"], cases: [good], skipped, hostJs }, true)).toHaveLength(1);
    expect(smokeProblems({ planned: ["a"], cases: [good], skipped, hostJs }, false)).toEqual([]);
  });
  test("when the host JS cost per pair is missing, NaN or not above zero", () => {
    expect(smokeProblems({ planned: ["a"], cases: [good], skipped: [] }, false)).toHaveLength(4);
    const broken = { ...hostJs, map: Number.NaN, prepared: 0 };
    expect(smokeProblems({ planned: ["a"], cases: [good], skipped: [], hostJs: broken }, false)).toEqual([
      "host JS per pair, map: NaN",
      "host JS per pair, prepared: 0",
    ]);
  });
  test("when a figure is NaN, Infinity, zero or negative, at its median or either end", () => {
    const bad: [string, Partial<CaseResult>, string][] = [
      ["NaN ratio", { ratio: iv(Number.NaN, 1, 1.2) }, "a: ratio is NaN (1..1.2)"],
      ["infinite ratio end", { ratio: iv(1.1, 1, Number.POSITIVE_INFINITY) }, "a: ratio is 1.1 (1..Infinity)"],
      ["zero C time", { c: iv(0, 0, 0) }, "a: C figure is 0 (0..0)"],
      ["negative library time", { lib: iv(-5, -6, 1) }, "a: library figure is -5 (-6..1)"],
      [
        "NaN speedup",
        { refPlanned: true, speedup: iv(Number.NaN, Number.NaN, Number.NaN) },
        "a: speedup is NaN (NaN..NaN)",
      ],
    ];
    for (const [, extra, problem] of bad) {
      const c = caseResult("a", extra.ratio ?? iv(1.1, 1, 1.2), extra);
      expect(smokeProblems({ planned: ["a"], cases: [c], skipped: [], hostJs }, false)).toEqual([problem]);
    }
  });
  test("when nothing was planned", () => {
    expect(smokeProblems({ planned: [], cases: [], skipped: [], hostJs }, false)).toEqual(["no case was planned"]);
  });
});

describe("plan", () => {
  test("ids are unique and every tier is a superset of the one below", () => {
    const ids = TIERS.map((t) => plan(env, t).cases.map((c) => c.id));
    for (const list of ids) expect(new Set(list).size).toBe(list.length);
    expect(ids[0]!.every((id) => ids[1]!.includes(id))).toBe(true);
    expect(ids[1]!.every((id) => ids[2]!.includes(id))).toBe(true);
  });
  test("quick has a C side in every map case and a C op of each kind", () => {
    const quick = plan(env, "quick").cases;
    expect(quick.filter((c) => c.suite === "map").every((c) => c.c)).toBe(true);
    for (const op of ["mapFile/", "map/", "copy/", "prepared/", "rawFfi/", "heap/", "allocator/", "map/edu-type1/"]) {
      expect(quick.some((c) => c.id.startsWith(op))).toBe(true);
    }
  });
  test("the edu cases a user tracks have type1 twins, with a C side", () => {
    const ids = plan(env, "default").cases.filter((c) => c.id.includes("/edu-type1/"));
    expect(ids.map((c) => c.id)).toEqual(["map/edu-type1/4KiB", "map/edu-type1/2MiB/huge"]);
    expect(ids.every((c) => c.c && c.tracked)).toBe(true);
  });
  test("without a type1 container its cases are skipped, saying which option is missing", () => {
    const { cases, skipped } = plan({ ...env, type1: false }, "quick");
    expect(cases.some((c) => c.id.includes("edu-type1"))).toBe(false);
    expect(skipped.find((s) => s.id === "map/edu-type1/4KiB")?.reason).toContain("CONFIG_VFIO_CONTAINER");
  });
  test("a case this machine cannot run is skipped with its reason", () => {
    const { cases, skipped } = plan({ ...env, mock: false, edu: undefined, hugeFree: 0 }, "default");
    expect(cases.some((c) => /\/(mock|edu|edu-type1)\//.test(c.id))).toBe(false);
    expect(skipped.find((s) => s.id === "mapFile/mock/2MiB/huge")?.reason).toContain("CONFIG_IOMMUFD_TEST");
  });
});

describe("results files", () => {
  test("carry no host paths", () => {
    const r = { note: `${join(import.meta.dir, "..", "..")}/bench/x`, tmp: join(tmpdir(), "y") } as unknown as Results;
    const text = JSON.stringify(scrubbed(r));
    expect(hostPaths(text)).toEqual([]);
    expect(hostPaths('{"a":"/root/.cache/x"}')).toEqual(["/root/.cache/x"]);
  });
});

describe("the C side", () => {
  const sources = join(import.meta.dir, "..", "..", "bench", "baseline");
  const made: string[] = [];
  afterAll(() => {
    for (const dir of made) rmSync(dir, { recursive: true, force: true });
  });
  let shared: string | undefined;
  /** One build for the tests that only need a binary. */
  function built(): string {
    shared ??= (() => {
      const dir = copy();
      return buildBaseline({ sourceDir: dir, buildDir: join(dir, "build") }).binary;
    })();
    return shared;
  }
  function copy(): string {
    const dir = mkdtempSync(join(tmpdir(), "cbench-src-"));
    made.push(dir);
    for (const f of readdirSync(sources)) if (/\.[ch]$/.test(f)) cpSync(join(sources, f), join(dir, f));
    return dir;
  }

  test("is rebuilt when a source changes, reused otherwise", () => {
    const dir = copy();
    const build = { sourceDir: dir, buildDir: join(dir, "build") };
    expect(buildBaseline(build).how).toBe("built");
    expect(buildBaseline(build).how).toBe("reused");
    appendFileSync(join(dir, "bench.h"), "\n/* changed */\n");
    expect(buildBaseline(build).how).toBe("built");
  }, 60_000);

  test("without a compiler is an error, not an old binary", () => {
    const dir = copy();
    buildBaseline({ sourceDir: dir, buildDir: join(dir, "build") });
    expect(() => buildBaseline({ sourceDir: dir, buildDir: join(dir, "build"), path: "/nonexistent" })).toThrow(
      BaselineError,
    );
  }, 60_000);

  test("receives the library side's descriptors and reports what the kernel said", async () => {
    const binary = built();
    const fd = openSync("/dev/null", "r");
    try {
      // Two descriptors handed over: set-up succeeds; MAP_FILE on /dev/null is ENOTTY.
      const c = await CProcess.start(binary, { op: "map_file", fds: [fd, fd], args: [1, 4096, 1 << 24] });
      await expect(c.warmUp(10, 0, 100)).rejects.toThrow(/errno 25/);
      await c.close();
      // One missing: the C side says which.
      await expect(CProcess.start(binary, { op: "map_file", fds: [fd], args: [1, 4096, 1 << 24] })).rejects.toThrow(
        /fd 4/,
      );
      await expect(CProcess.start(binary, { op: "nonsense", fds: [], args: [] })).rejects.toThrow(
        /no op named nonsense/,
      );
    } finally {
      closeSync(fd);
    }
  }, 60_000);

  test("a slice outside 1..4096 samples of at least 1 op is refused by name", async () => {
    const c = await CProcess.start(built(), { op: "syscall_getppid", fds: [], args: [] });
    try {
      await expect(c.slice(0, 1)).rejects.toThrow(/slice wants 1\.\.4096 samples of at least 1 op/);
      await expect(c.slice(4097, 1)).rejects.toThrow(/slice wants/);
      await expect(c.slice(3, 0)).rejects.toThrow(/slice wants/);
      // The process is still there and answers a good slice with one time per sample.
      expect((await c.slice(3, 8)).length).toBe(3);
    } finally {
      await c.close();
    }
  }, 60_000);

  test("runs paired rounds: sides alternate, one ratio per round", async () => {
    const binary = built();
    const { symbols, close } = dlopen("libc.so.6", { getppid: { args: [], returns: FFIType.i32 } });
    let closed = false;
    const spec: BenchCase = {
      id: "selftest/getppid",
      suite: "selftest",
      title: "getppid",
      k: 16,
      tier: "quick",
      tracked: true,
      c: true,
      setup: () => ({
        lib: () => symbols.getppid(),
        c: { op: "syscall_getppid", fds: [], args: [] },
        close: () => {
          closed = true;
        },
      }),
    };
    const mode = { ...runMode("quick"), rounds: 4, minMs: 5 };
    const r = await runCase(spec, { env, mode, cBinary: binary, log: () => {} }, false);
    close();
    expect(r.errors).toEqual([]);
    expect(closed).toBe(true);
    expect(r.rounds.map((x) => x.order.join(","))).toEqual(["c,lib", "lib,c", "c,lib", "lib,c"]);
    const plan = r.plan!;
    expect(plan.slices).toBeGreaterThanOrEqual(mode.slices);
    expect(plan.opsPerSample % spec.k).toBe(0);
    for (const round of r.rounds) {
      // Every slice has both sides; the round's ratio is the median of the slice pairs' ratios.
      expect(round.slices.length).toBe(plan.slices);
      const ratios = round.slices.map((x) => x.lib! / x.c!).sort((a, b) => a - b);
      const mid = ratios.length >> 1;
      expect(round.ratio).toBeCloseTo(ratios.length % 2 ? ratios[mid]! : (ratios[mid - 1]! + ratios[mid]!) / 2, 9);
      expect(round.c!.samples).toBe(plan.slices * plan.samplesPerSlice);
      expect(round.lib.samples).toBe(plan.slices * plan.samplesPerSlice);
      expect(round.lib.ticks).toBe(round.lib.samples * plan.opsPerSample);
    }
    expect(r.ratio?.n).toBe(4);
    expect(r.ratio!.lo).toBeLessThanOrEqual(r.ratio!.median);
    expect(r.ratio!.median).toBeLessThanOrEqual(r.ratio!.hi);
    expect(r.warmupOps.c).toBeGreaterThan(0);
  }, 60_000);

  test("interleaved cases take turns round by round, report in plan order, and one failing stops no other", async () => {
    const binary = built();
    // Which case ran when: a lib op appends its case's letter unless the last op was its own.
    const timeline: string[] = [];
    const opened: string[] = [];
    const closed: string[] = [];
    const spec = (name: string, broken = false): BenchCase => ({
      id: `selftest/${name}`,
      suite: "selftest",
      title: name,
      k: 1,
      tier: "quick",
      tracked: true,
      c: true,
      interleave: true,
      setup: () => {
        opened.push(name);
        if (broken) throw new Error(`${name} cannot be set up`);
        return {
          lib: () => {
            if (timeline.at(-1) !== name) timeline.push(name);
          },
          c: { op: "syscall_getppid", fds: [], args: [] },
          close: () => closed.push(name),
        };
      },
    });
    const lines: string[] = [];
    const mode = { ...runMode("quick"), rounds: 4, minMs: 2 };
    const results = await runInterleaved(
      [spec("a"), spec("b", true), spec("c")],
      { env, mode, cBinary: binary, log: (l) => lines.push(l) },
      false,
    );
    expect(results.map((r) => r.id)).toEqual(["selftest/a", "selftest/b", "selftest/c"]);
    expect(opened).toEqual(["a", "b", "c"]);
    expect(closed).toEqual(["a", "c"]);
    expect(results[1]!.errors.join()).toContain("b cannot be set up");
    for (const r of [results[0]!, results[2]!]) {
      expect(r.errors).toEqual([]);
      expect(r.rounds).toHaveLength(4);
    }
    // Runs of one case's ops in order: a and c warmed up (a, c), then round 0 a, c; round 1 c, a;
    // round 2 a, c; round 3 c, a. Consecutive runs of one case merge: "ac" + "ac" + "a" + "c" + "a".
    // Case by case it would be "acac"; without the reversal "acacacacac".
    expect(timeline.join("")).toBe("acacaca");
    // A line per case, in plan order, once all rounds are done.
    expect(lines.filter((l) => l.includes("selftest/")).map((l) => l.trim().split(" ")[0])).toEqual([
      "selftest/b",
      "selftest/a",
      "selftest/c",
    ]);
  }, 60_000);

  test("a case whose C side fails reports the error, closes, and fails the smoke test", async () => {
    const binary = built();
    let closed = false;
    const spec: BenchCase = {
      id: "selftest/broken",
      suite: "selftest",
      title: "broken",
      k: 1,
      tier: "quick",
      tracked: true,
      c: true,
      setup: () => ({
        lib: () => 0,
        c: { op: "no_such_op", fds: [], args: [] },
        close: () => {
          closed = true;
        },
      }),
    };
    const r = await runCase(
      spec,
      { env, mode: { ...runMode("quick"), minMs: 5 }, cBinary: binary, log: () => {} },
      false,
    );
    expect(closed).toBe(true);
    expect(r.errors.join()).toContain("no op named no_such_op");
    expect(smokeProblems({ planned: [spec.id], cases: [r], skipped: [] }, false).length).toBeGreaterThan(0);
  }, 60_000);
});
