/**
 * What a run measured, the file it is kept in, the table printed, and the comparison with the
 * previous run of the same mode.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { cpus, tmpdir, totalmem } from "node:os";
import { join } from "node:path";
import { formatNs, type CStats } from "./baseline.ts";
import { GiB, OP_LABEL, type CaseSpec, type Mode, type SkippedCase } from "./cases.ts";

/** Statistics of one side of one case, over the rounds. */
export interface SideResult {
  /** Time per pair in ns: the best (lowest) per-round median. */
  nsPerPair: number;
  pairsPerSec: number;
  gibPerSec: number;
  /** Per-round medians and means, in run order. */
  p50: number[];
  avg: number[];
  /** From the best round. */
  min: number;
  p99: number;
  samples: number;
  ticks: number;
  warmupPairs?: number;
}

export interface CaseResult extends CaseSpec {
  label: string;
  library?: SideResult;
  c?: SideResult;
  /** library / C, both best-of-rounds medians. */
  ratio?: number;
  errors: string[];
}

export interface Machine {
  cpu: string;
  cores: number;
  memoryGiB: number;
  kernel: string;
}

/** What the process next to /dev/iommu measured (in the guest or on a host that has one). */
export interface Measurement {
  vm: boolean;
  machine: Machine;
  bun: string;
  settings: Mode & { statistic: string; order: string };
  cases: CaseResult[];
  skipped: SkippedCase[];
  notes: string[];
}

export interface AllocatorResult {
  name: string;
  avgNs: number;
  p50Ns: number;
}

export interface Results extends Measurement {
  schema: 1;
  date: string;
  commit: string;
  dirty: boolean;
  mode: "quick" | "full";
  filter?: string;
  /** The machine the guest ran on, when vm is true. */
  host?: Machine;
  cBuild?: string[];
  allocator: AllocatorResult[];
  previous?: string;
  regressions: string[];
}

export function machine(): Machine {
  const list = cpus();
  return {
    cpu: list[0]?.model ?? "unknown",
    cores: list.length,
    memoryGiB: Math.round((totalmem() / GiB) * 10) / 10,
    kernel: (() => {
      try {
        return readFileSync("/proc/sys/kernel/osrelease", "utf8").trim();
      } catch {
        return "unknown";
      }
    })(),
  };
}

interface Sample {
  p50: number;
  avg: number;
  min: number;
  p99: number;
  samples: number;
  ticks: number;
}

export function side(rounds: Sample[], size: number, warmupPairs?: number): SideResult | undefined {
  if (rounds.length === 0) return undefined;
  const best = rounds.reduce((a, b) => (b.p50 < a.p50 ? b : a));
  return {
    nsPerPair: best.p50,
    pairsPerSec: 1e9 / best.p50,
    gibPerSec: (size / GiB) * (1e9 / best.p50),
    p50: rounds.map((r) => r.p50),
    avg: rounds.map((r) => r.avg),
    min: best.min,
    p99: best.p99,
    samples: best.samples,
    ticks: best.ticks,
    warmupPairs,
  };
}

export function cSample(s: CStats): Sample | undefined {
  if (!s.ok || s.p50 === undefined) return undefined;
  return { p50: s.p50, avg: s.avg!, min: s.min!, p99: s.p99!, samples: s.samples!, ticks: s.ticks! };
}

export const resultsDir = join(import.meta.dir, "results");
const quickSavedDir = join(resultsDir, "quick");
/** Quick and filtered runs land here unless --save: CI runs must not pile files up in the tree. */
const scratchDir = join(tmpdir(), "bun-iommufd-bench");

function dirFor(results: Results, save: boolean): string {
  if (results.mode === "quick") return save ? quickSavedDir : scratchDir;
  if (results.filter && !save) return scratchDir;
  return resultsDir;
}

function readResults(dir: string): { path: string; results: Results }[] {
  if (!existsSync(dir)) return [];
  const out: { path: string; results: Results }[] = [];
  for (const name of readdirSync(dir)) {
    if (!name.endsWith(".json")) continue;
    const path = join(dir, name);
    try {
      const results = JSON.parse(readFileSync(path, "utf8")) as Results;
      if (results.schema === 1 && Array.isArray(results.cases)) out.push({ path, results });
    } catch {
      // not ours, or half written
    }
  }
  return out;
}

/**
 * The newest earlier results of the same mode (full runs compare with full runs only). A whole
 * run compares with whole runs only; a filtered one with anything that has its cases.
 */
export function previousResults(results: Results): { path: string; results: Results } | undefined {
  const dirs = results.mode === "quick" ? [quickSavedDir, scratchDir] : [resultsDir, scratchDir];
  return dirs
    .flatMap(readResults)
    .filter((r) => r.results.mode === results.mode && r.results.date < results.date)
    .filter((r) => results.filter !== undefined || r.results.filter === undefined)
    .sort((a, b) => (a.results.date < b.results.date ? 1 : -1))[0];
}

