/**
 * The NVMe driver against its two bare loops, taking turns in short slices in one boot:
 *
 *   bun bench nvme-slices [--rounds N] [--cycles N] [--slice-ms MS] [--qd 1,32] [--writes]
 *
 * `bun bench nvme` runs each row as its own phase of seconds and keeps the best of two rounds;
 * QEMU's NVMe model (completing on its main loop, beside the one TCG vCPU) moves a phase's rate by
 * +-30%, so two runs of the same code put the driver at 0.76x and 0.95x of the bare TS loop at
 * QD32. Here every side has its own queue pair on one controller, opened once, and the sides take
 * turns in short slices (40 ms; the order reversed every other cycle), 6 per side per round; a
 * side's rate in a round is its I/Os over its time in the round's slices, a round's ratio is that
 * over the bare TS loop's, and a ratio is reported as the median
 * over rounds with the narrowest order-statistic interval covering it with >= 95% (as
 * `bun bench backends-pair`). CPU per I/O is the guest's busy time (/proc/stat) during a side's
 * slices over its I/Os, for every side alike.
 *
 * Sides: the bare TS loop and the bare C loop (bench/nvme-loop.ts, bench/baseline/ops_nvme.c),
 * the driver's requests taken by the caller's own spin on queue.reap(), the same called back by the
 * driver's poller, and the same on an interrupt and on a hybrid queue pair (completion "interrupt"
 * and "hybrid", their defaults).
 */
import { existsSync, writeFileSync } from "node:fs";
import { loadavg } from "node:os";
import { join, resolve } from "node:path";
import { bindToVfioPci } from "../src/vfio/pci.ts";
import { type Completion, NvmeController, type NvmeRequest, type QueuePair } from "../src/nvme/index.ts";
import { innerInterval } from "./backends-pair.ts";
import { git, measureInGuest, saveRun } from "./backends.ts";
import { binaryPath, buildBaseline, CProcess } from "./baseline.ts";
import { bareLoop, cLoopCounterpart, openLoopQueue } from "./nvme-loop.ts";
import { guestCpu, guestNvmeAddress } from "./nvme.ts";
import { fmtInterval, machine } from "./results.ts";
import type { Interval } from "./runner.ts";

const root = resolve(import.meta.dir, "..");
const BLOCK = 4096;
/** The range every side reads or writes: the first 16 MiB, written once first (as bun bench nvme). */
const RANGE = 16 << 20;
/** Per side, before the first round (100-300 ms left QD1 rows at a third of their rate: still compiling). */
const WARM_UP_MS = 2000;

export type SideName = "bare-ts" | "bare-c" | "request-spin" | "request" | "interrupt" | "hybrid";
export const SIDES: SideName[] = ["bare-ts", "bare-c", "request-spin", "request", "interrupt", "hybrid"];

interface Side {
  name: SideName;
  /** Runs for about `ms`, then lets everything in flight complete: the I/Os done. */
  run(ms: number): Promise<number>;
  close(): Promise<void> | void;
}

export interface SliceRow {
  workload: "randread" | "randwrite";
  queueDepth: number;
  side: SideName;
  /** Median over rounds of the side's IOPS in its slice. */
  iops: number;
  /** Per round: this side's IOPS over the bare TS loop's, and over the bare C loop's. */
  vsBareTs?: Interval;
  vsBareC?: Interval;
  cpuUsPerIo: number;
  perRound: number[];
}

/**
 * The order of the sides in round `round`: as given in even rounds, reversed in odd ones, so a
 * drift within a round favours no side over the rounds.
 */
export function sliceOrder<T>(sides: readonly T[], round: number): T[] {
  return round % 2 === 0 ? [...sides] : [...sides].reverse();
}

/** Per round, a's IOPS over b's (rounds where either is missing or zero are left out). */
export function roundRatios(a: number[], b: number[]): number[] {
  const out: number[] = [];
  for (let i = 0; i < Math.min(a.length, b.length); i++) if (a[i]! > 0 && b[i]! > 0) out.push(a[i]! / b[i]!);
  return out;
}

/** The driver's requests on `queue`: `qd` callers, each sending its next command from its callback. */
function driverSide(
  name: SideName,
  controller: NvmeController,
  queue: QueuePair,
  qd: number,
  read: boolean,
  spin: boolean,
): Side {
  const ns = controller.namespace(1);
  const blocks = BLOCK / ns.blockSize;
  const slots = Math.floor(Math.min(ns.bytes, RANGE) / BLOCK);
  const buffers = Array.from({ length: qd }, () => controller.allocBuffer(BLOCK));
  let seed = 0x9e3779b9;
  let until = 0;
  let done = 0;
  let active = 0;
  let failure: Error | undefined;
  let finished: () => void = () => {};
  const requests = buffers.map((buffer) => {
    const send = (request: NvmeRequest) => {
      seed ^= seed << 13;
      seed ^= seed >>> 17;
      seed ^= seed << 5;
      const lba = ((seed >>> 0) % slots) * blocks;
      if (read) ns.submitRead(request, lba, blocks, buffer);
      else ns.submitWrite(request, lba, blocks, buffer);
    };
    const request = queue.request((r) => {
      if (r.error) failure ??= r.error;
      else done++;
      // One clock read per completion, for the deadline: the bare loops read it as often.
      if (!failure && performance.now() < until) send(r);
      else if (--active === 0) finished();
    });
    return { request, send };
  });
  return {
    name,
    async run(ms) {
      done = 0;
      active = qd;
      until = performance.now() + ms;
      const over = new Promise<void>((resolve) => {
        finished = resolve;
      });
      for (const { request, send } of requests) send(request);
      if (spin) {
        queue.ringDoorbell();
        while (active > 0) queue.reap();
      }
      await over;
      if (failure) throw failure;
      return done;
    },
    close() {
      for (const b of buffers) b.free();
      controller.deleteQueuePair(queue);
    },
  };
}

