/**
 * `bun bench`: the library against a C program doing the same work on the same memory, in paired
 * rounds, tracked over commits.
 *
 *   bun bench [--quick | --full] [--json] [--filter REGEX] [--save] [--no-c]
 *   bun bench history [--out FILE]
 *   bun bench nvme [--seconds S] [--rounds N]
 *   bun bench backends [--quick] [--filter REGEX]
 *   bun bench backends-pair [--quick] [--rounds N] [--slice-ms MS] [--pairs N]
 *   bun bench nvme-slices [--rounds N] [--cycles N] [--slice-ms MS] [--qd 1,32] [--writes]
 *
 *   (default)  the cases a user tracks, 10 rounds each (about 5 minutes in the TCG guest)
 *   --full     every case, 16 rounds
 *   --quick    CI's smoke test: small cases, 2 rounds; fails when a planned case did not report,
 *              lacks its C side or ratio (or, under CI=true, was skipped). Results go to a scratch
 *              dir unless --save.
 *   --json     the results as JSON on stdout (everything else goes to stderr)
 *   --filter   only cases whose id matches ("mapFile/mock", "4KiB$", "^heap/")
 *   --save     keep quick or filtered results in bench/results/ too (whole runs always are)
 *   --no-c     run without the C side (no ratios); otherwise a missing compiler is an error
 *   history    print every saved run's tracked figures; write bench/results/history.html
 *   nvme       bun-iommufd/nvme against the kernel's NVMe driver, same controller, same boot (bench/nvme.ts)
 *   backends   the same edu and NVMe controller through the VFIO type1 backend and through iommufd,
 *              same boot, alternating: type1 / iommufd ratios (bench/backends.ts)
 *   backends-pair  NVMe type1 / iommufd with two controllers open at once, taking turns every
 *              20 ms (bench/backends-pair.ts)
 *   nvme-slices  the NVMe driver (requests: caller's spin, poller, hybrid) against the bare TS and C
 *              loops, every side on its own queue pair, taking turns in slices: per-round ratios
 *              (bench/nvme-slices.ts)
 *
 * Where /dev/iommu exists the suite runs right here. Elsewhere it runs itself again inside the
 * QEMU guest of vm/run.ts (TCG: emulated time, so only ratios carry over), after building the C
 * side on the host, where the tree is writable.
 */
import { existsSync, mkdtempSync, readFileSync, readlinkSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, join, resolve } from "node:path";
import { findPciDevices, Iommufd } from "../src/index.ts";
import { MockDomain } from "../src/testing/selftest.ts";
import { isCI as isCIRun } from "../test/support/ci.ts";
import { vmAvailability } from "../vm/host.ts";
import { kernelImage } from "../vm/images.ts";
import { runInGuest } from "../vm/run.ts";
import { BaselineError, binaryPath, buildBaseline, type Build } from "./baseline.ts";
import { measureHostJsCostInProcesses } from "./hotpath.ts";
import { type Confirmation, confirm, judge, MAX_MARGIN } from "./noise.ts";
import { type CaseResult, type Interval, type RunContext, runInterleaved, runMode } from "./runner.ts";
import {
  codeHash,
  compare,
  machine,
  previousResults,
  ratioPlot,
  readResults,
  SCHEMA,
  save,
  tables,
  THRESHOLD,
  type Change,
  type Measurement,
  type Results,
  type Saved,
  type SkippedCase,
} from "./results.ts";
import { inTier, MiB, registeredSuites, type BenchCase, type BenchEnv, type Tier } from "./suite.ts";
import "./suites/index.ts";

const root = resolve(import.meta.dir, "..");
const MEASUREMENT_FILE = "measurement.json";
const started = performance.now();

interface Args {
  tier: Tier;
  json: boolean;
  save: boolean;
  noC: boolean;
  filter?: RegExp;
  filterSource?: string;
  /** Internal: this process is the guest side; hand the measurement back through $IOMMUFD_VM_OUT. */
  child: boolean;
}

function usage(): string {
  return readFileSync(import.meta.path, "utf8")
    .split("*/")[0]!
    .replace(/^\/\*\*\n/, "")
    .replace(/^ \* ?/gm, "");
}

/** `args` narrowed to the cases whose ids match `source` (a regular expression). */
function filteredTo(args: Args, source: string): Args {
  return { ...args, filter: new RegExp(source), filterSource: source };
}

