// Running `bun-iommufd vm` as a user would, from the host, and checking it left nothing behind.
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
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