async function openSides(
  controller: NvmeController,
  qd: number,
  read: boolean,
  cbench: string | undefined,
): Promise<Side[]> {
  const sides: Side[] = [];
  try {
    const tsLoop = openLoopQueue(controller, qd);
    const bare = bareLoop(controller, tsLoop, read ? "read" : "write", RANGE);
    const perRun = Math.min(1024, Math.max(64, 16 * qd));
    sides.push({
      name: "bare-ts",
      async run(ms) {
        const end = performance.now() + ms;
        let ios = 0;
        while (performance.now() < end) {
          bare.run(perRun);
          ios += perRun;
        }
        bare.takeLatencies();
        return ios;
      },
      close: () => tsLoop.close(),
    });
    if (cbench) {
      const cLoop = openLoopQueue(controller, qd);
      const c = await CProcess.start(
        cbench,
        cLoopCounterpart(controller, cLoop, read ? "read" : "write", RANGE, perRun),
      );
      sides.push({
        name: "bare-c",
        run: async (ms) => (await c.warmUp(1, ms, ms * 4)) * perRun,
        async close() {
          await c.close();
          cLoop.close();
        },
      });
    }
    const polled = (completion: Completion) => controller.createQueuePair(Math.max(qd + 1, 2), { completion });
    sides.push(driverSide("request-spin", controller, polled("poll"), qd, read, true));
    sides.push(driverSide("request", controller, polled("poll"), qd, read, false));
    sides.push(driverSide("interrupt", controller, polled("interrupt"), qd, read, false));
    sides.push(driverSide("hybrid", controller, polled("hybrid"), qd, read, false));
    return sides;
  } catch (error) {
    for (const side of sides.reverse()) await side.close();
    throw error;
  }
}

interface Options {
  rounds: number;
  /** Slices per side per round, and their length: short slices, so a drift of the rate hits every side alike. */
  cycles: number;
  sliceMs: number;
  depths: number[];
  writes: boolean;
  cbench?: string;
}

/** In the guest: every depth and workload, rounds of one slice per side. */
async function measure(address: string, o: Options, log: (line: string) => void): Promise<SliceRow[]> {
  using controller = NvmeController.open(bindToVfioPci(address), { heapSize: 8 << 20 });
  {
    // Write the range once: reads of never-written blocks (holes in the image) cost QEMU less.
    const ns = controller.namespace(1);
    using buffer = controller.allocBuffer(128 * 1024);
    for (let at = 0; at < RANGE; at += buffer.size)
      await ns.write(at / ns.blockSize, buffer.size / ns.blockSize, buffer);
  }
  const rows: SliceRow[] = [];
  const workloads: ("randread" | "randwrite")[] = o.writes ? ["randread", "randwrite"] : ["randread"];
  for (const workload of workloads) {
    for (const qd of o.depths) {
      const sides = await openSides(controller, qd, workload === "randread", o.cbench);
      try {
        // Warm-up: under TCG the JIT's top tier takes seconds of the one vCPU to compile a path.
        for (const side of sides) await side.run(WARM_UP_MS);
        const iops = new Map<SideName, number[]>(sides.map((s) => [s.name, []]));
        const cpu = new Map<SideName, { busy: number; ios: number }>(sides.map((s) => [s.name, { busy: 0, ios: 0 }]));
        for (let round = 0; round < o.rounds; round++) {
          const inRound = new Map<SideName, { ios: number; seconds: number }>(
            sides.map((s) => [s.name, { ios: 0, seconds: 0 }]),
          );
          for (let cycle = 0; cycle < o.cycles; cycle++) {
            for (const side of sliceOrder(sides, round * o.cycles + cycle)) {
              const before = guestCpu().busy;
              const t0 = performance.now();
              const ios = await side.run(o.sliceMs);
              const mine = inRound.get(side.name)!;
              mine.seconds += (performance.now() - t0) / 1000;
              mine.ios += ios;
              const c = cpu.get(side.name)!;
              c.busy += guestCpu().busy - before;
              c.ios += ios;
            }
          }
          for (const [name, { ios, seconds }] of inRound) iops.get(name)!.push(ios / seconds);
        }
        for (const side of sides) {
          const mine = iops.get(side.name)!;
          const ts = iops.get("bare-ts")!;
          const cLoop = iops.get("bare-c");
          const c = cpu.get(side.name)!;
          const sorted = [...mine].sort((a, b) => a - b);
          const row: SliceRow = {
            workload,
            queueDepth: qd,
            side: side.name,
            iops: Math.round(sorted[sorted.length >> 1]!),
            ...(side.name !== "bare-ts" ? { vsBareTs: innerInterval(roundRatios(mine, ts)) } : {}),
            ...(cLoop && side.name !== "bare-c" ? { vsBareC: innerInterval(roundRatios(mine, cLoop)) } : {}),
            // USER_HZ is 100: one jiffy is 10,000 us.
            cpuUsPerIo: +((c.busy * 10_000) / Math.max(1, c.ios)).toFixed(1),
            perRound: mine.map(Math.round),
          };
          rows.push(row);
          log(format(row));
        }
      } finally {
        for (const side of sides.reverse()) await side.close();
      }
    }
  }
  return rows;
}

