// What the guest boots: the kernel vm/kernel.sh builds (or a cached one) and a busybox initramfs
// whose PID 1 is vm/guest-init.sh, both cached under cacheDir().

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
import { join } from "node:path";
import { shellQuote } from "./guest-script.ts";

const kernelScript = join(import.meta.dir, "kernel.sh");
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

/** The kernel the guest would boot now, without building one: a path, or undefined. */
export async function cachedKernel(): Promise<string | undefined> {
  const { code, out } = await runTool(["bash", kernelScript, "cached"], "pipe", "ignore");
  const path = out.trim().split("\n").pop() ?? "";
  return code === 0 && path && existsSync(path) ? path : undefined;
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
    const { code } = await runTool([
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
  const { code, out } = await runTool(["bash", kernelScript, "build"]);
  const path = out.trim().split("\n").pop() ?? "";
  if (code !== 0 || !path || !existsSync(path)) {
    throw new Error(`vm/kernel.sh build failed (status ${code})${path ? `: ${path}` : ""}`);
  }
  return path;
}
