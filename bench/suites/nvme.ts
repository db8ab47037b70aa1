/**
 * The nvme suite: 4 KiB random reads and writes through bun-iommufd/nvme on QEMU's NVMe
 * controller, at queue depth 1 and 32, polled and by MSI-X. IOPS are 1e9 / the time per op at
 * QD1, and 32e9 / the time per op at QD32 (one op = 32 concurrent commands).
 *
 * Polled cases have two references on a queue pair of their own on the same controller
 * (bench/nvme-loop.ts): the C side is the bare C loop (bench/baseline/ops_nvme.c), the reference
 * side the bare TypeScript loop; one operation of each is the same `depth` commands, drained.
 * The race with the kernel's own NVMe driver needs the controller rebound between phases:
 * `bun bench nvme` (bench/nvme.ts) runs it.
 */
import type { DmaBackend } from "../../src/index.ts";
import { type Completion, NvmeController } from "../../src/nvme/index.ts";
import { guestNvmeAddress } from "../nvme.ts";
import { bareLoop, cLoopCounterpart, openLoopQueue } from "../nvme-loop.ts";
import { type BenchCase, defineSuite, KiB, Scope, type Tier } from "../suite.ts";
import type { Session } from "../switching.ts";

type Workload = "read" | "write";

const CASES: { workload: Workload; depth: number; completion: Completion; tier: Tier }[] = [
  // In CI's smoke test too: the driver beside the bare loops on queue pairs it lent them (their
  // completions left in those rings once failed every polled case with EPROTO, and only default
  // runs, which CI does not make, had NVMe cases).
  { workload: "read", depth: 1, completion: "poll", tier: "quick" },
  { workload: "read", depth: 32, completion: "poll", tier: "default" },
  { workload: "write", depth: 1, completion: "poll", tier: "default" },
  { workload: "write", depth: 32, completion: "poll", tier: "default" },
  { workload: "read", depth: 1, completion: "interrupt", tier: "default" },
  { workload: "read", depth: 32, completion: "interrupt", tier: "default" },
];

/**
 * The controller opened (on `backend` when given), one buffer of `depth` 4 KiB slots; one
 * operation is `depth` concurrent 4 KiB commands at random 4 KiB-aligned LBAs, awaited together.
 */
export function openNvmeWorkload(
  address: string,
  workload: Workload,
  depth: number,
  completion: Completion,
  backend?: DmaBackend,
): Session & { controller: NvmeController; scope: Scope } {
  const scope = new Scope();
  try {
    const controller = scope.keep(
      NvmeController.open(address, { heapSize: 4 << 20, queueDepth: 64, completion, backend }),
    );
    const opened = (controller as { backend?: DmaBackend }).backend;
    if (backend && opened !== backend) {
      throw new Error(
        `NvmeController.open gave the ${opened ?? "iommufd (no backend option yet)"} backend, not ${backend}`,
      );
    }
    const ns = controller.namespace(1);
    const blocks = 4096 / ns.blockSize;
    const slots = Math.floor(ns.blocks / blocks);
    const buffer = controller.allocBuffer(depth * 4096);
    buffer.bytes.fill(0xa5);
    let seed = 0x2545f491;
    const lba = () => {
      seed ^= seed << 13;
      seed ^= seed >>> 17;
      seed ^= seed << 5;
      return ((seed >>> 0) % slots) * blocks;
    };
    const one = (i: number) =>
      workload === "read"
        ? ns.read(lba(), blocks, buffer, { offset: i * 4096 })
        : ns.write(lba(), blocks, buffer, { offset: i * 4096 });
    const op = depth === 1 ? () => one(0) : () => Promise.all(Array.from({ length: depth }, (_, i) => one(i)));
    return { op, close: () => scope.close(), controller, scope };
  } catch (error) {
    throw scope.abandon(error);
  }
}

defineSuite({
  name: "nvme",
  description:
    "4 KiB random I/O through the user-space NVMe driver (QEMU NVMe on vfio-pci); the kernel race is `bun bench nvme`",
  cases(): Omit<BenchCase, "suite">[] {
    const address = guestNvmeAddress();
    return CASES.map(({ workload, depth, completion, tier }) => ({
      id: `nvme/${workload}/4KiB/qd${depth}/${completion === "poll" ? "poll" : "msix"}`,
      title:
        depth === 1
          ? `one 4 KiB random ${workload} awaited (${completion === "poll" ? "polled" : "MSI-X"} completion)`
          : `${depth} concurrent 4 KiB random ${workload}s awaited together (${completion === "poll" ? "polled" : "MSI-X"})`,
      bytes: depth * 4 * KiB,
      k: depth === 1 ? 4 : 1,
      tier,
      tracked: true,
      c: completion === "poll",
      reference: completion === "poll",
      skip: () => (address ? undefined : "no NVMe controller on vfio-pci (the guest needs --device nvme)"),
      setup() {
        const session = openNvmeWorkload(address!, workload, depth, completion);
        if (completion !== "poll") return { lib: session.op, close: session.close };
        try {
          const { controller, scope } = session;
          // One queue pair per loop: each keeps its own tail, head and phase.
          const tsLoop = scope.keep(openLoopQueue(controller, depth));
          const cLoop = scope.keep(openLoopQueue(controller, depth));
          const bare = bareLoop(controller, tsLoop, workload, Number.MAX_SAFE_INTEGER);
          return {
            lib: session.op,
            c: cLoopCounterpart(controller, cLoop, workload, Number.MAX_SAFE_INTEGER, depth),
            reference: () => bare.run(depth),
            close: session.close,
          };
        } catch (error) {
          throw session.scope.abandon(error);
        }
      },
    }));
  },
});