function parseArgs(argv: string[]): Args {
  let args: Args = { tier: "default", json: false, save: false, noC: false, child: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    switch (a) {
      case "--quick":
        args.tier = "quick";
        break;
      case "--full":
        args.tier = "full";
        break;
      case "--json":
        args.json = true;
        break;
      case "--save":
        args.save = true;
        break;
      case "--no-c":
        args.noC = true;
        break;
      case "--child":
        args.child = true;
        break;
      case "--filter": {
        const source = argv[++i];
        if (source === undefined) throw new Error("--filter needs a regular expression");
        args = filteredTo(args, source);
        break;
      }
      case "-h":
      case "--help":
        console.log(usage());
        process.exit(0);
        break;
      default:
        throw new Error(`unknown argument ${a}`);
    }
  }
  return args;
}

const isCI = isCIRun();

// In --json mode stdout carries the JSON alone; everything for people goes to stderr.
let jsonMode = false;
const say = (line = "") => (jsonMode ? process.stderr : process.stdout).write(`${line}\n`);

function useColors(): boolean {
  if (process.env.BENCH_COLORS) return process.env.BENCH_COLORS === "1";
  if (process.env.NO_COLOR) return false;
  if (process.env.FORCE_COLOR) return true;
  return !!(jsonMode ? process.stderr : process.stdout).isTTY;
}

function meminfo(): Map<string, number> {
  const out = new Map<string, number>();
  try {
    for (const line of readFileSync("/proc/meminfo", "utf8").split("\n")) {
      const m = /^(\S+):\s+(\d+)(?: kB)?/.exec(line);
      if (m) out.set(m[1]!, Number(m[2]) * (line.endsWith("kB") ? 1024 : 1));
    }
  } catch {
    // no /proc: every memory check fails closed
  }
  return out;
}

function readTrimmed(path: string): string | undefined {
  try {
    return readFileSync(path, "utf8").trim();
  } catch {
    return undefined;
  }
}

/** What this machine offers the cases. */
function probe(notes: string[]): BenchEnv {
  let mock = false;
  try {
    using iommufd = Iommufd.open();
    MockDomain.attach(iommufd.createIoas()).destroy();
    mock = true;
  } catch (error) {
    notes.push(`mock domain unavailable: ${(error as Error).message}`);
  }
  // edu (vendor 0x1234, device 0x11e8) when it is on vfio-pci.
  const edu = findPciDevices(0x1234, 0x11e8).find((address) => {
    try {
      return basename(readlinkSync(`/sys/bus/pci/devices/${address}/driver`)) === "vfio-pci";
    } catch {
      return false;
    }
  });
  const info = meminfo();
  return {
    mock,
    edu,
    type1: existsSync("/dev/vfio/vfio"),
    hugeFree: info.get("Hugepagesize") === 2 * MiB ? (info.get("HugePages_Free") ?? 0) * 2 * MiB : 0,
    memAvailable: info.get("MemAvailable") ?? 0,
    pagemap: process.getuid?.() === 0,
    vm: process.env.IOMMUFD_IN_VM === "1",
    extra: {},
  };
}

/** The cases of this run, in suite order, and the ones this machine cannot run (with why). */
export function plan(env: BenchEnv, tier: Tier, filter?: RegExp): { cases: BenchCase[]; skipped: SkippedCase[] } {
  const cases: BenchCase[] = [];
  const skipped: SkippedCase[] = [];
  const seen = new Set<string>();
  for (const suite of registeredSuites()) {
    for (const spec of suite.cases(env)) {
      if (seen.has(spec.id)) throw new Error(`bench: case id ${spec.id} used twice`);
      seen.add(spec.id);
      if (!inTier(spec.tier, tier) || (filter && !filter.test(spec.id))) continue;
      const reason = spec.skip?.(env);
      if (reason) skipped.push({ id: spec.id, reason });
      else cases.push({ ...spec, suite: suite.name });
    }
  }
  return { cases, skipped };
}

