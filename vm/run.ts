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

export type GuestFailure = "timeout" | "vm" | "kernel" | "setup";

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
  if (!Bun.which(qemuBinary))
    return { ok: false, reason: `${qemuBinary} not found (Debian: apt-get install qemu-system-x86)` };
  const busybox = findBusybox();
  if (!busybox) return { ok: false, reason: "busybox not found (Debian: apt-get install busybox-static)" };
  if (!isStaticElf(busybox))
    return { ok: false, reason: `${busybox} is not statically linked (Debian: apt-get install busybox-static)` };
  if (!Bun.which("cpio")) return { ok: false, reason: "cpio not found (Debian: apt-get install cpio)" };
  if (!Bun.which("bash")) return { ok: false, reason: "bash not found (needed by vm/kernel.sh)" };
  return { ok: true };
}

// PID 1 of the guest. Everything that varies per run comes from /results/config, so the cached
// initramfs only changes when this script or busybox does. "FATAL" marks a setup failure that a
// second boot would not cure; the runner then does not retry.
const initScript = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin

say() { echo "iommufd-vm: $*"; }
fatal() {
  say "FATAL: $*"
  echo "$*" > /results/fatal 2>/dev/null
  sync
  poweroff -f
  sleep 5
  echo o > /proc/sysrq-trigger
}
p9() { mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,"$1" "$2" "$3"; }

mount -t proc proc /proc || fatal "cannot mount /proc"
mount -t sysfs sysfs /sys || fatal "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fatal "cannot mount devtmpfs"
p9 rw results /results || fatal "cannot mount the results share (9p)"
[ -f /results/config ] || fatal "no /results/config from the host"
. /results/config
# The host tree does not change during a run, so let the guest cache it: much faster bun startup.
p9 ro,cache=loose hostroot /newroot || fatal "cannot mount the host root (9p)"

if mount -t debugfs debugfs /sys/kernel/debug; then
  for d in failslab fail_page_alloc; do
    [ -d /sys/kernel/debug/$d ] || continue
    echo N > /sys/kernel/debug/$d/ignore-gfp-wait
    echo 0 > /sys/kernel/debug/$d/verbose
  done
else
  say "warning: cannot mount debugfs"
fi

echo "$HUGEPAGES" > /proc/sys/vm/nr_hugepages
got=$(cat /proc/sys/vm/nr_hugepages)
[ "$got" = "$HUGEPAGES" ] || say "warning: asked for $HUGEPAGES huge pages, got $got"

# Hand every edu device to vfio-pci, so the tests get /dev/vfio/devices/vfio*.
edus=0
for dev in /sys/bus/pci/devices/*; do
  [ "$(cat $dev/vendor)" = 0x1234 ] && [ "$(cat $dev/device)" = 0x11e8 ] || continue
  addr=\${dev##*/}
  echo vfio-pci > $dev/driver_override
  [ -e $dev/driver ] && echo $addr > $dev/driver/unbind
  echo $addr > /sys/bus/pci/drivers_probe
  edus=$((edus + 1))
done
tries=0
while [ "$(ls /dev/vfio/devices 2>/dev/null | wc -l)" -lt $edus ]; do
  tries=$((tries + 1))
  [ $tries -le 200 ] || fatal "edu bound to vfio-pci but no /dev/vfio/devices/vfio* after 20 s"
  usleep 100000
done
[ -e /dev/iommu ] || say "warning: no /dev/iommu"

r=/newroot
mount -t proc proc $r/proc || fatal "cannot mount proc in the new root"
mount -t sysfs sysfs $r/sys || fatal "cannot mount sysfs in the new root"
mount -t debugfs debugfs $r/sys/kernel/debug 2>/dev/null
mount -t devtmpfs devtmpfs $r/dev || fatal "cannot mount devtmpfs in the new root"
mkdir -p $r/dev/pts $r/dev/shm $r/dev/hugepages
mount -t devpts devpts $r/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $r/dev/shm
mount -t hugetlbfs hugetlbfs $r/dev/hugepages
# A project under the host's /tmp (a CI clone, say) would vanish under the guest's own /tmp:
# set it aside first, then put it back at the same path on top of the tmpfs.
if [ -n "$KEEP" ]; then
  mkdir -p /kept
  mount -o bind $r$KEEP /kept || fatal "cannot set aside $KEEP"
