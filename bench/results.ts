/**
 * What a run measured, the file it is kept in (no host paths), the tables printed, and the
 * comparison with the previous run of the same mode: a case is flagged only when its new
 * interval lies beyond the previous one by more than a threshold.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { cpus, homedir, tmpdir, totalmem } from "node:os";
import { basename, join, resolve } from "node:path";
import * as mitata from "mitata";
import { formatNs, type Build } from "./baseline.ts";
import type { HostJsCost } from "./hotpath.ts";
import { layoutNote } from "./layout.ts";
import type { Confirmation } from "./noise.ts";
import type { CaseResult, Interval, RunMode } from "./runner.ts";
import { GiB, type Tier } from "./suite.ts";

export interface Machine {
  cpu: string;
  cores: number;
  memoryGiB: number;
  kernel: string;
}

export interface SkippedCase {
  id: string;
  reason: string;
}

/** What the process next to /dev/iommu measured (in the guest or on a host that has one). */
export interface Measurement {
  vm: boolean;
  machine: Machine;
  bun: string;
  settings: RunMode & { statistic: string; order: string; interval: string };
  /** What the machine offered: domains, huge pages, transparent huge pages for shmem. */
  env: Record<string, unknown>;
  /** Cases the plan had for this mode and filter (ran or failed), by id. */
  planned: string[];
  cases: CaseResult[];
  skipped: SkippedCase[];
  notes: string[];
  measureSeconds: number;
}

export interface Change {
  id: string;
  kind: "regression" | "improvement";
  metric: "ratio" | "speedup";
  before: Interval;
  after: Interval;
  /** C time per op now over then (the machine's own drift), when both runs have it. */
  cChange?: number;
  text: string;
}

/**
 * 1: unpaired best-of rounds (no interval). 2: paired rounds of 120 ms a side. 3: rounds of
 * interleaved slices, interval min..max. Runs are compared only with runs of the same schema.
 */
export type Schema = 1 | 2 | 3;
export const SCHEMA = 3;

/**
 * The code a tree measures, from its `git ls-tree -r` listing of src/, bench/ and vm/: saved
 * results and docs (*.md) left out, so two runs of one code are A/A runs (bench/noise.ts groups by
 * this) even with a commit of results or a README edit between them.
 */
export function codeHash(listing: string): string | undefined {
  const code = listing
    .split("\n")
    .filter((line) => line !== "" && !line.includes("\tbench/results/") && !line.endsWith(".md"))
    .join("\n");
  return code ? new Bun.CryptoHasher("sha1").update(code).digest("hex").slice(0, 12) : undefined;
}

export interface Results extends Measurement {
  schema: Schema;
  date: string;
  commit: string;
  /** codeHash of the committed src/, bench/ and vm/: the code measured. */
  code?: string;
  dirty: boolean;
  mode: Tier;
  filter?: string;
  /** The machine the guest ran on, when vm is true. */
  host?: Machine;
  cBuild?: Omit<Build, "binary">;
  /** Wall time of the whole command, guest boot included (host side). */
  wallSeconds?: number;
  bootSeconds?: number;
  /** File name (in bench/results/) of the run compared with. */
  previous?: string;
  /** Files of the runs the reference was made of (bench/noise.ts), when judged by noise floors. */
  reference?: string[];
  /** Cases judged by their A/A noise floor: the margin each had (fraction), by "id metric". */
  margins?: Record<string, number>;
  /** Cases whose A/A noise is too large to judge, with their would-be margins. */
  tooNoisy?: Record<string, number>;
  /** The library's own JS per 4 KiB pair on the host, ioctl a no-op: the median of fresh processes (bench/hotpath.ts). */
  hostJs?: HostJsCost & { each?: HostJsCost[] };
  threshold: number;
  changes: Change[];
  /** Why the run failed (quick: the smoke test's conditions; otherwise cases with errors). */
  problems?: string[];
  /** The flagged cases measured again in a fresh boot; `changes` holds only the flags it reproduced. */
  confirmation?: Confirmation;
}

/**
 * A new interval must clear the previous one by this fraction to be flagged. An interval covers
 * the noise within a run, but each run is a new Bun process with its own JIT decisions, a
 * between-run spread no single run sees (earlier runs moved the 4 KiB mapFile ratio between 1.42
 * and 1.75), hence a margin of 10% on top.
 */
export const THRESHOLD = 0.1;

export function machine(): Machine {
  const list = cpus();
  let kernel = "unknown";
  try {
    kernel = readFileSync("/proc/sys/kernel/osrelease", "utf8").trim();
  } catch {
    // no /proc
  }
  return {
    cpu: list[0]?.model ?? "unknown",
    cores: list.length,
    memoryGiB: Math.round((totalmem() / GiB) * 10) / 10,
    kernel,
  };
}

