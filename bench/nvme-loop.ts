/**
 * The two references the NVMe benches compare the driver with, both our own: a bare synchronous
 * TypeScript loop over this library's pieces (the controller's BAR mapping and DMA heap, a queue
 * pair it created) and the same loop in C (bench/baseline/ops_nvme.c) on the same queue pair.
 *
 * The loop: write commands at random 4 KiB-aligned LBAs into the submission ring until QD are in
 * flight, one SQ tail doorbell write, spin on the completion ring's phase bit, take every posted
 * entry, one CQ head doorbell write, repeat. No promises, no tracker, no timeouts: what is left is
 * the ring protocol itself, which is the floor for any driver on this controller.
 *
 * The queue pair is created by the driver and handed over idle; every run ends with nothing in
 * flight, so the driver's poller (which reaps every queue it owns) never sees the loop's entries.
 */
import type { DmaBuffer } from "../src/heap/dma-heap.ts";
import type { NvmeController, QueuePair } from "../src/nvme/index.ts";
import type { CCounterpart } from "./suite.ts";

const DOORBELLS = 0x1000;
const BLOCK = 4096;

export type LoopWorkload = "read" | "write";

export interface LoopQueue {
  queue: QueuePair;
  /** One 4 KiB slot per command id. */
  data: DmaBuffer;
  qd: number;
  close(): void;
}

/** A polled queue pair of `qd + 1` entries (at least 2) and a data buffer with one 4 KiB slot per command. */
export function openLoopQueue(controller: NvmeController, qd: number): LoopQueue {
  const queue = controller.createQueuePair(Math.max(qd + 1, 2), { completion: "poll" });
  let data: DmaBuffer;
  try {
    data = controller.allocBuffer(qd * BLOCK);
  } catch (error) {
    controller.deleteQueuePair(queue);
    throw error;
  }
  data.bytes.fill(0x5a);
  return {
    queue,
    data,
    qd,
    close() {
      data.free();
      controller.deleteQueuePair(queue);
    },
  };
}

/** The loop's random LBAs: xorshift32, the same sequence in TS and C. */
function slotsOf(controller: NvmeController, range: number): { blocks: number; slots: number } {
  const ns = controller.namespace(1);
  const blocks = BLOCK / ns.blockSize;
  return { blocks, slots: Math.floor(Math.min(ns.bytes, range) / BLOCK) };
}

/**
 * The bare TypeScript loop on `loop`'s queue pair: `run(ios)` completes `ios` commands with up to
 * QD in flight and returns with none in flight. `latencies` (ms) fills from index 0 until reset.
 */
export function bareLoop(controller: NvmeController, loop: LoopQueue, workload: LoopWorkload, range: number) {
  const { queue, data, qd } = loop;
  const heap = controller.heap;
  const depth = queue.depth;
  const sqView = heap.viewAt(queue.sqIova, depth * 64);
  const cqView = heap.viewAt(queue.cqIova, depth * 16);
  const sqWords = new Uint32Array(sqView.buffer, sqView.byteOffset, depth * 16);
  const cqWords = new Uint32Array(cqView.buffer, cqView.byteOffset, depth * 4);
  const bar = controller.registers;
  const stride = controller.doorbellStride;
  const sqDoorbell = DOORBELLS + 2 * queue.id * stride;
  const cqDoorbell = DOORBELLS + (2 * queue.id + 1) * stride;
  const { blocks, slots } = slotsOf(controller, range);
  const opcode = workload === "read" ? 2 : 1;
  const nsid = 1;
  const dataIova = data.iova;
  const submittedAt = new Float64Array(qd);
  const free = new Int32Array(qd);
  const latencies = new Float64Array(1 << 20);
  let recorded = 0;
  let tail = 0;
  let head = 0;
  let phase = 1;
  let seed = 0x2545f491;
  const run = (ios: number) => {
    let top = 0;
    for (let cid = qd - 1; cid >= 0; cid--) free[top++] = cid;
    let issued = 0;
    let done = 0;
    let inFlight = 0;
    while (done < ios) {
      const before = tail;
      while (inFlight < qd && issued < ios) {
        const cid = free[--top]!;
        seed ^= seed << 13;
        seed ^= seed >>> 17;
        seed ^= seed << 5;
        const lba = ((seed >>> 0) % slots) * blocks;
        const prp1 = dataIova + cid * BLOCK;
        const at = tail * 16;
        sqWords[at] = opcode | (cid << 16);
        sqWords[at + 1] = nsid;
        sqWords[at + 2] = 0;
        sqWords[at + 3] = 0;
        sqWords[at + 4] = 0;
        sqWords[at + 5] = 0;
        sqWords[at + 6] = prp1 % 2 ** 32;
        sqWords[at + 7] = Math.floor(prp1 / 2 ** 32);
        sqWords[at + 8] = 0;
        sqWords[at + 9] = 0;
        sqWords[at + 10] = lba;
        sqWords[at + 11] = 0;
        sqWords[at + 12] = blocks - 1;
        sqWords[at + 13] = 0;
        sqWords[at + 14] = 0;
        sqWords[at + 15] = 0;
        submittedAt[cid] = performance.now();
        if (++tail === depth) tail = 0;
        inFlight++;
        issued++;
      }
      if (tail !== before) bar.write32(sqDoorbell, tail);
      let reaped = 0;
      const since = performance.now();
      for (;;) {
        const dw3 = cqWords[head * 4 + 3]!;
        if (((dw3 >>> 16) & 1) !== phase) {
          if (reaped > 0) break;
          if (performance.now() - since > 10_000) throw new Error("bare loop: no completion for 10 s");
          continue;
        }
        const cid = dw3 & 0xffff;
        if ((dw3 >>> 17) & 0x7fff)
          throw new Error(`bare loop: command ${cid} failed, status 0x${((dw3 >>> 17) & 0x7fff).toString(16)}`);
        if (recorded < latencies.length) latencies[recorded++] = performance.now() - submittedAt[cid]!;
        free[top++] = cid;
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
  };
  return {
    run,
    /** The latencies (ms) recorded since the last reset, sorted; then starts afresh. */
    takeLatencies(): Float64Array {
      const out = latencies.slice(0, recorded).sort();
      recorded = 0;
      return out;
    },
  };
}

/** The C loop's case on `loop`'s queue pair: the controller's device fd and heap memfd, and where things are. */
export function cLoopCounterpart(
  controller: NvmeController,
  loop: LoopQueue,
  workload: LoopWorkload,
  range: number,
  perRun: number,
): CCounterpart {
  const heap = controller.heap;
  const bar0 = controller.device.region(0);
  const { blocks, slots } = slotsOf(controller, range);
  return {
    op: "nvme_loop",
    fds: [controller.device.fd, heap.assertOpen("nvme loop").fd],
    args: [
      bar0.offset,
      bar0.size,
      heap.size,
      loop.queue.sqIova - heap.iova,
      loop.queue.cqIova - heap.iova,
      loop.queue.depth,
      loop.queue.id,
      controller.doorbellStride,
      loop.data.iova,
      workload === "read" ? 2 : 1,
      1,
      blocks,
      slots,
      loop.qd,
      perRun,
    ],
  };
}
