// Running `bun-iommufd vm` as a user would, from the host, and checking it left nothing behind.
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { vmAvailability } from "../../vm/host.ts";

export const root = resolve(import.meta.dir, "../..");
export const bin = join(root, "bin", "bun-iommufd.ts");

const available = vmAvailability();
/** Why the guest cannot run here, or undefined when it can. */
export const noGuest: string | undefined = available.ok ? undefined : available.reason;

const markers: string[] = [];
/** Removes the private temp dirs of every run so far (call from afterAll). */
export function removeMarkers(): void {
  for (const dir of markers.splice(0)) rmSync(dir, { recursive: true, force: true });
}

export interface CliRun {
  code: number;
  stdout: string;
  stderr: string;
  /** The private temp dir the run used (its TMPDIR): every QEMU of the run has it in its arguments. */
  marker: string;
}

/** Runs argv (e.g. [bun, bin, "vm", ...]) with its own TMPDIR, so its QEMU processes can be found. */
export async function runCli(
  argv: string[],
  options: { cwd?: string; env?: Record<string, string | undefined> } = {},
): Promise<CliRun> {
  const marker = mkdtempSync(join(tmpdir(), "vm-cli-test-"));
  markers.push(marker);
  const env: Record<string, string | undefined> = { ...process.env, TMPDIR: marker, ...options.env };
  const proc = Bun.spawn(argv, { cwd: options.cwd ?? root, env, stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  const [stdout, stderr] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
  return { code: await proc.exited, stdout, stderr, marker };
}

export interface PackedPackage {
  /** The .tgz, alone in a temp dir of its own. */
  tarball: string;
  /** `bun pm pack`'s output: every file packed, then "Total files", "Packed size" and the rest. */
  output: string;
}

/** `bun pm pack` of this checkout (its `prepack` builds dist/) into a fresh temp dir. */
export function packPackage(): PackedPackage {
  const dir = mkdtempSync(join(tmpdir(), "bun-iommufd-pack-"));
  const pack = Bun.spawnSync([process.execPath, "pm", "pack", "--destination", dir], { cwd: root });
  const output = pack.stdout.toString() + pack.stderr.toString();
  if (pack.exitCode !== 0) throw new Error(`bun pm pack failed (exit ${pack.exitCode}):\n${output}`);
  const name = readdirSync(dir).find((f) => f.endsWith(".tgz"));
  if (!name) throw new Error(`bun pm pack wrote no .tgz into ${dir}:\n${output}`);
  return { tarball: join(dir, name), output };
}

/**
 * A new ESM project in a fresh dir under `parent` whose one dependency is the tarball, added by
 * `bun add` (no registry: the package has no dependencies). Returns the project's dir.
 */
export function consumerProject(tarball: string, parent = tmpdir()): string {
  const project = mkdtempSync(join(parent, "bun-iommufd-consumer-"));
  writeFileSync(join(project, "package.json"), JSON.stringify({ name: "consumer", private: true, type: "module" }));
  const add = Bun.spawnSync([process.execPath, "add", tarball], { cwd: project, stdout: "pipe", stderr: "pipe" });
  if (add.exitCode !== 0) throw new Error(`bun add ${tarball} failed: ${add.stderr.toString()}`);
  return project;
}

/** Command lines of live processes that mention `marker` (a stray QEMU would). */
export function processesMentioning(marker: string): string[] {
  const found: string[] = [];
  for (const pid of readdirSync("/proc")) {
    if (!/^\d+$/.test(pid) || Number(pid) === process.pid) continue;
    try {
      const cmdline = readFileSync(`/proc/${pid}/cmdline`, "utf8").replaceAll("\0", " ");
      if (cmdline.includes(marker)) found.push(`${pid}: ${cmdline}`);
    } catch {
      // The process ended while we looked.
    }
  }
  return found;
}
