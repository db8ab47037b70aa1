/**
 * Judging a run against the runs before it, with each case's own noise floor.
 *
 * Identical code does not measure the same twice: each default run is a new guest and a new Bun
 * process with its own JIT decisions, and the medians of some cases move between such runs by more
 * than anything a single run's interval shows (heap/mock/64KiB by 15%, irq/edu/msi/await-epoll by
 * 70%, while copy/mock/4KiB stays within 3%). One threshold for all cases either flags identical
 * code on the noisy cases or misses a real 10% slowdown on the quiet ones. So the noise is learned
 * per case from the A/A history in bench/results/: every version of the code (a run's `code` hash;
 * runs saved before it: their commit) with two or more clean runs of the same mode is an A/A
 * group, and how far each run's median lies from the median of the other runs of its group is
 * what identical code does.
 *
 * The rule: a case moved when its median lies beyond the reference (the median of the medians of
 * the newest run's code's runs) by more than NOISE_Z times its A/A noise (root mean square of those
 * deviations), and never by less than MIN_MARGIN. A case whose margin would exceed MAX_MARGIN cannot
 * resolve a change worth reporting and is listed as too noisy instead. A case with no A/A history
 * yet falls back to the interval rule of results.ts (`compare`) against the last run.
 */
import { type Interval, median } from "./runner.ts";
import { type Change, compare, fmtInterval, type Results, type Saved } from "./results.ts";

/** Margin = NOISE_Z x a case's A/A noise (rms of log deviations), within MIN_MARGIN..MAX_MARGIN. */
export const NOISE_Z = 3;
export const MIN_MARGIN = 0.07;
export const MAX_MARGIN = 0.3;
/** At most this many runs of the last commit make the reference. */
export const REFERENCE_RUNS = 4;

type Metric = "ratio" | "speedup";
const METRICS: Metric[] = ["ratio", "speedup"];

export interface CaseNoise {
  /** Root mean square of the log deviations of a run's median from the median of its group's other runs. */
  rms: number;
  /** Deviations it was learned from, and the A/A groups (commits) they came from. */
  samples: number;
  groups: number;
}

export interface Judgement {
  changes: Change[];
  /** Files of the runs the reference was made of (all of one commit), oldest first. */
  reference: string[];
  /** Cases judged by their learned noise floor, with their margins (fraction). */
  margins: Record<string, number>;
  /** Cases whose A/A noise is too large to judge, with their would-be margins. */
  tooNoisy: Record<string, number>;
  /** Cases with no A/A history yet, judged by the interval rule against the last run. */
  byInterval: string[];
}

const key = (id: string, metric: Metric) => `${id} ${metric}`;

/** The code a run measured: its code hash, or (runs saved before it was recorded) its commit. */
const codeOf = (r: Results) => r.code ?? r.commit;

function medianOf(results: Results, id: string, metric: Metric): number | undefined {
  const c = results.cases.find((x) => x.id === id);
  return c?.tracked ? c[metric]?.median : undefined;
}

/** Runs that can stand for their commit: full default-style runs of clean trees. */
export function comparable(history: Saved[], now: Results): Saved[] {
  return history
    .filter(
      (s) =>
        s.results.schema === now.schema &&
        s.results.mode === now.mode &&
        s.results.filter === undefined &&
        !s.results.dirty &&
        s.results.date < now.date,
    )
    .sort((a, b) => (a.results.date < b.results.date ? -1 : 1));
}