const REGRESSION_THRESHOLD = 1.1;

/** "REGRESSION" lines for every case whose library time per pair grew by more than 10%. */
export function compare(results: Results, previous: Results): string[] {
  const before = new Map(previous.cases.map((c) => [c.id, c]));
  const lines: string[] = [];
  for (const now of results.cases) {
    const then = before.get(now.id);
    if (!now.library || !then?.library) continue;
    const change = now.library.nsPerPair / then.library.nsPerPair;
    if (change <= REGRESSION_THRESHOLD) continue;
    // A C side that slowed down as much points at the machine, not at the library.
    const cChange = now.c && then.c ? now.c.nsPerPair / then.c.nsPerPair : undefined;
    const ratioNote =
      now.ratio !== undefined && then.ratio !== undefined
        ? `; lib/C ${then.ratio.toFixed(2)} -> ${now.ratio.toFixed(2)}`
        : "";
    lines.push(
      `REGRESSION ${now.id}: ${formatNs(now.library.nsPerPair)}/pair, was ${formatNs(then.library.nsPerPair)} ` +
        `(+${((change - 1) * 100).toFixed(1)}%${cChange !== undefined ? `; C ${cChange >= 1 ? "+" : ""}${((cChange - 1) * 100).toFixed(1)}%` : ""}${ratioNote})`,
    );
  }
  return lines;
}

export function fileName(results: Results): string {
  const stamp = results.date.replace(/\.\d+Z$/, "Z").replaceAll(":", "");
  return `${stamp}-${results.commit}.json`;
}

export function save(results: Results, saveFlag: boolean): string {
  const dir = dirFor(results, saveFlag);
  mkdirSync(dir, { recursive: true });
  const path = join(dir, fileName(results));
  writeFileSync(path, `${JSON.stringify(results, null, 2)}\n`);
  return path;
}

function pad(s: string, n: number, left = false): string {
  return left ? s.padStart(n) : s.padEnd(n);
}

function rate(n: number): string {
  if (!Number.isFinite(n)) return "n/a";
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)} M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} k`;
  return n.toFixed(1);
}

function gib(n: number): string {
  if (!Number.isFinite(n)) return "n/a";
  return n >= 100 ? n.toFixed(0) : n >= 1 ? n.toFixed(2) : n.toPrecision(2);
}

/** The table: one row per case, library and C side by side. */
export function table(results: Results): string {
  const head = ["case", "lib/pair", "lib pairs/s", "lib GiB/s", "C/pair", "C pairs/s", "lib/C"];
  const widths = [26, 11, 12, 10, 11, 10, 7];
  const lines: string[] = [];
  const row = (cells: string[]) => lines.push(cells.map((c, i) => pad(c, widths[i]!, i > 0)).join("  "));
  row(head);
  lines.push(widths.map((w) => "-".repeat(w)).join("  "));
  let domain = "";
  for (const c of results.cases) {
    if (c.domain !== domain && domain !== "") lines.push("");
    domain = c.domain;
    const lib = c.library;
    const cc = c.c;
    row([
      c.id,
      lib ? formatNs(lib.nsPerPair) : "error",
      lib ? rate(lib.pairsPerSec) : "",
      lib ? gib(lib.gibPerSec) : "",
      cc ? formatNs(cc.nsPerPair) : "n/a",
      cc ? rate(cc.pairsPerSec) : "",
      c.ratio !== undefined ? c.ratio.toFixed(3) : "n/a",
    ]);
  }
  const errors = results.cases.flatMap((c) => c.errors.map((e) => `  ${c.id}: ${e}`));
  if (errors.length) lines.push("", "errors:", ...errors);
  if (results.skipped.length) lines.push("", "skipped:", ...results.skipped.map((s) => `  ${s.id}: ${s.reason}`));
  lines.push(
    "",
    `time per pair = ${results.settings.statistic}; GiB/s = bytes mapped (and unmapped) per second.`,
    `ops: ${Object.entries(OP_LABEL)
      .map(([k, v]) => `${k} = ${v}`)
      .join("; ")}`,
  );
  return lines.join("\n");
}

/** The headline checks of issue #7, as lines. */
export function verdicts(results: Results): string[] {
  const out: string[] = [];
  for (const c of results.cases) {
    if (c.ratio === undefined) continue;
    if (c.op === "mapFile" && c.size === 4096) {
      const slower = (c.ratio - 1) * 100;
      const ok = c.ratio <= 1.1;
      out.push(
        `${ok ? "ok  " : "MISS"} ${c.id}: library ${slower >= 0 ? `${slower.toFixed(1)}% slower` : `${(-slower).toFixed(1)}% faster`} than C (target: at most 10%, aim 5%)`,
      );
    }
  }
  return out;
}