export const resultsDir = join(import.meta.dir, "results");
const quickSavedDir = join(resultsDir, "quick");
/** Quick and filtered runs land here unless --save: CI runs must not pile files up in the tree. */
export const scratchDir = join(tmpdir(), "bun-iommufd-bench");

function dirFor(results: Results, save: boolean): string {
  if (results.mode === "quick") return save ? quickSavedDir : scratchDir;
  if (results.filter && !save) return scratchDir;
  return resultsDir;
}

export interface Saved {
  file: string;
  path: string;
  results: Results;
}

export function readResults(dir = resultsDir): Saved[] {
  if (!existsSync(dir)) return [];
  const out: Saved[] = [];
  for (const name of readdirSync(dir)) {
    if (!name.endsWith(".json")) continue;
    const path = join(dir, name);
    try {
      const results = JSON.parse(readFileSync(path, "utf8")) as Results;
      if ([1, 2, 3].includes(results.schema) && Array.isArray(results.cases)) out.push({ file: name, path, results });
    } catch {
      // not ours, or half written
    }
  }
  return out.sort((a, b) => (a.results.date < b.results.date ? -1 : 1));
}

/** The newest earlier results of the same schema and mode (and of a whole run, unless filtered). */
export function previousResults(results: Results): Saved | undefined {
  const dirs = results.mode === "quick" ? [quickSavedDir, scratchDir] : [resultsDir, scratchDir];
  return dirs
    .flatMap((d) => readResults(d))
    .filter(
      (r) => r.results.schema === results.schema && r.results.mode === results.mode && r.results.date < results.date,
    )
    .filter((r) => results.filter !== undefined || r.results.filter === undefined)
    .sort((a, b) => (a.results.date < b.results.date ? 1 : -1))[0];
}

const f3 = (x: number) => x.toFixed(3);

export function fmtInterval(i: Interval | undefined, f: (x: number) => string = f3): string {
  return i ? `${f(i.median)} [${f(i.lo)}, ${f(i.hi)}]` : "n/a";
}

/**
 * Changes between two runs, per tracked case: the ratio (lib / C, lower is better) or the speedup
 * (higher is better) is flagged only when the new interval lies wholly beyond the old one by more
 * than `threshold` of it; the C side's own change is given beside it.
 */
export function compare(now: Results, then: Results, threshold = THRESHOLD): Change[] {
  const before = new Map(then.cases.map((c) => [c.id, c]));
  const out: Change[] = [];
  for (const c of now.cases) {
    const p = before.get(c.id);
    if (!c.tracked || !p) continue;
    const cChange = c.c && p.c ? c.c.median / p.c.median : undefined;
    const cNote =
      cChange !== undefined ? `; C itself ${cChange >= 1 ? "+" : ""}${((cChange - 1) * 100).toFixed(1)}%` : "";
    if (c.ratio && p.ratio) {
      const worse = c.ratio.lo > p.ratio.hi * (1 + threshold);
      const better = c.ratio.hi < p.ratio.lo / (1 + threshold);
      if (worse || better) {
        const kind = worse ? "regression" : "improvement";
        out.push({
          id: c.id,
          kind,
          metric: "ratio",
          before: p.ratio,
          after: c.ratio,
          cChange,
          text: `${worse ? "REGRESSION" : "improved  "} ${c.id}: lib/C ${fmtInterval(c.ratio)}, was ${fmtInterval(p.ratio)}${cNote}`,
        });
      }
    }
    if (c.speedup && p.speedup) {
      const worse = c.speedup.hi < p.speedup.lo / (1 + threshold);
      const better = c.speedup.lo > p.speedup.hi * (1 + threshold);
      if (worse || better) {
        const f1 = (x: number) => x.toFixed(1);
        out.push({
          id: c.id,
          kind: worse ? "regression" : "improvement",
          metric: "speedup",
          before: p.speedup,
          after: c.speedup,
          text: `${worse ? "REGRESSION" : "improved  "} ${c.id}: speedup ${fmtInterval(c.speedup, f1)}x, was ${fmtInterval(p.speedup, f1)}x`,
        });
      }
    }
  }
  return out;
}

export function fileName(results: Results): string {
  const stamp = results.date.replace(/\.\d+Z$/, "Z").replaceAll(":", "");
  return `${stamp}-${results.commit}-${results.mode}.json`;
}

const projectRoot = resolve(import.meta.dir, "..");

/** Strings of a results object with this machine's paths taken out (project -> ".", home -> "~"). */
export function scrubbed(results: Results): Results {
  const home = homedir();
  const text = JSON.stringify(results, (_key, value) => {
    if (typeof value !== "string") return value;
    let s = value.split(projectRoot).join(".");
    if (home && home !== "/") s = s.split(home).join("~");
    return s.split(tmpdir()).join("$TMPDIR");
  });
  return JSON.parse(text) as Results;
}

