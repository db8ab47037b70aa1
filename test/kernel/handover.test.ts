/**
 * Live hand-over (IOMMU_IOAS_CHANGE_PROCESS) and the VMM examples, each run as a user would run
 * it, in a subprocess. The hand-over itself runs as `nobody`: iommufd charges pinned pages only to
 * callers without CAP_IPC_LOCK, and Linux 7.2.13 mis-accounts the privileged case.
 */
import { afterEach, beforeAll, describe, expect, test } from "bun:test";
import { chmodSync, statSync } from "node:fs";
import { join } from "node:path";
import {
  adoptIoas,
  bindToVfioPci,
  changeProcess,
  hasIpcLock,
  Iommufd,
  MemfdBuffer,
  PRIVILEGED_HANDOVER_WARNING,
  VfioDevice,
} from "../../src/index.ts";
import { MOCK_APERTURE_START, MockDomain } from "../../src/testing/selftest.ts";
import { requireEduAddress } from "../support/edu.ts";
import { expectIommufdError, openFdCount, requireIommufd, testScope } from "../support/kernel.ts";

const root = join(import.meta.dir, "../..");
const isRoot = process.getuid?.() === 0;
const rootOnly = isRoot ? "" : " [skipped: needs root to hold CAP_IPC_LOCK and to drop to another user]";
let eduAddress = "";

beforeAll(() => {
  requireIommufd();
  eduAddress = requireEduAddress();
});

const scope = testScope();
afterEach(scope.releaseAll);

async function run(
  argv: string[],
  options: { asNobody?: boolean; memlockKiB?: number } = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  const command = options.asNobody
    ? [
        "sh",
        "-c",
        `ulimit -l ${options.memlockKiB ?? 65536} && exec setpriv --reuid=65534 --regid=65534 --clear-groups "$@"`,
        "sh",
        ...argv,
      ]
    : argv;
  const proc = Bun.spawn(command, { cwd: root, stdout: "pipe", stderr: "pipe", env: { ...process.env, HOME: "/tmp" } });
  const [stdout, stderr] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
  const code = await proc.exited;
  if (code !== 0) console.error(`${argv.join(" ")} exited ${code}\n--- stdout\n${stdout}\n--- stderr\n${stderr}`);
  return { code, stdout, stderr };
}

const example = (name: string, options?: { asNobody?: boolean }) =>
  run([process.execPath, join(root, "examples", name)], options);

/** Open the device nodes to `nobody` for the duration of `fn`. */
async function withOpenNodes<T>(paths: string[], fn: () => Promise<T>): Promise<T> {
  const modes = paths.map((p) => statSync(p).mode & 0o777);
  for (const p of paths) chmodSync(p, 0o666);
  try {
    return await fn();
  } finally {
    for (const [i, p] of paths.entries()) chmodSync(p, modes[i]!);
  }
}

describe("IOMMU_IOAS_CHANGE_PROCESS in-process", () => {
  test("a by-address mapping blocks it: EINVAL that says so; with file mappings only it succeeds", () => {
    const iommufd = scope.keep(Iommufd.open());
    const ioas = iommufd.createIoas();
    MockDomain.attach(ioas);
    const file = scope.keep(MemfdBuffer.create(64 * 1024));
    ioas.mapFile(file, { iova: MOCK_APERTURE_START });
    const memory = scope.keep(MemfdBuffer.create(4096));
    const byAddress = ioas.map(memory, { iova: MOCK_APERTURE_START + 0x100000 });
    const e = expectIommufdError(
      () => changeProcess(iommufd, { warnIfPrivileged: false }),
      "EINVAL",
      "IOMMU_IOAS_CHANGE_PROCESS",
    );
    expect(e.message).toContain("by address");
    expect(e.hint).toContain("mapFile");
    byAddress.unmap();
    changeProcess(iommufd, { warnIfPrivileged: false });
  });

  test.skipIf(!isRoot)(`a privileged caller gets a warning naming the kernel's accounting bug${rootOnly}`, async () => {
    expect(hasIpcLock()).toBe(true);
    const iommufd = scope.keep(Iommufd.open());
    const warnings: string[] = [];
    const listener = (w: Error) => warnings.push(w.message);
    process.on("warning", listener);
    try {
      changeProcess(iommufd);
      // process.emitWarning delivers on a later tick.
      await Bun.sleep(20);
    } finally {
      process.off("warning", listener);
    }
    expect(warnings).toContain(PRIVILEGED_HANDOVER_WARNING);
  });

  test("adoptIoas: an unknown id is ENOENT; a closed iommufd is EBADF", () => {
    const iommufd = Iommufd.open();
    expectIommufdError(() => adoptIoas(iommufd, 777), "ENOENT", "IOMMU_IOAS_IOVA_RANGES");
    expectIommufdError(() => adoptIoas(iommufd, 0), "EINVAL", "adoptIoas", "id");
    iommufd.close();
    expectIommufdError(() => adoptIoas(iommufd, 1), "EBADF", "adoptIoas");
  });

  test("fromFd of fds that are not what they claim: typed errors, no leak", () => {
    const fds = openFdCount();
    const iommufd = scope.keep(Iommufd.open());
    expectIommufdError(() => MemfdBuffer.fromFd(iommufd.fd), "EINVAL", "MemfdBuffer.fromFd", "fd");
    expectIommufdError(() => MemfdBuffer.fromFd(9999), "EBADF", "MemfdBuffer.fromFd", "fd");
    expectIommufdError(
      () => VfioDevice.fromFd(iommufd.fd, { iommufd, deviceId: 1 }),
      "EINVAL",
      "VfioDevice.fromFd",
      "fd",
    );
    expectIommufdError(
      () => VfioDevice.fromFd(iommufd.fd, { iommufd, deviceId: 0 }),
      "EINVAL",
      "VfioDevice.fromFd",
      "options.deviceId",
    );
    iommufd.close();
    expect(openFdCount()).toBe(fds);
  });
});

