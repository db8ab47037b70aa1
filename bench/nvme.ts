/**
 * NVMe race: 4 KiB random reads and writes at queue depth 1 and 32 through the user-space driver
 * (bun-iommufd/nvme: polled, MSI-X and hybrid completion) and through the guest kernel's own NVMe driver, on the
 * same controller in the same boot. Between the phases the controller moves from vfio-pci to
 * the kernel's nvme driver through driver_override, and back.
 *
 * Kernel side: fio with O_DIRECT on the block device, QD1 by pread (psync), QD32 by io_uring from
 * one process. User side: one queue pair, QD callers each with one command out at a time, through
 * both of the driver's APIs: requests (a callback, nothing allocated per command), called back by
 * the driver's poller or taken by the caller's own spin on queue.reap(), and promises (one awaited
 * per command).
 *
 *   bun bench nvme [--seconds S] [--rounds N] [--deep] [--hybrid RULES] [--modes poll,interrupt,hybrid] [--apis request,promise]

 * --hybrid gives the hybrid rows' spin rules, comma-separated: `default` (the driver's own),
 * `p50x2` (twice the median recent wait), `p90x1.25`, or `fixed0.1` (a window fixed at 0.1 ms),
 * each optionally with `+blockN` (blockMs N; else the default, 1); one row per rule,
 * labelled with it. --modes and --apis leave the other rows out (for quick comparisons).
 *
 * --deep adds random reads at QD 64/128/256 (as CAP.MQES allows; bare loops and the driver's
 * requests, one queue pair) and the driver spread over 2 and 4 queue pairs at QD32 each, to show
 * where each stops scaling.
 *
 * boots the test guest with one NVMe controller (where /dev/iommu is missing), runs the race there
 * and saves bench/results/nvme/<date>-<commit>-nvme.json. Inside a guest that has a controller on
 * vfio-pci, `bun bench/nvme.ts [--seconds S] [--rounds N] [--deep] [--reads] [--no-kernel] [--json]`
 * runs it directly.
 */
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { runInGuest } from "../vm/run.ts";
import {
  type Completion,
  type HybridSpin,
  NvmeController,
  type NvmeRequest,
  type QueuePair,
} from "../src/nvme/index.ts";
import { bindToVfioPci } from "../src/vfio/pci.ts";
import { binaryPath, buildBaseline, CProcess } from "./baseline.ts";
import { bareLoop, cLoopCounterpart, openLoopQueue } from "./nvme-loop.ts";

/** Ours, the kernel's, and the two bare loops (bench/nvme-loop.ts) that are the floor for ours. */
export type Driver = "bun-iommufd" | "kernel" | "bare-ts" | "bare-c";
export type Workload = "randread" | "randwrite";

/**
 * Which of the driver's APIs a bun-iommufd row used (src/nvme/request.ts): requests called back by
 * the driver's poller; the same requests with the completions taken by the caller's own spin on
 * queue.reap() (no poller, no event loop: the SPDK way); or a Promise awaited per command.
 */
export type DriverApi = "request" | "request-spin" | "promise";

export interface NvmeRaceRow {
  driver: Driver;
  /** bun-iommufd rows: which API (DriverApi). */
  api?: DriverApi;
  /** Queue pairs the commands were spread over, when more than one (queueDepth is the total in flight). */
  queuePairs?: number;
  /** "polled", "msi-x" or "hybrid[ rule]" for ours; fio's engine for the kernel's. */
  mode: string;
  workload: Workload;
  queueDepth: number;
  iops: number;
  p50us: number;
  p99us: number;
  ops: number;
  seconds: number;
  /**
   * The whole guest's busy CPU time per I/O in µs, from /proc/stat (user, nice, system, irq,
   * softirq, steal) over the measured phase: it counts interrupt handlers, the kernel's own
   * driver and fio alike, which getrusage of one process would not, and the guest runs nothing
   * else meanwhile. With one vCPU a spinning poller shows as 1e6 / IOPS.
   */
  cpuUsPerIo: number;
  /** Hybrid rows: the share of the poller's spins that ended in a park, and the window at the end (ms). */
  parkedShare?: number;
  spinMs?: number;
}

/** A hybrid row's rule: its label (`p50x2`, `fixed0.1`) and what it asks of the driver. */
export interface HybridRule {
  label: string;
  /** hybridSpin; undefined: the driver's default rule (`default`). */
  spin?: HybridSpin;
  /** blockMs (`+block1`). */
  blockMs?: number;
}

