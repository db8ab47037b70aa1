/**
 * type1 against iommufd for the NVMe driver, with two controllers open at once so that the two
 * backends can alternate every few milliseconds without reopening anything:
 *
 *   bun bench backends-pair [--quick] [--rounds N] [--slice-ms MS] [--pairs N]
 *
 * Where /dev/iommu is missing it boots the test guest (1 vCPU) with two 64 MiB NVMe controllers;
 * QD1 and QD32 polled 4 KiB random reads. Saved as bench/results/backends/<date>-<commit>-pair.json
 * (quick runs: the scratch dir).
 *
 * Why: `bun bench backends` switches one controller between the backends, so a slice must reopen
 * it (tens of milliseconds of bring-up) and slices are long; the QEMU NVMe model completes I/O on
 * its main loop, whose share of the host against the vCPU thread moves the rate by +-30% from
 * one long slice to the next, and that drift is in every ratio. Here controller A goes through
 * one backend and controller B through the other, both open for the whole block, the two taking
 * turns slice by slice (order alternating), so the slow drift hits both sides alike.
 *
 * The two controllers are not identical (their place on the bus, their image files), so each
 * round runs three blocks: X (A type1, B iommufd), Y (A iommufd, B type1) and C (both iommufd,
 * the control). With r = time per I/O of A / time per I/O of B in a block, the controller asymmetry
 * cancels in type1/iommufd = sqrt(r_X / r_Y); the control's r_C / sqrt(r_X * r_Y) is the method's
 * own error (1 when A against B is the same in every block).
 */
import { existsSync, writeFileSync } from "node:fs";
import { loadavg } from "node:os";
import { join, resolve } from "node:path";
import type { DmaBackend } from "../src/index.ts";
import { GOAL, git, measureInGuest, saveRun, verdict } from "./backends.ts";
import { fmtInterval, machine, scratchDir } from "./results.ts";
import { type Interval, interval, median } from "./runner.ts";
import { openNvmeWorkload } from "./suites/nvme.ts";

const root = resolve(import.meta.dir, "..");
const OUT_FILE = "backends-pair.json";
const DEPTHS = [1, 32];

interface Options {
  rounds: number;
  sliceMs: number;
  pairs: number;
  quick: boolean;
}

function parse(argv: string[]): Options {
  const o: Options = { rounds: 10, sliceMs: 20, pairs: 30, quick: false };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--child") continue;
    if (argv[i] === "--quick") {
      Object.assign(o, { quick: true, rounds: 2, pairs: 4 });
      continue;
    }
    const key = ({ "--rounds": "rounds", "--slice-ms": "sliceMs", "--pairs": "pairs" } as const)[
      argv[i] as "--rounds" | "--slice-ms" | "--pairs"
    ];
    const value = Number(argv[i + 1]);
    if (!key || !Number.isInteger(value) || value <= 0) {
      throw new Error(
        `bad argument ${argv[i]} ${argv[i + 1] ?? ""} (bun bench backends-pair [--quick] [--rounds N] [--slice-ms MS] [--pairs N])`,
      );
    }
    o[key] = value;
    i++;
  }
  return o;
}

interface Round {
  x: number;
  y: number;
  c: number;
  type1: number;
  control: number;
  /** I/Os per second of the control block (both controllers, iommufd). */
  iops: number;
}

interface DepthResult {
  depth: number;
  rounds: Round[];
  /** type1/iommufd: median [min..max] over the rounds of sqrt(r_X / r_Y). */
  type1: Interval;
  /** The same median with the narrowest order-statistic interval of at least 95% (innerInterval). */
  type1Inner: Interval;
  /** The control: r_C / sqrt(r_X r_Y), 1 when A against B is the same in every block. */
  control: Interval;
  controlInner: Interval;
}

/**
 * The narrowest interval of order statistics around the median that covers it with at least 95%
 * (no distribution assumed): the k-th lowest..k-th highest of n values covers it with
 * 1 - 2 P(Binomial(n, 1/2) < k). For 10 rounds that is the 2nd..9th (97.9%), for 20 the 6th..15th
 * (95.9%); min..max (99.8% for 10) lets one stray round decide.
 */
