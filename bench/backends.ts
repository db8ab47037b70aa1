/**
 * `bun bench backends`: the same device through the VFIO type1 backend and through iommufd, in
 * the same guest boot, alternating slice by slice (bench/switching.ts), reported as type1 /
 * iommufd time ratios with the harness's intervals:
 *
 *   dma/edu/2KiB              edu DMA RAM -> device -> RAM through one IOVA, completion by MSI
 *   nvme/read/4KiB/qd1/poll   one 4 KiB random read, polled (the nvme suite's operation)
 *   nvme/read/4KiB/qd32/poll  32 of them at once
 *
 *   bun bench backends [--quick] [--filter REGEX]
 *
 * A device is claimed by its group or by its cdev, never both, so every slice opens its side
 * (container and group, or iommufd, bind and attach; for NVMe the whole controller) and closes it
 * before the other side's slice: same device, same controller, same boot. Where /dev/iommu is
 * missing it boots the test guest with edu and one NVMe controller. Saved as
 * bench/results/backends/<date>-<commit>-<mode>.json (quick and filtered runs: scratch dir).
 */
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { Edu, EDU_IRQ_DMA } from "../examples/edu.ts";
import { type DmaBackend, findPciDevices, MemfdBuffer, openDmaDevice } from "../src/index.ts";
import type { DeviceSpec } from "../vm/devices.ts";
import { runInGuest } from "../vm/run.ts";
import { formatNs } from "./baseline.ts";
import { guestNvmeAddress } from "./nvme.ts";
import { fmtInterval, hostPaths, machine, scratchDir, scrubbed } from "./results.ts";
import { BENCH_IOVA, KiB, Scope } from "./suite.ts";
import { openNvmeWorkload } from "./suites/nvme.ts";
import { runSwitched, type Session, SWITCH_MODES, type SwitchedCase, type SwitchedResult } from "./switching.ts";

const root = resolve(import.meta.dir, "..");
const OUT_FILE = "backends.json";
/** The goal of issue 26: type1 within 5% of iommufd. */
export const GOAL = 0.05;
/**
 * QEMU 7.2's edu aborts the VM on a transfer that ends exactly at its 4 KiB buffer's end, so the
 * round trip moves 2 KiB each way (RAM at IOVA -> device, device -> RAM at IOVA + 4 KiB).
 */
const DMA_BYTES = 2 * KiB;

type Mode = keyof typeof SWITCH_MODES;

/** edu opened on `backend`, bus mastering and MSI on, 8 KiB mapped at BENCH_IOVA; one op = one verified round trip. */
function eduDmaSession(backend: DmaBackend, address: string): Session {
  const scope = new Scope();
  try {
    // The library's own way to a device on a chosen backend: the examples and the NVMe driver use it too.
    const { device, space } = scope.keep(openDmaDevice(address, { backend }));
    device.setBusMaster(true);
    const edu = new Edu(device.mapRegion(0));
    const vector = scope.keep(device.enableIrq("msi")).vectors[0]!;
    const buffer = scope.keep(MemfdBuffer.create(8 * KiB));
    const mapping = space.mapDma(buffer, { iova: BENCH_IOVA });
    scope.keep({ close: () => mapping[Symbol.dispose]() });
    const bytes = buffer.bytes;
    let stamp = 0;
    const op = async () => {
      stamp = (stamp + 1) & 0xff;
      bytes.fill(stamp, 0, DMA_BYTES);
      bytes.fill(0, 4 * KiB, 4 * KiB + DMA_BYTES);
      edu.startDma({ toRam: false, iova: BENCH_IOVA, deviceOffset: 0, count: DMA_BYTES });
      await vector.wait();
      edu.ackInterrupt(EDU_IRQ_DMA);
      edu.startDma({ toRam: true, iova: BENCH_IOVA + 4 * KiB, deviceOffset: 0, count: DMA_BYTES });
      await vector.wait();
      edu.ackInterrupt(EDU_IRQ_DMA);
      // Status is no proof of delivery: the bytes must have made the trip.
      if (bytes[4 * KiB] !== stamp || bytes[4 * KiB + DMA_BYTES - 1] !== stamp) {
        throw new Error(`edu DMA through ${backend}: the bytes did not come back`);
      }
    };
    return { op, close: () => scope.close() };
  } catch (error) {
    throw scope.abandon(error);
  }
}

