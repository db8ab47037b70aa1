/**
 * The NVMe driver's own cost per command, on the host, without a device: the queue pair and
 * poller driven against the in-memory controller model (test/support/nvme-model.ts), which
 * completes every announced command at its doorbell write. What is left is the driver's
 * JavaScript (tracker, ring encoding, promises or callbacks, the poller's turns), beside the
 * same ring protocol done by a bare loop over the same model: the floor.
 *
 *   bun bench/nvme-profile.ts [--ios N] [--rounds R]
 *
 * Figures are ns per command; compare them within one run (same process, interleaved).
 * `--case NAME` and `--qd N` run one case at one depth, e.g. under `bun --cpu-prof-md`.
 */
import { IoOpcode, readWrite } from "../src/nvme/commands.ts";
import type { DataBuffer } from "../src/nvme/data-buffer.ts";
import { Namespace } from "../src/nvme/namespace.ts";
import type { NvmeRequest } from "../src/nvme/request.ts";
import { NvmeModel } from "../test/support/nvme-model.ts";

const TIMEOUT = 10_000;
const BLOCK = 4096;
const DATA_IOVA = 0x4000_0000;

function argument(flag: string, fallback: number): number {
  const at = process.argv.indexOf(flag);
  return at < 0 ? fallback : Number(process.argv[at + 1]);
}

/** The bare loop of bench/nvme-loop.ts, over the model's rings: post up to QD, one doorbell, reap all, one doorbell. */
function bareModelLoop(qd: number, ios: number): number {
  const model = new NvmeModel({ polled: false, record: false });
  const queue = model.queuePair(1, qd + 1);
  model.autoComplete = true;
  const depth = queue.depth;
  const sq = model.heap.at(queue.sqIova);
  const cq = model.heap.at(queue.cqIova);
  const sqWords = new Uint32Array(sq.buffer, sq.byteOffset, depth * 16);
  const cqWords = new Uint32Array(cq.buffer, cq.byteOffset, depth * 4);
  const bar = model.registers;
  const sqDoorbell = model.sqDoorbell(1);
  const cqDoorbell = model.cqDoorbell(1);
  const free = new Int32Array(qd);
  let top = 0;
  for (let cid = qd - 1; cid >= 0; cid--) free[top++] = cid;
  let tail = 0;
  let head = 0;
  let phase = 1;
  let seed = 0x2545f491;
  let issued = 0;
  let done = 0;
  let inFlight = 0;
  const t0 = performance.now();
  while (done < ios) {
    const before = tail;
    while (inFlight < qd && issued < ios) {
      const cid = free[--top]!;
      seed ^= seed << 13;
      seed ^= seed >>> 17;
      seed ^= seed << 5;
      const lba = ((seed >>> 0) % 4096) * 8;
      const prp1 = DATA_IOVA + cid * BLOCK;
      const at = tail * 16;
      sqWords[at] = IoOpcode.Read | (cid << 16);
      sqWords[at + 1] = 1;
      sqWords[at + 2] = 0;
      sqWords[at + 3] = 0;
      sqWords[at + 4] = 0;
      sqWords[at + 5] = 0;
      sqWords[at + 6] = prp1;
      sqWords[at + 7] = 0;
      sqWords[at + 8] = 0;
      sqWords[at + 9] = 0;
      sqWords[at + 10] = lba;
      sqWords[at + 11] = 0;
      sqWords[at + 12] = 7;
      sqWords[at + 13] = 0;
      sqWords[at + 14] = 0;
      sqWords[at + 15] = 0;
      if (++tail === depth) tail = 0;
      inFlight++;
      issued++;
    }
    if (tail !== before) bar.write32(sqDoorbell, tail);
    let reaped = 0;
    for (;;) {
      const dw3 = cqWords[head * 4 + 3]!;
      if (((dw3 >>> 16) & 1) !== phase) break;
      free[top++] = dw3 & 0xffff;
      if (++head === depth) {
        head = 0;
        phase ^= 1;
      }
      reaped++;
    }
    bar.write32(cqDoorbell, head);
    inFlight -= reaped;
    done += reaped;
  }
  return ((performance.now() - t0) * 1e6) / ios;
}

