/**
 * Wake latency of a program parked on an eventfd before the count arrives (issue 27's parked
 * wait()), on any Linux host: no device. A Worker adds 1 to the eventfd with write(2) a fixed
 * delay after the main thread has said it is about to park, and stamps the time just before;
 * the main thread stamps the time once the count has reached it. Latency = the difference (one
 * CLOCK_MONOTONIC for both threads). The options run interleaved, a slice of each per round, so
 * their ratios hold under a shared machine's changing load; absolute times do not.
 *
 *   bun bench/irq-park.ts [--samples N] [--rounds N] [--delay-us N] [--quick]
 */
import { read as fsRead } from "node:fs";
import { parseArgs } from "node:util";
import type { IrqSet } from "../src/vfio/irq.ts";
import { IrqVector } from "../src/vfio/irq-vector.ts";
import { EFD_CLOEXEC, EFD_NONBLOCK, libc } from "../src/sys/libc.ts";
import { monotonicNs, PARK } from "./irq-park-shared.ts";

const { values: args } = parseArgs({
  options: {
    samples: { type: "string", default: "200" },
    rounds: { type: "string", default: "10" },
    "delay-us": { type: "string", default: "500" },
    quick: { type: "boolean", default: false },
    filter: { type: "string" },
    "idle-ms": { type: "string", default: "3000" },
    /** Another IrqVector module to set beside the library's (e.g. an older irq-vector.ts copied into src/vfio/). */
    also: { type: "string" },
  },
});
const SAMPLES = args.quick ? 50 : Number(args.samples);
const ROUNDS = args.quick ? 2 : Number(args.rounds);
const DELAY_US = Number(args["delay-us"]);
const IDLE_MS = args.quick ? 300 : Number(args["idle-ms"]);

interface Option {
  name: string;
  fd: number;
  /** Returns once the count has reached the program (a number, or a promise of it). */
  wait(): number | Promise<number>;
  close(): void;
}

function eventfd(nonblocking: boolean): number {
  const fd = libc().eventfd(0, EFD_CLOEXEC | (nonblocking ? EFD_NONBLOCK : 0));
  if (fd < 0) throw new Error("eventfd failed");
  return fd;
}

const TWO_32 = 2 ** 32;
/** A vector over a plain eventfd; the set only carries the index (as in test/unit/irq-vector.test.ts). */
function vector(Vector: typeof IrqVector = IrqVector): IrqVector {
  const set = { index: 1, info: { maskable: false } } as unknown as IrqSet;
  return new Vector(set, 0, eventfd(true));
}

const options: (() => Option)[] = [
  () => {
    // C's blocking read(2), through FFI on the main thread: the reference.
    const fd = eventfd(false);
    const word = new Uint32Array(2);
    return {
      name: "blocking read(2) (the C reference)",
      fd,
      wait: () => {
        if (libc().read(fd, word, 8) !== 8) throw new Error("read failed");
        return word[1]! * TWO_32 + word[0]!;
      },
      close: () => libc().close(fd),
    };
  },
  () => {
    const v = vector();
    return {
      name: "vector.poll() spinning",
      fd: v.fd,
      wait: () => {
        let count = 0;
        while (count === 0) count = v.poll();
        return count;
      },
      close: () => v.release(),
    };
  },
  () => {
    const v = vector();
    return { name: "vector.wait() (the library)", fd: v.fd, wait: () => v.wait(), close: () => v.release() };
  },
  () => {
    // The naive program of the issue: one Bun.file(fd).stream() reader for all its reads.
    const fd = eventfd(true);
    const reader = Bun.file(fd).stream().getReader();
    return {
      name: "one open Bun.file(fd).stream() reader",
      fd,
      wait: async () => {
        const { value } = await reader.read();
        return value ? value.byteLength / 8 : 0;
      },
      close: () => {
        reader.cancel().catch(() => {});
        libc().close(fd);
      },
    };
  },
  () => {
    // The same reader, its next read() issued before the count is handed on (as the vector does).
    const fd = eventfd(true);
    const reader = Bun.file(fd).stream().getReader();
    let resolveWait: ((count: number) => void) | undefined;
    const next = (): void => {
      reader.read().then(({ value }) => {
        if (!value) return;
        next();
        resolveWait?.(value.byteLength / 8);
      });
    };
    next();
    return {
      name: "one stream reader, next read() issued first",
      fd,
      wait: () => new Promise<number>((resolve) => (resolveWait = resolve)),
      close: () => {
        reader.cancel().catch(() => {});
        libc().close(fd);
      },
    };
  },
  () => {
    // A blocking read(2) in Bun's thread pool (node:fs read on a blocking eventfd).
    const fd = eventfd(false);
    const buffer = Buffer.alloc(8);
    return {
      name: "node:fs read() in Bun's thread pool (blocking fd)",
      fd,
      wait: () =>
        new Promise<number>((resolve, reject) =>
          fsRead(fd, buffer, 0, 8, null, (error) =>
            error ? reject(error) : resolve(Number(buffer.readBigUInt64LE())),
          ),
        ),
      close: () => libc().close(fd),
    };
  },
];

function quantile(sorted: Float64Array, q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * q))]!;
}