/** The cases this guest can run, and why the others cannot. */
export function backendCases(
  devices: { edu?: string; nvme?: string; type1: boolean; iommufd: boolean },
  filter?: RegExp,
): { cases: SwitchedCase[]; skipped: { id: string; reason: string }[] } {
  const cases: SwitchedCase[] = [];
  const skipped: { id: string; reason: string }[] = [];
  const both = (make: (backend: DmaBackend) => Session | Promise<Session>) => ({
    a: { name: "type1", open: () => make("type1") },
    b: { name: "iommufd", open: () => make("iommufd") },
  });
  const add = (
    id: string,
    title: string,
    k: number,
    missing: string | undefined,
    make: (b: DmaBackend) => Session,
    options: Pick<SwitchedCase, "settleMs" | "longSlices"> & { control?: boolean } = {},
  ) => {
    if (filter && !filter.test(id)) return;
    const reason =
      missing ??
      (!devices.type1 ? "no VFIO type1 container (/dev/vfio/vfio)" : !devices.iommufd ? "no /dev/iommu" : undefined);
    if (reason) {
      skipped.push({ id, reason });
      return;
    }
    // The control runs iommufd against itself through the very same switching: whatever ratio it
    // shows is the method's own noise, the yardstick for the type1 ratio beside it.
    const sides = options.control
      ? {
          a: { name: "iommufd", open: () => make("iommufd") },
          b: { name: "iommufd-again", open: () => make("iommufd") },
        }
      : both(make);
    cases.push({ id, title, k, settleMs: options.settleMs, longSlices: options.longSlices, ...sides });
  };
  add(
    "dma/edu/2KiB",
    "edu DMA of 2 KiB RAM -> device -> RAM through one IOVA, each leg awaited by MSI, bytes checked",
    1,
    devices.edu ? undefined : "no edu device on vfio-pci",
    (backend) => eduDmaSession(backend, devices.edu!),
    // Each leg waits for edu's 100 ms DMA timer: a fresh session needs no settling beyond the slice's untimed op.
    { settleMs: 0 },
  );
  for (const depth of [1, 32]) {
    const what =
      depth === 1
        ? "one 4 KiB random read awaited (polled)"
        : "32 concurrent 4 KiB random reads awaited together (polled)";
    const missing = devices.nvme ? undefined : "no NVMe controller on vfio-pci";
    const make = (backend: DmaBackend) => openNvmeWorkload(devices.nvme!, "read", depth, "poll", backend);
    add(`nvme/read/4KiB/qd${depth}/poll`, what, depth === 1 ? 4 : 1, missing, make, { longSlices: true });
    add(
      `nvme/read/4KiB/qd${depth}/poll/control`,
      `${what}: iommufd against itself`,
      depth === 1 ? 4 : 1,
      missing,
      make,
      {
        longSlices: true,
        control: true,
      },
    );
  }
  return { cases, skipped };
}

interface BackendsFile {
  schema: 1;
  date: string;
  commit: string;
  dirty: boolean;
  mode: Mode;
  filter?: string;
  bun: string;
  vm: boolean;
  machine: ReturnType<typeof machine>;
  host?: ReturnType<typeof machine>;
  /** The host's 1-minute load average when the run started and ended (other guests share the host). */
  hostLoad?: { start: number; end: number };
  settings: (typeof SWITCH_MODES)[Mode] & { statistic: string; interval: string; goal: string };
  cases: SwitchedResult[];
  skipped: { id: string; reason: string }[];
  bootSeconds?: number;
  measureSeconds: number;
  wallSeconds?: number;
}

type Measured = Omit<BackendsFile, "commit" | "dirty" | "date" | "host" | "hostLoad" | "bootSeconds" | "wallSeconds">;

/** Whether a ratio meets the goal: its median, and its whole interval, within GOAL of 1. */
export function verdict(r: SwitchedResult["ratio"], goal = GOAL): string {
  if (!r) return "no ratio";
  const within = (x: number) => Math.abs(x - 1) <= goal;
  if (within(r.lo) && within(r.hi)) return `within ${goal * 100}% (whole interval)`;
  if (within(r.median)) return `median within ${goal * 100}%, interval not`;
  return `NOT within ${goal * 100}%`;
}

