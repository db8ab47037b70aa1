/**
 * Paired rounds for two sides that cannot be live at once: the same device through two backends
 * (a VFIO device is claimed by its group or by its cdev, never both). Each side's slice opens its
 * session, warms it up, runs one untimed operation and then its timed samples, and closes it again
 * before the other side's slice opens; otherwise the method is bench/runner.ts's: rounds of short
 * slices alternating side by side (a, b / b, a ...), one ratio (a / b) per slice pair, a round's
 * ratio the median of its pairs, the case's the median of its rounds with min..max as interval.
 *
 * What switching costs (the open, the warm-up) stays outside every timed sample; it spaces the two
 * sides of a pair further apart than the runner's 12 ms slices, which the many pairs a case has
 * and the median over them answer. The time an open takes is saved too.
 *
 * Beside that ratio each round has a second, `fastRatio`: the same median over the pairs, of each
 * slice's fastest sample instead of its median. A host busy with other work only ever adds time,
 * and a slice of 200 ms-opens apart meets it more than the runner's do (at load 7 on 2 cores one
 * run's NVMe QD1 slice medians spread 7x within a round); the fastest sample of a slice is the
 * one least disturbed, as `bun bench nvme` keeps each side's best round for the same reason.
 */
import type { Sample } from "./baseline.ts";
import { interval, median, planSlices, type Interval, type SlicePlan, slicer, summarize, warmUp } from "./runner.ts";

/** One side opened: its operation, live until close(). */
export interface Session {
  op: () => unknown;
  close(): void | Promise<void>;
}

export interface SwitchedSide {
  /** Short, path-like: "type1", "iommufd". */
  name: string;
  open(): Session | Promise<Session>;
}

export interface SwitchedCase {
  id: string;
  title: string;
  /** Operations per timed iteration (as BenchCase.k). */
  k: number;
  /**
   * Untimed running of a freshly opened session before its slice, in ms, instead of the mode's
   * (0: none; the slice's own untimed operation still runs). An operation of 200 ms needs none.
   */
  settleMs?: number;
  /**
   * Slices of the mode's longSliceMs instead of minMs / slices. An operation whose time rests on
   * another host thread (QEMU's NVMe model completes on its main loop, not the vCPU's) moves with
   * the host's scheduling by whole milliseconds: a slice of 40 ms catches one such spell, a slice
   * ten times longer averages over many.
   */
  longSlices?: boolean;
  /** a / b is the reported ratio. */
  a: SwitchedSide;
  b: SwitchedSide;
}

export interface SwitchMode {
  rounds: number;
  /** Timed budget per side per round, spread over `slices` slices (each slice opens its session once). */
  minMs: number;
  slices: number;
  /** Warm-up of each side before round 1: at least `ops` and `ms`, `maxMs` at most. */
  warmup: { ops: number; ms: number; maxMs: number };
  /** Untimed running of a freshly opened session before its slice, in ms (at least one operation). */
  settleMs: number;
  /** Timed time per slice of a case with longSlices (ms). */
  longSliceMs: number;
}

export const SWITCH_MODES = {
  quick: { rounds: 2, minMs: 40, slices: 4, warmup: { ops: 200, ms: 0, maxMs: 300 }, settleMs: 5, longSliceMs: 10 },
  default: {
    rounds: 8,
    minMs: 240,
    slices: 6,
    warmup: { ops: 20_000, ms: 500, maxMs: 2000 },
    settleMs: 20,
    longSliceMs: 400,
  },
} satisfies Record<string, SwitchMode>;

export interface SwitchedRound {
  /** The sides' order in the round's first slice pair; the next pair runs them in reverse, and so on. */
  order: string[];
  /** Per slice pair, each side's median time per operation (ns). */
  slices: Record<string, number>[];
  a: Sample;
  b: Sample;
  /** a / b: the median over the slice pairs of a's median / b's median. */
  ratio: number;
  /** a / b of each slice's fastest sample, the median over the pairs. */
  fastRatio: number;
}

export interface SwitchedResult {
  id: string;
  title: string;
  sides: [string, string];
  k: number;
  plan?: SlicePlan;
  rounds: SwitchedRound[];
  /** Time per operation (ns): the per-round medians' median and interval. */
  a?: Interval;
  b?: Interval;
  ratio?: Interval;
  fastRatio?: Interval;
  /** How long opening a session took (ms), per side: median and range over every slice. */
  openMs: Record<string, Interval | undefined>;
  seconds?: number;
  errors: string[];
}

