// One boot of the guest: QEMU's command line, the command's output streamed from the share while
// it runs, the limits that kill it, and what the console and the share say happened.

import { closeSync, existsSync, openSync, readFileSync, readSync } from "node:fs";
import { join } from "node:path";
import { deviceArgs, iommuArgs, iommuKernelArgs } from "./devices.ts";
import { type ShareContents, writeShare } from "./guest-script.ts";

const qemuBinary = "qemu-system-x86_64";

// Follows a file the guest appends to over 9p, handing each new chunk to the sink.
class Tail {
  private fd: number | undefined;
  private pos = 0;
  private readonly buf = Buffer.alloc(1 << 16);
  constructor(
    private readonly path: string,
    private readonly sink?: (chunk: Uint8Array) => void,
  ) {}
  pump(): void {
    if (this.fd === undefined) {
      if (!existsSync(this.path)) return;
      this.fd = openSync(this.path, "r");
    }
    for (;;) {
      const n = readSync(this.fd, this.buf, 0, this.buf.length, this.pos);
      if (n <= 0) return;
      this.pos += n;
      this.sink?.(new Uint8Array(this.buf.subarray(0, n)));
    }
  }
  close(): void {
    if (this.fd !== undefined) closeSync(this.fd);
    this.fd = undefined;
  }
}

