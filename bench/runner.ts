/**
 * Runs planned cases in paired rounds. Per case: set it up once, start its C process on the same
 * descriptors, warm every side up by the same rule, then run rounds. A round is a train of short
 * slices (about 12 ms a side), the sides alternating slice by slice (C, lib / lib, C / ...; with a
 * reference side: C, lib, ref / ref, lib, C ...): the machine's speed drifts over tenths of a
 * second (under TCG by up to 2x), so only sides measured milliseconds apart meet the same machine.
 * A slice pair gives a ratio (lib / C) and a speedup (ref / lib); a round reports the median of
 * its slice pairs, and the case the median of its rounds with a distribution-free interval.
 */
import { CProcess, formatNs, type Sample } from "./baseline.ts";
import type { BenchCase, BenchEnv, CaseInstance, Layout, Tier } from "./suite.ts";

export interface RunMode {
  tier: Tier;
  /** Paired rounds per case. */
  rounds: number;
  /** Timed budget per side per round, spread over `slices` slices. */
  minMs: number;
  /** Slices per round (more when a sample is too long for 12 samples a side in this many). */
  slices: number;
  /** Warm-up per side before round 1: at least `ops` operations and `ms`, or `maxMs` at most. */
  warmup: { ops: number; ms: number; maxMs: number };
  /** Extra warm-up of the first case's library side: a fresh Bun process under TCG is slow for seconds. */
  processWarmupMs: number;
}

export function runMode(tier: Tier): RunMode {
  switch (tier) {
    case "quick":
      return { tier, rounds: 2, minMs: 30, slices: 4, warmup: { ops: 2000, ms: 0, maxMs: 200 }, processWarmupMs: 0 };
    case "default":
      // Each round a train of short slices: a disturbance of the machine moves a slice or two, which
      // the round's median over its slices leaves out.
      return {
        tier,
        rounds: 10,
        minMs: 120,
        slices: 10,
        warmup: { ops: 40_000, ms: 500, maxMs: 2000 },
        processWarmupMs: 6000,
      };
    case "full":
      return {
        tier,
        rounds: 16,
        minMs: 300,
        slices: 20,
        warmup: { ops: 40_000, ms: 2000, maxMs: 4000 },
        processWarmupMs: 8000,
      };
  }
}

export type SideName = "c" | "lib" | "ref";

export interface Round {
  /** The sides' order in the round's first slice; the next slice runs them in reverse, and so on. */
  order: SideName[];
  /** Each side's samples of the whole round. */
  lib: Sample;
  c?: Sample;
  ref?: Sample;
  /** Per slice, each side's median time per operation (ns). */
  slices: Partial<Record<SideName, number>>[];
  /** lib / C: the median over the slices of each slice's lib median / C median. */
  ratio?: number;
  /** ref / lib, the same way. */
  speedup?: number;
}

/** How a case's rounds are cut: the same shape for every side. */
export interface SlicePlan {
  /** Operations per timed sample: k, or a multiple of it so that a sample lasts about 1 ms. */
  opsPerSample: number;
  samplesPerSlice: number;
  slices: number;
}

const SAMPLE_TARGET_NS = 1e6;
/** mitata's own minimum: fewer samples than this a side per round give no usable median. */
const MIN_SAMPLES_PER_ROUND = 12;

/** Cuts a round for an operation that takes about `opNs` on its slower side. */
export function planSlices(opNs: number, k: number, mode: Pick<RunMode, "minMs" | "slices">): SlicePlan {
  const iterationNs = Math.max(opNs, 1) * k;
  // A power of two: a calibration off by a little (it is noisy too) still gives the same plan.
  const iterations = 2 ** Math.max(0, Math.round(Math.log2(SAMPLE_TARGET_NS / iterationNs)));
  const sampleNs = iterationNs * iterations;
  const samplesPerSlice = Math.max(1, Math.round((mode.minMs * 1e6) / mode.slices / sampleNs));
  return {
    opsPerSample: k * iterations,
    samplesPerSlice,
    slices: Math.max(mode.slices, Math.ceil(MIN_SAMPLES_PER_ROUND / samplesPerSlice)),
  };
}

/** A median over rounds with its interval. */
export interface Interval {
  median: number;
  lo: number;
  hi: number;
  /** Probability that the true median lies in [lo, hi] (order statistics; no distribution assumed). */
  confidence: number;
  n: number;
}

