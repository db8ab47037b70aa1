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
 * A/A runs taken back to back share the machine's state, and the machine does not keep one: on
 * some hours the same guest ran C's mock 4 KiB pair in 13.5 us, on others in 20-30, and lib/C moved
 * with it (map/mock/4KiB +19% on a commit that did not touch the map path; irq/edu/msi/block -9.5%
 * on identical code). So each case's noise is also taken from how far its median moves between
 * consecutive runs of the history, of any code (its drift: 1.4826 x the median of those moves, a
 * standard deviation that the few moves real changes make do not shift), once DRIFT_MIN_PAIRS
 * such moves exist; the larger of the two is the case's noise.
 *
 * The rule: a case moved when its median lies beyond the reference (the median of the medians of
 * the newest run's code's runs) by more than NOISE_Z times its noise, and never by less than
 * MIN_MARGIN. A case whose margin would exceed MAX_MARGIN cannot
 * resolve a change worth reporting and is listed as too noisy instead. A case with no A/A history
 * yet falls back to the interval rule of results.ts (`compare`) against the last run.
 */
import { type CaseResult, type Interval, median } from "./runner.ts";
import { type Change, compare, fmtInterval, type Results, type Saved } from "./results.ts";

/** Margin = NOISE_Z x a case's A/A noise (rms of log deviations), within MIN_MARGIN..MAX_MARGIN. */
export const NOISE_Z = 3;
export const MIN_MARGIN = 0.07;
export const MAX_MARGIN = 0.3;
/** At most this many runs of the last commit make the reference. */
export const REFERENCE_RUNS = 4;
/** Moves between consecutive runs a case needs before its drift counts (a median of fewer says little). */
export const DRIFT_MIN_PAIRS = 4;

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

/**
 * A run as it stands in the reference: its own figures, except for a case on which its second
 * boot withdrew a flag. That boot was off for the case, and the second boot's figures stand in.
 * Left as it was, the outlier became the reference: the run after c15da83 measured
 * `mapFile/mock/2MiB/huge` where it had always been, and was flagged as improved (-11.1%) against
 * the first boot of c15da83, whose flag on that case its own second boot had withdrawn.
 */
export function asReference(results: Results): Results {
  const confirmation = results.confirmation;
  if (!confirmation?.withdrawn.length) return results;
  const off = new Set(confirmation.withdrawn.map((c) => c.id));
  const cases = results.cases.map((c) => (off.has(c.id) ? (confirmation.cases.find((a) => a.id === c.id) ?? c) : c));
  return { ...results, cases };
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

/**
 * How far a case's median moves from one run to the next over `runs` (oldest first, any code):
 * 1.4826 x the median of |log(m[i] / m[i-1])|, the standard deviation those moves would have if
 * normal, robust to the few that real changes make. Undefined with fewer than DRIFT_MIN_PAIRS moves.
 */
export function driftOf(runs: Results[], id: string, metric: Metric): number | undefined {
  const medians = runs.map((r) => medianOf(r, id, metric)).filter((m): m is number => m !== undefined && m > 0);
  const moves: number[] = [];
  for (let i = 1; i < medians.length; i++) moves.push(Math.abs(Math.log(medians[i]! / medians[i - 1]!)));
  return moves.length < DRIFT_MIN_PAIRS ? undefined : 1.4826 * median(moves);
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
  const comparableResults = runs.map((s) => s.results);
  const references = reference.map((s) => asReference(s.results));
  const noise = learnNoise(comparableResults);
  const fallback: string[] = [];
  for (const c of now.cases) {
    if (!c.tracked) continue;
    for (const metric of METRICS) {
      const after = c[metric];
      const before = references.map((r) => medianOf(r, c.id, metric)).filter((m) => m !== undefined);
      if (!after || before.length === 0) continue;
      const learned = noise.get(key(c.id, metric));
      if (!learned) {
        fallback.push(c.id);
        continue;
      }
      const drift = driftOf(comparableResults, c.id, metric);
      const sigma = Math.max(learned.rms, drift ?? 0);
      const margin = Math.max(MIN_MARGIN, Math.exp(NOISE_Z * sigma) - 1);
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
          `(${NOISE_Z} x ${sigma === learned.rms ? `A/A noise ${(learned.rms * 100).toFixed(1)}% rms over ${learned.samples} runs` : `drift ${(sigma * 100).toFixed(1)}% between consecutive runs`})`,
      });
    }
  }
  // Cases with no A/A history yet: the interval rule against the newest reference run.
  const newest = references.at(-1)!;
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

/** A second guest boot's look at the cases the first flagged (bench/main.ts). */
export interface Confirmation {
  /** The flagged cases, measured again in a fresh boot (a run filtered to them). */
  ids: string[];
  bootSeconds?: number;
  measureSeconds?: number;
  /** The second boot's figures, as measured. */
  cases: CaseResult[];
  /** Flags the second boot did not reproduce: withdrawn, each with both figures in its text. */
  withdrawn: Change[];
}

const same = (a: Change, b: Change) => a.id === b.id && a.metric === b.metric && a.kind === b.kind;

/**
 * Which flags of a run stand once its flagged cases were measured again in a fresh guest boot.
 * `again` is that boot's judgement, by the same rule against the same history: a flag stands when
 * the second boot makes the same one (same case, metric and direction, beyond the margin again),
 * or could not measure the case at all (`measured` lacks it: better a flag to look at than a
 * regression let through). One boot can be off on its own: on 8 Dec 2026 two default runs of the
 * same commit, back to back, flagged map/edu-type1/4KiB +16.6% against its reference and then,
 * 5 minutes later, -13.2% against the first; a real slowdown shows in every boot.
 */
export function confirm(
  changes: Change[],
  again: Change[],
  measured: CaseResult[],
): { kept: Change[]; withdrawn: Change[] } {
  const kept: Change[] = [];
  const withdrawn: Change[] = [];
  for (const change of changes) {
    const second = measured.find((c) => c.id === change.id);
    const figure = second?.[change.metric];
    if (!second || !figure || second.errors.length > 0) {
      kept.push({
        ...change,
        text: `${change.text}; not measured again (${second?.errors.join("; ") || "no figure"}): kept`,
      });
      continue;
    }
    const moved = figure.median / change.before.median;
    const pct = `${moved >= 1 ? "+" : ""}${((moved - 1) * 100).toFixed(1)}%`;
    const at = `a second boot: ${fmtInterval(figure)}, ${pct}`;
    if (again.some((c) => same(c, change))) kept.push({ ...change, text: `${change.text}; confirmed by ${at}` });
    else withdrawn.push({ ...change, text: `withdrawn ${change.text.trimStart()}; not reproduced by ${at}` });
  }
  return { kept, withdrawn };
}