export function lastLines(path: string, n: number): string {
  if (!existsSync(path)) return "(no console output)";
  // SeaBIOS clears the screen with escape sequences; they only garble a log.
  const text = readFileSync(path, "latin1")
    .replace(/\x1b(\[[0-9;?]*[A-Za-z]|.)/g, "")
    .replaceAll("\r", "");
  const lines = text.split("\n");
  if (lines.at(-1) === "") lines.pop();
  return lines.length ? lines.slice(-n).join("\n") : "(no console output)";
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

interface Attempt {
  outcome: "done" | "early-death" | "refused" | "setup" | "died" | "timeout";
  exitCode?: number;
  bootSeconds: number;
  /** From the start of this process to the command starting. */
  sinceLaunch?: number;
  /** Guest uptime when the command started: the kernel's and init's share of bootSeconds. */
  guestUptime?: number;
  reason?: string;
  consoleLog: string;
  qemuLog: string;
  /** The guest's whole kernel log, read after the command (absent if it never finished). */
  dmesg?: string;
}

export interface AttemptConfig extends ShareContents {
  kernel: string;
  initrd: string;
  /** The run's directory; each attempt gets its own below it. */
  dir: string;
  memory: string;
  cpus: number;
  kvm: boolean;
  panicOnWarn: boolean;
  deadline: number;
  bootTimeoutMs: number;
  onStdout: (chunk: Uint8Array) => void;
  onStderr: (chunk: Uint8Array) => void;
  current: { proc?: Bun.Subprocess };
}

export function qemuBinaryPath(): string {
  return process.env.IOMMUFD_QEMU || qemuBinary;
}

function qemuArgs(c: AttemptConfig, share: string, consoleLog: string): string[] {
  // no_timer_check: on a busy host a TCG guest misses the IO-APIC timer check's short window and
  // panics with "timer doesn't work through Interrupt-remapped IO-APIC" (seen 1 boot in 24).
  // oops=panic: an oopsing guest kernel is broken for the rest of the run and often hangs the
  // command (seen: an oops in a close() under fault injection left bun stuck with irqs off), so
  // end the run at once and report the console instead of waiting for the timeout.
  // log_buf_len: fault-injection sweeps log many allocation failures; a small ring would lose the
  // WARNINGs the runner looks for in dmesg after the command.
  const append = [
    "console=ttyS0",
    ...iommuKernelArgs(c.iommu),
    "panic=-1",
    "oops=panic",
    "quiet",
    "no_timer_check",
    "log_buf_len=8M",
    // A WARNING's lines are below the console level of `quiet`; replaying the log at panic time
    // (when the console turns verbose) puts them in the console log the runner reports.
    ...(c.panicOnWarn ? ["panic_on_warn=1", "panic_console_replay=1"] : []),
  ];
  // For debugging the guest, e.g. IOMMUFD_VM_APPEND="loglevel=7" to see the whole boot.
  if (process.env.IOMMUFD_VM_APPEND) append.push(process.env.IOMMUFD_VM_APPEND);
  return [
    qemuBinaryPath(),
    // split irqchip is what intremap=on needs under KVM; TCG accepts and ignores it.
    "-machine",
    "q35,kernel-irqchip=split",
    // Multi-threaded TCG sometimes panics the guest at boot (code patching races): one thread.
    ...(c.kvm ? ["-accel", "kvm", "-cpu", "host"] : ["-accel", "tcg,thread=single", "-cpu", "max"]),
    "-smp",
    String(c.cpus),
    "-m",
    c.memory,
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-no-reboot",
    "-serial",
    `file:${consoleLog}`,
    ...iommuArgs(c.iommu),
    // Devices before the shares: they claim fixed slots, the shares take whatever is left.
    ...deviceArgs(c.devices),
    "-virtfs",
    "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    "-virtfs",
    `local,path=${share.replaceAll(",", ",,")},mount_tag=results,security_model=none,multidevs=remap`,
    ...(c.work
      ? ["-virtfs", `local,path=${c.work.replaceAll(",", ",,")},mount_tag=work,security_model=none,multidevs=remap`]
      : []),
    "-kernel",
    c.kernel,
    "-initrd",
    c.initrd,
    "-append",
    append.join(" "),
  ];
}

export async function attempt(c: AttemptConfig, n: number): Promise<Attempt> {
  const dir = join(c.dir, `attempt-${n}`);
  const share = join(dir, "share");
  writeShare(share, c);
  const consoleLog = join(dir, "console.log");
  const qemuLog = join(dir, "qemu.log");
  const base = { consoleLog, qemuLog };

  const started = performance.now();
  // setpriv --pdeathsig: the kernel kills QEMU when this runner dies, even by SIGKILL, which no
  // signal handler here can catch. (util-linux; without it the handlers below still cover
  // SIGINT and SIGTERM.)
  const setpriv = Bun.which("setpriv");
  const argv = qemuArgs(c, share, consoleLog);
  const proc = Bun.spawn(setpriv ? [setpriv, "--pdeathsig", "KILL", ...argv] : argv, {
    stdin: "ignore",
    stdout: "ignore",
    stderr: Bun.file(qemuLog),
  });
  c.current.proc = proc;
  let qemuExit: number | undefined;
  const exited = proc.exited.then((code) => (qemuExit = code));

  const out = new Tail(join(share, "stdout"), c.onStdout);
  const err = new Tail(join(share, "stderr"), c.onStderr);
  let bootSeconds = NaN;
  let sinceLaunch = NaN;
  let commandDone: number | undefined;
  let killedFor: "timeout" | "boot" | "poweroff" | undefined;
  try {
    while (qemuExit === undefined) {
      await Promise.race([exited, sleep(50)]);
      out.pump();
      err.pump();
      const now = performance.now();
      if (Number.isNaN(bootSeconds) && existsSync(join(share, "started"))) {
        bootSeconds = (now - started) / 1000;
        // performance.now() counts from this process's start: what a user waits after typing.
        sinceLaunch = now / 1000;
      }
      if (commandDone === undefined && existsSync(join(share, "exit-code"))) commandDone = now;
      if (qemuExit !== undefined) break;
      if (now > c.deadline) killedFor = "timeout";
      else if (Number.isNaN(bootSeconds) && now - started > c.bootTimeoutMs) killedFor = "boot";
      // The command is finished; a guest that then fails to power off must not hold the run.
      else if (commandDone !== undefined && now - commandDone > 30_000) killedFor = "poweroff";
      else continue;
      proc.kill("SIGKILL");
      await exited;
      break;
    }
    out.pump();
    err.pump();
  } finally {
    // Whatever went wrong above, no guest outlives its attempt.
    if (qemuExit === undefined) {
      proc.kill("SIGKILL");
      await exited;
    }
    out.close();
    err.close();
    c.current.proc = undefined;
  }

  const codeFile = join(share, "exit-code");
  if (existsSync(codeFile)) {
    const code = Number.parseInt(readFileSync(codeFile, "utf8").trim(), 10);
    const uptime = Number.parseFloat(readFileSync(join(share, "started"), "utf8"));
    const dmesgFile = join(share, "dmesg");
    const dmesg = existsSync(dmesgFile) ? readFileSync(dmesgFile, "utf8") : undefined;
    if (!Number.isNaN(code)) {
      return { ...base, outcome: "done", exitCode: code, bootSeconds, sinceLaunch, guestUptime: uptime, dmesg };
    }
  }
  if (killedFor === "timeout")
    return { ...base, outcome: "timeout", bootSeconds, reason: "the overall timeout ran out" };
  const fatalFile = join(share, "fatal");
  const consoleText = existsSync(consoleLog) ? readFileSync(consoleLog, "latin1") : "";
  const fatal = existsSync(fatalFile)
    ? readFileSync(fatalFile, "utf8").trim()
    : /iommufd-vm: FATAL: (.*)/.exec(consoleText)?.[1]?.trim();
  if (fatal) return { ...base, outcome: "setup", bootSeconds, reason: `guest setup failed: ${fatal}` };
  // QEMU that stops at once with an error and no console output refused its arguments (a file
  // that is not a kernel, a device it lacks): a second try would fail the same way.
  const qemuErr = existsSync(qemuLog) ? readFileSync(qemuLog, "utf8").trim() : "";
  if (Number.isNaN(bootSeconds) && killedFor === undefined && qemuExit !== 0 && consoleText.trim() === "" && qemuErr) {
    const said = qemuErr.split("\n").filter(Boolean).slice(-3).join("; ");
    return {
      ...base,
      outcome: "refused",
      bootSeconds,
      reason: `QEMU could not start the guest (status ${qemuExit}): ${said}`,
    };
  }
  const plain = consoleText.replaceAll("\r", "");
  const panic = /Kernel panic[^\n]*/.exec(plain)?.[0]?.trim();
  if (Number.isNaN(bootSeconds)) {
    const why =
      killedFor === "boot"
        ? `the command had not started after ${c.bootTimeoutMs / 1000} s`
        : panic
          ? `the guest kernel panicked before the command started (${panic})`
          : `QEMU exited with status ${qemuExit} before the command started`;
    return { ...base, outcome: "early-death", bootSeconds, reason: why };
  }
  const cause = /(BUG:|Oops:|general protection fault)[^\n]*/.exec(plain)?.[0]?.trim();
  return {
    ...base,
    outcome: "died",
    bootSeconds,
    reason: panic
      ? `the guest kernel panicked while the command ran (${cause ? `${cause}; ` : ""}${panic})`
      : `the guest stopped while the command ran (QEMU status ${qemuExit})`,
  };
}
