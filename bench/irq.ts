/**
 * Interrupt benchmark: QEMU's edu raises an MSI through its raise register; how long until the
 * library hands the count to JavaScript, against bench/baseline/irq_bench.c blocking in read(2)
 * on the eventfd of the same vector, in the same guest boot.
 *
 *   bun bench/irq.ts            (without /dev/iommu: builds the C side here, runs both in the guest)
 *   bun bench/irq.ts --quick    (few iterations: proves it runs, not how fast)
 *
 * Paths measured on the library side, each per interrupt (raise -> count in JS -> ack):
 *   await        `await vector.wait()` after the raise (the event is already pending: one read)
 *   await-armed  `wait()` called before the raise, so it goes through Bun's epoll loop
 *   poll         spin on `vector.poll()` (one non-blocking read per turn)
 * plus burst rates (B raises back to back, counted until all are in) and the CPU time of an idle
 * 2 s wait.
 */
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { findPciDevices, Iommufd, type IrqVector, VfioDevice } from "../src/index.ts";
import { Edu, EDU_DEVICE, EDU_VENDOR } from "../examples/edu.ts";
import { uapiIncludeDir } from "../test/support/headers.ts";

const here = import.meta.dir;
const quick = process.argv.includes("--quick");
const WARMUP = quick ? 200 : 20_000;
const ITERATIONS = quick ? 200 : 5_000;
const BURST = 16;
const ROUNDS = quick ? 1 : 2;
const IDLE_MS = quick ? 200 : 2_000;

export interface Figures {
  side: string;
  iterations: number;
  events: number;
  meanNs: number;
  minNs: number;
  medianNs: number;
  p99Ns: number;
}

function figures(side: string, samples: Float64Array, events: number): Figures {
  const sorted = Float64Array.from(samples).sort();
  const total = samples.reduce((a, b) => a + b, 0);
  return {
    side,
    iterations: samples.length,
    events,
    meanNs: total / samples.length,
    minNs: sorted[0]!,
    medianNs: sorted[sorted.length >> 1]!,
    p99Ns: sorted[Math.floor((sorted.length * 99) / 100)]!,
  };
}

type Path = "await" | "await-armed" | "poll";

async function roundTrip(
  path: Path,
  vector: IrqVector,
  edu: Edu,
  warmup: number,
  iterations: number,
): Promise<Figures> {
  const samples = new Float64Array(iterations);
  let events = 0;
  for (let i = 0; i < warmup + iterations; i++) {
    let count: number;
    const start = Bun.nanoseconds();
    if (path === "await") {
      edu.raiseInterrupt();
      count = await vector.wait();
    } else if (path === "await-armed") {
      const pending = vector.wait();
      edu.raiseInterrupt();
      count = await pending;
    } else {
      edu.raiseInterrupt();
      do count = vector.poll();
      while (count === 0);
    }
    const end = Bun.nanoseconds();
    edu.ackInterrupt(1);
    if (i >= warmup) {
      samples[i - warmup] = end - start;
      events += count;
    }
  }
  return figures(path, samples, events);
}

async function burstRate(path: "await" | "poll", vector: IrqVector, edu: Edu, rounds: number): Promise<number> {
  const start = Bun.nanoseconds();
  let events = 0;
  for (let r = 0; r < rounds; r++) {
    for (let i = 0; i < BURST; i++) edu.raiseInterrupt();
    let seen = 0;
    while (seen < BURST) seen += path === "await" ? await vector.wait() : vector.poll();
    edu.ackInterrupt(1);
    events += seen;
  }
  return (events * 1e9) / (Bun.nanoseconds() - start);
}

/** CPU time (user + system, µs) the process spends while one wait() sits idle for `ms`. */
async function idleWaitCpu(vector: IrqVector, ms: number): Promise<{ cpuUs: number; wallMs: number }> {
  const timer = setTimeout(() => vector.trigger(), ms);
  const before = process.cpuUsage();
  const start = performance.now();
  await vector.wait();
  const used = process.cpuUsage(before);
  clearTimeout(timer);
  return { cpuUs: used.user + used.system, wallMs: performance.now() - start };
}