/** What a run saved of one case: its plan's identity, then what was measured. */
export interface CaseResult extends Pick<BenchCase, "id" | "suite" | "title" | "bytes" | "k" | "tier" | "tracked"> {
  /** Whether the plan had a C side / a reference side for this case. */
  cPlanned: boolean;
  refPlanned: boolean;
  layout?: Layout;
  /** How its rounds were cut into slices and samples. */
  plan?: SlicePlan;
  /** Every round, in run order. */
  rounds: Round[];
  /** Time per operation in ns (the per-round medians' median and interval). */
  lib?: Interval;
  c?: Interval;
  ref?: Interval;
  ratio?: Interval;
  speedup?: Interval;
  /** Bytes per second through the library, from lib.median. */
  gibPerSec?: number;
  warmupOps: Partial<Record<SideName, number>>;
  /** Wall time of the whole case, set-up and warm-up included (for the run's time budget). */
  seconds?: number;
  errors: string[];
}

export function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** Sample statistics of per-operation times (nearest-rank quantiles of the sorted values). */
export function summarize(times: number[], opsPerSample: number): Sample {
  const s = [...times].sort((a, b) => a - b);
  const at = (q: number) => s[Math.round(q * (s.length - 1))]!;
  return {
    p50: median(s),
    avg: s.reduce((a, b) => a + b, 0) / s.length,
    min: s[0]!,
    p25: at(0.25),
    p75: at(0.75),
    p99: at(0.99),
    max: s[s.length - 1]!,
    samples: s.length,
    ticks: s.length * opsPerSample,
  };
}

/**
 * The median of the rounds and their whole range, min..max. As an interval of the median it
 * covers it with probability 1 - 2 / 2^n (99.8% for 10 rounds); more to the point it spans every
 * state the machine was in during the run: under TCG a ratio depends a few percent on how fast
 * the guest happens to run (measured: copy/mock/2MiB/huge 0.89 in fast rounds, 1.00 in slow
 * ones of the same run), so a narrower interval of one run excluded the next run's median.
 */
export function interval(values: number[]): Interval | undefined {
  const n = values.length;
  if (n === 0) return undefined;
  const s = [...values].sort((a, b) => a - b);
  const confidence = n === 1 ? 0 : 1 - 2 / 2 ** n;
  return { median: median(s), lo: s[0]!, hi: s[n - 1]!, confidence, n };
}

type Log = (line: string) => void;

export async function warmUp(
  op: () => unknown,
  rule: RunMode["warmup"],
  maxMs: number,
): Promise<{ ops: number; isAsync: boolean }> {
  const first = op();
  const isAsync = first instanceof Promise;
  if (isAsync) await first;
  const start = performance.now();
  let n = 1;
  for (;;) {
    const elapsed = performance.now() - start;
    if ((n >= rule.ops && elapsed >= rule.ms) || elapsed >= maxMs) return { ops: n, isAsync };
    if (isAsync) await op();
    else op();
    n++;
  }
}

/**
 * A library-side slice, the same loop as the C side's (bench/baseline/bench.c, `slice`): one
 * untimed run, then `samples` timed runs of `ops` operations. The untimed run is not optional:
 * the first run after the other side's slice pays for the switch (in the guest: 2x, more for
 * the C side), and a plan with one or two samples a slice then moved a ratio by 15-30%. Not mitata's measure(): it compiles
 * a new sampling function per call, 53 ms a call in the TCG guest, four times a slice's budget.
 *
 * The loop is compiled once per slicer, not shared: a shared loop calls every case's op from one
 * call site, and with the interleaved cases alive together that site stops inlining the op (on the
 * host, 8 cases taking turns: 173-177 ns per getppid against 166-172 one case at a time).
 */
export function slicer(op: () => unknown, ops: number, isAsync: boolean): (samples: number) => Promise<number[]> {
  const wait = isAsync ? "await " : "";
  const body = `return async (samples) => {
    for (let j = 0; j < ops; j++) ${wait}op();
    const times = new Array(samples);
    for (let i = 0; i < samples; i++) {
      const t0 = now();
      for (let j = 0; j < ops; j++) ${wait}op();
      times[i] = (now() - t0) / ops;
    }
    return times;
  };`;
  return new Function("op", "ops", "now", body)(op, ops, Bun.nanoseconds);
}

