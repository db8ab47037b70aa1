/** Helpers shared by the kernel tests (test/kernel): they run where /dev/iommu exists. */
import { expect } from "bun:test";
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

export function openFdCount(): number {
  return readdirSync("/proc/self/fd").length;
}

/** VmPin and VmLck of this process, in KiB. */
export function pinnedKiB(): { pin: number; lck: number } {
  const status = readFileSync("/proc/self/status", "utf8");
  const field = (name: string) => Number(new RegExp(`${name}:\\s+(\\d+)`).exec(status)?.[1] ?? Number.NaN);
  return { pin: field("VmPin"), lck: field("VmLck") };
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
 */
export function testScope(): { keep<T extends Releasable>(item: T): T; releaseAll(): void } {
  const items: Releasable[] = [];
  return {
    keep(item) {
      items.push(item);
      return item;
    },
    releaseAll() {
      for (const item of items.splice(0).reverse()) {
        try {
          item.destroy ? item.destroy() : item.close?.();
        } catch {
          // already released by the test itself
        }
      }
    },
  };
}
