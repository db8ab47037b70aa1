/** Helpers shared by the kernel tests (test/kernel): they run where /dev/iommu exists. */
import { afterEach, beforeEach, expect } from "bun:test";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { IommufdError } from "../../src/sys/error.ts";

export const HAVE_IOMMUFD = existsSync("/dev/iommu");

/** Kernel tests must run where iommufd exists; `bun run test` arranges that (a VM here). */
export function requireIommufd(): void {
  if (!HAVE_IOMMUFD) {
    throw new Error(
      "/dev/iommu is missing: run the kernel tests through `bun run test` (it boots a VM) or on a host with CONFIG_IOMMUFD",
    );
  }
}

/**
 * The backend "auto" must pick here, from the guest's own report of its kernel
 * (IOMMUFD_VM_FEATURES), or from the nodes on a host: iommufd where the kernel has iommufd and
 * VFIO cdevs, else type1. `pciAddress` is a device bound to vfio-pci.
 */
export function expectedAutoBackend(pciAddress: string): "iommufd" | "type1" {
  const features = process.env.IOMMUFD_VM_FEATURES;
  if (features !== undefined) {
    const list = features.split(",");
    return list.includes("iommufd") && list.includes("vfio-cdev") ? "iommufd" : "type1";
  }
  const vfioDev = `/sys/bus/pci/devices/${pciAddress}/vfio-dev`;
  // A cdev has a device number (`dev`); 6.1 lists vfio-dev/vfioN without one.
  const cdev = existsSync(vfioDev) && readdirSync(vfioDev).some((n) => existsSync(`${vfioDev}/${n}/dev`));
  return HAVE_IOMMUFD && cdev ? "iommufd" : "type1";
}

export function openFdCount(): number {
  return readdirSync("/proc/self/fd").length;
}

/**
 * The open fd count once it has settled at `target` (or after a second): Bun closes its duplicate
 * of an awaited eventfd on its own thread shortly after the read is cancelled.
 */
export async function settledFdCount(target: number): Promise<number> {
  for (let i = 0; i < 100 && openFdCount() !== target; i++) await Bun.sleep(10);
  return openFdCount();
}

/** VmPin and VmLck of this process, in KiB. */
export function pinnedKiB(): { pin: number; lck: number } {
  const status = readFileSync("/proc/self/status", "utf8");
  const field = (name: string) => Number(new RegExp(`${name}:\\s+(\\d+)`).exec(status)?.[1] ?? Number.NaN);
  return { pin: field("VmPin"), lck: field("VmLck") };
}

/**
 * How many times the kernel handled the interrupt named `name` in /proc/interrupts (all CPUs):
 * vfio-pci names its handlers "vfio-msi[N](BDF)", "vfio-msix[N](BDF)", "vfio-intx(BDF)".
 */
export function kernelInterrupts(name: string): number {
  const lines = readFileSync("/proc/interrupts", "utf8").split("\n");
  const line = lines.find((l) => l.includes(name));
  if (!line) throw new Error(`no ${name} in /proc/interrupts`);
  const cpus = lines[0]!.trim().split(/\s+/).length;
  return line
    .trim()
    .split(/\s+/)
    .slice(1, 1 + cpus)
    .reduce((sum, n) => sum + Number(n), 0);
}

/** The kernel's log (`dmesg`), one line per entry. Needs root (or kernel.dmesg_restrict=0). */
export function kernelLog(): string[] {
  const run = Bun.spawnSync(["dmesg"], { stdout: "pipe", stderr: "pipe" });
  if (run.exitCode !== 0) throw new Error(`dmesg exited with ${run.exitCode}: ${run.stderr.toString().trim()}`);
  return run.stdout.toString().split("\n");
}

/** Runs fn, expects an IommufdError with this code and operation; returns it for more checks. */
export function expectIommufdError(
  fn: () => unknown,
  code: string,
  operation: string,
  argument?: string,
): IommufdError {
  let thrown: unknown;
  try {
    fn();
  } catch (error) {
    thrown = error;
  }
  if (thrown === undefined) throw new Error(`expected ${code} from ${operation}, but the call succeeded`);
  if (!(thrown instanceof IommufdError)) throw thrown;
  expect({ code: thrown.code, operation: thrown.operation }).toEqual({ code, operation });
  if (argument !== undefined) expect(thrown.argument).toBe(argument);
  expect(thrown.message.length).toBeGreaterThan(operation.length + 10);
  return thrown;
}

type Releasable = { close?(): void; destroy?(): void };

/**
 * Per-test ownership: `keep(x)` registers x, and the returned `releaseAll` (call it in afterEach)
 * destroys or closes everything in reverse order, so a failing test cannot leak into the next.
 * Every close and destroy of the library is idempotent, so an error here is a real teardown
 * failure: all items are still released, then the errors are thrown together and fail the test.
 */
export function testScope(): { keep<T extends Releasable>(item: T): T; releaseAll(): void } {
  const items: Releasable[] = [];
  return {
    keep(item) {
      items.push(item);
      return item;
    },
    releaseAll() {
      const errors: unknown[] = [];
      for (const item of items.splice(0).reverse()) {
        try {
          item.destroy ? item.destroy() : item.close?.();
        } catch (error) {
          errors.push(error);
        }
      }
      if (errors.length > 0) {
        const what = errors.map((e) => (e instanceof Error ? e.message : String(e))).join("; ");
        throw new AggregateError(errors, `teardown: ${errors.length} release(s) failed: ${what}`);
      }
    },
  };
}

/**
 * A testScope released after every test, which then fails the test if the process holds more
 * file descriptors than before it (closes that Bun finishes on its own schedule are waited for).
 */
export function fdCheckedScope(): ReturnType<typeof testScope> {
  const scope = testScope();
  let fdsAtStart = 0;
  beforeEach(() => {
    fdsAtStart = openFdCount();
  });
  afterEach(async () => {
    scope.releaseAll();
    expect(await settledFdCount(fdsAtStart)).toBe(fdsAtStart);
  });
  return scope;
}