/** Each tracked case's A/A noise, from every version of the code with two or more runs in `runs`. */
export function learnNoise(runs: Results[]): Map<string, CaseNoise> {
  const groups = new Map<string, Results[]>();
  for (const r of runs) groups.set(codeOf(r), [...(groups.get(codeOf(r)) ?? []), r]);
  const squares = new Map<string, { sum: number; samples: number; groups: number }>();
  for (const group of groups.values()) {
    const ids = new Set(group.flatMap((r) => r.cases.map((c) => c.id)));
    for (const id of ids) {
      for (const metric of METRICS) {
        const medians = group.map((r) => medianOf(r, id, metric)).filter((m): m is number => m !== undefined && m > 0);
        if (medians.length < 2) continue;
        const entry = squares.get(key(id, metric)) ?? { sum: 0, samples: 0, groups: 0 };
        medians.forEach((m, i) => {
          const others = medians.filter((_, j) => j !== i);
          entry.sum += Math.log(m / median(others)) ** 2;
          entry.samples++;
        });
        entry.groups++;
        squares.set(key(id, metric), entry);
      }
    }
  }
  const out = new Map<string, CaseNoise>();
  for (const [k, e] of squares) out.set(k, { rms: Math.sqrt(e.sum / e.samples), samples: e.samples, groups: e.groups });
  return out;
}

/** The runs of the newest run's code (at most REFERENCE_RUNS of them, the newest). */
export function referenceRuns(history: Saved[]): Saved[] {
  const last = history.at(-1);
  if (!last) return [];
  return history.filter((s) => codeOf(s.results) === codeOf(last.results)).slice(-REFERENCE_RUNS);
}

function span(values: number[]): Interval {
  return {
    median: median(values),
    lo: Math.min(...values),
    hi: Math.max(...values),
    confidence: Number.NaN,
    n: values.length,
  };
}

/** Judge `now` against `history` (saved runs; those not comparable with `now` are ignored). */
export function judge(now: Results, history: Saved[]): Judgement {
  const runs = comparable(history, now);
  const reference = referenceRuns(runs);
  const judgement: Judgement = {
    changes: [],
    reference: reference.map((s) => s.file),
    margins: {},
    tooNoisy: {},
    byInterval: [],
  };
  if (reference.length === 0) return judgement;
  const noise = learnNoise(runs.map((s) => s.results));
  const fallback: string[] = [];
  for (const c of now.cases) {
    if (!c.tracked) continue;
    for (const metric of METRICS) {
      const after = c[metric];
      const before = reference.map((s) => medianOf(s.results, c.id, metric)).filter((m) => m !== undefined);
      if (!after || before.length === 0) continue;
      const learned = noise.get(key(c.id, metric));
      if (!learned) {
        fallback.push(c.id);
        continue;
      }
      const margin = Math.max(MIN_MARGIN, Math.exp(NOISE_Z * learned.rms) - 1);
      if (margin > MAX_MARGIN) {
        judgement.tooNoisy[key(c.id, metric)] = margin;
        continue;
      }
      judgement.margins[key(c.id, metric)] = margin;
      const ref = span(before);
      const moved = after.median / ref.median;
      if (Math.abs(Math.log(moved)) <= Math.log(1 + margin)) continue;
      // A ratio (lib/C) is better lower, a speedup higher.
      const worse = metric === "ratio" ? moved > 1 : moved < 1;
      const pct = `${moved >= 1 ? "+" : ""}${((moved - 1) * 100).toFixed(1)}%`;
      const what = metric === "ratio" ? "lib/C" : "speedup";
      judgement.changes.push({
        id: c.id,
        kind: worse ? "regression" : "improvement",
        metric,
        before: ref,
        after,
        text:
          `${worse ? "REGRESSION" : "improved  "} ${c.id}: ${what} ${fmtInterval(after)}, reference ${ref.median.toFixed(3)} ` +
          `(${before.length} run(s)); moved ${pct}, beyond its margin of ${(margin * 100).toFixed(1)}% ` +
          `(${NOISE_Z} x A/A noise ${(learned.rms * 100).toFixed(1)}% rms over ${learned.samples} runs)`,
      });
    }
  }
  // Cases with no A/A history yet: the interval rule against the newest reference run.
  const newest = reference.at(-1)!.results;
  const unlearned = new Set(fallback);
  judgement.byInterval = [...unlearned];
  const byInterval = compare({ ...now, cases: now.cases.filter((c) => unlearned.has(c.id)) }, newest);
  judgement.changes.push(
    ...byInterval
      .filter((ch) => !noise.has(key(ch.id, ch.metric)))
      .map((ch) => ({ ...ch, text: `${ch.text} (no A/A history: interval rule)` })),
  );
  return judgement;
}