fi
mount -t tmpfs -o mode=1777 tmpfs $r/tmp || fatal "cannot mount a tmpfs on /tmp in the new root"
if [ -n "$KEEP" ]; then
  mkdir -p $r$KEEP
  mount -o bind /kept $r$KEEP || fatal "cannot bring $KEEP back under the guest's /tmp"
fi
mkdir -p $r${guestShare}
mount -o bind /results $r${guestShare} || fatal "cannot bind the results share into the new root"

ulimit -l unlimited
cat /proc/uptime > /results/started
say "starting the command"
env -i /bin/chroot $r /bin/sh ${guestShare}/cmd.sh </dev/null >/results/stdout 2>/results/stderr
rc=$?
echo $rc > /results/exit-code
say "command exited with status $rc"
sync
poweroff -f
sleep 5
echo o > /proc/sysrq-trigger
`;

function shellQuote(s: string): string {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}

async function run(argv: string[], stdout: "pipe" | "inherit" = "pipe"): Promise<{ code: number; out: string }> {
  const proc = Bun.spawn(argv, { stdin: "ignore", stdout, stderr: "inherit" });
  const out = stdout === "pipe" ? await new Response(proc.stdout as ReadableStream).text() : "";
  return { code: await proc.exited, out };
}

/** Path of a cached initramfs for the current init script and busybox, building it if needed. */
export async function initramfs(): Promise<string> {
  const busybox = findBusybox();
  if (!busybox) throw new Error("busybox not found");
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
  lines.push(`cd ${shellQuote(cwd)} || exit 125`);
  lines.push(`exec ${command.map(shellQuote).join(" ")}`);
  return `${lines.join("\n")}\n`;
}

// Copies whatever a file gains to a sink. The guest writes through 9p without caching, so bytes
// show up on the host as soon as the command writes them.
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
  outcome: "done" | "early-death" | "setup" | "died" | "timeout";
  exitCode?: number;
  bootSeconds: number;
  /** Guest uptime when the command started: the kernel's and init's share of bootSeconds. */
  guestUptime?: number;
  reason?: string;
  consoleLog: string;
  qemuLog: string;
}

interface AttemptConfig {
  kernel: string;
  initrd: string;
  dir: string;
  script: string;
  hugepages: number;
  /** A directory under /tmp to keep visible in the guest (the project), or "". */
  keepDir: string;
  memory: string;
  kvm: boolean;
  deadline: number;
  bootTimeoutMs: number;
  onStdout: (chunk: Uint8Array) => void;
  onStderr: (chunk: Uint8Array) => void;
  current: { proc?: Bun.Subprocess };
}

function qemuArgs(c: AttemptConfig, share: string, consoleLog: string): string[] {
  // no_timer_check: on a busy host a TCG guest misses the IO-APIC timer check's short window and
  // panics with "timer doesn't work through Interrupt-remapped IO-APIC" (seen 1 boot in 24).
  // oops=panic: an oopsing guest kernel is broken for the rest of the run and often hangs the
  // command (seen: an oops in a close() under fault injection left bun stuck with irqs off), so
  // end the run at once and report the console instead of waiting for the timeout.
  const append = ["console=ttyS0", "intel_iommu=on", "panic=-1", "oops=panic", "quiet", "no_timer_check"];
  // For debugging the guest, e.g. IOMMUFD_VM_APPEND="loglevel=7" to see the whole boot.
  if (process.env.IOMMUFD_VM_APPEND) append.push(process.env.IOMMUFD_VM_APPEND);
  return [
    qemuBinary,
    // split irqchip is what intremap=on needs under KVM; TCG accepts and ignores it.
    "-machine",
    "q35,kernel-irqchip=split",
    // Multi-threaded TCG sometimes panics the guest at boot (code patching races): one thread.
    ...(c.kvm ? ["-accel", "kvm", "-cpu", "host"] : ["-accel", "tcg,thread=single", "-cpu", "max"]),
    "-smp",
    "2",
    "-m",
    c.memory,
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-no-reboot",
    "-serial",
    `file:${consoleLog}`,
    "-device",
    "intel-iommu,intremap=on,caching-mode=on",
    "-device",
    "edu",
    "-virtfs",
    "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    "-virtfs",
    `local,path=${share},mount_tag=results,security_model=none,multidevs=remap`,
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
  const consoleLog = join(dir, "console.log");
  const qemuLog = join(dir, "qemu.log");
  writeFileSync(join(share, "config"), `HUGEPAGES=${c.hugepages}\nKEEP=${shellQuote(c.keepDir)}\n`);
  writeFileSync(join(share, "cmd.sh"), c.script);
  const base = { consoleLog, qemuLog };

  const started = performance.now();
  const proc = Bun.spawn(qemuArgs(c, share, consoleLog), {
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
  let commandDone: number | undefined;
  let killedFor: "timeout" | "boot" | "poweroff" | undefined;
  try {
    while (qemuExit === undefined) {
      await Promise.race([exited, sleep(50)]);
      out.pump();
      err.pump();
      const now = performance.now();
      if (Number.isNaN(bootSeconds) && existsSync(join(share, "started"))) bootSeconds = (now - started) / 1000;
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
    out.close();
    err.close();
    c.current.proc = undefined;
  }

  const codeFile = join(share, "exit-code");
  if (existsSync(codeFile)) {
    const code = Number.parseInt(readFileSync(codeFile, "utf8").trim(), 10);
    const uptime = Number.parseFloat(readFileSync(join(share, "started"), "utf8"));
    if (!Number.isNaN(code)) return { ...base, outcome: "done", exitCode: code, bootSeconds, guestUptime: uptime };
  }
  if (killedFor === "timeout")
    return { ...base, outcome: "timeout", bootSeconds, reason: "the overall timeout ran out" };
  const fatalFile = join(share, "fatal");
  const consoleText = existsSync(consoleLog) ? readFileSync(consoleLog, "latin1") : "";
  const fatal = existsSync(fatalFile)
    ? readFileSync(fatalFile, "utf8").trim()
    : /iommufd-vm: FATAL: (.*)/.exec(consoleText)?.[1]?.trim();
  if (fatal) return { ...base, outcome: "setup", bootSeconds, reason: `guest setup failed: ${fatal}` };
  if (Number.isNaN(bootSeconds)) {
    const why =
      killedFor === "boot"
        ? `the command had not started after ${c.bootTimeoutMs / 1000} s`
        : `QEMU exited with status ${qemuExit} before the command started`;
    return { ...base, outcome: "early-death", bootSeconds, reason: why };
  }
  const plain = consoleText.replaceAll("\r", "");
  const panic = /Kernel panic[^\n]*/.exec(plain)?.[0]?.trim();
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

// Oopses and warnings do not stop the command, but someone should look at them.
function kernelComplaints(consoleLog: string): string[] {
  if (!existsSync(consoleLog)) return [];
  return readFileSync(consoleLog, "latin1")
    .replaceAll("\r", "")
    .split("\n")
    .filter((l) => /\b(Oops|BUG:|WARNING:|Kernel panic|general protection fault|Call Trace:)/.test(l));
}

export async function runInGuest(opts: GuestOptions): Promise<GuestResult> {
  const t0 = performance.now();
  const log = opts.log ?? ((line: string) => process.stderr.write(`${line}\n`));
  const seconds = () => (performance.now() - t0) / 1000;
  const timeoutSeconds = opts.timeoutSeconds ?? 1800;
  const fail = (failure: GuestFailure, message: string, extra: Partial<GuestResult> = {}): GuestResult => {
    log(`[vm] error: ${message}`);
    return {
      exitCode: failure === "timeout" ? EXIT_TIMEOUT : EXIT_VM_FAILURE,
      bootSeconds: NaN,
      totalSeconds: seconds(),
      retried: false,
      failure,
      message,
      ...extra,
    };
  };

  const available = vmAvailability();
  if (!available.ok) return fail("setup", available.reason ?? "cannot run a guest");
  if (opts.command.length === 0) return fail("setup", "no command given");
  const cwd = resolve(opts.cwd ?? process.cwd());
  if (!existsSync(cwd)) return fail("setup", `no such directory: ${cwd}`);
  // The guest mounts its own tmpfs on /tmp; a directory below it is bound back in (KEEP), but /tmp
  // itself cannot be both.
  if (cwd === "/tmp")
    return fail("setup", "/tmp itself is the guest's own tmpfs; run from a directory below it or elsewhere");
  for (const k of Object.keys(opts.env ?? {})) {
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(k))
      return fail("setup", `invalid environment variable name ${JSON.stringify(k)}`);
  }
  const hugepages = opts.hugepages ?? Number(process.env.IOMMUFD_VM_HUGEPAGES ?? 256);
  if (!Number.isInteger(hugepages) || hugepages < 0) return fail("setup", `invalid huge page count ${hugepages}`);

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
    script: commandScript(opts.command, cwd, guestEnvironment(opts.env ?? {})),
    hugepages,
    keepDir: cwd.startsWith("/tmp/") ? cwd : "",
    memory: opts.memory ?? "4G",
    kvm: opts.kvm ?? process.env.IOMMUFD_VM_KVM === "1",
    deadline: t0 + timeoutSeconds * 1000,
    bootTimeoutMs: (opts.bootTimeoutSeconds ?? 180) * 1000,
    onStdout: opts.onStdout ?? ((c) => process.stdout.write(c)),
    onStderr: opts.onStderr ?? ((c) => process.stderr.write(c)),
    current,
  };

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

    if (opts.outDir) {
      const out = join(dirname(a.consoleLog), "share", "out");
      mkdirSync(opts.outDir, { recursive: true });
      if (existsSync(out)) cpSync(out, opts.outDir, { recursive: true });
    }

    if (a.outcome === "done") {
      const complaints = kernelComplaints(a.consoleLog);
      if (complaints.length) {
        log(`[vm] note: the guest kernel logged ${complaints.length} oops/warning line(s), first: ${complaints[0]}`);
        log(`[vm]       full console: ${consoleLog}`);
      }
      const total = seconds();
      const uptime =
        a.guestUptime === undefined || Number.isNaN(a.guestUptime)
          ? ""
          : ` (guest kernel+init ${a.guestUptime.toFixed(1)} s)`;
      log(
        `[vm] boot-to-command ${a.bootSeconds.toFixed(1)} s${uptime}, total ${total.toFixed(1)} s, exit status ${a.exitCode}${retried ? " (after one retry)" : ""}`,
      );
      rmSync(dir, { recursive: true, force: true });
      return {
        exitCode: a.exitCode ?? EXIT_VM_FAILURE,
        bootSeconds: a.bootSeconds,
        totalSeconds: total,
        retried,
        consoleLog,
      };
    }

    const failure: GuestFailure = a.outcome === "timeout" ? "timeout" : a.outcome === "setup" ? "setup" : "vm";
    const qemuErr = existsSync(a.qemuLog) ? readFileSync(a.qemuLog, "utf8").trim() : "";
    log(`[vm] last console lines (full log: ${consoleLog}):`);
    log(lastLines(a.consoleLog, 40));
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
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
}

function usage(): string {
  return `usage: bun vm/run.ts [options] [--] <command...>