/** `p50x2` -> { percentile: 50, multiple: 2 }; `fixed0.1` -> 0.1 (ms); `+blockN`: blockMs N. */
export function parseHybridRule(label: string): HybridRule {
  if (label === "default") return { label };
  const [spin = "", block] = label.split("+block");
  const blockMs = block === undefined ? {} : { blockMs: Number(block) };
  const fixed = /^fixed(\d+(?:\.\d+)?)$/.exec(spin);
  if (fixed && !Number.isNaN(blockMs.blockMs)) return { label, spin: Number(fixed[1]), ...blockMs };
  const rule = /^p(\d+)x(\d+(?:\.\d+)?)(?:max(\d+(?:\.\d+)?))?$/.exec(spin);
  if (rule && !Number.isNaN(blockMs.blockMs)) {
    const maxMs = rule[3] === undefined ? {} : { maxMs: Number(rule[3]) };
    return { label, spin: { percentile: Number(rule[1]), multiple: Number(rule[2]), ...maxMs }, ...blockMs };
  }
  throw new Error(`--hybrid: ${label} is not pNNxM (percentile, multiple) or fixedMS, then +blockN or nothing`);
}

export interface NvmeRaceOptions {
  /** PCI address of the controller (on vfio-pci at the start; left on vfio-pci at the end). */
  address: string;
  /** Measured seconds per phase (after a warm-up of a quarter of it, at least 0.5 s). */
  seconds?: number;
  /** Alternating rounds (ours, kernel's); each row reported is its best round. Default 2. */
  rounds?: number;
  log?: (line: string) => void;
  /** The cbench binary for the C loop's rows (bench/baseline.ts); without it they are left out. */
  cbench?: string;
  /** Include the kernel driver's phase (the controller is rebound). Default true. */
  kernel?: boolean;
  /** Only these workloads. Default: all. */
  workloads?: Workload[];
  /**
   * Also the deep-queue rows (random reads at QD 64/128/256 as CAP.MQES allows: bare loops and the
   * driver's requests) and the driver spread over 2 and 4 queue pairs (QD32 each). Default false.
   */
  deep?: boolean;
  /** The hybrid rows' rules, one row each. Default: the driver's own (p50x2). */
  hybridRules?: HybridRule[];
  /** Only these completion modes (default all three) and APIs (default all). */
  modes?: Completion[];
  apis?: DriverApi[];
}

/** Deep queues, each a single queue pair of depth + 1 entries (CAP.MQES permitting). */
const DEEP_DEPTHS = [64, 128, 256];
/** The driver over several queue pairs, QD32 on each. */
const QUEUE_PAIRS = [2, 4];

const BLOCK = 4096;
/**
 * Both drivers use the first 16 MiB of the namespace, written once before the first round: reads
 * of never-written blocks (holes in the sparse image) and of written ones cost QEMU differently.
 */
const RANGE = 16 << 20;
const SYSFS = "/sys/bus/pci/devices";

/** Busy and total jiffies of the whole guest (/proc/stat's first line). */
export function guestCpu(): { busy: number; total: number } {
  const fields = readFileSync("/proc/stat", "utf8").split("\n", 1)[0]!.trim().split(/\s+/).slice(1).map(Number);
  const [user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0] = fields;
  const busy = user + nice + system + irq + softirq + steal;
  return { busy, total: busy + idle + iowait };
}

/** Measures the guest's busy CPU time from now; the closure gives µs per I/O for `ios`. */
function cpuMeter(): (ios: number) => number {
  const before = guestCpu();
  // USER_HZ is 100 on every architecture Linux exports /proc/stat for.
  return (ios) => +(((guestCpu().busy - before.busy) * 10_000) / Math.max(1, ios)).toFixed(1);
}

