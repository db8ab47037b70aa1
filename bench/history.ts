/**
 * `bun bench history [--out FILE] [--last N]`: every saved run of bench/results/ as a table
 * (commit, date, the headline figure of each tracked case: lib/C ratio, speedup, or time when a
 * case has no counterpart), and a self-contained HTML chart (inline SVG, no scripts, no network):
 * the ratio per case over commits with its interval, and time per operation against size for the
 * latest run, library and C.
 */
import { writeFileSync } from "node:fs";
import { join, relative, resolve } from "node:path";
import { formatNs } from "./baseline.ts";
import { readResults, resultsDir, type Saved, type Schema } from "./results.ts";
import type { CaseResult, Interval } from "./runner.ts";

const root = resolve(import.meta.dir, "..");

/** A point of a case in one run: schema-1 files (before paired rounds) have no interval. */
interface Point {
  median: number;
  lo?: number;
  hi?: number;
}

type Metric = "ratio" | "speedup" | "time";

function headline(c: CaseResult | LegacyCase): { metric: Metric; point: Point } | undefined {
  const of = (i: Interval): Point => ({ median: i.median, lo: i.lo, hi: i.hi });
  if ("rounds" in c) {
    if (c.ratio) return { metric: "ratio", point: of(c.ratio) };
    if (c.speedup) return { metric: "speedup", point: of(c.speedup) };
    if (c.lib) return { metric: "time", point: of(c.lib) };
    return undefined;
  }
  if (typeof c.ratio === "number") return { metric: "ratio", point: { median: c.ratio } };
  return undefined;
}

/** The schema-1 case shape, enough for the history. */
interface LegacyCase {
  id: string;
  ratio?: number;
}

function tracked(c: CaseResult | LegacyCase): boolean {
  return "rounds" in c ? c.tracked : true;
}

function fmt(metric: Metric, p: Point): string {
  if (metric === "ratio") return p.median.toFixed(3);
  if (metric === "speedup") return `${p.median.toFixed(1)}x`;
  return formatNs(p.median);
}

function runLabel(s: Saved): string {
  return `${s.results.date.slice(0, 16).replace("T", " ")} ${s.results.commit}${s.results.dirty ? "+" : ""}`;
}

export interface Series {
  id: string;
  metric: Metric;
  points: (Point | undefined)[];
}

/** Per tracked case, its headline figure in each run (undefined where the run lacked it). */
export function seriesOf(runs: Saved[]): Series[] {
  const order: string[] = [];
  const metricOf = new Map<string, Metric>();
  // Once runs with paired rounds exist, their tracked cases are the rows; older ids stay out.
  const paired = runs.filter((r) => r.results.schema >= 2);
  for (const r of [...(paired.length ? paired : runs)].reverse()) {
    for (const c of r.results.cases as (CaseResult | LegacyCase)[]) {
      if (!tracked(c) || metricOf.has(c.id)) continue;
      const h = headline(c);
      if (!h) continue;
      metricOf.set(c.id, h.metric);
      order.push(c.id);
    }
  }
  return order.map((id) => ({
    id,
    metric: metricOf.get(id)!,
    points: runs.map((r) => {
      const c = (r.results.cases as (CaseResult | LegacyCase)[]).find((x) => x.id === id);
      const h = c && headline(c);
      return h && h.metric === metricOf.get(id) ? h.point : undefined;
    }),
  }));
}

/** How each schema's figures were formed, as the history names it. */
const METHOD: Record<Schema, string> = {
  1: "schema 1 (unpaired best-of)",
  2: "paired rounds",
  3: "interleaved slices",
};

export function historyTable(runs: Saved[]): string {
  const lines: string[] = [];
  lines.push("runs:");
  runs.forEach((r, i) => {
    const res = r.results;
    const reg = (res.changes ?? []).filter((c) => c.kind === "regression").length;
    const wall = res.wallSeconds !== undefined ? `${res.wallSeconds.toFixed(0)} s` : "";
    lines.push(
      `  #${String(i + 1).padEnd(3)} ${runLabel(r).padEnd(25)} ${res.mode.padEnd(8)} ${METHOD[res.schema].padEnd(27)}  ${wall}  ${res.schema >= 2 ? `${reg} regression(s)` : ""}  ${r.file}`,
    );
  });
  lines.push("");
  const series = seriesOf(runs);
  const w = 34;
  lines.push(
    ["tracked case (lib/C, speedup or time)".padEnd(w), ...runs.map((_, i) => `#${i + 1}`.padStart(9))].join(" "),
  );
  for (const s of series) {
    lines.push([s.id.padEnd(w), ...s.points.map((p) => (p ? fmt(s.metric, p) : "-").padStart(9))].join(" "));
  }
  return lines.join("\n");
}

// ---- the chart -------------------------------------------------------------------------------

const esc = (s: string) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");

function niceRange(lo: number, hi: number): [number, number] {
  if (!(hi > lo)) return [lo * 0.9, hi * 1.1 || 1];
  const pad = (hi - lo) * 0.1;
  return [Math.max(0, lo - pad), hi + pad];
}