export function table(results: Pick<BackendsFile, "cases">): string {
  const lines = [
    `${"case".padEnd(34)} ${"a/op [interval]".padStart(34)} ${"b/op [interval]".padStart(34)}  ${"a/b [interval]".padEnd(26)} ${"goal".padEnd(30)} ${"fastest samples [interval]".padEnd(26)} goal`,
  ];
  for (const c of results.cases) {
    const t = (i: SwitchedResult["a"]) => fmtInterval(i, formatNs);
    lines.push(
      c.errors.length
        ? `${c.id.padEnd(34)} error: ${c.errors.join("; ")}`
        : `${c.id.padEnd(34)} ${t(c.a).padStart(34)} ${t(c.b).padStart(34)}  ${fmtInterval(c.ratio).padEnd(26)} ${verdict(c.ratio).padEnd(30)} ${fmtInterval(c.fastRatio).padEnd(26)} ${verdict(c.fastRatio)}`,
    );
  }
  return lines.join("\n");
}

async function measure(mode: Mode, filter: RegExp | undefined, filterSource?: string): Promise<Measured> {
  const t0 = performance.now();
  const devices = {
    edu: findPciDevices(0x1234, 0x11e8)[0],
    nvme: guestNvmeAddress(),
    type1: existsSync("/dev/vfio/vfio"),
    iommufd: existsSync("/dev/iommu"),
  };
  const { cases, skipped } = backendCases(devices, filter);
  for (const s of skipped) console.log(`skipped ${s.id}: ${s.reason}`);
  const settings = SWITCH_MODES[mode];
  console.log(`${cases.length} case(s), ${settings.rounds} rounds each, type1 and iommufd alternating slice by slice`);
  const results: SwitchedResult[] = [];
  for (const spec of cases) {
    const r = await runSwitched(spec, settings, (line) => console.log(line));
    if (!r.errors.length) {
      console.log(
        `  ${r.id.padEnd(34)} ${r.sides.join("/")} ${fmtInterval(r.ratio)}, fastest samples ${fmtInterval(r.fastRatio)}  (${r.seconds} s)`,
      );
    }
    results.push(r);
  }
  return {
    schema: 1,
    mode,
    filter: filterSource,
    bun: `${Bun.version} (${Bun.revision.slice(0, 9)})`,
    vm: process.env.IOMMUFD_IN_VM === "1",
    machine: machine(),
    settings: {
      ...settings,
      statistic:
        "time: median over the rounds of each round's median time per operation; ratio: median over the rounds of each round's median over its slice pairs of a's median / b's median (a/b: type1/iommufd; a control case runs iommufd against itself, iommufd/iommufd-again, to show the method's own noise); fastest samples: the same with each slice's fastest sample instead of its median",
      interval: "min..max of the rounds",
      goal: `type1 within ${GOAL * 100}% of iommufd (issue 26)`,
    },
    cases: results,
    skipped,
    measureSeconds: (performance.now() - t0) / 1000,
  };
}

export function git(argv: string[]): string {
  const r = Bun.spawnSync(["git", ...argv], { cwd: root, stdout: "pipe", stderr: "pipe" });
  return r.exitCode === 0 ? r.stdout.toString().trim() : "";
}

function parse(argv: string[]): { mode: Mode; filter?: RegExp; filterSource?: string } {
  let mode: Mode = "default";
  let filterSource: string | undefined;
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--quick") mode = "quick";
    else if (argv[i] === "--filter" && argv[i + 1] !== undefined) filterSource = argv[++i];
    else if (argv[i] !== "--child")
      throw new Error(`unknown argument ${argv[i]} (bun bench backends [--quick] [--filter REGEX])`);
  }
  return { mode, filterSource, filter: filterSource !== undefined ? new RegExp(filterSource) : undefined };
}

/**
 * Run `script --child ARGV` in the test guest (1 vCPU, as `bun bench`: a side that migrated to the
 * other vCPU waited for its turn) and read back the JSON it wrote to $IOMMUFD_VM_OUT/`outFile`;
 * an exit status when it failed. Shared by `bun bench backends` and `backends-pair`.
 */
