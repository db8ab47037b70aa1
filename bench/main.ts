/**
 * `bun bench`: map/unmap throughput of the library against a C baseline run in the same session.
 *
 *   bun bench [--quick] [--json] [--filter REGEX] [--save]
 *
 *   --quick    smoke mode for CI: 4 and 64 KiB, short warm-up, one round; proves the suite runs,
 *              says nothing about speed. Its results go to a scratch dir unless --save.
 *   --json     the results as JSON on stdout (everything else goes to stderr)
 *   --filter   only cases whose id matches ("mapFile/mock", "4KiB$", "free\\+alloc")
 *   --save     keep quick or filtered results in bench/results/ too (full runs always are)
 *
 * Where /dev/iommu exists the suite runs right here. Elsewhere it runs itself again inside the
 * QEMU guest of vm/run.ts (TCG: emulated time, so only ratios carry over), after building the C
 * baseline on the host, where the tree is writable. The allocator benchmark is pure JS and always
 * runs on the host.
 *
 * How the C ratio is formed: rounds alternate C then library (C, lib, C, lib in a full run); each
 * side's time per pair is its best per-round median (mitata's p50 on the library side, the same
 * statistic over the same sampling rule in C). Best-of rather than mean-of, because noise in a
 * shared or emulated machine only ever adds time.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { run } from "mitata";
import { Iommufd } from "../src/index.ts";
import { MockDomain } from "../src/selftest.ts";
import { kernelImage, runInGuest, vmAvailability } from "../vm/run.ts";
import { baselineBinary, buildBaseline, runBaseline, type Build, type CStats } from "./baseline.ts";
import { mode, OP_LABEL, planCases, probeMachine, type CaseSpec } from "./cases.ts";
import { benchName, registerLibraryBenchmarks, warmProcess } from "./library.ts";
import {
  compare,
  cSample,
  machine,
  previousResults,
  save,
  side,
  table,
  verdicts,
  type AllocatorResult,
  type CaseResult,
  type Measurement,
  type Results,
} from "./results.ts";

const root = resolve(import.meta.dir, "..");
const MEASUREMENT_FILE = "measurement.json";

interface Args {
  quick: boolean;
  json: boolean;
  save: boolean;
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

function parseArgs(argv: string[]): Args {
  const args: Args = { quick: false, json: false, save: false, child: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    switch (a) {
      case "--quick":
        args.quick = true;
        break;
      case "--json":
        args.json = true;
        break;
      case "--save":
        args.save = true;
        break;
      case "--child":
        args.child = true;
        break;
      case "--filter": {
        const source = argv[++i];
        if (source === undefined) throw new Error("--filter needs a regular expression");
        args.filter = new RegExp(source);
        args.filterSource = source;
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

// In --json mode stdout carries the JSON alone; everything for people goes to stderr.
let jsonMode = false;
const say = (line = "") => (jsonMode ? process.stderr : process.stdout).write(`${line}\n`);

function useColors(): boolean {
  if (process.env.BENCH_COLORS) return process.env.BENCH_COLORS === "1";
  if (process.env.NO_COLOR) return false;
  if (process.env.FORCE_COLOR) return true;
  return !!(jsonMode ? process.stderr : process.stdout).isTTY;
}

function mitataOptions(filter?: RegExp) {
  return {
    filter,
    colors: useColors(),
    print: (s: string) => say(s),
    format: { mitata: { name: "longest" as const } },
  };
}

async function runAllocator(args: Args): Promise<AllocatorResult[]> {
  let register: (() => void) | undefined;
  try {
    register = (await import("./allocator.ts")).registerAllocatorBenchmarks;
  } catch (error) {
    say(`allocator benchmark skipped: bench/allocator.ts cannot be loaded (${(error as Error).message})`);
    return [];
  }
  if (typeof register !== "function") {
    say("allocator benchmark skipped: bench/allocator.ts has no registerAllocatorBenchmarks()");
    return [];
  }
  say("== allocator (pure JS, on this host) ==");
  register();
  const { benchmarks } = await run(mitataOptions(args.filter));
  const out: AllocatorResult[] = [];
  for (const trial of benchmarks) {
    for (const r of trial.runs) if (r.stats) out.push({ name: r.name, avgNs: r.stats.avg, p50Ns: r.stats.p50 });
  }
  say();
  return out;
}

/** Whether this kernel has the selftest mock domain (CONFIG_IOMMUFD_TEST). */
function probeMock(notes: string[]): boolean {
  try {
    using iommufd = Iommufd.open();
    const ioas = iommufd.createIoas();
    MockDomain.attach(ioas).destroy();
    return true;
  } catch (error) {
    notes.push(`mock domain unavailable: ${(error as Error).message}`);
    return false;
  }
}