/** One small chart: a case's figure over runs, with interval bars. */
function trendSvg(s: Series, labels: string[]): string {
  const W = 420;
  const H = 170;
  const L = 52;
  const R = 34;
  const T = 22;
  const B = 40;
  const vals = s.points.flatMap((p) => (p ? [p.lo ?? p.median, p.hi ?? p.median] : []));
  if (vals.length === 0) return "";
  const [y0, y1] = niceRange(
    Math.min(...vals, s.metric === "ratio" ? 1 : Infinity),
    Math.max(...vals, s.metric === "ratio" ? 1 : -Infinity),
  );
  const n = s.points.length;
  const x = (i: number) => L + (n === 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (n - 1));
  const y = (v: number) => T + (H - T - B) * (1 - (v - y0) / (y1 - y0));
  const f = (v: number) => (s.metric === "time" ? formatNs(v) : v.toFixed(s.metric === "speedup" ? 1 : 2));
  const parts: string[] = [];
  parts.push(`<text x="${L}" y="14" class="t">${esc(s.id)} (${s.metric === "ratio" ? "lib/C" : s.metric})</text>`);
  for (const v of [y0, (y0 + y1) / 2, y1]) {
    parts.push(
      `<line x1="${L}" x2="${W - R}" y1="${y(v)}" y2="${y(v)}" class="g"/><text x="${L - 4}" y="${y(v) + 4}" class="a" text-anchor="end">${esc(f(v))}</text>`,
    );
  }
  if (s.metric === "ratio" && y0 <= 1 && 1 <= y1)
    parts.push(`<line x1="${L}" x2="${W - R}" y1="${y(1)}" y2="${y(1)}" class="one"/>`);
  let path = "";
  s.points.forEach((p, i) => {
    if (!p) return;
    path += `${path ? "L" : "M"}${x(i).toFixed(1)},${y(p.median).toFixed(1)}`;
    if (p.lo !== undefined && p.hi !== undefined)
      parts.push(`<line x1="${x(i)}" x2="${x(i)}" y1="${y(p.lo)}" y2="${y(p.hi)}" class="e"/>`);
    parts.push(
      `<circle cx="${x(i)}" cy="${y(p.median)}" r="3" class="${p.lo === undefined ? "old" : "p"}"><title>${esc(`${labels[i]}: ${f(p.median)}${p.lo !== undefined ? ` [${f(p.lo)}, ${f(p.hi!)}]` : " (no interval: schema 1)"}`)}</title></circle>`,
    );
  });
  parts.push(`<path d="${path}" class="l"/>`);
  labels.forEach((lab, i) => {
    if (n > 8 && i % Math.ceil(n / 8) !== 0 && i !== n - 1) return;
    parts.push(
      `<text x="${x(i)}" y="${H - B + 14}" class="a" text-anchor="middle">${esc(lab.split(" ").pop()!)}</text>`,
    );
  });
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">${parts.join("")}</svg>`;
}

/** Time per operation against size (log-log), library and C, per op/domain/layout, for one run. */
function sizeSvg(run: Saved): string {
  const cases = (run.results.cases as CaseResult[]).filter((c) => c.bytes && c.lib && "rounds" in c);
  const groups = new Map<string, CaseResult[]>();
  for (const c of cases) {
    const parts = c.id.split("/");
    const layout = parts[3] ?? (c.layout?.kind === "single-page" ? "scattered" : (c.layout?.kind ?? ""));
    const key = `${parts[0]}/${parts[1]}${layout ? ` (${layout})` : ""}`;
    (groups.get(key) ?? groups.set(key, []).get(key)!).push(c);
  }
  const series = [...groups.entries()].filter(([, v]) => v.length >= 2);
  if (series.length === 0) return "<p>No case of the latest run has two sizes.</p>";
  const W = 860;
  const H = 420;
  const L = 70;
  const R = 240;
  const T = 20;
  const B = 40;
  const xs = cases.map((c) => c.bytes!);
  const ys = cases.flatMap((c) => [c.lib!.median, ...(c.c ? [c.c.median] : [])]);
  const lx0 = Math.log10(Math.min(...xs));
  const lx1 = Math.log10(Math.max(...xs));
  const ly0 = Math.floor(Math.log10(Math.min(...ys)));
  const ly1 = Math.ceil(Math.log10(Math.max(...ys)));
  const x = (b: number) => L + ((Math.log10(b) - lx0) / (lx1 - lx0 || 1)) * (W - L - R);
  const y = (ns: number) => T + (1 - (Math.log10(ns) - ly0) / (ly1 - ly0 || 1)) * (H - T - B);
  const colors = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
  ];
  const parts: string[] = [];
  for (let e = ly0; e <= ly1; e++) {
    parts.push(
      `<line x1="${L}" x2="${W - R}" y1="${y(10 ** e)}" y2="${y(10 ** e)}" class="g"/><text x="${L - 4}" y="${y(10 ** e) + 4}" class="a" text-anchor="end">${esc(formatNs(10 ** e))}</text>`,
    );
  }
  for (const b of [...new Set(xs)].sort((a, c) => a - c)) {
    const label = b >= 2 ** 30 ? `${b / 2 ** 30} GiB` : b >= 2 ** 20 ? `${b / 2 ** 20} MiB` : `${b / 1024} KiB`;
    parts.push(`<text x="${x(b)}" y="${H - B + 16}" class="a" text-anchor="middle">${label}</text>`);
  }
  series.forEach(([key, list], i) => {
    const color = colors[i % colors.length]!;
    const sorted = [...list].sort((a, b) => a.bytes! - b.bytes!);
    const line = (pick: (c: CaseResult) => Interval | undefined, dash: string) => {
      const pts = sorted.flatMap((c) =>
        pick(c) ? [`${x(c.bytes!).toFixed(1)},${y(pick(c)!.median).toFixed(1)}`] : [],
      );
      if (pts.length)
        parts.push(`<polyline points="${pts.join(" ")}" fill="none" stroke="${color}" stroke-width="1.6"${dash}/>`);
      for (const c of sorted) {
        const v = pick(c);
        if (v)
          parts.push(
            `<circle cx="${x(c.bytes!)}" cy="${y(v.median)}" r="2.5" fill="${color}"><title>${esc(`${c.id} ${dash ? "C" : "lib"}: ${formatNs(v.median)}`)}</title></circle>`,
          );
      }
    };
    line((c) => c.lib, "");
    line((c) => c.c, ' stroke-dasharray="4 3"');
    parts.push(`<text x="${W - R + 10}" y="${T + 14 * i + 10}" class="a" style="fill:${color}">${esc(key)}</text>`);
  });
  parts.push(`<text x="${W - R + 10}" y="${T + 14 * series.length + 20}" class="a">solid: library, dashed: C</text>`);
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">${parts.join("")}</svg>`;
}

