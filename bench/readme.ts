/**
 * Writes the benchmark figures of README.md and bench/README.md from one named results file:
 *
 *   bun bench/readme.ts bench/results/<file>.json [--check]
 *
 * Each README has a block between `<!-- bench:<name> begin -->` and `<!-- bench:<name> end -->`;
 * only those blocks change. Every block names the results file it came from. --check exits 1
 * when a block differs from what the file gives (for CI or review), writing nothing.
 */
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { basename, join, resolve } from "node:path";
import { formatNs } from "./baseline.ts";
import { layoutNote } from "./layout.ts";
import type { Results } from "./results.ts";
import type { CaseResult, Interval } from "./runner.ts";

const root = resolve(import.meta.dir, "..");

const r3 = (i: Interval | undefined) => (i ? `${i.median.toFixed(2)} (${i.lo.toFixed(2)}-${i.hi.toFixed(2)})` : "-");
const x1 = (i: Interval | undefined) => (i ? `${i.median.toFixed(1)}x (${i.lo.toFixed(1)}-${i.hi.toFixed(1)})` : "-");
const ns = (i: Interval | undefined) => (i ? formatNs(i.median) : "-");

function source(results: Results, file: string): string {
  const where = results.vm ? "the QEMU/TCG guest (emulated time: compare ratios, not times)" : "a host with /dev/iommu";
  return (
    `From \`bench/results/${file}\` (${results.mode} run, commit ${results.commit}, ${results.date.slice(0, 10)}, ${where}; ` +
    (results.schema >= 3
      ? `${results.settings.rounds} rounds of interleaved slices per case: median, and in brackets min..max of the rounds).`
      : `${results.settings.rounds} paired rounds per case: median, and in brackets the interval of the median).`)
  );
}

function find(results: Results, id: string): CaseResult | undefined {
  return results.cases.find((c) => c.id === id);
}

/** README.md: the headline ratios. */
function summaryBlock(results: Results, file: string): string {
  const lines = [
    source(results, file),
    "",
    "| library time / C time, same memory, same run | no domain | mock domain | edu (VT-d) |",
    "| --- | --- | --- | --- |",
  ];
  const row = (label: string, op: string) => {
    const cell = (d: string) => r3(find(results, `${op}/${d}/4KiB`)?.ratio);
    lines.push(`| ${label} | ${cell("none")} | ${cell("mock")} | ${cell("edu")} |`);
  };
  row("4 KiB, bare `bun:ffi` (no library: the floor)", "rawFfi");
  row("4 KiB, `ioas.prepareMapFile()` → `map()`/`unmap()`", "prepared");
  row("4 KiB, `ioas.mapFile()` + `mapping.unmap()`", "mapFile");
  const js = results.hostJs;
  if (js) {
    const f = (x: number) => `${x.toFixed(1)} ns`;
    lines.push(
      "",
      `The library's own JavaScript per 4 KiB pair on the host (\`ioctl\` a no-op, ${js.each ? `the median of ${js.each.length} process${js.each.length === 1 ? "" : "es"}` : "one process"}, \`bench/hotpath.ts\`): ` +
        `\`mapFile\` ${f(js.mapFile)}, \`map\` ${f(js.map)}, \`copy\` ${f(js.copy)}, prepared ${f(js.prepared)}.`,
    );
  }
  const large = results.cases.filter((c) => c.ratio && (c.bytes ?? 0) >= 2 * 2 ** 20 && c.id.startsWith("mapFile/"));
  if (large.length) {
    lines.push(
      "",
      "| `mapFile` + `unmap`, 2 MiB and more | lib/C | C per pair | library per pair |",
      "| --- | --- | --- | --- |",
    );
    for (const c of large) lines.push(`| \`${c.id}\` | ${r3(c.ratio)} | ${ns(c.c)} | ${ns(c.lib)} |`);
  }
  const heap = results.cases.filter((c) => c.speedup);
  if (heap.length) {
    lines.push("", "| DmaHeap alloc+free against mapFile+unmap of the same size | speedup |", "| --- | --- |");
    for (const c of heap) lines.push(`| \`${c.id}\` | ${x1(c.speedup)} |`);
  }
  return lines.join("\n");
}

