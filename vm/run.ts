// Runs a command inside a throwaway QEMU guest whose kernel has iommufd, its selftest hooks and
// VFIO, so the kernel tests and the benchmark can run on machines without /dev/iommu.
//
//   bun vm/run.ts [options] -- <command...>      (bun run vm -- <command...> works too)
//
// The guest sees the host's whole filesystem read-only over 9p and runs the command in the
// project directory as root; its stdout and stderr stream back live through a second, writable
// 9p share, apart from the kernel console (kept in a log file). See usage() for the options.

import { createHash } from "node:crypto";
import {
  closeSync,
  copyFileSync,
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  readSync,
  renameSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { homedir, tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import {
  type DeviceSpec,
  DEVICE_LISTS,
  deviceArgs,
  guestDeviceTable,
  type IommuModel,
  iommuArgs,
  iommuKernelArgs,
  type PlacedDevice,
  placeDevices,
  prepareDisks,
} from "./devices.ts";
import { commandWindow, kernelWarnings } from "./kernel-log.ts";

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
  /** A bzImage to boot instead of the one vm/kernel.sh builds. */
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

const kernelScript = join(import.meta.dir, "kernel.sh");
// Inside the guest the results share is mounted here, on the guest's own tmpfs /tmp.
const guestShare = "/tmp/.iommufd-vm";
const qemuBinary = "qemu-system-x86_64";

export function cacheDir(): string {
  const env = process.env;
  if (env.IOMMUFD_CACHE_DIR) return env.IOMMUFD_CACHE_DIR;
  return join(env.XDG_CACHE_HOME || join(homedir(), ".cache"), "bun-iommufd");
}

function findBusybox(): string | undefined {
  for (const candidate of ["/bin/busybox", "/usr/bin/busybox", Bun.which("busybox")]) {
    if (candidate && existsSync(candidate)) return candidate;
  }
  return undefined;
}

// A dynamically linked busybox would find no libc in the initramfs and the guest would die at
// once with nothing on the console, so check for an ELF interpreter up front.
function isStaticElf(path: string): boolean {
  const head = readFileSync(path).subarray(0, 64 * 1024);
  if (head.length < 64 || head.readUInt32BE(0) !== 0x7f454c46 || head[4] !== 2) return false;
  const phoff = Number(head.readBigUInt64LE(0x20));
  const phentsize = head.readUInt16LE(0x36);
  const phnum = head.readUInt16LE(0x38);
  for (let i = 0; i < phnum; i++) {
    const at = phoff + i * phentsize;
    if (at + 4 > head.length) break;
    if (head.readUInt32LE(at) === 3 /* PT_INTERP */) return false;
  }
  return true;
}

/** Cheap check that the host can run a guest at all (not whether the kernel is built). */
export function vmAvailability(): { ok: boolean; reason?: string } {
  if (process.platform !== "linux" || process.arch !== "x64") {
    return {
      ok: false,
      reason: `the test guest needs an x86-64 Linux host (this is ${process.platform}/${process.arch})`,
    };
  }
  if (!Bun.which(qemuBinaryPath()))
    return { ok: false, reason: `${qemuBinaryPath()} not found (Debian: apt-get install qemu-system-x86)` };
  const busybox = findBusybox();
  if (!busybox) return { ok: false, reason: "busybox not found (Debian: apt-get install busybox-static)" };
  if (!isStaticElf(busybox))
    return { ok: false, reason: `${busybox} is not statically linked (Debian: apt-get install busybox-static)` };
  if (!Bun.which("cpio")) return { ok: false, reason: "cpio not found (Debian: apt-get install cpio)" };
  if (!Bun.which("bash")) return { ok: false, reason: "bash not found (needed by vm/kernel.sh)" };
  return { ok: true };
}

interface HostRequirement {
  what: string;
  /** Path or version found, or undefined when missing. */
  found?: string;
  /** Debian package that provides it. */
  debian?: string;
  /** Only needed to build the kernel (not when one is cached or given). */
  forBuild?: boolean;
  note?: string;
}

const BUILD_TOOLS: [string, string][] = [
  ["make", "make"],
  ["gcc", "gcc"],
  ["flex", "flex"],
  ["bison", "bison"],
  ["bc", "bc"],
  ["xz", "xz-utils"],
  ["dpkg-deb", "dpkg"],
  ["apt-get", "apt"],
];
const BUILD_HEADERS: [string, string][] = [
  ["/usr/include/libelf.h", "libelf-dev"],
  ["/usr/include/openssl/ssl.h", "libssl-dev"],
  ["/usr/share/keyrings/debian-archive-keyring.gpg", "debian-archive-keyring"],
];

/** The kernel the guest would boot now, without building one: a path, or undefined. */
export async function cachedKernel(): Promise<string | undefined> {
  const { code, out } = await run(["bash", kernelScript, "cached"], "pipe", "ignore");
  const path = out.trim().split("\n").pop() ?? "";
  return code === 0 && path && existsSync(path) ? path : undefined;
}

/** What this host has and lacks to run the guest, and the one command that installs the rest. */
export async function hostCheck(): Promise<{ ok: boolean; text: string; missing: string[] }> {
  const reqs: HostRequirement[] = [];
  const platformOk = process.platform === "linux" && process.arch === "x64";
  reqs.push({ what: "x86-64 Linux host", found: platformOk ? `${process.platform}/${process.arch}` : undefined });
  reqs.push({ what: qemuBinaryPath(), found: Bun.which(qemuBinaryPath()) ?? undefined, debian: "qemu-system-x86" });
  const busybox = findBusybox();
  reqs.push({
    what: "busybox (static)",
    found: busybox && isStaticElf(busybox) ? busybox : undefined,
    debian: "busybox-static",
    note: busybox && !isStaticElf(busybox) ? `${busybox} is dynamically linked` : undefined,
  });
  for (const [tool, pkg] of [
    ["cpio", "cpio"],
    ["bash", "bash"],
  ] as const) {
    reqs.push({ what: tool, found: Bun.which(tool) ?? undefined, debian: pkg });
  }
  let kernel: string | undefined;
  if (Bun.which("bash")) {
    try {
      kernel = await cachedKernel();
    } catch {
      kernel = undefined;
    }
  }
  for (const [tool, pkg] of BUILD_TOOLS)
    reqs.push({ what: tool, found: Bun.which(tool) ?? undefined, debian: pkg, forBuild: true });
  for (const [file, pkg] of BUILD_HEADERS)
    reqs.push({ what: file, found: existsSync(file) ? file : undefined, debian: pkg, forBuild: true });

  const lines: string[] = [];
  const missing: string[] = [];
  for (const r of reqs) {
    const needed = !r.forBuild || !kernel;
    if (r.found) lines.push(`ok       ${r.what}: ${r.found}`);
    else if (!needed) lines.push(`(unused) ${r.what}: missing, only needed to build a kernel`);
    else {
      lines.push(`MISSING  ${r.what}${r.debian ? ` (Debian package ${r.debian})` : ""}${r.note ? `: ${r.note}` : ""}`);
      if (r.debian) missing.push(r.debian);
    }
  }
  lines.push(
    kernel
      ? `ok       kernel: ${kernel}`
      : `build    kernel: none cached in ${cacheDir()}/kernels; the first run builds one (10-15 min), or set IOMMUFD_TEST_KERNEL`,
  );
  const kvm = existsSync("/dev/kvm");
  lines.push(
    `info     /dev/kvm ${kvm ? "exists (--kvm may work on a real KVM host; TCG is the default)" : "absent: the guest runs under TCG emulation"}`,
  );
  const unique = [...new Set(missing)];
  const ok = platformOk && unique.length === 0;
  if (unique.length) {
    const sudo = process.getuid?.() === 0 ? "" : "sudo ";
    lines.push("", `install what is missing with:\n  ${sudo}apt-get install -y ${unique.join(" ")}`);
  } else if (ok) {
    lines.push("", "this host can run the test guest");
  }
  return { ok, text: lines.join("\n"), missing: unique };
}

// PID 1 of the guest: a real shell script beside this file, packed into a cached initramfs.
const initScriptPath = join(import.meta.dir, "guest-init.sh");

function shellQuote(s: string): string {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}

async function run(
  argv: string[],
  stdout: "pipe" | "inherit" = "pipe",
  stderr: "inherit" | "ignore" = "inherit",
): Promise<{ code: number; out: string }> {
  const proc = Bun.spawn(argv, { stdin: "ignore", stdout, stderr });
  const out = stdout === "pipe" ? await new Response(proc.stdout as ReadableStream).text() : "";
  return { code: await proc.exited, out };
}

/** Path of a cached initramfs for the current init script and busybox, building it if needed. */
export async function initramfs(): Promise<string> {
  const busybox = findBusybox();
  if (!busybox) throw new Error("busybox not found");
  const initScript = readFileSync(initScriptPath);
  const hash = createHash("sha256").update(initScript).update(readFileSync(busybox)).digest("hex").slice(0, 16);
  const dir = join(cacheDir(), "initramfs");
  const image = join(dir, `${hash}.cpio`);
  if (existsSync(image)) return image;

  mkdirSync(dir, { recursive: true });
  const stage = mkdtempSync(join(tmpdir(), "iommufd-initramfs-"));
  try {
    for (const d of ["bin", "dev", "proc", "sys", "results", "newroot"]) mkdirSync(join(stage, d));
    copyFileSync(busybox, join(stage, "bin/busybox"));
    writeFileSync(join(stage, "init"), initScript, { mode: 0o755 });
    const tmp = `${image}.${process.pid}.tmp`;
    const { code } = await run([
      "sh",
      "-c",
      `cd ${shellQuote(stage)} && find . | cpio -o -H newc -R 0:0 --quiet > ${shellQuote(tmp)}`,
    ]);
    if (code !== 0) throw new Error(`cpio failed with status ${code}`);
    renameSync(tmp, image); // atomic, so parallel runs never boot a half-written image
    return image;
  } finally {
    rmSync(stage, { recursive: true, force: true });
  }
}

/** The bzImage from vm/kernel.sh (which builds it on first use; its progress goes to stderr). */
export async function kernelImage(): Promise<string> {
  const { code, out } = await run(["bash", kernelScript, "build"]);
  const path = out.trim().split("\n").pop() ?? "";
  if (code !== 0 || !path || !existsSync(path)) {
    throw new Error(`vm/kernel.sh build failed (status ${code})${path ? `: ${path}` : ""}`);
  }
  return path;
}

// Variables that make sense inside the guest; anything else from the host (SSH agents, display,
// the host's TMPDIR) would only mislead the command.
function guestEnvironment(extra: Record<string, string>): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (v === undefined) continue;
    if (
      /^(IOMMUFD_|BUN_)/.test(k) ||
      ["CI", "TERM", "NO_COLOR", "FORCE_COLOR", "LANG", "LC_ALL", "TZ", "GITHUB_ACTIONS"].includes(k)
    ) {
      env[k] = v;
    }
  }
  Object.assign(env, extra);
  Object.assign(env, {
    HOME: "/tmp",
    TMPDIR: "/tmp",
    USER: "root",
    PATH: process.env.PATH || "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
    IOMMUFD_IN_VM: "1",
    IOMMUFD_VM_OUT: `${guestShare}/out`,
  });
  return env;
}