/** Where an await's time goes apart from the kernel: the cost of the pieces, each alone. */
async function pieces(vector: IrqVector, edu: Edu): Promise<Record<string, number>> {
  const n = quick ? 200 : 5_000;
  const time = async (fn: () => unknown) => {
    for (let i = 0; i < n; i++) await fn();
    const start = Bun.nanoseconds();
    for (let i = 0; i < n; i++) await fn();
    return (Bun.nanoseconds() - start) / n;
  };
  const emptyPollNs = await time(() => vector.poll()); // read(2) -> EAGAIN
  const resolvedAwaitNs = await time(() => Promise.resolve(1));
  const raiseAckNs = await time(() => {
    edu.raiseInterrupt();
    edu.ackInterrupt(1);
  });
  while (vector.poll() === 0) {} // the raises above are pending: drain them
  await Bun.sleep(20);
  vector.poll();
  return { emptyPollNs, resolvedAwaitNs, raiseAckNs };
}

async function librarySide(address: string) {
  using iommufd = Iommufd.open();
  using device = VfioDevice.open(address);
  device.bind(iommufd);
  device.attach(iommufd.createIoas());
  const edu = new Edu(device.mapRegion(0));
  using msi = device.enableIrq("msi");
  const vector = msi.vectors[0]!;
  const paths: Figures[] = [];
  for (const path of ["poll", "await", "await-armed"] as const)
    paths.push(await roundTrip(path, vector, edu, WARMUP, ITERATIONS));
  const rounds = Math.max(1, Math.floor(ITERATIONS / BURST));
  const burstAwait = await burstRate("await", vector, edu, rounds);
  const burstPoll = await burstRate("poll", vector, edu, rounds);
  const breakdown = await pieces(vector, edu);
  const idle = await idleWaitCpu(vector, IDLE_MS);
  return { paths, burstAwait, burstPoll, breakdown, idle };
}

function cSide(binary: string, cdev: string): Figures & { burstEventsPerSecond: number } {
  const run = Bun.spawnSync([binary, cdev, String(Math.min(WARMUP, 2_000)), String(ITERATIONS), String(BURST)], {
    stdout: "pipe",
    stderr: "pipe",
  });
  if (run.exitCode !== 0) throw new Error(`irq_bench failed: ${run.stderr.toString()}`);
  return JSON.parse(run.stdout.toString());
}

const us = (ns: number) => `${(ns / 1000).toFixed(1)} us`;