function format(r: SliceRow): string {
  const vs = (label: string, i: Interval | undefined) => (i ? ` ${label} ${fmtInterval(i)}` : "");
  return `${r.workload} QD${r.queueDepth} ${r.side.padEnd(12)} ${String(r.iops).padStart(7)} IOPS  ${String(r.cpuUsPerIo).padStart(6)} us CPU/IO${vs("/bare-ts", r.vsBareTs)}${vs("/bare-c", r.vsBareC)}`;
}

function parse(argv: string[]): Options {
  const after = (flag: string, fallback: string) => {
    const at = argv.indexOf(flag);
    return at >= 0 && argv[at + 1] !== undefined ? argv[at + 1]! : fallback;
  };
  const rounds = Number(after("--rounds", "12"));
  const sliceMs = Number(after("--slice-ms", "40"));
  const cycles = Number(after("--cycles", "6"));
  const depths = after("--qd", "1,32").split(",").map(Number);
  if (!Number.isInteger(rounds) || rounds < 2) throw new Error("--rounds: a whole number, at least 2");
  if (!(sliceMs >= 10)) throw new Error("--slice-ms: at least 10");
  if (!Number.isInteger(cycles) || cycles < 1) throw new Error("--cycles: a whole number, at least 1");
  if (depths.some((d) => !Number.isInteger(d) || d < 1 || d > 256)) throw new Error("--qd: whole numbers 1..256");
  return { rounds, cycles, sliceMs, depths, writes: argv.includes("--writes") };
}

interface SlicesFile {
  date: string;
  commit: string;
  note: string;
  options: Omit<Options, "cbench">;
  machine: ReturnType<typeof machine>;
  loadavg: { before: number[]; after: number[] };
  rows: SliceRow[];
  wallSeconds?: number;
}

/** `bun bench nvme-slices`: in the guest (or here, with /dev/iommu and a controller on vfio-pci). */
export async function nvmeSlicesBench(argv: string[]): Promise<number> {
  const started = performance.now();
  let options: Options;
  try {
    options = parse(argv);
  } catch (error) {
    console.error(`bench nvme-slices: ${(error as Error).message}`);
    return 2;
  }
  const before = loadavg();
  const cbench = buildBaseline().binary;
  let rows: SliceRow[];
  const address = existsSync("/dev/iommu") ? guestNvmeAddress() : undefined;
  if (address) {
    rows = await measure(address, { ...options, cbench }, (line) => console.log(`  ${line}`));
  } else {
    const run = await measureInGuest<SliceRow[]>({
      script: "nvme-slices.ts",
      argv,
      devices: [{ kind: "nvme", size: 64 << 20 }],
      outFile: "slices.json",
      what: "nvme-slices",
    });
    if ("exitCode" in run) return run.exitCode || 1;
    rows = run.measured;
    for (const row of rows) console.log(`  ${format(row)}`);
  }
  const result: SlicesFile = {
    date: new Date().toISOString(),
    commit: git(["rev-parse", "--short", "HEAD"]) || "unknown",
    note: "one 1-vCPU TCG boot, one controller, every side on its own queue pair, slices taking turns; ratios are per round, median [interval >= 95%]",
    options,
    machine: machine(),
    loadavg: { before, after: loadavg() },
    rows,
    wallSeconds: (performance.now() - started) / 1000,
  };
  return saveRun(result, join(root, "bench", "results", "nvme"), "slices");
}

if (import.meta.main) {
  const out = process.env.IOMMUFD_VM_OUT;
  if (process.argv.includes("--child") && out) {
    // In the guest: the C loop was built on the host (the tree is read-only here).
    const address = guestNvmeAddress();
    if (!address) throw new Error("nvme-slices: no NVMe controller on vfio-pci in this guest");
    const options = { ...parse(process.argv.slice(2)), cbench: existsSync(binaryPath) ? binaryPath : undefined };
    const rows = await measure(address, options, (line) => console.error(`  ${line}`));
    writeFileSync(join(out, "slices.json"), JSON.stringify(rows));
  } else {
    process.exitCode = await nvmeSlicesBench(process.argv.slice(2));
  }
}