/** The order of the sides in slice pair `slice` of round `round`: a, b / b, a / ..., every round starting the other way. */
export function sliceOrder(round: number, slice: number): ("a" | "b")[] {
  return (round + slice) % 2 === 0 ? ["a", "b"] : ["b", "a"];
}

/** A round's ratio from its slice pairs: the median of a / b over the pairs. */
export function roundRatio(slices: { a: number; b: number }[]): number {
  return median(slices.map((s) => s.a / s.b));
}

/** Open a side's session, run `body`, always close it; returns what body gave and the open's ms. */
async function withSession<T>(side: SwitchedSide, body: (session: Session) => Promise<T>): Promise<[T, number]> {
  const t0 = performance.now();
  const session = await side.open();
  const openMs = performance.now() - t0;
  try {
    return [await body(session), openMs];
  } finally {
    await session.close();
  }
}

/** Runs a case through all its rounds. Never throws: failures land in `errors`. */
export async function runSwitched(
  spec: SwitchedCase,
  mode: SwitchMode,
  log: (line: string) => void,
): Promise<SwitchedResult> {
  const result: SwitchedResult = {
    id: spec.id,
    title: spec.title,
    sides: [spec.a.name, spec.b.name],
    k: spec.k,
    rounds: [],
    openMs: {},
    errors: [],
  };
  const t0 = performance.now();
  const opens: Record<"a" | "b", number[]> = { a: [], b: [] };
  const sides = { a: spec.a, b: spec.b };
  try {
    // Warm each side up as the runner does, and calibrate on the slower one (least disturbed of 5 samples).
    const calibration: number[] = [];
    const isAsync: Record<"a" | "b", boolean> = { a: false, b: false };
    for (const key of ["a", "b"] as const) {
      const [best, ms] = await withSession(sides[key], async (session) => {
        const warm = await warmUp(session.op, mode.warmup, mode.warmup.maxMs);
        isAsync[key] = warm.isAsync;
        return Math.min(...(await slicer(session.op, spec.k, warm.isAsync)(5)));
      });
      opens[key].push(ms);
      calibration.push(best);
    }
    const budget = spec.longSlices ? { minMs: mode.longSliceMs * mode.slices, slices: mode.slices } : mode;
    const plan = planSlices(Math.max(...calibration), spec.k, budget);
    result.plan = plan;
    const slice = async (key: "a" | "b"): Promise<number[]> => {
      const [times, ms] = await withSession(sides[key], async (session) => {
        const settleUntil = performance.now() + (spec.settleMs ?? mode.settleMs);
        while (performance.now() < settleUntil) await session.op();
        return slicer(session.op, plan.opsPerSample, isAsync[key])(plan.samplesPerSlice);
      });
      opens[key].push(ms);
      return times;
    };
    for (let r = 0; r < mode.rounds; r++) {
      Bun.gc(true);
      const times: Record<"a" | "b", number[]> = { a: [], b: [] };
      const pairs: { a: number; b: number }[] = [];
      const fastest: { a: number; b: number }[] = [];
      for (let i = 0; i < plan.slices; i++) {
        const pair = { a: 0, b: 0 };
        const fast = { a: 0, b: 0 };
        for (const key of sliceOrder(r, i)) {
          const t = await slice(key);
          times[key].push(...t);
          pair[key] = median(t);
          fast[key] = Math.min(...t);
        }
        pairs.push(pair);
        fastest.push(fast);
      }
      result.rounds.push({
        order: sliceOrder(r, 0).map((key) => sides[key].name),
        slices: pairs.map((p) => ({ [spec.a.name]: p.a, [spec.b.name]: p.b })),
        a: summarize(times.a, plan.opsPerSample),
        b: summarize(times.b, plan.opsPerSample),
        ratio: roundRatio(pairs),
        fastRatio: roundRatio(fastest),
      });
    }
    result.a = interval(result.rounds.map((x) => x.a.p50));
    result.b = interval(result.rounds.map((x) => x.b.p50));
    result.ratio = interval(result.rounds.map((x) => x.ratio));
    result.fastRatio = interval(result.rounds.map((x) => x.fastRatio));
  } catch (error) {
    result.errors.push((error as Error).message);
    log(`  ${spec.id.padEnd(28)} error: ${(error as Error).message}`);
  }
  result.openMs = { [spec.a.name]: interval(opens.a), [spec.b.name]: interval(opens.b) };
  result.seconds = Math.round((performance.now() - t0) / 10) / 100;
  return result;
}