/** The measuring half: next to a /dev/iommu, in the guest or on a host that has one. */
async function measure(args: Args, build: Build, vm: boolean): Promise<Measurement> {
  const m = mode(args.quick);
  const notes: string[] = [];
  const probe = { ...probeMachine(), mock: probeMock(notes) };
  const { cases, skipped } = planCases(m, probe, args.filter);
  if (build.note) notes.push(build.note);
  for (const s of skipped) say(`skipped ${s.id}: ${s.reason}`);
  if (!build.binary) say(`no C baseline: ${build.note ?? "not built"}`);

  const lib = new Map<
    string,
    { p50: number; avg: number; min: number; p99: number; samples: number; ticks: number }[]
  >();
  const c = new Map<string, CStats[]>();
  const errors = new Map<string, Set<string>>();
  const warmups = new Map<string, number>();
  const byName = new Map(cases.map((spec) => [benchName(spec), spec]));
  const addError = (id: string, e: string) => (errors.get(id) ?? errors.set(id, new Set()).get(id)!).add(e);

  for (let round = 1; round <= m.rounds; round++) {
    if (build.binary) {
      say(`== round ${round}/${m.rounds}: C baseline (${cases.length} cases) ==`);
      const results = await runBaseline(build.binary, cases, m, say);
      for (const [id, s] of results) {
        if (s.ok) (c.get(id) ?? c.set(id, []).get(id)!).push(s);
        else addError(id, `C: ${s.error}`);
      }
    }
    say(`== round ${round}/${m.rounds}: library (mitata) ==`);
    if (round === 1 && m.processWarmupMs > 0 && cases.length > 0) {
      say(`(warming the Bun process up for ${m.processWarmupMs / 1000} s first)`);
      warmProcess(m);
    }
    registerLibraryBenchmarks(cases, m, warmups);
    const { benchmarks } = await run(mitataOptions());
    for (const trial of benchmarks) {
      for (const r of trial.runs) {
        const spec = byName.get(r.name);
        if (!spec) continue;
        if (r.stats) {
          // mitata timed iterations of k pairs: per pair from here on.
          const { p50, avg, min, p99, samples, ticks } = r.stats;
          const k = spec.k;
          (lib.get(spec.id) ?? lib.set(spec.id, []).get(spec.id)!).push({
            p50: p50 / k,
            avg: avg / k,
            min: min / k,
            p99: p99 / k,
            samples: samples.length,
            ticks: ticks * k,
          });
        } else {
          addError(spec.id, `library: ${(r.error as Error)?.message ?? String(r.error)}`);
        }
      }
    }
    say();
  }

  const results: CaseResult[] = cases.map((spec: CaseSpec) => {
    const cRuns = (c.get(spec.id) ?? []).map(cSample).filter((s) => s !== undefined);
    const library = side(lib.get(spec.id) ?? [], spec.size, warmups.get(spec.id));
    const cSide = side(cRuns, spec.size, c.get(spec.id)?.[0]?.warmupPairs);
    return {
      ...spec,
      label: OP_LABEL[spec.op],
      library,
      c: cSide,
      ratio: library && cSide ? library.nsPerPair / cSide.nsPerPair : undefined,
      errors: [...(errors.get(spec.id) ?? [])],
    };
  });

  return {
    vm,
    machine: machine(),
    bun: `${Bun.version} (${Bun.revision.slice(0, 9)})`,
    settings: {
      ...m,
      statistic: `best of ${m.rounds} round(s) of the median (p50) time per map+unmap pair`,
      order: "per round: the C baseline over all cases, then the library over all cases",
    },
    cases: results,
    skipped,
    notes,
  };
}

function git(args: string[]): string {
  const r = Bun.spawnSync(["git", ...args], { cwd: root, stdout: "pipe", stderr: "pipe" });
  return r.exitCode === 0 ? r.stdout.toString().trim() : "";
}