/** bench/README.md: why the layout matters, in figures. */
function layoutBlock(results: Results, file: string): string {
  const lines = [
    source(results, file),
    "",
    "| case | layout (checked) | C per pair | library per pair | lib/C |",
    "| --- | --- | --- | --- | --- |",
  ];
  const cases = results.cases.filter(
    (c) => c.layout && (c.layout.kind === "scattered" || c.layout.kind === "huge") && c.c,
  );
  for (const c of cases)
    lines.push(`| \`${c.id}\` | ${layoutNote(c.layout)} | ${ns(c.c)} | ${ns(c.lib)} | ${r3(c.ratio)} |`);
  return lines.join("\n");
}

/** bench/README.md: every case of the file. */
function allBlock(results: Results, file: string): string {
  const lines = [
    source(results, file),
    "",
    "| case | library | C | lib/C | reference | speedup |",
    "| --- | --- | --- | --- | --- | --- |",
  ];
  for (const c of results.cases) {
    lines.push(
      `| \`${c.id}\` | ${ns(c.lib)} | ${ns(c.c)} | ${r3(c.ratio)} | ${ns(c.ref)} | ${c.speedup ? x1(c.speedup) : "-"} |`,
    );
  }
  return lines.join("\n");
}

function replaceBlock(text: string, name: string, body: string, path: string): string {
  const begin = `<!-- bench:${name} begin -->`;
  const end = `<!-- bench:${name} end -->`;
  const a = text.indexOf(begin);
  const b = text.indexOf(end);
  if (a < 0 || b < a) throw new Error(`${path} has no ${begin} ... ${end} block`);
  return `${text.slice(0, a + begin.length)}\n${body}\n${text.slice(b)}`;
}

/**
 * The text as `bun run format` would leave it (Biome pads Markdown tables), so that a generated
 * README passes the lint step and `--check` compares like with like.
 */
function formatLikeTheRepository(text: string, path: string): string {
  const biome = join(root, "node_modules", ".bin", "biome");
  if (!existsSync(biome)) return text;
  const run = Bun.spawnSync([biome, "format", `--stdin-file-path=${path}`], {
    cwd: root,
    stdin: new TextEncoder().encode(text),
    stderr: "pipe",
  });
  if (run.exitCode !== 0) throw new Error(`biome could not format ${path}: ${run.stderr.toString().trim()}`);
  return run.stdout.toString();
}

export function render(results: Results, file: string): Record<string, Record<string, string>> {
  return {
    "README.md": { summary: summaryBlock(results, file) },
    "bench/README.md": { layout: layoutBlock(results, file), cases: allBlock(results, file) },
  };
}

if (import.meta.main) {
  const args = process.argv.slice(2);
  const check = args.includes("--check");
  const path = args.find((a) => !a.startsWith("--"));
  if (!path) {
    console.error("usage: bun bench/readme.ts bench/results/<file>.json [--check]");
    process.exit(2);
  }
  const results = JSON.parse(readFileSync(path, "utf8")) as Results;
  if (results.schema < 2) {
    console.error(
      `${path}: schema ${results.schema}; README figures come from runs with paired sides (schema 2 or later)`,
    );
    process.exit(1);
  }
  let stale = 0;
  for (const [readme, blocks] of Object.entries(render(results, basename(path)))) {
    const full = join(root, readme);
    const before = readFileSync(full, "utf8");
    let after = before;
    for (const [name, body] of Object.entries(blocks)) after = replaceBlock(after, name, body, readme);
    after = formatLikeTheRepository(after, readme);
    if (after === before) continue;
    stale++;
    if (check) console.error(`${readme}: figures differ from ${basename(path)}`);
    else {
      writeFileSync(full, after);
      console.log(`${readme}: figures from ${basename(path)}`);
    }
  }
  process.exit(check && stale ? 1 : 0);
}