/** What every case of one run is measured with: the guest's facts, the tier, the C program, the log. */
export interface RunContext {
  env: BenchEnv;
  mode: RunMode;
  /** The C side's program; undefined when it could not be built (cases with a C side then fail). */
  cBinary: string | undefined;
  log: Log;
}

/** Runs one case through all its rounds. Never throws: failures land in `errors`. */
export async function runCase(spec: BenchCase, run: RunContext, firstCase: boolean): Promise<CaseResult> {
  return (await runInterleaved([spec], run, firstCase))[0]!;
}

/**
 * Runs cases round by round, taking turns (one case alone: its rounds in turn). Never throws:
 * failures land in each case's `errors`. Round r of each, then round r + 1 of each (the order
 * reversed every other round). A spell of a few seconds in which the machine runs the library
 * side slower (seen here: one case's lib/C 15% high in 9 of its 10 rounds while its C side kept
 * its speed, in one of four runs of the same code) then lands in a round or two of every case
 * instead of in every round of one, and each case's median over its rounds leaves it out. Only for
 * cases whose setups can be held open together (their own iommufd and memory, a few MiB).
 */
export async function runInterleaved(specs: BenchCase[], run: RunContext, firstCase: boolean): Promise<CaseResult[]> {
  const open: OpenCase[] = [];
  for (const [i, spec] of specs.entries()) open.push(await openCase(spec, run, firstCase && i === 0));
  for (let r = 0; r < run.mode.rounds; r++) {
    for (const one of r % 2 === 0 ? open : [...open].reverse()) await one.round(r);
  }
  // Each case's line in the plan's order (none of these throws).
  const results: CaseResult[] = [];
  for (const one of open) results.push(await one.finish());
  return results;
}

interface OpenCase {
  /** Runs round `r` (nothing once the case failed). */
  round(r: number): Promise<void>;
  /** Summarizes, logs, and closes the C process and the setup. Never throws. */
  finish(): Promise<CaseResult>;
}

