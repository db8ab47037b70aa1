/**
 * Reads an `strace -f -o FILE` log: which system calls were made between two marker calls (an
 * access(2) or similar whose argument contains a unique marker string).
 */
import { expect } from "bun:test";
import { readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";

/** Calls between two markers: over every thread, and on the thread that wrote the markers. */
export interface SyscallWindow {
  all: Record<string, number>;
  /** The thread that made the marker calls (the JS thread that ran the measured code). */
  markerThread: Record<string, number>;
}

/**
 * Syscall name -> how many calls between the first line naming `begin` and the first naming `end`
 * after it, over every thread and on the marker's own thread.
 */
export function syscallsBetween(log: string, begin: string, end: string): SyscallWindow {
  const lines = log.split("\n");
  const from = lines.findIndex((l) => l.includes(begin));
  if (from < 0) throw new Error(`strace log: no line with the marker ${begin}`);
  const to = lines.findIndex((l, i) => i > from && l.includes(end));
  if (to < 0) throw new Error(`strace log: no line with the marker ${end} after ${begin}`);
  const thread = /^(?:\[pid\s+)?(\d+)/.exec(lines[from]!)?.[1];
  const window: SyscallWindow = { all: {}, markerThread: {} };
  for (const line of lines.slice(from + 1, to)) {
    // "PID name(args) = ret" or "PID name(args <unfinished ...>"; "<... name resumed>" is the same
    // call again, and "--- SIG..." / "+++ exited" are not calls.
    const m = /^(?:\[pid\s+)?(\d+)\]?\s+([a-z_][a-z0-9_]*)\(/.exec(line);
    if (!m) continue;
    const name = m[2]!;
    window.all[name] = (window.all[name] ?? 0) + 1;
    if (m[1] === thread) window.markerThread[name] = (window.markerThread[name] ?? 0) + 1;
  }
  return window;
}

/** The per-syscall call counts of strace's -c / -C summary table. */
export function straceSummary(log: string): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const m of log.matchAll(/^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?([a-z_][a-z0-9_]*)\s*$/gm)) {
    counts[m[2]!] = Number(m[1]);
  }
  return counts;
}

/**
 * Run `fixture` (a Bun script) under `strace -f` (`-C`: with the summary table too) and return the
 * last line it printed, parsed as JSON, and the log's text. The fixture must exit 0: its stderr is
 * in the failure otherwise. The log file is gone afterwards, whatever happened.
 */
export function traceFixture(
  fixture: string,
  args: string[],
  options: { summary?: boolean } = {},
): { report: Record<string, number>; log: string } {
  const path = join(tmpdir(), `${basename(fixture)}-${process.pid}-${Date.now()}.strace`);
  try {
    const flags = ["-f", ...(options.summary ? ["-C"] : []), "-qq", "-o", path];
    const run = Bun.spawnSync(["strace", ...flags, process.execPath, fixture, ...args], {
      stdout: "pipe",
      stderr: "pipe",
    });
    expect({ exitCode: run.exitCode, stderr: run.exitCode ? run.stderr.toString() : "" }).toEqual({
      exitCode: 0,
      stderr: "",
    });
    return { report: JSON.parse(run.stdout.toString().trim().split("\n").pop()!), log: readFileSync(path, "utf8") };
  } finally {
    rmSync(path, { force: true });
  }
}