function commandScript(command: string[], cwd: string, env: Record<string, string>): string {
  const lines = ["# Written by vm/run.ts; run by the guest's /bin/sh with an empty environment."];
  for (const [k, v] of Object.entries(env)) lines.push(`export ${k}=${shellQuote(v)}`);
  // The device variables, written by the guest's init once it has bound the devices.
  lines.push(`for f in ${guestShare}/env/*; do [ -f "$f" ] && export "\${f##*/}=$(cat "$f")"; done`);
  lines.push(`cd ${shellQuote(cwd)} || exit 125`);
  // The host checked the command before booting; this catches what only the guest lacks.
  lines.push(`command -v ${shellQuote(command[0]!)} >/dev/null 2>&1 || {`);
  lines.push(`  echo "bun-iommufd vm: command not found in the guest: "${shellQuote(command[0]!)} >&2; exit 127; }`);
  lines.push(`exec ${command.map(shellQuote).join(" ")}`);
  return `${lines.join("\n")}\n`;
}

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

function lastLines(path: string, n: number): string {
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

interface AttemptConfig {
  kernel: string;
  initrd: string;
  dir: string;
  script: string;
  hugepages: number;
  /** Host directory shared writable at the same path in the guest, or "". */
  work: string;
  memory: string;
  cpus: number;
  kvm: boolean;
  panicOnWarn: boolean;
  iommu: IommuModel;
  devices: PlacedDevice[];
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

async function attempt(c: AttemptConfig, n: number): Promise<Attempt> {
  const dir = join(c.dir, `attempt-${n}`);
  const share = join(dir, "share");
  mkdirSync(join(share, "out"), { recursive: true });
  mkdirSync(join(share, "env"), { recursive: true });
  // Every list variable is set in the guest, empty when no device is in it.
  for (const list of DEVICE_LISTS) writeFileSync(join(share, "env", `IOMMUFD_VM_${list}`), "");
  const consoleLog = join(dir, "console.log");
  const qemuLog = join(dir, "qemu.log");
  writeFileSync(
    join(share, "config"),
    `HUGEPAGES=${c.hugepages}\nSHARE=${shellQuote(guestShare)}\nWORK=${shellQuote(c.work)}\n`,
  );
  writeFileSync(join(share, "devices"), guestDeviceTable(c.devices, c.iommu));
  writeFileSync(join(share, "cmd.sh"), c.script);
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

/** The host directory the guest gets writable at the same path, for a command run in `cwd`. */
export function workShare(cwd: string): string {
  // The guest's /tmp is its own tmpfs: share the whole top directory below /tmp, so a project's
  // node_modules one level up from cwd stays visible.
  if (cwd.startsWith("/tmp/")) return `/tmp/${cwd.slice(5).split("/")[0]}`;
  return cwd;
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

  let kernel: string;
  try {
    kernel = opts.kernel ?? (await kernelImage());
  } catch (e) {
    return fail("kernel", (e as Error).message);
  }
  const initrd = await initramfs();

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
    kernel,
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

if (import.meta.main) {
  const { main } = await import("./cli.ts");
  process.exitCode = await main(process.argv.slice(2));
}
