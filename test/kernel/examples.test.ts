// Each example as a user would run it (`bun examples/x.ts`), in a subprocess: exit status 0 and
// the lines that show it did its job. Runs in the QEMU test guest (or a host with VFIO). The
// examples that work on either backend run twice: as the host chooses, and with
// BUN_IOMMUFD_BACKEND=type1; the rest need iommufd.
import { expect, test } from "bun:test";
import { join } from "node:path";
import { BACKEND_ENV, findPciDevices } from "../../src/index.ts";
import { guestNvmeControllers } from "../support/nvme.ts";
import { expectedAutoBackend, requireIommufd } from "../support/kernel.ts";
import { kernelHas, onThisKernel } from "../support/matrix.ts";

const root = join(import.meta.dir, "../..");
// In the guest the edu device is part of the setup, so its absence is a failure, not a skip.
const eduAddress = findPciDevices(0x1234, 0x11e8)[0];
const haveEdu = process.env.IOMMUFD_IN_VM === "1" || eduAddress !== undefined;
const nvme = guestNvmeControllers()[0];
const has = kernelHas();

/** An example that needs iommufd, on a kernel without it: Iommufd.open's sentence, exit status 1. */
function expectNoIommufd(result: { code: number; stderr: string }): void {
  expect(result.code).toBe(1);
  expect(result.stderr).toContain("ENOENT");
  expect(result.stderr).toContain("CONFIG_IOMMUFD");
}

/** Shows an example's output in the run's log: the record of what each kernel printed. */
function show(name: string, how: string, stdout: string): void {
  console.log(
    `--- examples/${name} ${how} on ${process.env.IOMMUFD_VM_KERNEL ?? "this host"}\n${stdout.trimEnd()}\n---`,
  );
}

async function example(
  name: string,
  env: Record<string, string> = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  const proc = Bun.spawn([process.execPath, join(root, "examples", name)], {
    cwd: root,
    env: { ...process.env, [BACKEND_ENV]: "", ...env },
    stdout: "pipe",
    stderr: "pipe",
  });
  const [stdout, stderr] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
  const code = await proc.exited;
  if (code !== 0) console.error(`examples/${name} exited ${code}\n--- stdout\n${stdout}\n--- stderr\n${stderr}`);
  return { code, stdout, stderr };
}

test(`map-memfd.ts maps a MemfdBuffer, prints its IOVA and unmaps${onThisKernel(has.iommufd, "no iommufd: Iommufd.open's ENOENT")}`, async () => {
  if (!has.iommufd) return expectNoIommufd(await example("map-memfd.ts"));
  requireIommufd();
  const { code, stdout } = await example("map-memfd.ts");
  expect(code).toBe(0);
  expect(stdout).toMatch(/^opened \/dev\/iommu/m);
  expect(stdout).toMatch(/^created IOAS \d+: usable IOVAs 0x/m);
  expect(stdout).toMatch(/^mapped 1048576 bytes at IOVA 0x[0-9a-f]+ \(kernel-chosen\)$/m);
  expect(stdout).toContain("unmapped; the IOAS holds 0 mappings");
  expect(stdout).toMatch(/at fixed IOVA 0x100000\.\.0x104000$/m);
  expect(stdout).toContain("unmapped IOVA 0x100000: mapped=false");
  expect(stdout.trimEnd().endsWith("done")).toBe(true);
});

/** The backend a run gets: type1 when forced, else what "auto" must pick on this kernel. */
const runs: { how: string; env: Record<string, string>; backend: (address: string) => "iommufd" | "type1" }[] = [
  { how: "as the host chooses", env: {}, backend: (address) => expectedAutoBackend(address) },
  { how: `with ${BACKEND_ENV}=type1`, env: { [BACKEND_ENV]: "type1" }, backend: () => "type1" },
];