export function innerInterval(values: number[]): Interval {
  const s = [...values].sort((a, b) => a - b);
  const n = s.length;
  const coverage = (k: number) => {
    // P(Binomial(n, 1/2) < k)
    let tail = 0;
    let term = 1 / 2 ** n;
    for (let i = 0; i < k; i++) {
      tail += term;
      term = (term * (n - i)) / (i + 1);
    }
    return 1 - 2 * tail;
  };
  let k = 1;
  while (2 * (k + 1) <= n && coverage(k + 1) >= 0.95) k++;
  return {
    median: median(s),
    lo: s[k - 1]!,
    hi: s[n - k]!,
    confidence: n < 2 ? 0 : coverage(k),
    n,
  };
}

/** The NVMe controllers on vfio-pci in this guest, as vm/run.ts lists them. */
function controllers(): string[] {
  const listed = process.env.IOMMUFD_VM_NVME ?? "";
  return listed
    .split(",")
    .map((entry) => entry.split("=")[0]!)
    .filter(Boolean);
}

type Op = () => unknown;

/** I/Os done in one slice of `ms`, and the time they took (ns per I/O). */
async function slice(op: Op, ms: number, depth: number): Promise<number> {
  const t0 = Bun.nanoseconds();
  const until = t0 + ms * 1e6;
  let ops = 0;
  let now = t0;
  while (now < until) {
    await op();
    ops++;
    now = Bun.nanoseconds();
  }
  return (now - t0) / (ops * depth);
}

/** One block: A and B open on their backends, `pairs` slice pairs; r = median of A/B per pair. */
async function block(
  addresses: [string, string],
  backends: [DmaBackend, DmaBackend],
  depth: number,
  o: Options,
): Promise<{ r: number; a: number; b: number }> {
  const a = openNvmeWorkload(addresses[0], "read", depth, "poll", backends[0]);
  try {
    const b = openNvmeWorkload(addresses[1], "read", depth, "poll", backends[1]);
    try {
      for (let i = 0; i < 20; i++) {
        await a.op();
        await b.op();
      }
      const ratios: number[] = [];
      const aTimes: number[] = [];
      const bTimes: number[] = [];
      for (let p = 0; p < o.pairs; p++) {
        // Alternate the order so that neither side always runs first.
        let ta: number;
        let tb: number;
        if (p % 2 === 0) {
          ta = await slice(a.op, o.sliceMs, depth);
          tb = await slice(b.op, o.sliceMs, depth);
        } else {
          tb = await slice(b.op, o.sliceMs, depth);
          ta = await slice(a.op, o.sliceMs, depth);
        }
        ratios.push(ta / tb);
        aTimes.push(ta);
        bTimes.push(tb);
      }
      return { r: median(ratios), a: median(aTimes), b: median(bTimes) };
    } finally {
      await b.close();
    }
  } finally {
    await a.close();
  }
}

async function measureDepth(pair: [string, string], depth: number, o: Options): Promise<DepthResult> {
  const rounds: Round[] = [];
  for (let round = 0; round < o.rounds; round++) {
    // The blocks' order turns round by round, so that none always runs first or last.
    const order = (["x", "y", "c"] as const).map((_, i, all) => all[(i + round) % 3]!);
    const r = { x: 0, y: 0, c: 0 };
    let iops = 0;
    for (const which of order) {
      const backends: [DmaBackend, DmaBackend] =
        which === "x" ? ["type1", "iommufd"] : which === "y" ? ["iommufd", "type1"] : ["iommufd", "iommufd"];
      const got = await block(pair, backends, depth, o);
      r[which] = got.r;
      if (which === "c") iops = 2e9 / (got.a + got.b);
    }
    const one = { ...r, type1: Math.sqrt(r.x / r.y), control: r.c / Math.sqrt(r.x * r.y), iops };
    rounds.push(one);
    console.log(
      `  QD${depth} round ${round + 1}: r_X ${r.x.toFixed(3)}  r_Y ${r.y.toFixed(3)}  r_C ${r.c.toFixed(3)}  ` +
        `type1/iommufd ${one.type1.toFixed(3)}  control ${one.control.toFixed(3)}  (${iops.toFixed(0)} IOPS)`,
    );
  }
  return {
    depth,
    rounds,
    type1: interval(rounds.map((r) => r.type1))!,
    type1Inner: innerInterval(rounds.map((r) => r.type1)),
    control: interval(rounds.map((r) => r.control))!,
    controlInner: innerInterval(rounds.map((r) => r.control)),
  };
}

