/**
 * The irq suite: QEMU's edu raises an MSI through its raise register; one operation is raise ->
 * the count reaches the program -> acknowledge. The library side reads the count three ways; the
 * C side (bench/baseline/ops_irq.c) reads the very eventfd of the same vector with read(2), on
 * the library's own device fd. Events per second are 1e9 / the time per operation.
 *
 * Idle-wait CPU time and where the awaited path's time goes: `bun bench/irq.ts` (library only).
 */
import { dlopen, FFIType } from "bun:ffi";
import { readFileSync, writeFileSync } from "node:fs";
import { Edu } from "../../examples/edu.ts";
import { Iommufd, VfioDevice } from "../../src/index.ts";
import { type BenchCase, defineSuite, Scope, type Tier } from "../suite.ts";

export type IrqPath = "poll" | "await" | "await-epoll" | "block";

const TITLE: Record<IrqPath, string> = {
  poll: "edu MSI raise -> spin on vector.poll() (one non-blocking read per turn) -> ack",
  await: "edu MSI raise -> await vector.wait() (the count is already there: one read) -> ack",
  "await-epoll": "edu MSI wait() armed before the raise -> resolved through Bun's epoll loop -> ack",
  block: "edu MSI raise -> vector.waitBlocking() (a read, then poll(2) when none is there, as the C side) -> ack",
};

const TIER: Record<IrqPath, Tier> = { poll: "default", await: "quick", "await-epoll": "default", block: "default" };

const affinity = dlopen("libc.so.6", {
  sched_getaffinity: { args: [FFIType.i32, FFIType.u64, FFIType.ptr], returns: FFIType.i32 },
  sched_setaffinity: { args: [FFIType.i32, FFIType.u64, FFIType.ptr], returns: FFIType.i32 },
}).symbols;

/**
 * Run this thread (and the C side it spawns) on CPU 0 and deliver edu's MSI there. The guest's
 * vCPUs take turns on one host thread (TCG): an interrupt aimed at another vCPU than the one a
 * spinning program runs on waits for the next turn (milliseconds), while a program that sleeps
 * hands the turn over at once. Steering both to one CPU measures the interrupt path, not that
 * schedule. Returns the undo.
 */
function steerToCpu0(address: string): () => void {
  const previous = new BigUint64Array(16);
  const one = new BigUint64Array(16);
  one[0] = 1n;
  if (affinity.sched_getaffinity(0, previous.byteLength, previous) !== 0) return () => {};
  affinity.sched_setaffinity(0, one.byteLength, one);
  const line = readFileSync("/proc/interrupts", "utf8")
    .split("\n")
    .find((l) => l.includes(`vfio-msi[0](${address})`));
  const irq = line?.trim().split(":")[0];
  let restoreIrq = () => {};
  if (irq) {
    const file = `/proc/irq/${irq}/smp_affinity_list`;
    try {
      const before = readFileSync(file, "utf8").trim();
      writeFileSync(file, "0");
      restoreIrq = () => writeFileSync(file, before);
    } catch {
      // not root, or the platform keeps the affinity: measure as it is
    }
  }
  return () => {
    affinity.sched_setaffinity(0, previous.byteLength, previous);
    try {
      restoreIrq();
    } catch {
      // the interrupt is gone with its set
    }
  };
}

/** edu on vfio-pci with MSI enabled; `op` is one raise -> count -> ack through `path`. */
export function eduMsi(address: string, path: IrqPath) {
  const scope = new Scope();
  try {
    const iommufd = scope.keep(Iommufd.open());
    const device = scope.keep(VfioDevice.open(address));
    device.bind(iommufd);
    device.attach(iommufd.createIoas());
    const bar0 = device.region(0);
    const edu = new Edu(device.mapRegion(0));
    const msi = scope.keep(device.enableIrq("msi"));
    const vector = msi.vectors[0]!;
    scope.keep({ close: steerToCpu0(address) });
    let events = 0;
    let op: () => unknown;
    if (path === "poll") {
      op = () => {
        edu.raiseInterrupt();
        let count = 0;
        while (count === 0) count = vector.poll();
        events += count;
        edu.ackInterrupt(1);
      };
    } else if (path === "await") {
      op = async () => {
        edu.raiseInterrupt();
        events += await vector.wait();
        edu.ackInterrupt(1);
      };
    } else if (path === "block") {
      op = () => {
        edu.raiseInterrupt();
        events += vector.waitBlocking(1000);
        edu.ackInterrupt(1);
      };
    } else {
      op = async () => {
        const pending = vector.wait();
        edu.raiseInterrupt();
        events += await pending;
        edu.ackInterrupt(1);
      };
    }
    return { scope, device, edu, vector, op, bar0, events: () => events };
  } catch (error) {
    throw scope.abandon(error);
  }
}

defineSuite({
  name: "irq",
  description: "edu MSI round trips (raise -> count in JS -> ack) against C reading the same vector's eventfd",
  cases(): Omit<BenchCase, "suite">[] {
    return (["poll", "await", "await-epoll", "block"] as const).map((path) => ({
      id: `irq/edu/msi/${path}`,
      title: TITLE[path],
      k: 32,
      tier: TIER[path],
      tracked: true,
      c: true,
      skip: (env) => (env.edu ? undefined : "no edu device on vfio-pci"),
      setup(env) {
        const { scope, device, vector, op, bar0 } = eduMsi(env.edu!, path);
        return {
          lib: op,
          c: { op: "edu_msi", fds: [device.fd, vector.fd], args: [bar0.offset, bar0.size] },
          close: () => scope.close(),
        };
      },
    }));
  },
});
