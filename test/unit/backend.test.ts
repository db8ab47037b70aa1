/**
 * The backend decision (src/dma/backend.ts) on every branch, from facts alone: what was asked
 * (option, environment, nothing), what the host has, what the caller handed in.
 */
import { describe, expect, test } from "bun:test";
import { BACKEND_ENV, type BackendFacts, chooseBackend, IommufdError, requestedBackend } from "../../src/index.ts";

const op = "test";
const env = (value?: string) => (value === undefined ? {} : { [BACKEND_ENV]: value });

function thrown(fn: () => unknown): IommufdError {
  try {
    fn();
  } catch (error) {
    if (error instanceof IommufdError) return error;
    throw error;
  }
  throw new Error("expected an IommufdError");
}

describe("requestedBackend", () => {
  test("an option that names a backend wins over the environment", () => {
    expect(requestedBackend("type1", op, env("iommufd"))).toEqual({ choice: "type1", source: "option" });
    expect(requestedBackend("iommufd", op, env("type1"))).toEqual({ choice: "iommufd", source: "option" });
  });

  test("no option, or auto, defers to the environment; an empty or unset variable is auto", () => {
    expect(requestedBackend(undefined, op, env("type1"))).toEqual({ choice: "type1", source: "environment" });
    expect(requestedBackend("auto", op, env("iommufd"))).toEqual({ choice: "iommufd", source: "environment" });
    expect(requestedBackend(undefined, op, env("auto"))).toEqual({ choice: "auto", source: "default" });
    expect(requestedBackend(undefined, op, env(""))).toEqual({ choice: "auto", source: "default" });
    expect(requestedBackend(undefined, op, env())).toEqual({ choice: "auto", source: "default" });
    expect(requestedBackend("auto", op, env())).toEqual({ choice: "auto", source: "option" });
  });

  test("a bad environment value is EINVAL naming the variable and the value", () => {
    for (const value of ["vfio", "TYPE1", " iommufd"]) {
      const e = thrown(() => requestedBackend(undefined, op, env(value)));
      expect({ code: e.code, operation: e.operation, argument: e.argument }).toEqual({
        code: "EINVAL",
        operation: op,
        argument: BACKEND_ENV,
      });
      expect(e.message).toContain(`${BACKEND_ENV}=${JSON.stringify(value)}`);
      expect(e.hint).toContain("auto, iommufd or type1");
    }
  });

  test("a bad option is EINVAL naming options.backend, even where the environment is fine", () => {
    const e = thrown(() => requestedBackend("legacy", op, env("type1")));
    expect([e.code, e.argument]).toEqual(["EINVAL", "options.backend"]);
    expect(e.message).toContain("legacy");
  });
});

describe("chooseBackend", () => {
  const device = "0000:00:04.0";
  const cdev = "/dev/vfio/devices/vfio1";
  const auto = { choice: "auto", source: "default" } as const;
  const all: BackendFacts = { iommu: true, cdev, container: true };

  test("auto: iommufd where /dev/iommu and the device's cdev exist, naming both", () => {
    const d = chooseBackend(auto, all, device, op);
    expect(d.backend).toBe("iommufd");
    expect(d.reason).toBe(`/dev/iommu exists and ${device} has a VFIO cdev (${cdev})`);
  });

  test("auto: type1 without /dev/iommu, or without the device's cdev, saying which", () => {
    const noIommu = chooseBackend(auto, { ...all, iommu: false }, device, op);
    expect(noIommu.backend).toBe("type1");
    expect(noIommu.reason).toContain("no /dev/iommu");
    expect(noIommu.reason).toContain("/dev/vfio/vfio exists");
    const noCdev = chooseBackend(auto, { ...all, cdev: undefined }, device, op);
    expect(noCdev.backend).toBe("type1");
    expect(noCdev.reason).toContain(`${device} has no VFIO cdev`);
  });

  test("auto with neither is ENODEV naming what is missing", () => {
    const e = thrown(() => chooseBackend(auto, { iommu: false, cdev: undefined, container: false }, device, op));
    expect(e.code).toBe("ENODEV");
    expect(e.message).toContain("no /dev/iommu");
    expect(e.message).toContain("no /dev/vfio/vfio");
    expect(e.hint).toContain("vfio-pci");
  });

  test("forced: the forced backend whatever the host has, naming who forced it", () => {
    const byEnv = chooseBackend({ choice: "type1", source: "environment" }, all, device, op);
    expect(byEnv).toEqual({ backend: "type1", reason: `forced by ${BACKEND_ENV}=type1` });
    const byOption = chooseBackend({ choice: "iommufd", source: "option" }, { ...all, iommu: false }, device, op);
    expect(byOption).toEqual({ backend: "iommufd", reason: "forced by options.backend" });
  });

  test("auto: an object handed in decides before the host's facts", () => {
    const given = {
      backend: "type1",
      argument: "options.container",
      reason: "options.container is a container",
    } as const;
    expect(chooseBackend(auto, { ...all, given }, device, op)).toEqual({ backend: "type1", reason: given.reason });
  });
});