/** The measuring half: next to a /dev/iommu, in the guest or on a host that has one. */
async function measure(args: Args, cBinary: string | undefined): Promise<Measurement> {
  const t0 = performance.now();
  const mode = runMode(args.tier);
  const notes: string[] = [];
  const env = probe(notes);
  const { cases, skipped } = plan(env, args.tier, args.filter);
  for (const s of skipped) say(`skipped ${s.id}: ${s.reason}`);
  if (!cBinary) say("no C side in this run: no ratios");
  say(`${cases.length} case(s), ${mode.rounds} rounds of interleaved slices each (${mode.tier} run)`);
  const run: RunContext = { env, mode, cBinary, log: say };
  const results: CaseResult[] = [];
  let suite = "";
  for (let i = 0; i < cases.length; ) {
    const spec = cases[i]!;
    if (spec.suite !== suite) {
      suite = spec.suite;
      say(`== ${suite}: ${registeredSuites().find((s) => s.name === suite)?.description ?? ""} ==`);
    }
    // A case alone, or the interleaved cases next to it taking turns.
    let end = i + 1;
    if (spec.interleave) while (cases[end]?.interleave && cases[end]!.suite === suite) end++;
    results.push(...(await runInterleaved(cases.slice(i, end), run, i === 0)));
    i = end;
  }
  const shmemThp = readTrimmed("/sys/kernel/mm/transparent_hugepage/shmem_enabled");
  return {
    vm: env.vm,
    machine: machine(),
    bun: `${Bun.version} (${Bun.revision.slice(0, 9)})`,
    settings: {
      ...mode,
      statistic:
        "time: median over the rounds of each round's median time per operation; ratio: median over the rounds of each round's median over its slice pairs of lib median / C median",
      order:
        "per case, rounds of short slices (about minMs / slices a side, samples of about 1 ms), the sides alternating slice by slice: C, lib (, ref) then (ref,) lib, C, ...; cases marked interleave (the per-call map cases) take turns round by round",
      interval:
        "min..max of the rounds (covers the median with 1 - 2/2^n: 99.8% for 10 rounds; spans the machine's states during the run)",
    },
    env: {
      mock: env.mock,
      edu: env.edu !== undefined,
      type1: env.type1,
      hugeFreeMiB: env.hugeFree / MiB,
      pagemap: env.pagemap,
      shmemThp,
      ...env.extra,
    },
    planned: cases.map((c) => c.id),
    cases: results,
    skipped,
    notes,
    measureSeconds: (performance.now() - t0) / 1000,
  };
}

/** What was measured (results.ts codeHash): the committed src/, bench/ and vm/. */
function codeVersion(): string | undefined {
  return codeHash(git(["ls-tree", "-r", "HEAD", "--", "src", "bench", "vm"]));
}

function git(argv: string[]): string {
  const r = Bun.spawnSync(["git", ...argv], { cwd: root, stdout: "pipe", stderr: "pipe" });
  return r.exitCode === 0 ? r.stdout.toString().trim() : "";
}

/** Why a quick (smoke) run fails: every planned case reports, with its C side and ratio. */
/**
 * A figure a run can stand on: finite and above zero at its median and both ends. A side that
 * timed nothing gives 0, a ratio over it Infinity or NaN, and either would pass a presence check.
 */
function usable(figure: Interval): boolean {
  return [figure.median, figure.lo, figure.hi].every((x) => Number.isFinite(x) && x > 0);
}

export function smokeProblems(
  results: Pick<Results, "planned" | "cases" | "skipped" | "hostJs">,
  ci: boolean,
): string[] {
  const problems: string[] = [];
  const byId = new Map(results.cases.map((c) => [c.id, c]));
  if (results.planned.length === 0) problems.push("no case was planned");
  for (const id of results.planned) {
    const c = byId.get(id);
    if (!c) {
      problems.push(`${id}: planned but did not report`);
      continue;
    }
    if (c.errors.length) problems.push(`${id}: ${c.errors.join("; ")}`);
    const figures: [string, boolean, Interval | undefined][] = [
      ["library figure", true, c.lib],
      ["C figure", c.cPlanned, c.c],
      ["ratio", c.cPlanned, c.ratio],
      ["speedup", c.refPlanned, c.speedup],
    ];
    for (const [name, planned, figure] of figures) {
      if (!planned) continue;
      if (!figure) problems.push(`${id}: no ${name}`);
      else if (!usable(figure)) problems.push(`${id}: ${name} is ${figure.median} (${figure.lo}..${figure.hi})`);
    }
  }
  const js = results.hostJs;
  for (const op of ["mapFile", "map", "copy", "prepared"] as const) {
    const ns = js?.[op];
    if (ns === undefined || !Number.isFinite(ns) || ns <= 0) problems.push(`host JS per pair, ${op}: ${ns}`);
  }
  if (ci) for (const s of results.skipped) problems.push(`${s.id}: skipped under CI (${s.reason})`);
  return problems;
}