/** Dates, names and files the measuring side cannot know or write (the guest's tree is read-only). */
function finish(
  args: Args,
  measurement: Measurement,
  extra: { host?: Results["host"]; build: Build; allocator: AllocatorResult[] },
): number {
  const results: Results = {
    schema: 1,
    date: new Date().toISOString(),
    commit: git(["rev-parse", "--short", "HEAD"]) || "unknown",
    dirty: git(["status", "--porcelain", "--", "src", "bench"]) !== "",
    mode: args.quick ? "quick" : "full",
    filter: args.filterSource,
    ...measurement,
    host: extra.host,
    cBuild: extra.build.command,
    allocator: extra.allocator,
    regressions: [],
  };
  const previous = previousResults(results);
  if (previous) {
    results.previous = previous.path;
    results.regressions = compare(results, previous.results);
  }
  const path = save(results, args.save);

  say(
    `== map/unmap pairs: library vs C (${results.vm ? "QEMU/TCG guest: emulated time, compare ratios" : "this host"}) ==`,
  );
  say(table(results));
  say();
  if (results.mode === "quick")
    say("quick mode: a smoke test of the suite, not a measurement (short warm-up, one round)");
  else for (const line of verdicts(results)) say(line);
  if (previous) {
    say(
      `compared with ${previous.path}: ${results.regressions.length ? `${results.regressions.length} case(s) more than 10% slower` : "no case more than 10% slower"}`,
    );
    for (const line of results.regressions) say(line);
  } else {
    say(`no earlier ${results.mode} results to compare with`);
  }
  say(`results: ${path}`);
  if (jsonMode) process.stdout.write(`${JSON.stringify(results, null, 2)}\n`);

  const broken = results.cases.filter((c) => c.errors.length > 0 || !c.library);
  if (broken.length) {
    say(`${broken.length} case(s) failed: ${broken.map((c) => c.id).join(", ")}`);
    return 1;
  }
  return 0;
}

async function inGuest(args: Args): Promise<number> {
  const out = process.env.IOMMUFD_VM_OUT;
  const measurement = await measure(args, baselineBinary(), process.env.IOMMUFD_IN_VM === "1");
  if (!out) throw new Error("--child runs inside the guest of vm/run.ts, which sets IOMMUFD_VM_OUT");
  writeFileSync(join(out, MEASUREMENT_FILE), JSON.stringify(measurement));
  return 0;
}

async function viaGuest(args: Args, allocator: AllocatorResult[]): Promise<number> {
  const isCI = !!process.env.CI && !["0", "false", "no"].includes(process.env.CI.toLowerCase());
  const available = vmAvailability();
  if (!available.ok) {
    say(`map/unmap benchmarks skipped: no /dev/iommu here and no test guest (${available.reason})`);
    return isCI ? 1 : 0;
  }
  say("no /dev/iommu here: the map/unmap benchmarks run in the QEMU/TCG guest (vm/run.ts).");
  say("running in the QEMU/TCG guest: absolute times are emulated, ratios are what count");
  let kernel: string;
  try {
    // Built now rather than by runInGuest: the C baseline compiles against its iommufd_test.h.
    kernel = await kernelImage();
  } catch (error) {
    say(`map/unmap benchmarks failed: ${(error as Error).message}`);
    return 1;
  }
  const build = buildBaseline();
  if (build.binary) say(`C baseline built: ${build.command?.join(" ")}`);
  else say(`C baseline not built: ${build.note}`);

  const outDir = mkdtempSync(join(tmpdir(), "bun-iommufd-bench-"));
  try {
    const passThrough = [
      ...(args.quick ? ["--quick"] : []),
      ...(args.filterSource !== undefined ? ["--filter", args.filterSource] : []),
      ...(args.json ? ["--json"] : []),
    ];
    const guest = await runInGuest({
      command: [process.execPath, join("bench", "main.ts"), "--child", ...passThrough],
      cwd: root,
      kernel,
      outDir,
      timeoutSeconds: args.quick ? 900 : 3600,
      env: { BENCH_COLORS: useColors() ? "1" : "0" },
      onStdout: (chunk) => (jsonMode ? process.stderr : process.stdout).write(chunk),
      log: (line) => process.stderr.write(`${line}\n`),
    });
    const file = join(outDir, MEASUREMENT_FILE);
    if (guest.exitCode !== 0 || !existsSync(file)) {
      say(
        `map/unmap benchmarks failed in the guest (exit status ${guest.exitCode}${guest.message ? `: ${guest.message}` : ""})`,
      );
      return guest.exitCode || 1;
    }
    const measurement = JSON.parse(readFileSync(file, "utf8")) as Measurement;
    return finish(args, measurement, { host: machine(), build, allocator });
  } finally {
    rmSync(outDir, { recursive: true, force: true });
  }
}

async function main(): Promise<number> {
  let args: Args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (error) {
    console.error(`bench: ${(error as Error).message}\n\n${usage()}`);
    return 2;
  }
  jsonMode = args.json;
  if (args.child) return inGuest(args);

  const allocator = await runAllocator(args);
  if (!existsSync("/dev/iommu")) return viaGuest(args, allocator);

  const build = buildBaseline();
  if (!build.binary) say(`C baseline not built: ${build.note}`);
  const measurement = await measure(args, build, process.env.IOMMUFD_IN_VM === "1");
  return finish(args, measurement, { build, allocator });
}

process.exitCode = await main();