export async function measureInGuest<T>(options: {
  script: string;
  argv: string[];
  devices: DeviceSpec[];
  outFile: string;
  what: string;
}): Promise<{ measured: T; bootSeconds?: number } | { exitCode: number }> {
  const out = mkdtempSync(join(tmpdir(), "bun-iommufd-backends-"));
  try {
    const guest = await runInGuest({
      command: [
        process.execPath,
        join("bench", options.script),
        "--child",
        ...options.argv.filter((a) => a !== "--child"),
      ],
      cwd: root,
      devices: options.devices,
      cpus: 1,
      outDir: out,
      timeoutSeconds: 1800,
    });
    if (guest.diskDir) rmSync(guest.diskDir, { recursive: true, force: true });
    const file = join(out, options.outFile);
    if (guest.exitCode !== 0 || !existsSync(file)) {
      console.error(
        `${options.what} failed in the guest (exit status ${guest.exitCode}${guest.message ? `: ${guest.message}` : ""})`,
      );
      return { exitCode: guest.exitCode || 1 };
    }
    return { measured: JSON.parse(readFileSync(file, "utf8")) as T, bootSeconds: guest.bootSeconds };
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
}

/** Save a run as <date>-<commit>-<suffix>.json in `dir` without host paths; 1 when it would carry some. */
export function saveRun(
  results: { date: string; commit: string; wallSeconds?: number },
  dir: string,
  suffix: string,
): number {
  mkdirSync(dir, { recursive: true });
  const path = join(
    dir,
    `${results.date.replace(/\.\d+Z$/, "Z").replaceAll(":", "")}-${results.commit}-${suffix}.json`,
  );
  const text = `${JSON.stringify(scrubbed(results as never), null, 2)}\n`;
  const left = hostPaths(text);
  if (left.length) {
    console.error(`bench: results would carry host paths (${left.join(", ")}); not saved`);
    return 1;
  }
  writeFileSync(path, text);
  console.log(
    `results: ${path.startsWith(root) ? path.slice(root.length + 1) : path} (${results.wallSeconds?.toFixed(0)} s in all)`,
  );
  return 0;
}

/** `bun bench backends`: in the guest (or here, with /dev/iommu), table, verdicts and results file. */
export async function backendsBench(argv: string[]): Promise<number> {
  const started = performance.now();
  const startLoad = loadavg()[0]!;
  const { mode, filter, filterSource } = parse(argv);
  let measured: Measured;
  let bootSeconds: number | undefined;
  if (existsSync("/dev/iommu")) {
    measured = await measure(mode, filter, filterSource);
  } else {
    const got = await measureInGuest<Measured>({
      script: "backends.ts",
      argv,
      devices: [{ kind: "edu" }, { kind: "nvme", size: 64 << 20 }],
      outFile: OUT_FILE,
      what: "backends bench",
    });
    if ("exitCode" in got) return got.exitCode;
    ({ measured, bootSeconds } = got);
  }
  const results: BackendsFile = {
    ...measured,
    date: new Date().toISOString(),
    commit: git(["rev-parse", "--short", "HEAD"]) || "unknown",
    dirty: git(["status", "--porcelain", "--", "src", "bench", ":!bench/results"]) !== "",
    host: measured.vm ? machine() : undefined,
    hostLoad: { start: startLoad, end: loadavg()[0]! },
    bootSeconds,
    wallSeconds: (performance.now() - started) / 1000,
  };
  console.log();
  console.log(
    `== type1 against iommufd, same device, same boot (${results.vm ? "QEMU/TCG guest: compare ratios" : "this host"}) ==`,
  );
  console.log(table(results));
  console.log(`each figure: ${results.settings.statistic}; [interval] = ${results.settings.interval}`);
  console.log(`host load (1 min) ${startLoad.toFixed(2)} at the start, ${results.hostLoad!.end.toFixed(2)} at the end`);
  if (saveRun(results, mode === "quick" || filter ? scratchDir : join(root, "bench", "results", "backends"), mode))
    return 1;
  const failed = results.cases.filter((c) => c.errors.length || !c.ratio);
  return failed.length ? 1 : 0;
}

if (import.meta.main) {
  // Inside the guest: measure, and hand the figures back through $IOMMUFD_VM_OUT.
  const out = process.env.IOMMUFD_VM_OUT;
  if (!process.argv.includes("--child") || !out) {
    process.exitCode = await backendsBench(process.argv.slice(2));
  } else {
    const { mode, filter, filterSource } = parse(process.argv.slice(2));
    const measured = await measure(mode, filter, filterSource);
    writeFileSync(join(out, OUT_FILE), JSON.stringify(measured));
  }
}