/** Dates, names and files the measuring side cannot know or write (the guest's tree is read-only). */
/** Pairs per timed loop of the host JS measurement: a quick run only checks that it runs. */
function hostJsPairs(tier: Tier): number {
  return tier === "quick" ? 100_000 : 1_000_000;
}

/** Measures the cases whose ids match `filter` again, in a fresh guest boot where there is one; a string says why it could not. */
export type Remeasure = (filter: string) => Promise<{ measurement: Measurement; bootSeconds?: number } | string>;

async function finish(
  args: Args,
  m: Measurement,
  extra: { host?: Results["host"]; build?: Build; bootSeconds?: number; remeasure?: Remeasure },
): Promise<number> {
  const results: Results = {
    schema: SCHEMA,
    date: new Date().toISOString(),
    commit: git(["rev-parse", "--short", "HEAD"]) || "unknown",
    // Saved results are not code: a run right after another (its file still untracked) is not dirty.
    dirty: git(["status", "--porcelain", "--", "src", "bench", ":!bench/results"]) !== "",
    code: codeVersion(),
    mode: args.tier,
    filter: args.filterSource,
    ...m,
    host: extra.host,
    cBuild: extra.build
      ? {
          how: extra.build.how,
          command: extra.build.command,
          compiler: extra.build.compiler,
          headers: extra.build.headers,
        }
      : undefined,
    bootSeconds: extra.bootSeconds,
    wallSeconds: (performance.now() - started) / 1000,
    threshold: THRESHOLD,
    changes: [],
    // The host is idle here (the guest is gone): the library's own JS per pair, tracked run by run,
    // the median of 5 processes (hotpath.ts says why).
    hostJs: measureHostJsCostInProcesses(args.tier === "quick" ? 1 : 5, hostJsPairs(args.tier)),
  };
  // A quick run is a smoke test (2 short rounds, confidence 50%): it is never compared.
  const previous = results.mode === "quick" ? undefined : previousResults(results);
  // A full run of its mode is judged by each case's A/A noise floor (bench/noise.ts) against the
  // last commit's runs; a filtered run against the run before it, by the interval rule.
  const history = previous && results.filter === undefined ? readResults() : undefined;
  const judged = history ? judge(results, history) : undefined;
  if (judged?.reference.length) {
    results.previous = judged.reference.at(-1);
    results.reference = judged.reference;
    results.margins = judged.margins;
    results.tooNoisy = judged.tooNoisy;
    results.changes = judged.changes;
    if (judged.changes.length > 0 && extra.remeasure) {
      ({ confirmation: results.confirmation, kept: results.changes } = await confirmFlags(
        results,
        judged.changes,
        history!,
        extra.remeasure,
      ));
      // The second boot is part of what the command cost.
      results.wallSeconds = (performance.now() - started) / 1000;
    }
  } else if (previous) {
    results.previous = previous.file;
    results.changes = compare(results, previous.results);
  }
  const where = results.vm ? "QEMU/TCG guest: emulated time, compare ratios" : "this host";
  say();
  say(`== results (${where}) ==`);
  say(tables(results));
  const js = results.hostJs!;
  say(
    `library JS per 4 KiB pair on the host (ioctl a no-op, ${js.each ? `median of ${js.each.length} process${js.each.length === 1 ? "" : "es"}` : "one process"}, bench/hotpath.ts): mapFile ${js.mapFile.toFixed(1)} ns, ` +
      `map ${js.map.toFixed(1)}, copy ${js.copy.toFixed(1)}, prepared ${js.prepared.toFixed(1)}`,
  );
  const plot = ratioPlot(results, useColors());
  if (plot) {
    say();
    say("lib/C per round (mitata box plot: min, quartiles, max; the mark is the median):");
    say(plot);
  }
  say();
  if (results.reference) {
    const reg = results.changes.filter((c) => c.kind === "regression");
    const noisy = Object.keys(results.tooNoisy ?? {});
    say(
      `compared with ${results.reference.length} run(s) of ${results.reference.at(-1)!.split("-").at(-2)} (each case against its own noise: A/A runs, or its drift between runs when larger): ${reg.length} regression(s), ${results.changes.length - reg.length} improvement(s)`,
    );
    for (const c of results.changes) say(c.text);
    for (const c of results.confirmation?.withdrawn ?? []) say(c.text);
    if (noisy.length) say(`too noisy to judge (margin over ${MAX_MARGIN * 100}%): ${noisy.join(", ")}`);
  } else if (previous) {
    const reg = results.changes.filter((c) => c.kind === "regression");
    say(
      `compared with ${previous.file}: ${reg.length} regression(s), ${results.changes.length - reg.length} improvement(s) (intervals apart by more than ${THRESHOLD * 100}%)`,
    );
    for (const c of results.changes) say(c.text);
  } else if (results.mode === "quick") {
    say("quick run: a smoke test of the suite, not a measurement (2 short rounds): nothing compared");
  } else {
    say(`no earlier ${results.mode} results to compare with`);
  }
  // Failures first, so that the saved file and the JSON on stdout carry them too.
  results.problems =
    results.mode === "quick"
      ? smokeProblems(results, isCI)
      : results.cases.flatMap((c) =>
          c.errors.length || !c.lib ? [`${c.id}: ${c.errors.join("; ") || "no figure"}`] : [],
        );
  let status = results.problems.length ? 1 : 0;
  try {
    const path = save(results, args.save);
    say(
      `results: ${path.startsWith(root) ? path.slice(root.length + 1) : path} (${results.wallSeconds?.toFixed(0)} s in all)`,
    );
  } catch (error) {
    say((error as Error).message);
    status = 1;
  }
  if (jsonMode) process.stdout.write(`${JSON.stringify(results, null, 2)}\n`);
  if (results.problems.length) {
    say(`${results.mode === "quick" ? "smoke test FAILED" : "run had failures"}:`);
    for (const p of results.problems) say(`  ${p}`);
  }
  return status;
}