async function main(): Promise<void> {
  if (args.also) {
    const { IrqVector: Other } = (await import(new URL(args.also, `file://${process.cwd()}/`).href)) as {
      IrqVector: typeof IrqVector;
    };
    options.splice(3, 0, () => {
      const v = vector(Other);
      return { name: `vector.wait() (${args.also})`, fd: v.fd, wait: () => v.wait(), close: () => v.release() };
    });
  }
  const shared = new SharedArrayBuffer(PARK.bytes);
  const control = new Int32Array(shared, 0, PARK.words);
  const stamp = new Float64Array(shared, PARK.stampOffset, 1);
  control[PARK.delayUs] = DELAY_US;
  const worker = new Worker(new URL("./irq-park-worker.ts", import.meta.url));
  const done = new Promise((resolve) => (worker.onmessage = resolve));
  worker.postMessage(shared);

  const built = options.map((make) => make());
  const chosen = built.filter((o) => !args.filter || new RegExp(args.filter).test(o.name));
  for (const option of built) if (!chosen.includes(option)) option.close();
  const samples = chosen.map(() => new Float64Array(SAMPLES * ROUNDS));
  let sequence = 0;
  const once = async (option: Option): Promise<number> => {
    control[PARK.fd] = option.fd;
    Atomics.store(control, PARK.sequence, ++sequence);
    Atomics.notify(control, PARK.sequence);
    const result = option.wait();
    const count = typeof result === "number" ? result : await result;
    const latency = monotonicNs() - stamp[0]!;
    if (count !== 1) throw new Error(`${option.name}: count ${count}, expected 1`);
    return latency;
  };
  try {
    for (const option of chosen) for (let i = 0; i < 20; i++) await once(option); // warm-up
    for (let round = 0; round < ROUNDS; round++) {
      for (const [k, option] of chosen.entries()) {
        for (let i = 0; i < SAMPLES; i++) samples[k]![round * SAMPLES + i] = await once(option);
      }
    }
  } finally {
    Atomics.store(control, PARK.sequence, -1);
    Atomics.notify(control, PARK.sequence);
    await done;
    worker.terminate();
    for (const option of chosen) option.close();
  }

  const us = (ns: number) => (ns / 1000).toFixed(1).padStart(8);
  const rows = chosen.map((option, k) => {
    const sorted = samples[k]!.sort();
    return { name: option.name, p50: quantile(sorted, 0.5), p90: quantile(sorted, 0.9), p99: quantile(sorted, 0.99) };
  });
  const reference = rows[0]!.p50;
  console.log(
    `parked wake latency, write(2) in a Worker -> count in the main thread; ${ROUNDS} rounds x ${SAMPLES}, ` +
      `delay ${DELAY_US} us, interleaved (us; ratio = p50 / first row's p50)`,
  );
  console.log(`  ${"option".padEnd(52)} ${"p50".padStart(8)} ${"p90".padStart(8)} ${"p99".padStart(8)}   ratio`);
  for (const r of rows) {
    console.log(`  ${r.name.padEnd(52)} ${us(r.p50)} ${us(r.p90)} ${us(r.p99)}   ${(r.p50 / reference).toFixed(2)}x`);
  }
  console.log(
    `RESULT ${JSON.stringify({ bun: Bun.version, samples: SAMPLES, rounds: ROUNDS, delayUs: DELAY_US, rows })}`,
  );
}

/**
 * CPU time (user + system, every thread) of the process while a wait() sits parked on an eventfd
 * nobody signals, beside a plain Bun.sleep of the same length in the same process (Bun's own
 * threads cost something either way). The wait is abandoned through its signal at the end.
 */
async function idleCpu(): Promise<void> {
  const cpu = async (fn: () => Promise<unknown>) => {
    const before = process.cpuUsage();
    await fn();
    const used = process.cpuUsage(before);
    return (used.user + used.system) / 1000;
  };
  const parked = (Vector: typeof IrqVector) => async () => {
    const v = vector(Vector);
    try {
      await v.wait({ signal: AbortSignal.timeout(IDLE_MS) }).catch(() => {});
    } finally {
      v.release();
    }
  };
  const others = args.also ? [(await import(new URL(args.also, `file://${process.cwd()}/`).href)).IrqVector] : [];
  await Bun.sleep(500); // background compilation from the runs above
  const rows: Record<string, number[]> = { sleep: [], wait: [], ...(args.also ? { [args.also]: [] } : {}) };
  // Alternated three times: Bun's own threads (GC, JIT) settle over seconds after the runs above.
  for (let i = 0; i < 3; i++) {
    rows.sleep!.push(await cpu(() => Bun.sleep(IDLE_MS)));
    rows.wait!.push(await cpu(parked(IrqVector)));
    if (args.also) rows[args.also]!.push(await cpu(parked(others[0])));
  }
  const ms = (xs: number[]) => xs.map((x) => x.toFixed(1)).join(", ");
  console.log(
    `idle CPU (ms, user + system, all threads) over ${IDLE_MS} ms, three alternations: ` +
      Object.entries(rows)
        .map(
          ([name, xs]) =>
            `${name === "wait" ? "a parked vector.wait()" : name === "sleep" ? "Bun.sleep" : name} ${ms(xs)}`,
        )
        .join("; "),
  );
  console.log(`RESULT-IDLE ${JSON.stringify({ idleMs: IDLE_MS, cpuMs: rows })}`);
}

await main();
await idleCpu();