async function measure(o: Options): Promise<{ controllers: [string, string]; depths: DepthResult[]; seconds: number }> {
  const t0 = performance.now();
  const found = controllers();
  if (found.length < 2) throw new Error(`two NVMe controllers on vfio-pci are needed, found ${found.length}`);
  const pair: [string, string] = [found[0]!, found[1]!];
  console.log(
    `controllers A ${pair[0]}, B ${pair[1]}; ${o.rounds} rounds of blocks X (A type1, B iommufd), ` +
      `Y (A iommufd, B type1), C (both iommufd); ${o.pairs} pairs of ${o.sliceMs} ms slices a block`,
  );
  const depths: DepthResult[] = [];
  for (const depth of DEPTHS) depths.push(await measureDepth(pair, depth, o));
  return { controllers: pair, depths, seconds: (performance.now() - t0) / 1000 };
}

/** `bun bench backends-pair`: in the guest (or here, with /dev/iommu), verdicts and results file. */
export async function backendsPairBench(argv: string[]): Promise<number> {
  const started = performance.now();
  const startLoad = loadavg()[0]!;
  const o = parse(argv);
  let measured: Awaited<ReturnType<typeof measure>>;
  let vm = false;
  if (existsSync("/dev/iommu")) {
    measured = await measure(o);
  } else {
    vm = true;
    const got = await measureInGuest<typeof measured>({
      script: "backends-pair.ts",
      argv,
      devices: [
        { kind: "nvme", size: 64 << 20 },
        { kind: "nvme", size: 64 << 20 },
      ],
      outFile: OUT_FILE,
      what: "backends-pair",
    });
    if ("exitCode" in got) return got.exitCode;
    measured = got.measured;
  }
  const results = {
    schema: 1,
    date: new Date().toISOString(),
    commit: git(["rev-parse", "--short", "HEAD"]) || "unknown",
    dirty: git(["status", "--porcelain", "--", "src", "bench", ":!bench/results"]) !== "",
    method:
      "two NVMe controllers open at once, A and B taking turns slice by slice; blocks X (A type1, B iommufd), Y (A iommufd, B type1), C (both iommufd); r = median over the slice pairs of A's time per I/O / B's; type1/iommufd = sqrt(r_X / r_Y); control = r_C / sqrt(r_X r_Y); intervals: median [min..max] of the rounds",
    options: o,
    vm,
    host: vm ? machine() : undefined,
    hostLoad: { start: startLoad, end: loadavg()[0]! },
    ...measured,
    wallSeconds: (performance.now() - started) / 1000,
  };
  console.log();
  console.log("== NVMe, type1 against iommufd, two controllers taking turns, same boot ==");
  for (const d of results.depths) {
    const pct = (i: Interval) => `${(i.confidence * 100).toFixed(1)}%`;
    for (const [what, i, c] of [
      ["min..max", d.type1, d.control],
      ["order stats", d.type1Inner, d.controlInner],
    ] as const) {
      console.log(
        `QD${String(d.depth).padEnd(3)} ${what} (${pct(i)})  type1/iommufd ${fmtInterval(i).padEnd(26)} ${verdict(i).padEnd(34)} control ${fmtInterval(c).padEnd(26)} ${verdict(c)}`,
      );
    }
  }
  console.log(
    `goal: type1 within ${GOAL * 100}% of iommufd; host load (1 min) ${startLoad.toFixed(2)} -> ${results.hostLoad.end.toFixed(2)}`,
  );
  return saveRun(results, o.quick ? scratchDir : join(root, "bench", "results", "backends"), "pair");
}

if (import.meta.main) {
  const out = process.env.IOMMUFD_VM_OUT;
  if (process.argv.includes("--child") && out) {
    writeFileSync(join(out, OUT_FILE), JSON.stringify(await measure(parse(process.argv.slice(2)))));
  } else {
    process.exitCode = await backendsPairBench(process.argv.slice(2));
  }
}