/**
 * One boot can be off on its own (bench/noise.ts, confirm): before a flag is reported, the flagged
 * cases are measured again in a fresh boot and judged by the same rule against the same history.
 * Only the flags that boot makes too stand; the others are withdrawn, both figures kept.
 */
export async function confirmFlags(
  results: Results,
  changes: Change[],
  history: Saved[],
  remeasure: Remeasure,
): Promise<{ confirmation: Confirmation; kept: Change[] }> {
  const ids = [...new Set(changes.map((c) => c.id))];
  say();
  say(`${changes.length} flag(s): measuring ${ids.join(", ")} again in a fresh boot before reporting them`);
  const filter = `^(${ids.map((id) => id.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&")).join("|")})$`;
  const second = await remeasure(filter);
  if (typeof second === "string") {
    say(`the second boot failed (${second}): the flags stand unconfirmed`);
    return { confirmation: { ids, cases: [], withdrawn: [] }, kept: confirm(changes, [], []).kept };
  }
  const { measurement, bootSeconds } = second;
  const cases = measurement.cases;
  const { kept, withdrawn } = confirm(changes, judge({ ...results, cases }, history).changes, cases);
  return { confirmation: { ids, bootSeconds, measureSeconds: measurement.measureSeconds, cases, withdrawn }, kept };
}

/** The C side, or undefined with --no-c; a build that fails ends the run (never a stale binary). */
function cSide(args: Args): Build | undefined {
  if (args.noC) return undefined;
  const build = buildBaseline();
  say(`C side ${build.how}: ${build.command.join(" ")}`);
  return build;
}

async function inGuest(args: Args): Promise<number> {
  const out = process.env.IOMMUFD_VM_OUT;
  if (!out) throw new Error("--child runs inside the guest of vm/run.ts, which sets IOMMUFD_VM_OUT");
  // The host built it (and checked it is current) before booting this guest.
  const binary = args.noC ? undefined : binaryPath;
  if (binary && !existsSync(binary)) throw new Error(`no ${binary}: the host side builds it before the guest boots`);
  const measurement = await measure(args, binary);
  writeFileSync(join(out, MEASUREMENT_FILE), JSON.stringify(measurement));
  return 0;
}

async function viaGuest(args: Args): Promise<number> {
  const available = vmAvailability();
  if (!available.ok) {
    say(`benchmarks skipped: no /dev/iommu here and no test guest (${available.reason})`);
    return isCI ? 1 : 0;
  }
  say(
    "no /dev/iommu here: the benchmarks run in the QEMU/TCG guest (vm/run.ts); absolute times are emulated, ratios count",
  );
  let kernel: string;
  try {
    kernel = await kernelImage();
  } catch (error) {
    say(`benchmarks failed: ${(error as Error).message}`);
    return 1;
  }
  const build = cSide(args);
  const first = await measureInGuest(args, kernel);
  if (typeof first === "string") {
    say(`benchmarks failed in the guest (${first})`);
    return 1;
  }
  const remeasure: Remeasure = (filter) => measureInGuest(filteredTo(args, filter), kernel);
  return await finish(args, first.measurement, { host: machine(), build, bootSeconds: first.bootSeconds, remeasure });
}

