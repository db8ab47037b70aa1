// What the host needs to run the guest: a quick yes/no for the test command and the bench
// (vmAvailability), and the full list with the apt-get line for `bun-iommufd vm --check`.

import { existsSync, readFileSync } from "node:fs";
import { cacheDir, cachedKernel, DEFAULT_KERNEL, findBusybox, KERNEL_NAMES } from "./images.ts";
import { qemuBinaryPath } from "./qemu.ts";

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
  // The rest of the matrix is optional: say what --kernel NAME would cost.
  for (const name of KERNEL_NAMES) {
    if (name === DEFAULT_KERNEL || !Bun.which("bash")) continue;
    const cached = await cachedKernel(name).catch(() => undefined);
    const first = name === "debian" ? "downloads it (about 30 s)" : "builds it (10-15 min)";
    lines.push(
      cached ? `ok       kernel ${name}: ${cached}` : `info     kernel ${name}: not cached; --kernel ${name} ${first}`,
    );
  }
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
