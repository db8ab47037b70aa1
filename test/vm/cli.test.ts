// `bun-iommufd vm` given bad input: each case a clear message, a non-zero exit status and no QEMU
// left running. Also: a kernel warning while the command runs fails the run. Runs on the host;
// the cases that boot a guest need QEMU and the cached kernel.
import { afterAll, describe, expect, test } from "bun:test";
import { chmodSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { bin, noGuest, processesMentioning, removeMarkers, runCli } from "./support.ts";

const vm = [process.execPath, bin, "vm"];
const scratch = mkdtempSync(join(tmpdir(), "vm-cli-scratch-"));
afterAll(() => {
  rmSync(scratch, { recursive: true, force: true });
  removeMarkers();
});

describe("bad input, caught before any guest boots", () => {
  test("an unknown device: usage error naming it and the known ones", async () => {
    const r = await runCli([...vm, "--device", "floppy", "--", "true"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('unknown device "floppy"');
    expect(r.stderr).toContain("known: edu, nvme");
    expect(processesMentioning(r.marker)).toEqual([]);
  });

  test("a command that does not exist: status 127 and its name, no boot", async () => {
    const r = await runCli([...vm, "--", "no-such-command-iommufd"]);
    expect(r.code).toBe(127);
    expect(r.stderr).toContain("command not found: no-such-command-iommufd");
    expect(r.stderr).not.toContain("boot-to-command");
    expect(processesMentioning(r.marker)).toEqual([]);
  });

  test("no QEMU on the host: the run says what to install, --check lists it", async () => {
    // A PATH with everything the runner needs but QEMU.
    const path = join(scratch, "no-qemu-bin");
    mkdirSync(path);
    for (const tool of ["bun", "bash", "cpio"]) symlinkSync(Bun.which(tool)!, join(path, tool));
    const r = await runCli([...vm, "--", "true"], { env: { PATH: path } });
    expect(r.code).toBe(125);
    expect(r.stderr).toContain("qemu-system-x86_64 not found (Debian: apt-get install qemu-system-x86)");
    const check = await runCli([...vm, "--check"], { env: { PATH: path } });
    expect(check.code).toBe(1);
    expect(check.stdout).toContain("MISSING  qemu-system-x86_64 (Debian package qemu-system-x86)");
    expect(check.stdout).toMatch(/apt-get install -y .*qemu-system-x86/);
  });
});

describe.skipIf(noGuest !== undefined)(`bad input that needs a guest (${noGuest ?? "QEMU available"})`, () => {
  test("a file that is not a kernel: QEMU's complaint, status 125, no retry, no QEMU left", async () => {
    const notKernel = join(scratch, "not-a-kernel");
    writeFileSync(notKernel, "this is not a bzImage\n");
    const r = await runCli([...vm, "--kernel", notKernel, "--", "true"]);
    expect(r.code).toBe(125);
    expect(r.stderr).toContain("QEMU could not start the guest");
    expect(r.stderr).not.toContain("retrying");
    expect(processesMentioning(r.marker)).toEqual([]);
  });

  test("a runner killed with SIGKILL takes its QEMU with it", async () => {
    const marker = mkdtempSync(join(tmpdir(), "vm-cli-kill-"));
    try {
      const runner = Bun.spawn([...vm, "--", "sleep", "600"], {
        env: { ...process.env, TMPDIR: marker },
        stdin: "ignore",
        stdout: "ignore",
        stderr: "ignore",
      });
      const deadline = Date.now() + 60_000;
      while (processesMentioning(marker).filter((p) => p.includes("qemu-system")).length === 0) {
        if (Date.now() > deadline) throw new Error("QEMU never started");
        await Bun.sleep(100);
      }
      runner.kill("SIGKILL");
      await runner.exited;
      const gone = Date.now() + 10_000;
      while (processesMentioning(marker).length > 0 && Date.now() < gone) await Bun.sleep(100);
      expect(processesMentioning(marker)).toEqual([]);
    } finally {
      rmSync(marker, { recursive: true, force: true });
    }
  }, 120_000);

  test("a kernel that does not reach the command: the panic, one retry, status 125", async () => {
    // The real kernel, told to run an init that does not exist: it panics at boot, every time.
    const r = await runCli([...vm, "--", "true"], { env: { IOMMUFD_VM_APPEND: "rdinit=/no-such-init" } });
    expect(r.code).toBe(125);
    expect(r.stderr).toContain("the guest kernel panicked before the command started");
    expect(r.stderr).toContain("retrying once");
    expect(r.stderr).toContain("(after one retry)");
    expect(processesMentioning(r.marker)).toEqual([]);
  }, 120_000);

  test("a command only the host has (under the host's /tmp): status 127 from the guest", async () => {
    const tool = join(scratch, "host-only-tool");
    writeFileSync(tool, "#!/bin/sh\necho should not run\n");
    chmodSync(tool, 0o755);
    const r = await runCli([...vm, "--", tool]);
    expect(r.code).toBe(127);
    expect(r.stderr).toContain(`command not found in the guest: ${tool}`);
    expect(r.stdout).not.toContain("should not run");
    expect(processesMentioning(r.marker)).toEqual([]);
  }, 120_000);

  test("cwd writable at its own path, exit status back, a kernel WARNING fails the run with its lines", async () => {
    // One guest for three checks (guests are slow on a shared machine). The WARNING is what a
    // WARN_ON prints, written into the kernel log from user space (same log, same reader).
    const project = mkdtempSync(join("/tmp", "vm-cli-project-"));
    try {
      mkdirSync(join(project, "sub"));
      const script = [
        "pwd",
        "echo from-guest > written.txt",
        "echo '<4>------------[ cut here ]------------' > /dev/kmsg",
        "echo '<4>WARNING: CPU: 0 PID: 1 at drivers/iommu/iommufd/fake.c:42 vm_cli_test+0x0/0x10' > /dev/kmsg",
        "echo '<4>---[ end trace 0000000000000000 ]---' > /dev/kmsg",
        "exit 0",
      ].join("; ");
      const r = await runCli([...vm, "--", "sh", "-c", script], { cwd: join(project, "sub") });
      expect(r.stdout.trim()).toBe(join(project, "sub"));
      expect(await Bun.file(join(project, "sub", "written.txt")).text()).toBe("from-guest\n");
      // The command itself succeeded; the warning turns the run into a failure.
      expect(r.code).toBe(125);
      expect(r.stderr).toContain("WARNING: CPU: 0 PID: 1 at drivers/iommu/iommufd/fake.c:42 vm_cli_test");
      expect(r.stderr).toContain("warning/bug report(s) while the command ran");
      expect(processesMentioning(r.marker)).toEqual([]);
    } finally {
      rmSync(project, { recursive: true, force: true });
    }
  }, 120_000);
});