async function inGuest(): Promise<void> {
  const address = findPciDevices(EDU_VENDOR, EDU_DEVICE)[0];
  if (!address) throw new Error("no edu device in this guest");
  const binary = join(here, "baseline", "build", "irq_bench");
  if (!existsSync(binary))
    throw new Error(`${binary} is missing: run bun bench/irq.ts on the host first (it builds it)`);
  const cdev = VfioDevice.open(address);
  const path = cdev.path;
  cdev.close();
  type Round = { c: ReturnType<typeof cSide>; lib: Awaited<ReturnType<typeof librarySide>> };
  const rounds: Round[] = [];
  for (let r = 0; r < ROUNDS; r++) {
    const c = cSide(binary, path);
    const lib = await librarySide(address);
    rounds.push({ c, lib });
  }
  // Each side's best round by median (the machine is shared and noisy).
  const c = rounds.map((r) => r.c).sort((a, b) => a.medianNs - b.medianNs)[0]!;
  const best = (path: Path) =>
    rounds.map((r) => r.lib.paths.find((p) => p.side === path)!).sort((a, b) => a.medianNs - b.medianNs)[0]!;
  const lib = rounds[rounds.length - 1]!.lib;
  const result = {
    date: new Date().toISOString(),
    quick,
    bun: Bun.version,
    iterations: ITERATIONS,
    burst: BURST,
    c,
    library: {
      poll: best("poll"),
      await: best("await"),
      awaitArmed: best("await-armed"),
      burstAwaitEventsPerSecond: Math.max(...rounds.map((r) => r.lib.burstAwait)),
      burstPollEventsPerSecond: Math.max(...rounds.map((r) => r.lib.burstPoll)),
      breakdown: lib.breakdown,
      idleWait: lib.idle,
    },
  };
  const ratio = (f: Figures) => (f.medianNs / c.medianNs).toFixed(2);
  console.log(
    `edu MSI round trip (raise -> count in the program -> ack), median / mean / min / p99, ${ITERATIONS} each:`,
  );
  const row = (name: string, f: Figures, note: string) =>
    console.log(
      `  ${name.padEnd(24)} ${us(f.medianNs).padStart(9)} ${us(f.meanNs).padStart(9)} ${us(f.minNs).padStart(9)} ${us(f.p99Ns).padStart(9)}  ${note}`,
    );
  row("C read(2)", c, "");
  row("poll()", result.library.poll, `${ratio(result.library.poll)}x C (goal <= 1.5x)`);
  row("await wait()", result.library.await, `${ratio(result.library.await)}x C (goal <= 3x)`);
  row("await wait() via epoll", result.library.awaitArmed, `${ratio(result.library.awaitArmed)}x C`);
  console.log(
    `burst of ${BURST} raises, events/s: C ${c.burstEventsPerSecond.toFixed(0)}, await ${result.library.burstAwaitEventsPerSecond.toFixed(0)}, poll ${result.library.burstPollEventsPerSecond.toFixed(0)}`,
  );
  console.log(
    `pieces: raise+ack ${us(lib.breakdown.raiseAckNs!)}, empty poll (read -> EAGAIN) ${us(lib.breakdown.emptyPollNs!)}, await of a resolved promise ${us(lib.breakdown.resolvedAwaitNs!)}`,
  );
  console.log(`idle wait: ${lib.idle.cpuUs.toFixed(0)} us of CPU over ${lib.idle.wallMs.toFixed(0)} ms`);
  console.log(`RESULT ${JSON.stringify(result)}`);
}

async function onHost(): Promise<number> {
  const include = uapiIncludeDir();
  const outDir = join(here, "baseline", "build");
  mkdirSync(outDir, { recursive: true });
  const source = join(here, "baseline", "irq_bench.c");
  const binary = join(outDir, "irq_bench");
  const cc = Bun.spawnSync(["cc", "-O2", "-Wall", "-Wextra", "-Werror", `-I${include}`, "-o", binary, source], {
    stderr: "pipe",
  });
  if (cc.exitCode !== 0) throw new Error(`cc failed:\n${cc.stderr.toString()}`);
  const { runInGuest } = await import("../vm/run.ts");
  let output = "";
  const decoder = new TextDecoder();
  const guest = await runInGuest({
    command: ["bun", "bench/irq.ts", ...process.argv.slice(2)],
    cwd: join(here, ".."),
    timeoutSeconds: 900,
    onStdout: (chunk) => {
      const text = decoder.decode(chunk, { stream: true });
      output += text;
      process.stdout.write(text);
    },
  });
  const line = output.split("\n").find((l) => l.startsWith("RESULT "));
  if (guest.exitCode === 0 && line && !quick) {
    const commit = Bun.spawnSync(["git", "rev-parse", "--short", "HEAD"], { cwd: here }).stdout.toString().trim();
    const dir = join(here, "results");
    mkdirSync(dir, { recursive: true });
    const file = join(dir, `irq-${new Date().toISOString().slice(0, 10)}-${commit}.json`);
    writeFileSync(file, `${JSON.stringify(JSON.parse(line.slice(7)), null, 2)}\n`);
    console.log(`saved ${file}`);
  }
  return guest.exitCode;
}

if (import.meta.main) {
  if (existsSync("/dev/iommu")) await inGuest();
  else process.exitCode = await onHost();
}