Boots a QEMU guest with an iommufd/VFIO kernel (built by vm/kernel.sh on first use), runs the
command there as root in the current directory (the host's filesystem is visible read-only, /tmp
is the guest's own) and exits with its status. The command's output streams live; the kernel
console goes to ${join("~/.cache/bun-iommufd", "last-console.log")}.

options:
  --timeout S        overall limit in seconds (default 1800); exit ${EXIT_TIMEOUT} when it runs out
  --boot-timeout S   limit for boot and setup before a retry (default 180)
  --env K=V          pass a variable to the command (repeatable); CI, IOMMUFD_*, BUN_* pass anyway
  --memory SIZE      guest memory (default 4G)
  --hugepages N      2 MiB huge pages to reserve (default 256, or IOMMUFD_VM_HUGEPAGES)
  --kvm              use KVM instead of TCG (or IOMMUFD_VM_KVM=1); only on hosts with real KVM
  --kernel PATH      boot this bzImage instead of building one
  --cwd DIR          run the command there (default: the current directory)
  --out DIR          copy what the command wrote to $IOMMUFD_VM_OUT into DIR
  -h, --help         this text

In the guest: IOMMUFD_IN_VM=1, HOME=/tmp, /dev/iommu, /dev/vfio/devices/vfio* (an edu device
bound to vfio-pci), debugfs with fault injection, huge pages, ulimit -l unlimited.

exit status: the command's own; ${EXIT_TIMEOUT} on timeout; ${EXIT_VM_FAILURE} when the guest failed (no kernel,
emulator fault, kernel panic); 2 for bad options.`;
}

async function main(argv: string[]): Promise<number> {
  const opts: GuestOptions = { command: [], env: {} };
  const value = (i: number, name: string): string => {
    const v = argv[i];
    if (v === undefined) throw new Error(`${name} needs a value`);
    return v;
  };
  const positive = (s: string, name: string): number => {
    const n = Number(s);
    if (!Number.isFinite(n) || n <= 0) throw new Error(`${name} wants a positive number, not ${s}`);
    return n;
  };
  try {
    let i = 0;
    for (; i < argv.length; i++) {
      const a = argv[i]!;
      if (a === "--") {
        i++;
        break;
      }
      if (!a.startsWith("-")) break; // `bun run vm -- cmd` drops the "--"
      switch (a) {
        case "-h":
        case "--help":
          console.log(usage());
          return 0;
        case "--timeout":
          opts.timeoutSeconds = positive(value(++i, a), a);
          break;
        case "--boot-timeout":
          opts.bootTimeoutSeconds = positive(value(++i, a), a);
          break;
        case "--memory":
          opts.memory = value(++i, a);
          break;
        case "--hugepages": {
          const n = Number(value(++i, a));
          if (!Number.isInteger(n) || n < 0) throw new Error(`--hugepages wants a count, not ${argv[i]}`);
          opts.hugepages = n;
          break;
        }
        case "--kvm":
          opts.kvm = true;
          break;
        case "--kernel":
          opts.kernel = resolve(value(++i, a));
          break;
        case "--cwd":
          opts.cwd = resolve(value(++i, a));
          break;
        case "--out":
          opts.outDir = resolve(value(++i, a));
          break;
        case "--env": {
          const kv = value(++i, a);
          const eq = kv.indexOf("=");
          if (eq <= 0) throw new Error(`--env wants K=V, not ${kv}`);
          opts.env![kv.slice(0, eq)] = kv.slice(eq + 1);
          break;
        }
        default:
          throw new Error(`unknown option ${a}`);
      }
    }
    opts.command = argv.slice(i);
    if (opts.command.length === 0) throw new Error("no command given");
  } catch (e) {
    console.error(`vm/run.ts: ${(e as Error).message}\n\n${usage()}`);
    return 2;
  }
  const result = await runInGuest(opts);
  return result.exitCode;
}

if (import.meta.main) {
  process.exitCode = await main(process.argv.slice(2));
}
