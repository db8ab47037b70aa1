// A project that depends on the packed package, as a user's would: its own `bun test` file opens
// /dev/iommu, maps a buffer and lets edu DMA into it, run with `bunx bun-iommufd vm -- bun test`.
// Nothing of this repository is on its PATH or in its directory; only the tarball.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { consumerProject, noGuest, packPackage, processesMentioning, removeMarkers, root, runCli } from "./support.ts";

const CONSUMER_TEST = `import { expect, test } from "bun:test";
import { Iommufd, MemfdBuffer, VfioDevice } from "bun-iommufd";

interface GuestDevice { kind: string; addr: string; vfio?: string }

// edu's registers (QEMU docs/specs/edu.rst) and its 4 KiB buffer at 0x40000 in its DMA space.
const DMA_SRC = 0x80, DMA_DST = 0x88, DMA_COUNT = 0x90, DMA_CMD = 0x98, EDU_BUFFER = 0x40000;

// 60 s: bun test's default 5 s cut this test at 5.2 s in the TCG guest on a host at load 11.
test("edu DMAs into a JavaScript buffer through the IOMMU", () => {
  console.log("library:", Bun.resolveSync("bun-iommufd", import.meta.dir));
  const devices: GuestDevice[] = JSON.parse(process.env.IOMMUFD_VM_DEVICES ?? "[]");
  const edu = devices.find((d) => d.kind === "edu");
  if (!edu?.vfio) throw new Error("no edu in IOMMUFD_VM_DEVICES: " + process.env.IOMMUFD_VM_DEVICES);

  using iommufd = Iommufd.open();
  using ioas = iommufd.createIoas();
  using device = VfioDevice.open(edu.vfio);
  device.bind(iommufd);
  device.attach(ioas);
  device.setBusMaster(true);
  using bar = device.mapRegion(0);
  expect(bar.read32(0)).toBe(0x010000ed);

  using buffer = MemfdBuffer.create(64 * 1024);
  using mapping = ioas.mapFile(buffer, { iova: 0x100000 });
  const pattern = Uint8Array.from({ length: 1024 }, (_, i) => (i * 7 + 3) & 0xff);
  buffer.bytes.set(pattern, 0);
  const dma = (src: number, dst: number, toRam: boolean) => {
    bar.write32(DMA_SRC, src);
    bar.write32(DMA_DST, dst);
    bar.write32(DMA_COUNT, pattern.length);
    bar.write32(DMA_CMD, toRam ? 3 : 1);
    const deadline = Date.now() + 10_000;
    while (bar.read32(DMA_CMD) & 1) {
      if (Date.now() > deadline) throw new Error("edu DMA did not finish");
      Bun.sleepSync(1);
    }
  };
  dma(mapping.iova, EDU_BUFFER, false); // RAM -> device
  dma(EDU_BUFFER, mapping.iova + 0x1000, true); // device -> RAM, 4 KiB further on
  expect(buffer.bytes.subarray(0x1000, 0x1000 + pattern.length)).toEqual(pattern);
  console.log("edu copied", pattern.length, "bytes into the buffer at IOVA 0x" + (mapping.iova + 0x1000).toString(16));
}, 60_000);
`;

let project = "";
let tarball = "";

beforeAll(async () => {
  if (noGuest) return;
  tarball = packPackage().tarball;
  // Under /tmp on purpose: the guest has its own /tmp, so this also checks the writable share.
  project = consumerProject(tarball, "/tmp");
  mkdirSync(join(project, "test"));
  writeFileSync(join(project, "test", "dma.test.ts"), CONSUMER_TEST);
}, 120_000);

afterAll(() => {
  removeMarkers();
  if (project) rmSync(project, { recursive: true, force: true });
  if (tarball) rmSync(dirname(tarball), { recursive: true, force: true });
});

describe.skipIf(noGuest !== undefined)(`a consumer project (${noGuest ?? "QEMU available"})`, () => {
  test("`bunx bun-iommufd vm -- bun test` passes its edu DMA test with only the packed package", async () => {
    // PATH has bun and the system; nothing of this repository.
    const path = [dirname(process.execPath), "/usr/local/bin", "/usr/bin", "/bin"].join(":");
    const bunx = Bun.which("bunx", { PATH: path }) ?? process.execPath;
    const argv = bunx === process.execPath ? [bunx, "x", "bun-iommufd"] : [bunx, "bun-iommufd"];
    const r = await runCli([...argv, "vm", "--", "bun", "test"], { cwd: project, env: { PATH: path } });
    console.log(`--- consumer run (exit ${r.code}) ---\n${r.stdout}${r.stderr}--- end of consumer run ---`);
    expect(r.code).toBe(0);
    // The library came from the consumer's node_modules (the packed copy), not from this checkout.
    expect(r.stdout).toContain(`library: ${project}/node_modules/bun-iommufd/`);
    expect(r.stdout).not.toContain(root);
    expect(r.stderr).toMatch(/\n\s*1 pass\n/);
    expect(r.stderr).toMatch(/\n\s*0 fail\n/);
    expect(processesMentioning(r.marker)).toEqual([]);
  }, 300_000);
});
