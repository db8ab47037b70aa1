// What the guest boots: a kernel of the matrix (vm/kernel.sh fetches or builds it, or a path
// given as it is) and a busybox initramfs whose PID 1 is vm/guest-init.sh, both cached under
// cacheDir().

import { createHash } from "node:crypto";
import {
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  renameSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { homedir, tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { shellQuote } from "./guest-script.ts";

const kernelScript = join(import.meta.dir, "kernel.sh");

/**
 * The kernels of the matrix. 7.2: our build with every feature (the default). 6.12: the LTS
 * built with the same fragment, iommufd without MAP_FILE or VFIO dma-buf export. debian: the
 * machine's stock kernel as shipped (Debian 12: 6.1, no iommufd, VFIO type1 only).
 */
export const KERNEL_NAMES = ["7.2", "6.12", "debian"] as const;
export type KernelName = (typeof KERNEL_NAMES)[number];
export const DEFAULT_KERNEL: KernelName = "7.2";

export function isKernelName(text: string): text is KernelName {
  return (KERNEL_NAMES as readonly string[]).includes(text);
}
// PID 1 of the guest: a real shell script beside this file, packed into a cached initramfs.
const initScriptPath = join(import.meta.dir, "guest-init.sh");

export function cacheDir(): string {
  const env = process.env;
  if (env.IOMMUFD_CACHE_DIR) return env.IOMMUFD_CACHE_DIR;
  return join(env.XDG_CACHE_HOME || join(homedir(), ".cache"), "bun-iommufd");
}

export function findBusybox(): string | undefined {
  for (const candidate of ["/bin/busybox", "/usr/bin/busybox", Bun.which("busybox")]) {
    if (candidate && existsSync(candidate)) return candidate;
  }
  return undefined;
}

async function runTool(
  argv: string[],
  stdout: "pipe" | "inherit" = "pipe",
  stderr: "inherit" | "ignore" = "inherit",
): Promise<{ code: number; out: string }> {
  const proc = Bun.spawn(argv, { stdin: "ignore", stdout, stderr });
  const out = stdout === "pipe" ? await new Response(proc.stdout as ReadableStream).text() : "";
  return { code: await proc.exited, out };
}

/** The named kernel's bzImage if it is cached (builds nothing), else undefined. */
export async function cachedKernel(name: KernelName = DEFAULT_KERNEL): Promise<string | undefined> {
  const { code, out } = await runTool(["bash", kernelScript, "cached", name], "pipe", "ignore");
  const path = out.trim().split("\n").pop() ?? "";
  return code === 0 && path && existsSync(path) ? path : undefined;
}

/**
 * Path of a cached initramfs for the current init script and busybox, building it if needed;
 * with `modules` (a cpio archive of a stock kernel's modules) appended: the kernel unpacks
 * concatenated archives one after the other.
 */
export async function initramfs(modules?: string): Promise<string> {
  const busybox = findBusybox();
  if (!busybox) throw new Error("busybox not found");
  const initScript = readFileSync(initScriptPath);
  const digest = createHash("sha256").update(initScript).update(readFileSync(busybox));
  if (modules) digest.update(readFileSync(modules));
  const hash = digest.digest("hex").slice(0, 16);
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
    const { code } = await runTool([
      "sh",
      "-c",
      `cd ${shellQuote(stage)} && find . | cpio -o -H newc -R 0:0 --quiet > ${shellQuote(tmp)}${modules ? ` && cat ${shellQuote(modules)} >> ${shellQuote(tmp)}` : ""}`,
    ]);
    if (code !== 0) throw new Error(`cpio failed with status ${code}`);
    renameSync(tmp, image); // atomic, so parallel runs never boot a half-written image
    return image;
  } finally {
    rmSync(stage, { recursive: true, force: true });
  }
}

/** The named kernel's bzImage from vm/kernel.sh, which fetches or builds it on first use. */
export async function kernelImage(name: KernelName = DEFAULT_KERNEL): Promise<string> {
  const { code, out } = await runTool(["bash", kernelScript, "build", name]);
  const path = out.trim().split("\n").pop() ?? "";
  if (code !== 0 || !path || !existsSync(path)) {
    throw new Error(`vm/kernel.sh build ${name} failed (status ${code})${path ? `: ${path}` : ""}`);
  }
  return path;
}

export interface GuestKernel {
  /** The bzImage QEMU boots. */
  image: string;
  /** A cpio archive of modules the guest's init loads (a stock kernel's virtio, 9p, VFIO). */
  modules?: string;
  /** Put before `uname -r` in IOMMUFD_VM_KERNEL ("debian" gives debian-6.1.0-57-amd64), or "". */
  prefix: string;
}

/** What the guest boots for `choice`: a kernel name, a bzImage path, or undefined for the default. */
export async function guestKernel(choice: string | undefined): Promise<GuestKernel> {
  const named = choice === undefined || isKernelName(choice);
  const image = named ? await kernelImage(choice ?? DEFAULT_KERNEL) : choice;
  if (!named && !existsSync(image)) throw new Error(`no such kernel: ${image}`);
  // vm/kernel.sh keeps a stock kernel's modules beside its image; a path to that image works too.
  const modules = join(dirname(image), "modules.cpio");
  return { image, modules: existsSync(modules) ? modules : undefined, prefix: choice === "debian" ? "debian" : "" };
}
