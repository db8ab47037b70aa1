/**
 * The irq suite: QEMU's edu raises an MSI through its raise register; one operation is raise ->
 * the count reaches the program -> acknowledge. The library side reads the count three ways; the
 * C side (bench/baseline/ops_irq.c) reads the very eventfd of the same vector with read(2), on
 * the library's own device fd. Events per second are 1e9 / the time per operation.
 *
 * Idle-wait CPU time and where the awaited path's time goes: `bun bench/irq.ts` (library only).
 */
import { Edu } from "../../examples/edu.ts";
import { Iommufd, VfioDevice } from "../../src/index.ts";
import { type BenchCase, defineSuite, Scope, type Tier } from "../suite.ts";

export type IrqPath = "poll" | "await" | "await-epoll";

const TITLE: Record<IrqPath, string> = {
  poll: "edu MSI raise -> spin on vector.poll() (one non-blocking read per turn) -> ack",
  await: "edu MSI raise -> await vector.wait() (the count is already there: one read) -> ack",
  "await-epoll": "edu MSI wait() armed before the raise -> resolved through Bun's epoll loop -> ack",
};

const TIER: Record<IrqPath, Tier> = { poll: "default", await: "quick", "await-epoll": "default" };

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
    try {
      scope.close();
    } catch {
      // the setup error is the one to report
    }
    throw error;
  }
}

defineSuite({
  name: "irq",
  description: "edu MSI round trips (raise -> count in JS -> ack) against C reading the same vector's eventfd",
  cases(): Omit<BenchCase, "suite">[] {
    return (["poll", "await", "await-epoll"] as const).map((path) => ({
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
