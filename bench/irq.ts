/**
 * What `bun bench` (suite irq: library against C on the same vector) does not show: the CPU time
 * an idle wait costs, the latency distribution of each path, and where the awaited path's time
 * goes. Library only.
 *
 *   bun bench/irq.ts            (without /dev/iommu it runs itself in the test guest)
 *   bun bench/irq.ts --quick
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import { findPciDevices } from "../src/index.ts";
import { eduMsi, type IrqPath } from "./suites/irq.ts";

const quick = process.argv.includes("--quick");
const WARMUP = quick ? 200 : 20_000;
const ITERATIONS = quick ? 200 : 5_000;
const IDLE_MS = quick ? 200 : 2_000;

const us = (ns: number) => `${(ns / 1000).toFixed(1)} us`;

async function distribution(address: string, path: IrqPath) {
  const { scope, op } = eduMsi(address, path);
  try {
    const samples = new Float64Array(ITERATIONS);
    for (let i = 0; i < WARMUP; i++) await op();
    for (let i = 0; i < ITERATIONS; i++) {
      const start = Bun.nanoseconds();
      await op();
      samples[i] = Bun.nanoseconds() - start;
    }
    samples.sort();
    const at = (q: number) => samples[Math.min(samples.length - 1, Math.floor(samples.length * q))]!;
    const mean = samples.reduce((a, b) => a + b, 0) / samples.length;
    return { path, mean, min: samples[0]!, p50: at(0.5), p99: at(0.99) };
  } finally {
    scope.close();
  }
}

/** The pieces of one awaited round trip, each timed alone. */
async function pieces(address: string) {
  const { scope, edu, vector } = eduMsi(address, "await");
  try {
    const time = async (fn: () => unknown, n = ITERATIONS) => {
      for (let i = 0; i < n; i++) await fn();
      const start = Bun.nanoseconds();
      for (let i = 0; i < n; i++) await fn();
      return (Bun.nanoseconds() - start) / n;
    };
    const emptyPoll = await time(() => vector.poll()); // read(2) -> EAGAIN
    const resolvedAwait = await time(() => Promise.resolve(1));
    // Raise and acknowledge without reading: the device write, the interrupt, the kernel's signal.
    const raiseAck = await time(() => {
      edu.raiseInterrupt();
      edu.ackInterrupt(1);
    });
    vector.poll();
    return { emptyPoll, resolvedAwait, raiseAck };
  } finally {
    scope.close();
  }
}

/**
 * CPU time (user + system, all threads) while one wait() sits idle for `ms`, beside a plain
 * Bun.sleep(ms) in the same process: Bun's own background threads (JIT, GC) and, in the TCG
 * guest, coarse tick accounting cost something either way; the difference is the wait's.
 */
async function idleWait(address: string, ms: number) {
  const cpu = async (fn: () => Promise<unknown>) => {
    const before = process.cpuUsage();
    const start = performance.now();
    await fn();
    const used = process.cpuUsage(before);
    return { cpuUs: used.user + used.system, wallMs: performance.now() - start };
  };
  await Bun.sleep(1000); // let background compilation from the runs above settle
  const sleep = await cpu(() => Bun.sleep(ms));
  const { scope, vector } = eduMsi(address, "await");
  try {
    const wait = await cpu(() => {
      setTimeout(() => vector.trigger(), ms);
      return vector.wait();
    });
    return { wait, sleep };
  } finally {
    scope.close();
  }
}

async function inGuest(): Promise<void> {
  const address = findPciDevices(0x1234, 0x11e8)[0];
  if (!address) throw new Error("no edu device in this guest");
  console.log(`edu MSI round trips through the library (${ITERATIONS} each after ${WARMUP} warm-up):`);
  console.log(
    `  ${"path".padEnd(12)} ${"mean".padStart(9)} ${"min".padStart(9)} ${"p50".padStart(9)} ${"p99".padStart(9)}`,
  );
  const rows = [];
  for (const path of ["poll", "await", "await-epoll"] as const) {
    const r = await distribution(address, path);
    rows.push(r);
    console.log(
      `  ${path.padEnd(12)} ${us(r.mean).padStart(9)} ${us(r.min).padStart(9)} ${us(r.p50).padStart(9)} ${us(r.p99).padStart(9)}`,
    );
  }
  const p = await pieces(address);
  console.log(
    `pieces: raise+ack (device, interrupt, kernel signal) ${us(p.raiseAck)}; empty poll (read -> EAGAIN) ` +
      `${us(p.emptyPoll)}; await of a resolved promise ${us(p.resolvedAwait)}`,
  );
  const idle = await idleWait(address, IDLE_MS);
  console.log(
    `idle wait: ${(idle.wait.cpuUs / 1000).toFixed(2)} ms of CPU over ${idle.wait.wallMs.toFixed(0)} ms; ` +
      `Bun.sleep of the same length: ${(idle.sleep.cpuUs / 1000).toFixed(2)} ms over ${idle.sleep.wallMs.toFixed(0)} ms`,
  );
  console.log(`RESULT ${JSON.stringify({ quick, bun: Bun.version, rows, pieces: p, idle })}`);
}

if (import.meta.main) {
  if (existsSync("/dev/iommu")) {
    await inGuest();
  } else {
    const { runInGuest } = await import("../vm/run.ts");
    const guest = await runInGuest({
      command: ["bun", "bench/irq.ts", ...process.argv.slice(2)],
      cwd: join(import.meta.dir, ".."),
      timeoutSeconds: 900,
    });
    process.exitCode = guest.exitCode;
  }
}