export function historyHtml(runs: Saved[]): string {
  const labels = runs.map(runLabel);
  const series = seriesOf(runs);
  const latest = [...runs].reverse().find((r) => r.results.schema >= 2);
  const style = `body{font:14px system-ui,sans-serif;margin:24px;color:#222}h1{font-size:20px}h2{font-size:16px;margin-top:28px}
svg{background:#fff;border:1px solid #ddd;margin:4px}.t{font:600 12px sans-serif}.a{font:11px sans-serif;fill:#555}
.g{stroke:#eee}.one{stroke:#999;stroke-dasharray:3 3}.e{stroke:#1f77b4;stroke-width:2;opacity:.45}.p{fill:#1f77b4}
.old{fill:#fff;stroke:#1f77b4}.l{fill:none;stroke:#1f77b4;stroke-width:1.2}table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}td:first-child,th:first-child{text-align:left}`;
  const rows = runs
    .map(
      (r, i) =>
        `<tr><td>#${i + 1}</td><td>${esc(labels[i]!)}</td><td>${esc(r.results.mode)}</td><td>${METHOD[r.results.schema]}</td><td>${r.results.wallSeconds !== undefined ? `${r.results.wallSeconds.toFixed(0)} s` : ""}</td><td>${esc(r.file)}</td></tr>`,
    )
    .join("");
  return `<!doctype html><html><head><meta charset="utf-8"><title>bun-iommufd bench history</title><style>${style}</style></head><body>
<h1>bun-iommufd: <code>bun bench</code> history</h1>
<p>Each point is a run's median over its rounds; bars are its interval (interleaved slices: min..max of the rounds; paired rounds: order statistics, ≥95% where the rounds allow).
lib/C is library time over C time for the same operation on the same memory in the same run (lower is better; 1 = as fast as C).
Hollow points: older results without rounds (best-of, unpaired). Generated by <code>bun bench history</code> from bench/results/.</p>
<table><tr><th>run</th><th>date, commit</th><th>mode</th><th>kind</th><th>wall</th><th>file</th></tr>${rows}</table>
<h2>Tracked cases over runs</h2>
${series.map((s) => trendSvg(s, labels)).join("\n")}
<h2>Time per operation against size${latest ? `, ${esc(runLabel(latest))} (${esc(latest.file)})` : ""}</h2>
${latest ? sizeSvg(latest) : "<p>No run with paired rounds yet.</p>"}
</body></html>
`;
}

export function history(argv: string[]): number {
  let out = join(resultsDir, "history.html");
  let last = Infinity;
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--out" && argv[i + 1]) out = resolve(argv[++i]!);
    else if (argv[i] === "--last" && argv[i + 1]) last = Number(argv[++i]);
    else {
      console.error("usage: bun bench history [--out FILE] [--last N]");
      return 2;
    }
  }
  const runs = readResults()
    .filter((r) => r.results.mode !== "quick")
    .slice(-last);
  if (runs.length === 0) {
    console.log("no saved runs in bench/results/");
    return 0;
  }
  console.log(historyTable(runs));
  writeFileSync(out, historyHtml(runs));
  console.log(`\nchart: ${out.startsWith(`${root}/`) ? relative(root, out) : out}`);
  return 0;
}
