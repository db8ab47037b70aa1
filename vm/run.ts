// Runs a command inside a throwaway QEMU guest whose kernel has iommufd, its selftest hooks and
// VFIO, so the kernel tests and the benchmark can run on machines without /dev/iommu. The command
// line on top of this is vm/cli.ts (`bunx bun-iommufd vm`, `bun run vm`).
//
// The guest sees the host's whole filesystem read-only over 9p and runs the command in the
// project directory as root; its stdout and stderr stream back live through a second, writable
// 9p share, apart from the kernel console (kept in a log file). This file checks the options,
// boots the guest (vm/qemu.ts), retries once a guest that died before the command started, and
// turns the attempt into a result.

import { copyFileSync, cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { type DeviceSpec, type IommuModel, type PlacedDevice, placeDevices, prepareDisks } from "./devices.ts";
import { commandScript, guestEnvironment, workShare } from "./guest-script.ts";
import { vmAvailability } from "./host.ts";
import { cacheDir, type GuestKernel, guestKernel, initramfs } from "./images.ts";
import { commandWindow, kernelWarnings } from "./kernel-log.ts";
import { type AttemptConfig, attempt, lastLines } from "./qemu.ts";

/** Exit code when the overall timeout ends the run (as timeout(1) does). */
export const EXIT_TIMEOUT = 124;
/** Exit code when the guest itself failed: no kernel, emulator fault, panic, broken setup. */
export const EXIT_VM_FAILURE = 125;

export interface GuestOptions {
  /** argv of the command to run in the guest; the first word is looked up in the host's PATH. */
  command: string[];
  /** Host directory to run the command in (seen at the same path in the guest). Default: cwd. */
  cwd?: string;
  /** Extra environment for the command, on top of CI, IOMMUFD_*, a few terminal variables. */
  env?: Record<string, string>;
  /** Overall limit in seconds, retry included. Default 1800. */
  timeoutSeconds?: number;
  /** Limit for boot and guest setup; a guest not running the command by then is retried. Default 180. */
  bootTimeoutSeconds?: number;
  /** Guest memory in QEMU's syntax. Default "4G". */
  memory?: string;
  /** 2 MiB huge pages to reserve in the guest. Default 256 (or IOMMUFD_VM_HUGEPAGES). */
  hugepages?: number;
  /** Use KVM instead of TCG. Default: IOMMUFD_VM_KVM=1. Only for hosts with a real KVM. */
  kvm?: boolean;
  /** Virtual CPUs. Default 2. */
  cpus?: number;
  /** Devices, in PCI slot order from 0000:00:03.0. Default: one edu. See vm/devices.ts. */
  devices?: DeviceSpec[];
  /** Emulated IOMMU. Default "intel". */
  iommu?: IommuModel;
  /** Where new NVMe disk images go. Default: a new directory under the OS temp dir, kept. */
  diskDir?: string;
  /** A kernel WARNING/BUG while the command runs only gets a note instead of failing the run. */
  allowKernelWarnings?: boolean;
  /** Boot with panic_on_warn=1: the first WARNING stops the guest at once (shows which test). */
  panicOnWarn?: boolean;
  /** A kernel of the matrix by name (7.2, 6.12, debian; see vm/images.ts) or a bzImage path. Default 7.2. */
  kernel?: string;
  /** Host directory that receives whatever the command wrote to $IOMMUFD_VM_OUT in the guest. */
  outDir?: string;
  /** Receive the command's output; default: the host's stdout and stderr. */
  onStdout?: (chunk: Uint8Array) => void;
  onStderr?: (chunk: Uint8Array) => void;
  /** Where the runner's own status lines go; default: the host's stderr. */
  log?: (line: string) => void;
}

export type GuestFailure = "timeout" | "vm" | "kernel" | "setup" | "kernel-warning" | "command-not-found";

export interface GuestResult {
  /** The command's own exit status, or EXIT_TIMEOUT, or EXIT_VM_FAILURE. */
  exitCode: number;
  /** From starting QEMU to the command starting (last attempt); NaN if it never started. */
  bootSeconds: number;
  /** Whole run, kernel lookup and retry included. */
  totalSeconds: number;
  /** Whether the first guest died before the command started and a second one was booted. */
  retried: boolean;
  /** Set when exitCode is not the command's own. */
  failure?: GuestFailure;
  message?: string;
  /** Kernel console of the last attempt. */
  consoleLog?: string;
  /** The guest's devices with their PCI addresses (and NVMe disk images on the host). */
  devices: PlacedDevice[];
  /** Directory holding the NVMe disk images the run created, if any. */
  diskDir?: string;
  /** Kernel reports (WARNING, BUG, ...) logged while the command ran; see vm/kernel-log.ts. */
  kernelWarnings: string[];
}

/** Where a command word resolves on the host (which the guest sees), or undefined. */
function findCommand(word: string, cwd: string, path: string): string | undefined {
  if (word.includes("/")) {
    const full = resolve(cwd, word);
    return existsSync(full) ? full : undefined;
  }
  return Bun.which(word, { PATH: path, cwd }) ?? undefined;
}

function describeDevices(devices: readonly PlacedDevice[]): string {
  return devices
    .map((d) => {
      const parts = [`${d.name} ${d.addr}`];
      if (d.kind === "nvme") {
        parts.push(`${d.size! >> 20} MiB`);
        if (d.cmb) parts.push(`CMB ${d.cmb >> 20} MiB`);
        if (d.driver === "kernel") parts.push("kernel driver");
      }
      return parts.join(" ");
    })
    .join(", ");
}

export async function runInGuest(opts: GuestOptions): Promise<GuestResult> {
  const t0 = performance.now();
  const log = opts.log ?? ((line: string) => process.stderr.write(`${line}\n`));
  const seconds = () => (performance.now() - t0) / 1000;
  const timeoutSeconds = opts.timeoutSeconds ?? 1800;
  let devices: PlacedDevice[] = [];
  let diskDir: string | undefined;
  const fail = (failure: GuestFailure, message: string, extra: Partial<GuestResult> = {}): GuestResult => {
    log(`[vm] error: ${message}`);
    const exitCode = failure === "timeout" ? EXIT_TIMEOUT : failure === "command-not-found" ? 127 : EXIT_VM_FAILURE;
    return {
      exitCode,
      bootSeconds: NaN,
      totalSeconds: seconds(),
      retried: false,
      failure,
      message,
      devices,
      diskDir,
      kernelWarnings: [],
      ...extra,
    };
  };

  const available = vmAvailability();
  if (!available.ok) return fail("setup", available.reason ?? "cannot run a guest");
  if (opts.command.length === 0) return fail("setup", "no command given");
  const cwd = resolve(opts.cwd ?? process.cwd());
  if (!existsSync(cwd)) return fail("setup", `no such directory: ${cwd}`);
  // The guest mounts its own tmpfs on /tmp and the root read-only; neither can be the work share.
  if (cwd === "/tmp" || cwd === "/") {
    return fail(
      "setup",
      `cannot run in ${cwd} itself: run from a project directory (${cwd} is shared read-only or is the guest's own)`,
    );
  }
  for (const k of Object.keys(opts.env ?? {})) {
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(k))
      return fail("setup", `invalid environment variable name ${JSON.stringify(k)}`);
  }
  const hugepages = opts.hugepages ?? Number(process.env.IOMMUFD_VM_HUGEPAGES ?? 256);
  if (!Number.isInteger(hugepages) || hugepages < 0) return fail("setup", `invalid huge page count ${hugepages}`);
  const cpus = opts.cpus ?? 2;
  if (!Number.isInteger(cpus) || cpus < 1 || cpus > 64) return fail("setup", `invalid CPU count ${cpus} (1 to 64)`);
  const env = guestEnvironment(opts.env ?? {});
  const command = opts.command[0]!;
  if (!findCommand(command, cwd, env.PATH!)) {
    return fail(
      "command-not-found",
      `command not found: ${command} (the guest runs the host's programs, looked up in the host's PATH from ${cwd})`,
    );
  }
  try {
    devices = placeDevices(opts.devices ?? [{ kind: "edu" }]);
    diskDir = prepareDisks(devices, opts.diskDir);
  } catch (e) {
    return fail("setup", (e as Error).message);
  }

  let kernel: GuestKernel;
  try {
    kernel = await guestKernel(opts.kernel);
  } catch (e) {
    return fail("kernel", (e as Error).message);
  }
  const initrd = await initramfs(kernel.modules);

  const dir = mkdtempSync(join(tmpdir(), "iommufd-vm-"));
  const current: { proc?: Bun.Subprocess } = {};
  // A runner killed from outside must not leave a guest behind.
  const onSignal = (signal: NodeJS.Signals) => {
    current.proc?.kill("SIGKILL");
    process.exit(signal === "SIGINT" ? 130 : 143);
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);

  const config: AttemptConfig = {
    kernel: kernel.image,
    kernelPrefix: kernel.prefix,
    initrd,
    dir,
    script: commandScript(opts.command, cwd, env),
    hugepages,
    work: workShare(cwd),
    memory: opts.memory ?? "4G",
    cpus,
    kvm: opts.kvm ?? process.env.IOMMUFD_VM_KVM === "1",
    panicOnWarn: opts.panicOnWarn ?? false,
    iommu: opts.iommu ?? "intel",
    devices,
    deadline: t0 + timeoutSeconds * 1000,
    bootTimeoutMs: (opts.bootTimeoutSeconds ?? 180) * 1000,
    onStdout: opts.onStdout ?? ((c) => process.stdout.write(c)),
    onStderr: opts.onStderr ?? ((c) => process.stderr.write(c)),
    current,
  };
  if (devices.some((d) => d.kind !== "edu") || devices.length !== 1) log(`[vm] devices: ${describeDevices(devices)}`);

  try {
    let retried = false;
    let a = await attempt(config, 1);
    if (a.outcome === "early-death") {
      const kept = join(cacheDir(), "failed-boot-console.log");
      try {
        copyFileSync(a.consoleLog, kept);
      } catch {
        // QEMU wrote no console at all.
      }
      log(`[vm] the guest failed before the command started: ${a.reason}. Last console lines (all: ${kept}):`);
      log(lastLines(a.consoleLog, 40));
      log(`[vm] retrying once with a fresh guest (emulator faults at boot happen now and then)`);
      retried = true;
      a = await attempt(config, 2);
    }

    const saved = join(cacheDir(), "last-console.log");
    try {
      mkdirSync(cacheDir(), { recursive: true });
      copyFileSync(a.consoleLog, saved);
    } catch {
      // No console to keep (QEMU never started); the failure message says why.
    }
    const consoleLog = existsSync(saved) ? saved : a.consoleLog;
    if (a.dmesg !== undefined) writeFileSync(join(cacheDir(), "last-dmesg.log"), a.dmesg);

    if (opts.outDir) {
      const out = join(dirname(a.consoleLog), "share", "out");
      mkdirSync(opts.outDir, { recursive: true });
      if (existsSync(out)) cpSync(out, opts.outDir, { recursive: true });
    }
    const disks = devices.filter((d) => d.disk).map((d) => `${d.name} ${d.disk}`);
    if (disks.length) log(`[vm] NVMe disk images: ${disks.join(", ")}`);

    if (a.outcome === "done") {
      const total = seconds();
      const uptime =
        a.guestUptime === undefined || Number.isNaN(a.guestUptime)
          ? ""
          : ` (guest kernel+init ${a.guestUptime.toFixed(1)} s)`;
      const dmesg = a.dmesg ?? "";
      const during = kernelWarnings(commandWindow(dmesg));
      const atBoot = kernelWarnings(dmesg.slice(0, Math.max(0, dmesg.indexOf("iommufd-vm: command starting"))));
      if (atBoot.length)
        log(`[vm] note: the guest kernel logged ${atBoot.length} report(s) while booting, first:\n${atBoot[0]}`);
      let exitCode = a.exitCode ?? EXIT_VM_FAILURE;
      let failure: GuestFailure | undefined;
      let message: string | undefined;
      if (during.length) {
        // This run's own copy (the cache's last-dmesg.log is shared by parallel runs); kept below.
        const dmesgPath = join(dirname(a.consoleLog), "share", "dmesg");
        log(
          `[vm] the guest kernel logged ${during.length} report(s) (WARNING/BUG/...) while the command ran (all of its log: ${dmesgPath}):`,
        );
        for (const report of during.slice(0, 3)) log(report);
        if (during.length > 3) log(`[vm] ... and ${during.length - 3} more`);
        if (opts.allowKernelWarnings) {
          log("[vm] kernel warnings are allowed for this run: not failing it");
        } else {
          failure = "kernel-warning";
          const first = during[0]!
            .split("\n")
            .find((l) => !l.includes("[ cut here ]"))
            ?.trim();
          message = `the guest kernel logged ${during.length} warning/bug report(s) while the command ran, first: ${first}`;
          if (exitCode === 0) exitCode = EXIT_VM_FAILURE;
          log(`[vm] error: ${message}`);
        }
      }
      const launch =
        a.sinceLaunch === undefined || Number.isNaN(a.sinceLaunch)
          ? ""
          : `, ${a.sinceLaunch.toFixed(1)} s after launch`;
      log(
        `[vm] boot-to-command ${a.bootSeconds.toFixed(1)} s${uptime}${launch}, total ${total.toFixed(1)} s, exit status ${exitCode}${retried ? " (after one retry)" : ""}`,
      );
      if (during.length === 0) rmSync(dir, { recursive: true, force: true });
      return {
        exitCode,
        bootSeconds: a.bootSeconds,
        totalSeconds: total,
        retried,
        consoleLog,
        devices,
        diskDir,
        kernelWarnings: during,
        ...(failure ? { failure, message } : {}),
      };
    }

    const failure: GuestFailure = a.outcome === "timeout" ? "timeout" : a.outcome === "setup" ? "setup" : "vm";
    const qemuErr = existsSync(a.qemuLog) ? readFileSync(a.qemuLog, "utf8").trim() : "";
    if (a.outcome !== "refused") {
      log(`[vm] last console lines (full log: ${consoleLog}):`);
      log(lastLines(a.consoleLog, 40));
      const reports = existsSync(a.consoleLog) ? kernelWarnings(readFileSync(a.consoleLog, "latin1")) : [];
      if (reports.length) log(`[vm] the kernel's first report on the console:\n${reports[0]}`);
    }
    if (qemuErr) log(`[vm] QEMU said:\n${qemuErr.split("\n").slice(-15).join("\n")}`);
    const reason = a.outcome === "timeout" ? `timed out after ${timeoutSeconds} s` : (a.reason ?? "the guest failed");
    const result = fail(failure, `${reason}${retried ? " (after one retry)" : ""}; run directory kept: ${dir}`, {
      bootSeconds: a.bootSeconds,
      retried,
      consoleLog,
    });
    log(
      `[vm] boot-to-command ${Number.isNaN(a.bootSeconds) ? "n/a" : `${a.bootSeconds.toFixed(1)} s`}, total ${result.totalSeconds.toFixed(1)} s, exit status ${result.exitCode}`,
    );
    return result;
  } finally {
    current.proc?.kill("SIGKILL");
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
}