/** Absolute paths left in a results file's text (there should be none). */
export function hostPaths(text: string): string[] {
  return [...new Set(text.match(/(?<![\w.~$])\/(?:root|home|tmp|work|usr|var|opt|srv|mnt)\/[^\s"']*/g) ?? [])];
}

export function save(results: Results, saveFlag: boolean): string {
  const dir = dirFor(results, saveFlag);
  mkdirSync(dir, { recursive: true });
  const path = join(dir, fileName(results));
  const text = `${JSON.stringify(scrubbed(results), null, 2)}\n`;
  const left = hostPaths(text);
  if (left.length) throw new Error(`bench: results would carry host paths (${left.join(", ")}); not saved`);
  writeFileSync(path, text);
  return path;
}

function rate(bytesPerSec: number | undefined): string {
  if (bytesPerSec === undefined || !Number.isFinite(bytesPerSec)) return "";
  return bytesPerSec >= 100
    ? bytesPerSec.toFixed(0)
    : bytesPerSec >= 1
      ? bytesPerSec.toFixed(2)
      : bytesPerSec.toPrecision(2);
}

function pad(cells: string[], widths: number[]): string {
  return cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  ");
}

/** The tables people read: ratios, speedups, plain times; every figure a median [interval]. */
export function tables(results: Results): string {
  const lines: string[] = [];
  const withC = results.cases.filter((c) => c.cPlanned);
  if (withC.length) {
    const w = [34, 11, 11, 26, 9];
    lines.push(pad(["case", "lib/op", "C/op", "lib/C median [interval]", "lib GiB/s"], w));
    lines.push(w.map((n) => "-".repeat(n)).join("  "));
    for (const c of withC) {
      lines.push(
        pad(
          [
            c.id,
            c.lib ? formatNs(c.lib.median) : "error",
            c.c ? formatNs(c.c.median) : "n/a",
            fmtInterval(c.ratio),
            rate(c.gibPerSec),
          ],
          w,
        ),
      );
    }
    lines.push("");
  }
  const withRef = results.cases.filter((c) => c.refPlanned);
  if (withRef.length) {
    const w = [34, 11, 13, 24];
    lines.push(pad(["case", "lib/op", "reference/op", "speedup median [interval]"], w));
    lines.push(w.map((n) => "-".repeat(n)).join("  "));
    for (const c of withRef) {
      lines.push(
        pad(
          [
            c.id,
            c.lib ? formatNs(c.lib.median) : "error",
            c.ref ? formatNs(c.ref.median) : "n/a",
            fmtInterval(c.speedup, (x) => `${x.toFixed(1)}x`),
          ],
          w,
        ),
      );
    }
    lines.push("");
  }
  const alone = results.cases.filter((c) => !c.cPlanned && !c.refPlanned);
  if (alone.length) {
    const w = [34, 36];
    lines.push(pad(["case (no C side: absolute time)", "time/op median [interval]"], w));
    lines.push(w.map((n) => "-".repeat(n)).join("  "));
    for (const c of alone) lines.push(pad([c.id, fmtInterval(c.lib, formatNs)], w));
    lines.push("");
  }
  const layouts = results.cases.filter((c) => c.layout && (c.layout.kind === "scattered" || c.layout.kind === "huge"));
  if (layouts.length) {
    lines.push("layouts (checked through /proc/self/pagemap):");
    for (const c of layouts) lines.push(`  ${c.id.padEnd(34)} ${layoutNote(c.layout)}`);
    lines.push("");
  }
  const errors = results.cases.flatMap((c) => c.errors.map((e) => `  ${c.id}: ${e}`));
  if (errors.length) lines.push("errors:", ...errors, "");
  if (results.skipped.length) lines.push("skipped:", ...results.skipped.map((s) => `  ${s.id}: ${s.reason}`), "");
  lines.push(`each figure: ${results.settings.statistic}; [interval] = ${results.settings.interval}`);
  return lines.join("\n");
}

/** mitata's box plot of the per-round ratios of every case with a C side. */
export function ratioPlot(results: Results, colors: boolean): string {
  const $ = (
    mitata as unknown as { $: { boxplot: { ascii(map: object, key: number, size: number, o: object): string[] } } }
  ).$;
  const map: Record<string, { min: number; max: number; p25: number; p75: number; avg: number }> = {};
  for (const c of results.cases) {
    const r = c.rounds.flatMap((x) => (x.ratio !== undefined ? [x.ratio] : [])).sort((a, b) => a - b);
    if (r.length === 0 || !c.ratio) continue;
    const q = (p: number) => r[Math.round(p * (r.length - 1))]!;
    map[c.id] = { min: r[0]!, max: r[r.length - 1]!, p25: q(0.25), p75: q(0.75), avg: c.ratio.median };
  }
  const keys = Object.keys(map);
  if (keys.length === 0) return "";
  const key = Math.max(...keys.map((k) => k.length));
  return $.boxplot.ascii(map, key, 44, { fmt: (x: number) => x.toFixed(2), colors }).join("\n");
}

export function fileOf(path: string): string {
  return basename(path);
}