function percentile(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

/**
 * Our driver: `depth` callers each with one 4 KiB command out at a time at random 4 KiB-aligned
 * LBAs, through requests (each sent again from its own callback) or promises (each awaited),
 * spread over `queuePairs` queue pairs of their own (caller i on pair i mod queuePairs).
 */
async function userPhase(
  controller: NvmeController,
  workload: Workload,
  depth: number,
  seconds: number,
  completion: Completion,
  api: DriverApi,
  queuePairs = 1,
  hybrid?: HybridRule,
): Promise<NvmeRaceRow> {
  const ns = controller.namespace(1);
  const blocks = BLOCK / ns.blockSize;
  const slots = Math.floor(Math.min(ns.bytes, RANGE) / BLOCK);
  const perQueue = Math.ceil(depth / queuePairs);
  const queues: QueuePair[] = [];
  try {
    for (let q = 0; q < queuePairs; q++)
      queues.push(
        controller.createQueuePair(Math.max(perQueue + 1, 2), {
          completion,
          hybridSpin: hybrid?.spin,
          blockMs: hybrid?.blockMs,
        }),
      );
  } catch (error) {
    for (const queue of queues) controller.deleteQueuePair(queue);
    throw error;
  }
  const buffers = Array.from({ length: depth }, () => controller.allocBuffer(BLOCK));
  for (const b of buffers) b.bytes.fill(0x5a);
  const latencies = new Float64Array(4 << 20);
  let count = 0;
  let seed = 0x2545f491;
  const random = () => {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return (seed >>> 0) % slots;
  };
  const read = workload === "randread";
  const awaited = async (until: number, record: boolean) => {
    const worker = async (i: number) => {
      const buffer = buffers[i]!;
      const options = { queue: queues[i % queuePairs]! };
      // Two clock reads per I/O, as the bare loops take: the completion's time is also the
      // loop's deadline check (a clock read costs 1-4 us in the TCG guest).
      for (let done = performance.now(); done < until; ) {
        const lba = random() * blocks;
        const t0 = performance.now();
        if (read) await ns.read(lba, blocks, buffer, options);
        else await ns.write(lba, blocks, buffer, options);
        done = performance.now();
        if (record && count < latencies.length) latencies[count++] = done - t0;
      }
    };
    await Promise.all(buffers.map((_, i) => worker(i)));
  };
  const calledBack = (until: number, record: boolean, spin = false) =>
    new Promise<void>((resolve, reject) => {
      let active = depth;
      const started = new Float64Array(depth);
      buffers.forEach((buffer, i) => {
        const send = (request: NvmeRequest) => {
          const lba = random() * blocks;
          started[i] = performance.now();
          if (read) ns.submitRead(request, lba, blocks, buffer);
          else ns.submitWrite(request, lba, blocks, buffer);
        };
        const request = queues[i % queuePairs]!.request((r) => {
          if (r.error) {
            active = 0; // ends the spin below
            return reject(r.error);
          }
          // Two clock reads per I/O, as above.
          const done = performance.now();
          if (record && count < latencies.length) latencies[count++] = done - started[i]!;
          if (done < until) send(r);
          else if (--active === 0) resolve();
        });
        send(request);
      });
      if (!spin) return;
      // The caller takes the completions itself, never yielding: the poller (started by the
      // first submission) does not get to run until the phase is over.
      for (const queue of queues) queue.ringDoorbell();
      while (active > 0) for (const queue of queues) queue.reap();
    });
  const run =
    api === "promise" ? awaited : (until: number, record: boolean) => calledBack(until, record, api === "request-spin");
  try {
    await run(performance.now() + Math.max(500, seconds * 250), false);
    // The hybrid queues' spins that found a completion, and those that parked.
    const hybridOf = (queue: QueuePair) => controller.stats().io[controller.queuePairs.indexOf(queue)]?.waits;
    const spins = () =>
      queues.reduce((sum, q) => [sum[0]! + (hybridOf(q)?.found ?? 0), sum[1]! + (hybridOf(q)?.parked ?? 0)], [0, 0]);
    const [foundBefore, parkedBefore] = spins();
    const cpu = cpuMeter();
    const t0 = performance.now();
    await run(t0 + seconds * 1000, true);
    const elapsed = (performance.now() - t0) / 1000;
    const cpuUsPerIo = cpu(count);
    const sorted = latencies.subarray(0, count).sort();
    const [found, parked] = spins().map((n, i) => n - [foundBefore!, parkedBefore!][i]!);
    const hybridRow =
      completion === "hybrid"
        ? {
            parkedShare: +(parked! / Math.max(1, found! + parked!)).toFixed(3),
            spinMs: +(hybridOf(queues[0]!)?.spinMs ?? 0).toFixed(3),
          }
        : {};
    return {
      driver: "bun-iommufd",
      api,
      ...(queuePairs > 1 ? { queuePairs } : {}),
      mode: modeLabel(completion, hybrid),
      workload,
      queueDepth: depth,
      iops: Math.round(count / elapsed),
      p50us: +(percentile(sorted, 50) * 1000).toFixed(1),
      p99us: +(percentile(sorted, 99) * 1000).toFixed(1),
      ops: count,
      seconds: +elapsed.toFixed(2),
      cpuUsPerIo,
      ...hybridRow,
    };
  } finally {
    for (const b of buffers) b.free();
    for (const queue of queues) controller.deleteQueuePair(queue);
  }
}

function modeLabel(completion: Completion, hybrid: HybridRule | undefined): string {
  if (completion === "poll") return "polled";
  if (completion === "interrupt") return "msi-x";
  return hybrid ? `hybrid ${hybrid.label}` : "hybrid";
}

/** I/Os per run of a bare loop: enough to make the drain at each run's end negligible. */
const LOOP_RUN = 1024;

/** The bare TypeScript loop (bench/nvme-loop.ts) on a queue pair of its own. */
function tsLoopPhase(controller: NvmeController, workload: Workload, depth: number, seconds: number): NvmeRaceRow {
  const loop = openLoopQueue(controller, depth);
  try {
    const bare = bareLoop(controller, loop, workload === "randread" ? "read" : "write", RANGE);
    const warmUntil = performance.now() + Math.max(500, seconds * 250);
    while (performance.now() < warmUntil) bare.run(LOOP_RUN);
    bare.takeLatencies();
    const cpu = cpuMeter();
    const t0 = performance.now();
    let ios = 0;
    while (performance.now() < t0 + seconds * 1000) {
      bare.run(LOOP_RUN);
      ios += LOOP_RUN;
    }
    const elapsed = (performance.now() - t0) / 1000;
    const cpuUsPerIo = cpu(ios);
    const sorted = bare.takeLatencies();
    return row(
      "bare-ts",
      workload,
      depth,
      ios,
      elapsed,
      percentile(sorted, 50) * 1000,
      percentile(sorted, 99) * 1000,
      cpuUsPerIo,
    );
  } finally {
    loop.close();
  }
}

/** The C loop (bench/baseline/ops_nvme.c) on a queue pair of its own, driven through cbench. */
async function cLoopPhase(
  controller: NvmeController,
  binary: string,
  workload: Workload,
  depth: number,
  seconds: number,
): Promise<NvmeRaceRow> {
  const loop = openLoopQueue(controller, depth);
  try {
    const counterpart = cLoopCounterpart(controller, loop, workload === "randread" ? "read" : "write", RANGE, LOOP_RUN);
    const c = await CProcess.start(binary, counterpart);
    try {
      const warmMs = Math.max(500, seconds * 250);
      await c.warmUp(1, warmMs, warmMs * 4);
      await c.report();
      const cpu = cpuMeter();
      const t0 = performance.now();
      const runs = await c.warmUp(1, seconds * 1000, seconds * 4000);
      const elapsed = (performance.now() - t0) / 1000;
      const ios = runs * LOOP_RUN;
      const cpuUsPerIo = cpu(ios);
      const latencies = (await c.report()) as { p50: number; p99: number };
      return row("bare-c", workload, depth, ios, elapsed, latencies.p50 / 1000, latencies.p99 / 1000, cpuUsPerIo);
    } finally {
      await c.close();
    }
  } finally {
    loop.close();
  }
}

function row(
  driver: Driver,
  workload: Workload,
  depth: number,
  ios: number,
  elapsed: number,
  p50us: number,
  p99us: number,
  cpuUsPerIo: number,
): NvmeRaceRow {
  return {
    driver,
    mode: "polled",
    workload,
    queueDepth: depth,
    iops: Math.round(ios / elapsed),
    p50us: +p50us.toFixed(1),
    p99us: +p99us.toFixed(1),
    ops: ios,
    seconds: +elapsed.toFixed(2),
    cpuUsPerIo,
  };
}

/** Move the controller to the kernel's nvme driver; returns its block device. */
function bindToKernel(address: string): string {
  const dir = join(SYSFS, address);
  writeFileSync(join(dir, "driver_override"), "nvme");
  if (existsSync(join(dir, "driver"))) writeFileSync(join(dir, "driver", "unbind"), address);
  writeFileSync("/sys/bus/pci/drivers_probe", address);
  const deadline = Date.now() + 20_000;
  for (;;) {
    const ctrlDir = join(dir, "nvme");
    if (existsSync(ctrlDir)) {
      for (const ctrl of readdirSync(ctrlDir)) {
        const ns = readdirSync(join(ctrlDir, ctrl)).find((n) => /^nvme\d+(c\d+)?n1$/.test(n));
        if (ns && existsSync(`/dev/${ns.replace(/c\d+n/, "n")}`)) return `/dev/${ns.replace(/c\d+n/, "n")}`;
      }
    }
    if (Date.now() > deadline) throw new Error(`${address} did not come up as a kernel NVMe block device within 20 s`);
    Bun.sleepSync(50);
  }
}

function fioPhase(device: string, workload: Workload, depth: number, seconds: number): NvmeRaceRow {
  const engine = depth === 1 ? "psync" : "io_uring";
  const args = [
    "fio",
    "--name=race",
    `--filename=${device}`,
    "--direct=1",
    `--rw=${workload}`,
    `--bs=${BLOCK}`,
    `--ioengine=${engine}`,
    `--iodepth=${depth}`,
    "--numjobs=1",
    "--time_based",
    `--runtime=${seconds}`,
    `--ramp_time=${Math.max(0.5, seconds / 4)}`,
    `--size=${RANGE}`,
    "--norandommap",
    "--randrepeat=0",
    "--output-format=json",
  ];
  const cpu = cpuMeter();
  const proc = Bun.spawnSync(args, { stdout: "pipe", stderr: "pipe" });
  // fio's ramp-up runs inside the meter: its I/Os are counted at the measured rate.
  if (proc.exitCode !== 0) throw new Error(`fio failed (${proc.exitCode}): ${proc.stderr.toString().trim()}`);
  const out = proc.stdout.toString();
  const job = JSON.parse(out.slice(out.indexOf("{"))).jobs[0];
  const side = workload === "randread" ? job.read : job.write;
  const pct = side.clat_ns.percentile as Record<string, number>;
  return {
    driver: "kernel",
    mode: engine,
    workload,
    queueDepth: depth,
    iops: Math.round(side.iops),
    p50us: +((pct["50.000000"] ?? Number.NaN) / 1000).toFixed(1),
    p99us: +((pct["99.000000"] ?? Number.NaN) / 1000).toFixed(1),
    ops: side.total_ios,
    seconds: +(side.runtime / 1000).toFixed(2),
    cpuUsPerIo: cpu(side.total_ios * (1 + Math.max(0.5, seconds / 4) / seconds)),
  };
}

const WORKLOADS: [Workload, number][] = [
  ["randread", 1],
  ["randread", 32],
  ["randwrite", 1],
  ["randwrite", 32],
];

/**
 * Both drivers, every workload, in `rounds` alternating rounds (ours, then the kernel's); the
 * controller ends on vfio-pci. Each row is the best round of its driver and workload: on a shared
 * or emulated machine noise only ever takes IOPS away, and alternating keeps both sides exposed
 * to the same slow spells.
 */
export async function nvmeRace(
  options: NvmeRaceOptions,
): Promise<{ best: NvmeRaceRow[]; rounds: NvmeRaceRow[][]; idle: IdleCpu }> {
  const seconds = options.seconds ?? 3;
  const log = options.log ?? ((line: string) => console.error(line));
  const rounds: NvmeRaceRow[][] = [];
  const idle = await idleCpu(options.address);
  log(
    `nvme race: idle guest ${idle.noController} ms of CPU per s; with a controller open and nothing pending: ` +
      `polled ${idle.polled}, MSI-X ${idle.interrupt}, hybrid ${idle.hybrid} (over ${IDLE_MS / 1000} s each)`,
  );
  {
    using controller = NvmeController.open(bindToVfioPci(options.address), { heapSize: 4 << 20 });
    const ns = controller.namespace(1);
    using fill = controller.allocBuffer(1 << 20);
    fill.bytes.fill(0x3c);
    const blocks = (1 << 20) / ns.blockSize;
    for (let lba = 0; lba * ns.blockSize < Math.min(RANGE, ns.bytes); lba += blocks) await ns.write(lba, blocks, fill);
    await ns.flush();
  }
  const workloads = WORKLOADS.filter(([w]) => !options.workloads || options.workloads.includes(w));
  for (let round = 1; round <= (options.rounds ?? 2); round++) {
    const rows: NvmeRaceRow[] = [];
    const path = bindToVfioPci(options.address);
    {
      // 8 MiB: a queue pair of 257 entries keeps a PRP list page per slot (1 MiB) besides its data.
      using controller = NvmeController.open(path, { heapSize: (options.deep ? 8 : 4) << 20 });
      for (const [workload, depth] of workloads) {
        const rowsHere = [tsLoopPhase(controller, workload, depth, seconds)];
        if (options.cbench) rowsHere.push(await cLoopPhase(controller, options.cbench, workload, depth, seconds));
        for (const row of rowsHere) {
          log(`nvme race round ${round}: ${format(row)}`);
          rows.push(row);
        }
      }
      // Per workload, every mode and API in turn: same-boot ratios between modes come from phases
      // seconds apart, not minutes (the host's load changes meanwhile).
      const modes: [Completion, HybridRule | undefined][] = [];
      for (const completion of options.modes ?? (["poll", "interrupt", "hybrid"] as const)) {
        if (completion !== "hybrid") modes.push([completion, undefined]);
        else for (const rule of options.hybridRules ?? [undefined]) modes.push([completion, rule]);
      }
      for (const [workload, depth] of workloads) {
        for (const [completion, rule] of modes) {
          // Alternate which API goes first: a phase right after another process's (the C loop's) ran slower here.
          const apis = options.apis ?? (["request", "request-spin", "promise"] as const);
          for (const api of round % 2 === 1 ? apis : apis.toReversed()) {
            if (api === "request-spin" && completion !== "poll") continue;
            const row = await userPhase(controller, workload, depth, seconds, completion, api, 1, rule);
            log(`nvme race round ${round}: ${format(row)}`);
            rows.push(row);
          }
        }
      }
    }
    if (options.deep) {
      const record = (row: NvmeRaceRow) => {
        log(`nvme race round ${round}: ${format(row)}`);
        rows.push(row);
      };
      using controller = NvmeController.open(bindToVfioPci(options.address), { heapSize: 8 << 20 });
      const entries = controller.capabilities.maxQueueEntries;
      for (const depth of DEEP_DEPTHS) {
        if (depth + 1 > entries) {
          if (round === 1) log(`nvme race: QD${depth} left out: CAP.MQES allows ${entries} entries per queue`);
          continue;
        }
        record(tsLoopPhase(controller, "randread", depth, seconds));
        if (options.cbench) record(await cLoopPhase(controller, options.cbench, "randread", depth, seconds));
        record(await userPhase(controller, "randread", depth, seconds, "poll", "request"));
      }
      for (const pairs of QUEUE_PAIRS) {
        record(await userPhase(controller, "randread", 32 * pairs, seconds, "poll", "request", pairs));
      }
    }
    if (options.kernel === false) {
      rounds.push(rows);
      continue;
    }
    const device = bindToKernel(options.address);
    try {
      for (const [workload, depth] of workloads) {
        const row = fioPhase(device, workload, depth, seconds);
        log(`nvme race round ${round}: ${format(row)}`);
        rows.push(row);
      }
    } finally {
      bindToVfioPci(options.address);
    }
    rounds.push(rows);
  }
  const best: NvmeRaceRow[] = [];
  for (const row of rounds.flat()) {
    const at = best.findIndex(
      (b) =>
        b.driver === row.driver &&
        b.api === row.api &&
        b.queuePairs === row.queuePairs &&
        b.mode === row.mode &&
        b.workload === row.workload &&
        b.queueDepth === row.queueDepth,
    );
    if (at < 0) best.push(row);
    else if (row.iops > best[at]!.iops) best[at] = row;
  }
  return { best, rounds, idle };
}

/** The guest's busy CPU, ms per s, while nothing is pending: without a controller, and with one open. */
export interface IdleCpu {
  noController: number;
  polled: number;
  interrupt: number;
  hybrid?: number;
}

const IDLE_MS = 2000;

async function idleMsPerS(): Promise<number> {
  const before = guestCpu().busy;
  await Bun.sleep(IDLE_MS);
  // USER_HZ is 100: a jiffy is 10 ms.
  return +(((guestCpu().busy - before) * 10) / (IDLE_MS / 1000)).toFixed(1);
}

/** An idle controller should cost what an idle guest costs: its poller runs only while commands are pending. */
async function idleCpu(address: string): Promise<IdleCpu> {
  const noController = await idleMsPerS();
  const opened = async (completion: Completion) => {
    using controller = NvmeController.open(bindToVfioPci(address), { heapSize: 4 << 20, completion });
    // One command first, so that whatever a finished command leaves running is counted.
    using one = controller.allocBuffer(4096);
    await controller.namespace(1).read(0, 4096 / controller.namespace(1).blockSize, one);
    return idleMsPerS();
  };
  return {
    noController,
    polled: await opened("poll"),
    interrupt: await opened("interrupt"),
    hybrid: await opened("hybrid"),
  };
}

export function format(row: NvmeRaceRow): string {
  const api = row.api ? ` ${row.api}${row.queuePairs ? ` x${row.queuePairs} QPs` : ""}` : "";
  const driver = `${row.driver}${api}`;
  const spins = row.parkedShare === undefined ? "" : `  parked ${row.parkedShare} of spins, window ${row.spinMs} ms`;
  return `${driver.padEnd(24)} ${row.mode.padEnd(8)} ${row.workload.padEnd(9)} QD${String(row.queueDepth).padEnd(3)} ${String(row.iops).padStart(7)} IOPS  p50 ${row.p50us} us  p99 ${row.p99us} us  CPU ${row.cpuUsPerIo} us/IO${spins}`;
}

export interface Ratio {
  mode: string;
  api?: DriverApi;
  workload: Workload;
  queueDepth: number;
  /** The driver it is compared with: the kernel's, or one of the bare loops. */
  against: Driver;
  ratio: number;
}

/** Ours (per completion mode and API, one queue pair) over the kernel's and over each bare loop, per workload and depth. */
export function ratios(rows: NvmeRaceRow[]): Ratio[] {
  const out: Ratio[] = [];
  const cases = [...WORKLOADS, ...DEEP_DEPTHS.map((depth): [Workload, number] => ["randread", depth])];
  for (const [workload, depth] of cases) {
    for (const against of ["kernel", "bare-ts", "bare-c"] as const) {
      const theirs = rows.find((r) => r.driver === against && r.workload === workload && r.queueDepth === depth);
      if (!theirs) continue;
      for (const ours of rows.filter(
        (r) => r.driver === "bun-iommufd" && !r.queuePairs && r.workload === workload && r.queueDepth === depth,
      )) {
        out.push({
          mode: ours.mode,
          api: ours.api,
          workload,
          queueDepth: depth,
          against,
          ratio: +(ours.iops / theirs.iops).toFixed(2),
        });
      }
    }
  }
  return out;
}

/** The first NVMe controller on vfio-pci the guest lists. */
export function guestNvmeAddress(): string | undefined {
  const listed = process.env.IOMMUFD_VM_NVME;
  if (listed) return listed.split(",")[0]?.split("=")[0];
  if (!existsSync(SYSFS)) return undefined;
  return readdirSync(SYSFS).find((a) => {
    const id = `${readFileSync(join(SYSFS, a, "vendor"), "utf8").trim()}:${readFileSync(join(SYSFS, a, "device"), "utf8").trim()}`;
    return id === "0x1b36:0x0010";
  });
}

interface RaceFile {
  date: string;
  commit: string;
  note: string;
  seconds: number;
  rounds: number;
  best: NvmeRaceRow[];
  ratios: ReturnType<typeof ratios>;
  all: NvmeRaceRow[][];
  /** The guest's busy CPU with nothing pending (bench/nvme.ts idleCpu). */
  idle?: IdleCpu;
}

function numberAfter(argv: string[], flag: string, fallback: number): number {
  const at = argv.indexOf(flag);
  const value = at >= 0 ? Number(argv[at + 1]) : fallback;
  if (!Number.isFinite(value) || value <= 0) throw new Error(`${flag} wants a positive number`);
  return value;
}

/** --hybrid, --modes and --apis (see the file comment), as nvmeRace takes them; the flags, to pass on to the guest. */
function selection(argv: string[]): { options: Partial<NvmeRaceOptions>; flags: string[] } {
  const list = (flag: string) => {
    const at = argv.indexOf(flag);
    return at >= 0 ? (argv[at + 1] ?? "").split(",").filter(Boolean) : undefined;
  };
  const options: Partial<NvmeRaceOptions> = {};
  const flags: string[] = [];
  const hybrid = list("--hybrid");
  if (hybrid) options.hybridRules = hybrid.map(parseHybridRule);
  const modes = list("--modes");
  if (modes) {
    const wrong = modes.filter((m) => !["poll", "interrupt", "hybrid"].includes(m));
    if (wrong.length > 0) throw new Error(`--modes: ${wrong.join(", ")} is not poll, interrupt or hybrid`);
    options.modes = modes as Completion[];
  }
  const apis = list("--apis");
  if (apis) {
    const wrong = apis.filter((a) => !["request", "request-spin", "promise"].includes(a));
    if (wrong.length > 0) throw new Error(`--apis: ${wrong.join(", ")} is not request, request-spin or promise`);
    options.apis = apis as DriverApi[];
  }
  for (const flag of ["--hybrid", "--modes", "--apis"]) {
    const at = argv.indexOf(flag);
    if (at >= 0) flags.push(flag, argv[at + 1] ?? "");
  }
  return { options, flags };
}

/** `bun bench nvme`: the race in a guest (or here, with /dev/iommu and a controller), table and results file. */
export async function nvmeBench(argv: string[]): Promise<number> {
  const seconds = numberAfter(argv, "--seconds", 3);
  const rounds = numberAfter(argv, "--rounds", 2);
  const deep = argv.includes("--deep");
  const chosen = selection(argv);
  const root = resolve(import.meta.dir, "..");
  let race: { best: NvmeRaceRow[]; rounds: NvmeRaceRow[][]; idle?: IdleCpu };
  const address = existsSync("/dev/iommu") ? guestNvmeAddress() : undefined;
  // The C loop's program is built here, where the tree is writable; the guest runs it from the share.
  const cbench = buildBaseline().binary;
  if (address) {
    race = await nvmeRace({ address, seconds, rounds, cbench, deep, ...chosen.options });
  } else {
    const out = mkdtempSync(join(tmpdir(), "bun-iommufd-nvme-bench-"));
    try {
      const guest = await runInGuest({
        command: [
          process.execPath,
          join("bench", "nvme.ts"),
          "--seconds",
          String(seconds),
          "--rounds",
          String(rounds),
          "--out",
          ...(deep ? ["--deep"] : []),
          ...chosen.flags,
        ],
        cwd: root,
        devices: [{ kind: "nvme", size: 64 << 20 }],
        // One vCPU, as `bun bench` uses: the CPU-per-I/O column is then the one vCPU's busy time.
        cpus: 1,
        outDir: out,
        timeoutSeconds: 300 + rounds * seconds * (deep ? 60 : 40),
      });
      const file = join(out, "race.json");
      if (guest.exitCode !== 0 || !existsSync(file)) {
        console.error(
          `nvme bench failed in the guest (exit status ${guest.exitCode}${guest.message ? `: ${guest.message}` : ""})`,
        );
        return guest.exitCode || 1;
      }
      race = JSON.parse(readFileSync(file, "utf8"));
      if (guest.diskDir) rmSync(guest.diskDir, { recursive: true, force: true });
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  }
  const commit =
    Bun.spawnSync(["git", "rev-parse", "--short", "HEAD"], { cwd: root }).stdout.toString().trim() || "unknown";
  const result: RaceFile = {
    date: new Date().toISOString(),
    commit,
    note: "TCG guest unless run on a host with /dev/iommu: absolute IOPS are emulated; ours/kernel ratios of the same run count. Each row is the best of its rounds.",
    seconds,
    rounds,
    best: race.best,
    ratios: ratios(race.best),
    all: race.rounds,
    idle: race.idle,
  };
  console.log("4 KiB random I/O, bun-iommufd/nvme against the kernel's nvme driver, same controller, same boot:");
  for (const row of race.best) console.log(`  ${format(row)}`);
  if (race.idle) {
    console.log(
      `  idle, nothing pending: guest busy ${race.idle.noController} ms/s without a controller, ${race.idle.polled} with one open (polled), ${race.idle.interrupt} (MSI-X), ${race.idle.hybrid} (hybrid)`,
    );
  }
  for (const r of result.ratios) {
    console.log(`  ${r.workload} QD${r.queueDepth}: bun-iommufd (${r.mode}, ${r.api}) / ${r.against} = ${r.ratio}x`);
  }
  const dir = join(root, "bench", "results", "nvme");
  mkdirSync(dir, { recursive: true });
  const path = join(dir, `${result.date.replace(/\.\d+Z$/, "Z").replaceAll(":", "")}-${commit}-nvme.json`);
  writeFileSync(path, `${JSON.stringify(result, null, 2)}\n`);
  console.log(`results: ${path.slice(root.length + 1)}`);
  return 0;
}

if (import.meta.main) {
  const argv = process.argv.slice(2);
  const address = guestNvmeAddress();
  if (!address) {
    console.error("no NVMe controller on vfio-pci here: use `bun bench nvme` (it boots the test guest)");
    process.exit(1);
  }
  const race = await nvmeRace({
    address,
    seconds: numberAfter(argv, "--seconds", 3),
    rounds: numberAfter(argv, "--rounds", 2),
    cbench: existsSync(binaryPath) ? binaryPath : undefined,
    kernel: !argv.includes("--no-kernel"),
    workloads: argv.includes("--reads") ? ["randread"] : undefined,
    deep: argv.includes("--deep"),
    ...selection(argv).options,
  });
  const out = process.env.IOMMUFD_VM_OUT;
  if (argv.includes("--out") && out) {
    mkdirSync(out, { recursive: true });
    writeFileSync(join(out, "race.json"), JSON.stringify(race));
  } else if (argv.includes("--json")) {
    console.log(JSON.stringify({ best: race.best, ratios: ratios(race.best), rounds: race.rounds }, null, 2));
  } else {
    for (const row of race.best) console.log(format(row));
    for (const r of ratios(race.best))
      console.log(`${r.workload} QD${r.queueDepth}: bun-iommufd (${r.mode}, ${r.api}) / ${r.against} = ${r.ratio}x`);
  }
}
