/**
 * Feature detection against the real kernel: the probe reads "known" and "unknown" from the
 * kernel's own answers, and what it reports matches the kernel series that booted (the guest's
 * kernel matrix: 6.12 LTS lacks MAP_FILE and CHANGE_PROCESS, 7.2 has everything the library uses).
 */
import { afterEach, beforeAll, describe, expect, test } from "bun:test";
import { release } from "node:os";
import { FEATURE_COMMANDS, Iommufd } from "../../src/index.ts";
import { knowsCommand } from "../../src/iommufd/features.ts";
import { IO } from "../../src/uapi/codec.ts";
import { IOMMU_IOAS_MAP, IOMMUFD_TYPE } from "../../src/uapi/iommufd.ts";
import { isCI } from "../support/ci.ts";
import { expectIommufdError, requireIommufd, testScope } from "../support/kernel.ts";
import { kernelHas, matrixKernel } from "../support/matrix.ts";

const has = kernelHas();
const scope = testScope();
afterEach(scope.releaseAll);

/** What each kernel series of the test matrix has; a series not listed is not asserted on. */
const EXPECTED: Record<string, Record<keyof typeof FEATURE_COMMANDS, boolean>> = {
  "6.12": { mapFile: false, hwpt: true, hwInfo: true, dirtyTracking: true, faultQueue: true, changeProcess: false },
  "7.2": { mapFile: true, hwpt: true, hwInfo: true, dirtyTracking: true, faultQueue: true, changeProcess: true },
};
const series = /^(\d+\.\d+)/.exec(release())?.[1] ?? "";

// A kernel without iommufd (Debian's stock 6.1) has no features to ask for: opening says why.
// Each kernel registers only its own branch: a skipped test fails the run under CI.
if (!has.iommufd) {
  test(`without iommufd (${matrixKernel() ?? "this host"}): Iommufd.open is ENOENT naming CONFIG_IOMMUFD`, () => {
    const e = expectIommufdError(() => scope.keep(Iommufd.open()), "ENOENT", "Iommufd.open");
    expect(e.message).toContain("CONFIG_IOMMUFD");
  });
}

if (has.iommufd)
  describe("iommufd.features", () => {
    beforeAll(requireIommufd);

    test("a command the kernel knows reads as known, one it does not as unknown", () => {
      const iommufd = scope.keep(Iommufd.open());
      expect(knowsCommand(iommufd.fd, IOMMU_IOAS_MAP, "IOMMU_IOAS_MAP")).toBe(true);
      // Far past the last iommufd command: the kernel has no handler for it.
      expect(knowsCommand(iommufd.fd, IO(IOMMUFD_TYPE, 0xf0), "unknown command")).toBe(false);
    });

    test(`match the kernel series that booted (${series})`, () => {
      const iommufd = scope.keep(Iommufd.open());
      const features = iommufd.features;
      expect(Object.keys(features).sort()).toEqual(Object.keys(FEATURE_COMMANDS).sort());
      if (isCI() && !(series in EXPECTED)) throw new Error(`no expectation for kernel ${release()}`);
      if (series in EXPECTED) expect({ ...features }).toEqual(EXPECTED[series]!);
      // The matrix's table (test/support/matrix.ts), which the other suites branch on, agrees.
      expect(features.mapFile).toBe(has.mapFile);
      // Asked once: the same frozen object every time.
      expect(iommufd.features).toBe(features);
      expect(Object.isFrozen(features)).toBe(true);
    });

    test("on a closed Iommufd: EBADF naming the property", () => {
      const iommufd = Iommufd.open();
      iommufd.close();
      expectIommufdError(() => iommufd.features, "EBADF", "Iommufd.features");
    });
  });