/** Boot the guest, run the suite there (`args`' tier and filter), and take its measurement; a string says why there is none. */
async function measureInGuest(
  args: Args,
  kernel: string,
): Promise<{ measurement: Measurement; bootSeconds?: number } | string> {
  const outDir = mkdtempSync(join(tmpdir(), "bun-iommufd-bench-"));
  try {
    const passThrough = [
      ...(args.tier !== "default" ? [`--${args.tier}`] : []),
      ...(args.filterSource !== undefined ? ["--filter", args.filterSource] : []),
      ...(args.json ? ["--json"] : []),
      ...(args.noC ? ["--no-c"] : []),
    ];
    const guest = await runInGuest({
      command: [process.execPath, join("bench", "main.ts"), "--child", ...passThrough],
      cwd: root,
      kernel,
      outDir,
      // edu first (vfio0), then an NVMe controller for the nvme suite (its image is removed below).
      devices: [{ kind: "edu" }, { kind: "nvme", size: 64 << 20 }],
      // One vCPU: TCG runs a guest's vCPUs in turns on one host thread, so a side that migrated
      // to the other vCPU waited for its turn; per-round times then split in two modes (~2x apart).
      cpus: 1,
      // --full maps 1 GiB twice: once scattered (needs 3 GiB available), once from 1 GiB of huge pages.
      ...(args.tier === "full" ? { memory: "7G", hugepages: 640 } : {}),
      timeoutSeconds: args.tier === "full" ? 5400 : 1200,
      env: { BENCH_COLORS: useColors() ? "1" : "0" },
      onStdout: (chunk) => (jsonMode ? process.stderr : process.stdout).write(chunk),
      log: (line) => process.stderr.write(`${line}\n`),
    });
    if (guest.diskDir) rmSync(guest.diskDir, { recursive: true, force: true });
    const file = join(outDir, MEASUREMENT_FILE);
    if (guest.exitCode !== 0 || !existsSync(file)) {
      return `exit status ${guest.exitCode}${guest.message ? `: ${guest.message}` : ""}`;
    }
    return { measurement: JSON.parse(readFileSync(file, "utf8")) as Measurement, bootSeconds: guest.bootSeconds };
  } finally {
    rmSync(outDir, { recursive: true, force: true });
  }
}

async function main(): Promise<number> {
  const argv = process.argv.slice(2);
  if (argv[0] === "history") {
    const { history } = await import("./history.ts");
    return history(argv.slice(1));
  }
  if (argv[0] === "backends-pair") {
    const { backendsPairBench } = await import("./backends-pair.ts");
    return backendsPairBench(argv.slice(1));
  }
  if (argv[0] === "backends") {
    const { backendsBench } = await import("./backends.ts");
    return backendsBench(argv.slice(1));
  }
  if (argv[0] === "nvme-slices") {
    const { nvmeSlicesBench } = await import("./nvme-slices.ts");
    return nvmeSlicesBench(argv.slice(1));
  }
  if (argv[0] === "nvme") {
    const { nvmeBench } = await import("./nvme.ts");
    return nvmeBench(argv.slice(1));
  }
  let args: Args;
  try {
    args = parseArgs(argv);
  } catch (error) {
    console.error(`bench: ${(error as Error).message}\n\n${usage()}`);
    return 2;
  }
  jsonMode = args.json;
  try {
    if (args.child) return await inGuest(args);
    if (!existsSync("/dev/iommu")) return await viaGuest(args);
    const build = cSide(args);
    const measurement = await measure(args, build?.binary);
    // No guest to boot again: the second look is a second measurement in this process.
    const remeasure: Remeasure = async (filter) => ({
      measurement: await measure(filteredTo(args, filter), build?.binary),
    });
    return await finish(args, measurement, { build, remeasure });
  } catch (error) {
    if (error instanceof BaselineError) {
      say(`bench: ${error.message}`);
      say("(bun bench --no-c runs the library side alone, without ratios)");
      return 1;
    }
    throw error;
  }
}

if (import.meta.main) process.exitCode = await main();
