/**
 * The kernel tests' own helpers, checked on the host with a simulated kernel: the fault-injection
 * sweep must refuse a sweep that never saw a failure, a false "cannot fail", a leak before
 * disposal; testScope must report teardown errors.
 */
import { describe, expect, test } from "bun:test";
import { closeSync, openSync } from "node:fs";
import { IommufdError } from "../../src/sys/error.ts";
import { type FaultInjector, sweep, type SweepCase } from "../support/fail-nth.ts";
import { testScope } from "../support/kernel.ts";

/**
 * A pretend kernel operation with `points` fault points: an armed fault at a point in `fatal`
 * makes the call throw ENOMEM, at any other point the kernel "tolerates" it.
 */
function simulatedKernel(points: number, fatal: number[]) {
  let armed = 0;
  let injected = false;
  const injector: FaultInjector = {
    arm(n) {
      armed = n;
      injected = false;
    },
    hit() {
      const hit = injected;
      armed = 0;
      return hit;
    },
  };
  const call = () => {
    for (let point = 1; point <= points; point++) {
      if (armed > 0 && --armed === 0) {
        injected = true;
        if (fatal.includes(point))
          throw new IommufdError({
            operation: "SIMULATED",
            errno: 12,
            message: "out of memory in the simulated kernel",
          });
      }
    }
    return "done";
  };
  return { injector, call };
}

function simulatedCase(call: () => string, extra: Partial<SweepCase<object, string>> = {}): SweepCase<object, string> {
  return {
    name: "simulated operation",
    setup: () => ({}),
    run: call,
    verify(_env, { result, error }) {
      if (!error) expect(result).toBe("done");
    },
    dispose() {},
    ...extra,
  };
}

describe("sweep", () => {
  test("counts points, errnos and tolerated faults", () => {
    const k = simulatedKernel(4, [2, 3]);
    const report = sweep(k.injector, simulatedCase(k.call));
    expect(report).toMatchObject({ points: 4, errnos: { ENOMEM: 2 }, tolerated: 2 });
  });

  test("a sweep whose faults never surface as an error fails: it proved nothing", () => {
    const k = simulatedKernel(3, []);
    expect(() => sweep(k.injector, simulatedCase(k.call))).toThrow(
      /none of its 3 fault point\(s\) surfaced as an error/,
    );
  });

  test("a pass whose fault was taken elsewhere and tolerated is tried again, up to 3 passes", () => {
    // The first pass's only point is tolerated (as when a user page fault takes the armed fault),
    // the second pass's is fatal: the sweep passes, and says it needed two passes.
    let pass = 0;
    const flaky = simulatedKernel(1, [1]);
    const tolerated = simulatedKernel(1, []);
    const injector: FaultInjector = {
      arm: (n) => (pass <= 2 ? tolerated : flaky).injector.arm(n),
      hit: () => (pass <= 2 ? tolerated : flaky).injector.hit(),
    };
    const call = () => (pass <= 2 ? tolerated : flaky).call();
    const report = sweep(injector, simulatedCase(call, { setup: () => ({ pass: ++pass }) }));
    expect(report).toMatchObject({ points: 1, errnos: { ENOMEM: 1 }, passes: 2 });
    // Never failing in any pass still fails, after three.
    const never = simulatedKernel(1, []);
    let setups = 0;
    expect(() => sweep(never.injector, simulatedCase(never.call, { setup: () => ({ n: ++setups }) }))).toThrow(
      /in 3 pass\(es\)/,
    );
    expect(setups).toBe(1 + 3 * 2); // warm-up, then two setups (point 1 hit, point 2 not) per pass
  });

  test("an operation with no fault point at all fails unless it says why it cannot fail", () => {
    const k = simulatedKernel(0, []);
    expect(() => sweep(k.injector, simulatedCase(k.call))).toThrow(/proved nothing/);
    const why = "simulated_op() allocates nothing";
    expect(
      sweep(k.injector, simulatedCase(k.call, { name: "simulated (cannot fail)", cannotFail: why })),
    ).toMatchObject({ points: 0, cannotFail: why });
  });

  test('"cannot fail" must be in the name and name a kernel function, and must be true', () => {
    const k = simulatedKernel(2, [1]);
    expect(() => sweep(k.injector, simulatedCase(k.call, { cannotFail: "simulated_op() allocates nothing" }))).toThrow(
      /say so in its name/,
    );
    expect(() =>
      sweep(k.injector, simulatedCase(k.call, { name: "x (cannot fail)", cannotFail: "it allocates nothing" })),
    ).toThrow(/name the kernel function/);
    expect(() =>
      sweep(
        k.injector,
        simulatedCase(k.call, { name: "x (cannot fail)", cannotFail: "simulated_op() allocates nothing" }),
      ),
    ).toThrow(/claims it cannot fail/);
  });

  test("a leak is caught before disposal, against the figure right after setup", () => {
    const k = simulatedKernel(2, [1]);
    const leaked: number[] = [];
    // The "operation" leaks an fd on failure; dispose would close it (as closing an iommufd
    // releases every pin): only a check before dispose sees it.
    const run = () => {
      try {
        return k.call();
      } catch (error) {
        leaked.push(openSync("/dev/null", "r"));
        throw error;
      }
    };
    const dispose = () => {
      for (const fd of leaked.splice(0)) closeSync(fd);
    };
    expect(() => sweep(k.injector, simulatedCase(run, { dispose }))).toThrow(/"fds": \d+/);
    dispose();
    // The same sweep without the leak passes.
    expect(sweep(k.injector, simulatedCase(k.call))).toMatchObject({ points: 2 });
  });

  test("an error that is not an IommufdError fails the sweep", () => {
    const k = simulatedKernel(1, []);
    let calls = 0;
    const run = () => {
      if (++calls === 2) throw new TypeError("segfault-ish");
      return k.call();
    };
    expect(() => sweep(k.injector, simulatedCase(run))).toThrow(/not an IommufdError/);
  });

  test("a failure with no fault injected fails the sweep", () => {
    const k = simulatedKernel(1, [1]);
    let calls = 0;
    const run = () => {
      calls++;
      if (calls === 3)
        throw new IommufdError({ operation: "SIMULATED", errno: 22, message: "invalid argument for no reason at all" });
      return k.call();
    };
    expect(() => sweep(k.injector, simulatedCase(run))).toThrow(/with no fault injected/);
  });
});

describe("testScope", () => {
  test("releases everything in reverse order, then reports every teardown error", () => {
    const order: string[] = [];
    const scope = testScope();
    scope.keep({ close: () => order.push("first") });
    scope.keep({
      destroy: () => {
        order.push("second");
        throw new Error("EBUSY from destroy");
      },
    });
    scope.keep({ close: () => order.push("third") });
    expect(() => scope.releaseAll()).toThrow(/teardown: 1 release\(s\) failed: EBUSY from destroy/);
    expect(order).toEqual(["third", "second", "first"]);
    // Nothing is released twice.
    scope.releaseAll();
    expect(order).toHaveLength(3);
  });
});
