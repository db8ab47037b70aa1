// The doctor where iommufd exists (the QEMU test guest under `bun run test`): the CLI must exit 0,
// the /dev/iommu check must pass, and the edu device must show up on vfio-pci with its cdev.
import { beforeAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import { findPciDevices } from "../../src/index.ts";
import { runDoctor, type DoctorReport } from "../../src/doctor/index.ts";
import { requireIommufd } from "../support/kernel.ts";

const root = join(import.meta.dir, "../..");
const inVm = process.env.IOMMUFD_IN_VM === "1";
const edu = findPciDevices(0x1234, 0x11e8)[0];

beforeAll(requireIommufd);

async function doctor(...args: string[]): Promise<{ code: number; stdout: string }> {
  const proc = Bun.spawn([process.execPath, join(root, "bin/bun-iommufd.ts"), "doctor", ...args], {
    cwd: root,
    stdout: "pipe",
    stderr: "inherit",
    env: { ...process.env, NO_COLOR: "1" },
  });
  const stdout = await new Response(proc.stdout).text();
  return { code: await proc.exited, stdout };
}

describe("doctor where /dev/iommu exists", () => {
  test("the CLI exits 0 and the /dev/iommu check opened it and created an IOAS", async () => {
    const { code, stdout } = await doctor("--json");
    const report = JSON.parse(stdout) as DoctorReport;
    expect(code).toBe(0);
    expect(report.usable).toBe(true);
    expect(report.exitCode).toBe(0);
    const check = report.checks.find((c) => c.id === "iommufd")!;
    expect(check.status).toBe("pass");
    expect(check.summary).toMatch(/^opened \/dev\/iommu and created IOAS \d+/);
    expect(report.facts.iommufd?.iovaRanges?.length).toBeGreaterThan(0);
  });

  test("the text report has a PASS line for /dev/iommu and the usable verdict", async () => {
    const { code, stdout } = await doctor();
    expect(code).toBe(0);
    expect(stdout).toMatch(/^PASS {2}\/dev\/iommu +opened \/dev\/iommu/m);
    expect(stdout.trimEnd().split("\n").at(-1)).toContain("iommufd is usable here");
  });

  test.skipIf(!inVm && !edu)("the edu device is listed on vfio-pci with its VFIO cdev node", () => {
    const report = runDoctor();
    const device = report.facts.pciDevices?.find((d) => d.vendor === 0x1234 && d.device === 0x11e8);
    expect(device).toBeDefined();
    expect(device!.driver).toBe("vfio-pci");
    expect(device!.vfioNode).toMatch(/^\/dev\/vfio\/devices\/vfio\d+$/);
    expect(device!.vfioNodeExists).toBe(true);
    const vfio = report.checks.find((c) => c.id === "vfio")!;
    expect(vfio.status).toBe("pass");
    expect(
      vfio.details?.some(
        (line) =>
          line.includes("1234:11e8 (QEMU edu)") && line.includes("driver vfio-pci") && line.includes(device!.vfioNode!),
      ),
    ).toBe(true);
  });

  test.skipIf(!inVm)("in the test guest every check is green", () => {
    const report = runDoctor();
    const notGreen = report.checks.filter((c) => c.status !== "pass").map((c) => `${c.id}: ${c.status}: ${c.summary}`);
    expect(notGreen).toEqual([]);
    expect(report.facts.dmabuf?.supported).toBe(true);
    expect(report.facts.iommuGroups).toBeGreaterThan(0);
    expect(report.facts.nrHugepages).toBeGreaterThan(0);
  });
});