/** The driver's promise API: `qd` callers each awaiting one command at a time, the poller reaping. */
async function promiseLoop(qd: number, ios: number): Promise<number> {
  const model = new NvmeModel({ record: false });
  const queue = model.queuePair(1, qd + 1);
  model.autoComplete = true;
  let issued = 0;
  let seed = 0x2545f491;
  const worker = async (i: number) => {
    while (issued < ios) {
      issued++;
      seed ^= seed << 13;
      seed ^= seed >>> 17;
      seed ^= seed << 5;
      const lba = ((seed >>> 0) % 4096) * 8;
      await queue.submit(readWrite(IoOpcode.Read, 1, lba, 8), DATA_IOVA + i * BLOCK, BLOCK, TIMEOUT);
    }
  };
  const t0 = performance.now();
  await Promise.all(Array.from({ length: qd }, (_, i) => worker(i)));
  return ((performance.now() - t0) * 1e6) / ios;
}

/** The driver's request API: `qd` requests, each sent again from its own onComplete, the poller reaping. */
function callbackLoop(qd: number, ios: number): Promise<number> {
  const model = new NvmeModel({ record: false });
  const queue = model.queuePair(1, qd + 1);
  model.autoComplete = true;
  let issued = 0;
  let done = 0;
  let seed = 0x2545f491;
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const send = (request: NvmeRequest, i: number) => {
      issued++;
      seed ^= seed << 13;
      seed ^= seed >>> 17;
      seed ^= seed << 5;
      const lba = ((seed >>> 0) % 4096) * 8;
      request.opcode = IoOpcode.Read;
      request.nsid = 1;
      request.cdw10 = lba;
      request.cdw12 = 7;
      request.iova = DATA_IOVA + i * BLOCK;
      request.length = BLOCK;
      request.submit();
    };
    for (let i = 0; i < qd; i++) {
      const request = queue.request((r) => {
        if (r.error) reject(r.error);
        else if (++done === ios) resolve(((performance.now() - t0) * 1e6) / ios);
        else if (issued < ios) send(r, i);
      });
      send(request, i);
    }
  });
}

/**
 * The request API as bench/nvme.ts's request-spin rows use it: Namespace.submitRead from each
 * request's onComplete, the completions taken by the caller's own spin on queue.reap() (no poller).
 */
function spinLoop(qd: number, ios: number): number {
  const model = new NvmeModel({ polled: false, record: false });
  const queue = model.queuePair(1, qd + 1);
  model.autoComplete = true;
  // The model has no DmaHeap: a buffer is its IOVA, and the namespace's owner passes it through.
  const owner = {
    ioQueue: queue,
    commandTimeoutMs: TIMEOUT,
    maxTransferBytes: 1 << 20,
    dataIova: (buffer: DataBuffer, offset: number) => (buffer as unknown as { iova: number }).iova + offset,
  };
  const ns = new Namespace(owner, 1, { size: 1 << 20, capacity: 1 << 20, blockSize: 512, metadataSize: 0 } as never);
  let issued = 0;
  let active = qd;
  let seed = 0x2545f491;
  const t0 = performance.now();
  for (let i = 0; i < qd; i++) {
    const buffer = { iova: DATA_IOVA + i * BLOCK } as unknown as DataBuffer;
    const send = (request: NvmeRequest) => {
      issued++;
      seed ^= seed << 13;
      seed ^= seed >>> 17;
      seed ^= seed << 5;
      ns.submitRead(request, ((seed >>> 0) % 4096) * 8, 8, buffer);
    };
    const request = queue.request((r) => {
      if (r.error) throw r.error;
      if (issued < ios) send(r);
      else active--;
    });
    send(request);
  }
  queue.ringDoorbell();
  while (active > 0) queue.reap();
  return ((performance.now() - t0) * 1e6) / issued;
}

type Case = [name: string, run: (qd: number, ios: number) => number | Promise<number>];

const CASES: Case[] = [
  ["bare loop", bareModelLoop],
  ["promise API", promiseLoop],
  ["request API", callbackLoop],
  ["request spin", spinLoop],
];

if (import.meta.main) {
  const ios = argument("--ios", 200_000);
  const rounds = argument("--rounds", 3);
  // `--case NAME` and `--qd N` narrow the run (for `bun --cpu-prof`).
  const only = process.argv.includes("--case") ? process.argv[process.argv.indexOf("--case") + 1] : undefined;
  const cases = CASES.filter(([name]) => only === undefined || name === only);
  for (const qd of process.argv.includes("--qd") ? [argument("--qd", 1)] : [1, 32]) {
    const best = new Map<string, number>();
    for (let round = 0; round < rounds; round++) {
      for (const [name, run] of cases) {
        const ns = await run(qd, ios);
        best.set(name, Math.min(best.get(name) ?? Infinity, ns));
      }
    }
    for (const [name, ns] of best)
      console.log(`QD${String(qd).padEnd(3)} ${name.padEnd(16)} ${ns.toFixed(0).padStart(6)} ns/command`);
  }
}