for (const run of runs) {
  test.skipIf(!haveEdu)(
    `edu-dma.ts ${run.how}: edu copies RAM -> device -> RAM through the IOMMU and the bytes match`,
    async () => {
      const { code, stdout } = await example("edu-dma.ts", run.env);
      expect(code).toBe(0);
      const backend = run.backend(eduAddress ?? "");
      expect(stdout).toMatch(new RegExp(`^DMA through ${backend}: `, "m"));
      expect(stdout).toContain("BAR0 mapped (0x100000 bytes): id register 0x10000ed");
      expect(stdout).toContain("liveness: wrote 0x12345678, read 0xedcba987");
      if (backend === "iommufd")
        expect(stdout).toMatch(/^bound to iommufd \(device id \d+\) and attached to IOAS \d+/m);
      else expect(stdout).toMatch(/^opened through VFIO group \d+ into a type1 container$/m);
      expect(stdout).toContain("DMA RAM -> device: 2048 bytes from IOVA 0x100000");
      expect(stdout).toContain("DMA device -> RAM: 2048 bytes to IOVA 0x108000");
      expect(stdout).toContain("round trip OK: 2048 bytes came back through the IOMMU unchanged");
      expect(stdout).toContain("unmapped IOVA 0x100000");
    },
    120_000,
  );

  test.skipIf(!haveEdu)(
    `edu-irq.ts ${run.how} awaits edu's DMA completion interrupts while a timer keeps ticking`,
    async () => {
      const { code, stdout } = await example("edu-irq.ts", run.env);
      show("edu-irq.ts", run.how, stdout);
      expect(code).toBe(0);
      expect(stdout).toMatch(new RegExp(`: DMA through ${run.backend(eduAddress ?? "")} \\(`, "m"));
      expect(stdout).toMatch(
        /: 1 MSI vector\(s\); INTx, MSI-X, ERR, REQ counts: intx 1, msi 1, msix 0, err 0, req 1$/m,
      );
      expect(stdout).toContain("DMA RAM -> device started (1024 bytes from IOVA 0x100000); awaiting its interrupt");
      expect(stdout).toMatch(/^completion interrupts: 1 \+ 1; the timer ticked [1-9]\d* times meanwhile$/m);
      expect(stdout).toContain("round trip OK: 1024 bytes back through the IOMMU");
      expect(stdout.trimEnd().endsWith("done")).toBe(true);
    },
    120_000,
  );

  test.skipIf(nvme === undefined && process.env.IOMMUFD_IN_VM !== "1")(
    `nvme.ts ${run.how} identifies the controller, writes a block and reads it back`,
    async () => {
      const { code, stdout } = await example("nvme.ts", run.env);
      show("nvme.ts", run.how, stdout);
      expect(code).toBe(0);
      expect(stdout).toMatch(/^0000:[0-9a-f:.]+: QEMU NVMe Ctrl \(serial \S+, firmware \S+\), NVMe 1\.\d+\.\d+$/m);
      const backend = run.backend(nvme?.addr ?? "");
      expect(stdout).toMatch(new RegExp(`^DMA through ${backend}: `, "m"));
      expect(stdout).toMatch(/^namespace 1: \d+ blocks of 512 bytes; 524288 bytes per command at most$/m);
      expect(stdout).toMatch(/^LBA 0 reads back: "hello from Bun at /m);
    },
    120_000,
  );
}

const dmaBufBranch = !has.iommufd
  ? onThisKernel(false, "no iommufd: Iommufd.open's ENOENT")
  : onThisKernel(has.dmaBufExport, "no VFIO dma-buf export: ENOTTY");

test.skipIf(!haveEdu)(
  `vfio-dmabuf.ts exports a BAR0 slice as a dma-buf, maps it into an IOAS and edu reads it by IOVA${dmaBufBranch}`,
  async () => {
    if (!has.iommufd) return expectNoIommufd(await example("vfio-dmabuf.ts"));
    if (!has.dmaBufExport) {
      const { code, stdout, stderr } = await example("vfio-dmabuf.ts");
      expect(code).not.toBe(0);
      expect(stdout).toMatch(/; dma-buf export supported: false$/m);
      expect(stderr).toContain("ENOTTY");
      expect(stderr).toContain("VFIO_DEVICE_FEATURE_DMA_BUF");
      return;
    }
    requireIommufd();
    const { code, stdout } = await example("vfio-dmabuf.ts");
    expect(code).toBe(0);
    expect(stdout).toMatch(/^bound \S+ to iommufd, attached to IOAS \d+; dma-buf export supported: true$/m);
    expect(stdout).toMatch(/^exported dma-buf of \S+ region 0 \[0x0, \+0x1000\) as dma-buf fd \d+ \(4096 bytes\)$/m);
    expect(stdout).toMatch(/^mapped the dma-buf into IOAS \d+ at IOVA 0x[0-9a-f]+\.\.0x[0-9a-f]+ \(kernel-chosen\)$/m);
    expect(stdout).toContain("unmapped the dma-buf");
    expect(stdout).toContain("mapped the dma-buf at IOVA 0x200000 and a MemfdBuffer at IOVA 0x100000");
    // Peer to peer through the IOMMU: the device's DMA reached its own BAR by the dma-buf's IOVA.
    expect(stdout).toContain(
      "through the IOMMU at IOVA 0x200000: 0x10000ed (matches 0x10000ed read through the mmapped BAR)",
    );
    expect(stdout).toMatch(/^a two-range dma-buf is refused as expected: EOPNOTSUPP$/m);
    expect(stdout.trimEnd().endsWith("done")).toBe(true);
  },
  120_000,
);