/** Sets a case up, starts its C side, warms every side and plans its slices. Never throws. */
async function openCase(spec: BenchCase, run: RunContext, firstCase: boolean): Promise<OpenCase> {
  const { env, mode, cBinary, log } = run;
  const result: CaseResult = {
    id: spec.id,
    suite: spec.suite,
    title: spec.title,
    bytes: spec.bytes,
    k: spec.k,
    tier: spec.tier,
    tracked: spec.tracked,
    cPlanned: spec.c,
    refPlanned: spec.reference ?? false,
    rounds: [],
    warmupOps: {},
    errors: [],
  };
  let busy = 0;
  const timed = async <T>(work: () => Promise<T>): Promise<T> => {
    const t0 = performance.now();
    try {
      return await work();
    } finally {
      busy += performance.now() - t0;
    }
  };
  let instance: CaseInstance | undefined;
  let c: CProcess | undefined;
  let failed = false;
  const fail = (error: unknown) => {
    failed = true;
    result.errors.push((error as Error).message);
    log(`  ${spec.id.padEnd(34)} error: ${(error as Error).message}`);
    c?.kill();
    c = undefined;
  };
  let round: (r: number) => Promise<void> = async () => {};
  const handle: OpenCase = {
    round: (r) => (failed ? Promise.resolve() : timed(() => round(r)).catch(fail)),
    async finish() {
      if (!failed) {
        const rounds = result.rounds;
        result.lib = interval(rounds.map((x) => x.lib.p50));
        result.c = interval(rounds.flatMap((x) => (x.c ? [x.c.p50] : [])));
        result.ref = interval(rounds.flatMap((x) => (x.ref ? [x.ref.p50] : [])));
        result.ratio = interval(rounds.flatMap((x) => (x.ratio !== undefined ? [x.ratio] : [])));
        result.speedup = interval(rounds.flatMap((x) => (x.speedup !== undefined ? [x.speedup] : [])));
        if (result.lib && spec.bytes) result.gibPerSec = spec.bytes / 2 ** 30 / (result.lib.median / 1e9);
        log(describe(result));
      }
      const t0 = performance.now();
      try {
        await c?.close();
      } catch (error) {
        result.errors.push((error as Error).message);
      }
      try {
        instance?.close();
      } catch (error) {
        result.errors.push(`teardown: ${(error as Error).message}`);
      }
      busy += performance.now() - t0;
      result.seconds = Math.round(busy / 10) / 100;
      return result;
    },
  };
  await timed(async () => {
    instance = await spec.setup(env);
    result.layout = instance.layout;
    if (spec.c && !instance.c) result.errors.push("the case plans a C side but its setup gave none");
    // Without a binary (bun bench --no-c) the case runs its library side alone: no ratio.
    if (instance.c && cBinary) c = await CProcess.start(cBinary, instance.c);

    const lib = instance.lib;
    const ref = instance.reference;
    const libWarm = await warmUp(
      lib,
      mode.warmup,
      firstCase ? Math.max(mode.warmup.maxMs, mode.processWarmupMs) : mode.warmup.maxMs,
    );
    result.warmupOps.lib = libWarm.ops;
    let refWarm: { ops: number; isAsync: boolean } | undefined;
    if (ref) {
      refWarm = await warmUp(ref, mode.warmup, mode.warmup.maxMs);
      result.warmupOps.ref = refWarm.ops;
    }
    if (c) result.warmupOps.c = await c.warmUp(mode.warmup.ops, mode.warmup.ms, mode.warmup.maxMs);
    // Cut by the slowest side (a short slice of each, warm), so no side's slice runs much over its share.
    // The least disturbed of 5 samples: a sample taken in a slow moment would shrink every slice.
    const calibration = [Math.min(...(await slicer(lib, spec.k, libWarm.isAsync)(5)))];
    if (ref) calibration.push(Math.min(...(await slicer(ref, spec.k, refWarm!.isAsync)(5))));
    if (c) calibration.push(Math.min(...(await c.slice(5, spec.k))));
    const plan = planSlices(Math.max(...calibration), spec.k, mode);
    result.plan = plan;

    const libSlice = slicer(lib, plan.opsPerSample, libWarm.isAsync);
    const refSlice = ref ? slicer(ref, plan.opsPerSample, refWarm!.isAsync) : undefined;
    const slice = (side: SideName): Promise<number[]> =>
      side === "c"
        ? c!.slice(plan.samplesPerSlice, plan.opsPerSample)
        : side === "lib"
          ? libSlice(plan.samplesPerSlice)
          : refSlice!(plan.samplesPerSlice);
    const sides: SideName[] = [...(c ? (["c"] as const) : []), "lib", ...(ref ? (["ref"] as const) : [])];
    round = async (r) => {
      // Garbage of the last round is collected outside the timed slices, as mitata does per run.
      Bun.gc(true);
      const order = r % 2 === 0 ? sides : [...sides].reverse();
      const times: Record<SideName, number[]> = { c: [], lib: [], ref: [] };
      const slices: Partial<Record<SideName, number>>[] = [];
      for (let i = 0; i < plan.slices; i++) {
        const sliceMedians: Partial<Record<SideName, number>> = {};
        for (const side of i % 2 === 0 ? order : [...order].reverse()) {
          const t = await slice(side);
          times[side].push(...t);
          sliceMedians[side] = median(t);
        }
        slices.push(sliceMedians);
      }
      const done: Round = { order, lib: summarize(times.lib, plan.opsPerSample), slices };
      if (c) done.c = summarize(times.c, plan.opsPerSample);
      if (ref) done.ref = summarize(times.ref, plan.opsPerSample);
      if (c) done.ratio = median(slices.map((x) => x.lib! / x.c!));
      if (ref) done.speedup = median(slices.map((x) => x.ref! / x.lib!));
      result.rounds.push(done);
    };
  }).catch(fail);
  return handle;
}

function fmtInterval(i: Interval | undefined, f: (x: number) => string): string {
  return i ? `${f(i.median)} [${f(i.lo)}..${f(i.hi)}]` : "n/a";
}

/** One progress line per case. */
export function describe(r: CaseResult): string {
  const parts = [`lib ${fmtInterval(r.lib, formatNs)}`];
  if (r.c) parts.push(`C ${fmtInterval(r.c, formatNs)}`);
  if (r.ratio) parts.push(`lib/C ${fmtInterval(r.ratio, (x) => x.toFixed(3))}`);
  if (r.speedup) parts.push(`speedup ${fmtInterval(r.speedup, (x) => x.toFixed(1))}x`);
  return `  ${r.id.padEnd(34)} ${parts.join("  ")}`;
}