describe.skipIf(!isRoot)(`hand-over between processes${rootOnly}`, () => {
  test("examples/handover.ts as nobody: DMA works across the switch and pinned memory moves to the new process", async () => {
    const { code, stdout } = await withOpenNodes(["/dev/iommu", bindToVfioPci(eduAddress)], () =>
      example("handover.ts", { asNobody: true }),
    );
    expect(code).toBe(0);
    expect(stdout).toMatch(/^old process \d+: DMA round trip OK, VmPin 64 kB$/m);
    expect(stdout).toMatch(
      /^with a by-address mapping: EINVAL: IOMMU_IOAS_CHANGE_PROCESS: an IOAS in this iommufd holds a mapping made by address/m,
    );
    expect(stdout).toMatch(
      /^new process \d+: adopted iommufd, \/dev\/vfio\/devices\/vfio\d+ \(device \d+\), IOAS \d+; VmPin 0 -> 64 kB: took over$/m,
    );
    expect(stdout).toContain("old process after the hand-over: VmPin 0 kB; closing its fds");
    expect(stdout).toContain("new process after the old one closed its fds: DMA round trip OK, VmPin 64 kB");
    expect(stdout).toContain("new process unmapped the guest memory: VmPin 0 kB");
    expect(stdout.trimEnd().endsWith("done")).toBe(true);
  }, 120_000);

  test("the accounting reproducer: correct for an unprivileged caller; the privileged result is reported", async () => {
    const script = [process.execPath, join(root, "scripts/repro/change-process-accounting.ts")];
    const unprivileged = await withOpenNodes(["/dev/iommu"], () => run(script, { asNobody: true }));
    expect(unprivileged.stdout).toContain("caller lacks CAP_IPC_LOCK");
    expect(unprivileged.stdout).toContain("accounting correct");
    expect(unprivileged.code).toBe(0);
    const privileged = await run(script);
    console.log(`reproducer as root:\n${privileged.stdout}`);
    expect(privileged.stdout).toContain("caller has CAP_IPC_LOCK");
    expect(privileged.stdout).toMatch(/^seen {5}VmPin \(kB\): \{"oldBefore":1024,/m);
  }, 120_000);
});

describe("VMM examples", () => {
  test("hw-info.ts: VT-d registers decoded for edu, the selftest type for the mock", async () => {
    const { code, stdout } = await example("hw-info.ts");
    expect(code).toBe(0);
    expect(stdout).toMatch(/^edu \S+: type intel-vtd \(0x1\), 24 bytes of driver data$/m);
    expect(stdout).toMatch(/dirty tracking: no \(this Intel VT-d unit lacks/);
    expect(stdout).toMatch(/^ {2}set: .*cap\.cachingMode/m);
    expect(stdout).toMatch(/^mock device: type selftest \(0xfeedbeef\), 8 bytes of driver data$/m);
    expect(stdout).toContain("selftest register 0xdeadbeef");
    expect(stdout.trimEnd().endsWith("done")).toBe(true);
  }, 60_000);

  test("hwpt-replace.ts: edu's DMA follows the replaced page table", async () => {
    const { code, stdout } = await example("hwpt-replace.ts");
    expect(code).toBe(0);
    expect(stdout).toMatch(/edu copied "written via IOAS A" inside buffer A/);
    expect(stdout).toMatch(
      /^replaced with table \d+ while attached: edu copied "written via IOAS B" inside buffer B$/m,
    );
    expect(stdout.trimEnd().endsWith("done")).toBe(true);
  }, 60_000);

  test("dirty-tracking.ts: exactly the written pages, cleared after a read; VT-d refuses", async () => {
    const { code, stdout } = await example("dirty-tracking.ts");
    expect(code).toBe(0);
    expect(stdout).toMatch(/^dirty: 3 pages: 0x1003000\+8192, 0x10c8000\+4096$/m);
    expect(stdout).toContain("read again after clearing: 0 dirty pages");
    expect(stdout).toMatch(
      /^edu behind QEMU's VT-d: EOPNOTSUPP: IOMMU_HWPT_ALLOC: the IOMMU of device \d+ cannot give a page table with dirty tracking/m,
    );
    expect(stdout.trimEnd().endsWith("done")).toBe(true);
  }, 60_000);

  test("fault-queue.ts: a page fault awaited, decoded and answered", async () => {
    const { code, stdout } = await example("fault-queue.ts");
    expect(code).toBe(0);
    expect(stdout).toMatch(/^fault from device \d+: address 0x12345000 group 9 rw last=true cookie \d+$/m);
    expect(stdout).toMatch(/^answered cookie \d+: success$/m);
    expect(stdout.trimEnd().endsWith("done")).toBe(true);
  }, 60_000);
});
