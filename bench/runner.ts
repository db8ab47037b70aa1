/**
 * Runs planned cases in paired rounds. Per case: set it up once, start its C process on the same
 * descriptors, warm every side up by the same rule, then alternate the sides round by round
 * (C, lib / lib, C / C, lib ...; with a reference side: C, lib, ref / ref, lib, C ...), so that
 * drift of the machine hits both sides of a ratio alike. Each round gives one ratio (lib / C) and
 * one speedup (ref / lib); the case reports their median with a distribution-free interval.
 */
import { measure } from "mitata";
import { CProcess, formatNs, type Sample } from "./baseline.ts";
import type { BenchCase, BenchEnv, CaseInstance, Layout, Tier } from "./suite.ts";

export interface RunMode {
  tier: Tier;
  /** Paired rounds per case. */
  rounds: number;
  /** Timed budget per side per round (mitata's min_cpu_time; C applies the same rule). */
  minMs: number;
  /** Warm-up per side before round 1: at least `ops` operations and `ms`, or `maxMs` at most. */
  warmup: { ops: number; ms: number; maxMs: number };
  /** Extra warm-up of the first case's library side: a fresh Bun process under TCG is slow for seconds. */
  processWarmupMs: number;
}

export function runMode(tier: Tier): RunMode {
  switch (tier) {
    case "quick":
      return { tier, rounds: 2, minMs: 30, warmup: { ops: 2000, ms: 0, maxMs: 200 }, processWarmupMs: 0 };
    case "default":
      // Many short rounds rather than a few long ones: the interval of 10 drops the most extreme
      // round on each side, so one round disturbed by the machine does not widen it.
      return { tier, rounds: 10, minMs: 120, warmup: { ops: 40_000, ms: 500, maxMs: 2000 }, processWarmupMs: 6000 };
    case "full":
      return { tier, rounds: 16, minMs: 300, warmup: { ops: 40_000, ms: 2000, maxMs: 4000 }, processWarmupMs: 8000 };
  }
}

export type SideName = "c" | "lib" | "ref";

export interface Round {
  order: SideName[];
  lib: Sample;
  c?: Sample;
  ref?: Sample;
  /** lib / C, from this round's medians. */
  ratio?: number;
  /** ref / lib, from this round's medians. */
  speedup?: number;
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

function binomialCdf(k: number, n: number): number {
  // P(X <= k), X ~ Binomial(n, 1/2)
  let sum = 0;
  let c = 1;
  for (let i = 0; i <= k; i++) {
    if (i > 0) c = (c * (n - i + 1)) / i;
    sum += c;
  }
  return sum / 2 ** n;
}

/**
 * The median and the narrowest order-statistic interval [x(j), x(n+1-j)] that still covers the
 * true median with at least 95% probability (for 6-8 rounds that is min..max: 97-99%); with
 * fewer than 6 rounds min..max, with its lower confidence stated.
 */
export function interval(values: number[]): Interval | undefined {
  const n = values.length;
  if (n === 0) return undefined;
  const s = [...values].sort((a, b) => a - b);
  let j = 1;
  while (j + 1 <= n / 2 && 1 - 2 * binomialCdf(j, n) >= 0.95) j++;
  const confidence = n === 1 ? 0 : 1 - 2 * binomialCdf(j - 1, n);
  return { median: median(s), lo: s[j - 1]!, hi: s[n - j]!, confidence, n };
}

type Log = (line: string) => void;

/** One iteration: k operations, sync or async as the case's op turned out to be. */
function iteration(op: () => unknown, k: number, isAsync: boolean): () => unknown {
  if (isAsync) {
    return async () => {
      for (let i = 0; i < k; i++) await op();
    };
  }
  if (k === 1) return op;
  return () => {
    for (let i = 0; i < k; i++) op();
  };
}

async function warmUp(
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

async function measureLib(op: () => unknown, k: number, isAsync: boolean, minMs: number): Promise<Sample> {
  const s = await measure(iteration(op, k, isAsync), { min_cpu_time: minMs * 1e6 });
  return {
    p50: s.p50 / k,
    avg: s.avg / k,
    min: s.min / k,
    p25: s.p25 / k,
    p75: s.p75 / k,
    p99: s.p99 / k,
    max: s.max / k,
    samples: s.samples.length,
    ticks: s.ticks * k,
  };
}

/** Runs one case through all its rounds. Never throws: failures land in `errors`. */
export async function runCase(
  spec: BenchCase,
  env: BenchEnv,
  mode: RunMode,
  cBinary: string | undefined,
  log: Log,
  firstCase: boolean,
): Promise<CaseResult> {
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
  const t0 = performance.now();
  let instance: CaseInstance | undefined;
  let c: CProcess | undefined;
  try {
    instance = await spec.setup(env);
    result.layout = instance.layout;
    if (spec.c && !instance.c) result.errors.push("the case plans a C side but its setup gave none");
    // Without a binary (bun bench --no-c) the case runs its library side alone: no ratio.
    if (instance.c && cBinary) c = await CProcess.start(cBinary, instance.c, spec.k);

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

    for (let r = 0; r < mode.rounds; r++) {
      const sides: SideName[] = [...(c ? (["c"] as const) : []), "lib", ...(ref ? (["ref"] as const) : [])];
      const order = r % 2 === 0 ? sides : sides.reverse();
      const round: Partial<Round> & { order: SideName[] } = { order };
      for (const side of order) {
        if (side === "c") round.c = await c!.measure(mode.minMs);
        else if (side === "lib") round.lib = await measureLib(lib, spec.k, libWarm.isAsync, mode.minMs);
        else round.ref = await measureLib(ref!, spec.k, refWarm!.isAsync, mode.minMs);
      }
      if (round.c) round.ratio = round.lib!.p50 / round.c.p50;
      if (round.ref) round.speedup = round.ref.p50 / round.lib!.p50;
      result.rounds.push(round as Round);
    }
    const rounds = result.rounds;
    result.lib = interval(rounds.map((x) => x.lib.p50));
    result.c = interval(rounds.flatMap((x) => (x.c ? [x.c.p50] : [])));
    result.ref = interval(rounds.flatMap((x) => (x.ref ? [x.ref.p50] : [])));
    result.ratio = interval(rounds.flatMap((x) => (x.ratio !== undefined ? [x.ratio] : [])));
    result.speedup = interval(rounds.flatMap((x) => (x.speedup !== undefined ? [x.speedup] : [])));
    if (result.lib && spec.bytes) result.gibPerSec = spec.bytes / 2 ** 30 / (result.lib.median / 1e9);
    log(describe(result));
  } catch (error) {
    result.errors.push((error as Error).message);
    log(`  ${spec.id.padEnd(34)} error: ${(error as Error).message}`);
    c?.kill();
    c = undefined;
  } finally {
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
    result.seconds = Math.round((performance.now() - t0) / 10) / 100;
  }
  return result;
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
