/**
 * The C side of `bun bench`: builds bench/baseline/*.c into one program (cbench) on the host,
 * where the tree is writable and the compiler native, and talks to one cbench process per case.
 *
 * A build is reused only while its stamp matches: the stamp holds a hash of the compile command,
 * the compiler's version and every file the compiler read (sources and kernel headers, from its
 * own dependency list). Anything else rebuilds; no compiler is an error, never a stale binary.
 */
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { basename, join, relative } from "node:path";
import { uapiIncludeDir } from "../test/support/headers.ts";
import type { CCounterpart } from "./suite.ts";

const here = import.meta.dir;
const defaultSourceDir = join(here, "baseline");
const defaultBuildDir = join(defaultSourceDir, "build");
/** Where `bun bench` builds the C side (on the host; the guest runs it from there). */
export const binaryPath = join(defaultBuildDir, "cbench");

export interface Build {
  binary: string;
  /** "reused" or "built", and the command without host paths. */
  how: "built" | "reused";
  command: string[];
  compiler: string;
  /** The kernel UAPI headers it was compiled against (their directory's version name). */
  headers: string;
}

export class BaselineError extends Error {}

interface Stamp {
  command: string[];
  compiler: string;
  files: Record<string, string>;
}

function sha256(data: string | Uint8Array): string {
  return createHash("sha256").update(data).digest("hex");
}

function hashFiles(files: string[]): Record<string, string> | undefined {
  const out: Record<string, string> = {};
  for (const f of files) {
    if (!existsSync(f)) return undefined;
    out[f] = sha256(readFileSync(f));
  }
  return out;
}

/** Files listed in a make-style dependency file written by cc -MD. */
function depsOf(depFile: string): string[] {
  const text = readFileSync(depFile, "utf8").replace(/\\\n/g, " ");
  const files = new Set<string>();
  for (const line of text.split("\n")) {
    const colon = line.indexOf(": ");
    if (colon < 0) continue;
    for (const f of line.slice(colon + 2).split(/\s+/)) if (f) files.add(f);
  }
  return [...files].sort();
}

/** The path-free form of a command or a path, for results files. */
export function withoutHostPaths(s: string, includeDir: string): string {
  return s.replace(includeDir, `<${headersName(includeDir)}>`).replace(`${here}/`, "bench/");
}

function headersName(includeDir: string): string {
  // .../headers/linux-libc-dev-7.2.13-1/usr/include -> linux-libc-dev-7.2.13-1
  return basename(join(includeDir, "..", ".."));
}

/**
 * The cbench binary, rebuilt when a source, a header or the compiler changed. Throws
 * BaselineError when it cannot be built (no cc, no headers, a compile error).
 */
export function buildBaseline(where: { sourceDir?: string; buildDir?: string; path?: string } = {}): Build {
  const sourceDir = where.sourceDir ?? defaultSourceDir;
  const buildDir = where.buildDir ?? defaultBuildDir;
  const binaryPath = join(buildDir, "cbench");
  const stampPath = join(buildDir, "cbench.stamp.json");
  const cc = Bun.which("cc", where.path !== undefined ? { PATH: where.path } : undefined);
  if (!cc)
    throw new BaselineError("no C compiler: `cc` is not in PATH (install build-essential); the C side cannot be built");
  let include: string;
  try {
    include = uapiIncludeDir();
  } catch (error) {
    throw new BaselineError(`no kernel UAPI headers for the C side: ${(error as Error).message.split("\n")[0]}`);
  }
  const version = Bun.spawnSync([cc, "--version"], { stdout: "pipe" }).stdout.toString().split("\n")[0] ?? "cc";
  const sources = readdirSync(sourceDir)
    .filter((n) => n.endsWith(".c"))
    .sort()
    .map((n) => join(sourceDir, n));
  mkdirSync(buildDir, { recursive: true });
  const tmp = `${binaryPath}.${process.pid}`;
  const command = [cc, "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", `-I${include}`, "-o", tmp, ...sources];
  const stampCommand = command.map((a) => (a === tmp ? "cbench" : a === cc ? "cc" : a));

  const info = {
    command: stampCommand.map((a) => withoutHostPaths(a, include)),
    compiler: version,
    headers: headersName(include),
  };
  if (existsSync(binaryPath) && existsSync(stampPath)) {
    try {
      const stamp = JSON.parse(readFileSync(stampPath, "utf8")) as Stamp;
      const now = hashFiles(Object.keys(stamp.files));
      const sameSources = sources.every((s) => s in stamp.files);
      if (
        sameSources &&
        now &&
        JSON.stringify(now) === JSON.stringify(stamp.files) &&
        JSON.stringify(stamp.command) === JSON.stringify(stampCommand) &&
        stamp.compiler === version
      ) {
        return { binary: binaryPath, how: "reused", ...info };
      }
    } catch {
      // unreadable stamp: rebuild
    }
  }

  rmSync(stampPath, { force: true });
  const depFile = join(buildDir, "cbench.d");
  const files = new Set<string>();
  for (const source of sources) {
    // Dependencies per source (-MD with several sources writes one .d each, named after -o).
    const dep = Bun.spawnSync([cc, "-MM", "-MF", depFile, `-I${include}`, "-std=gnu11", source], { stderr: "pipe" });
    if (dep.exitCode !== 0)
      throw new BaselineError(`cc -MM ${relative(here, source)} failed:\n${dep.stderr.toString()}`);
    for (const f of depsOf(depFile)) files.add(f.startsWith("/") ? f : join(process.cwd(), f));
  }
  const compiled = Bun.spawnSync(command, { stdout: "pipe", stderr: "pipe" });
  if (compiled.exitCode !== 0) {
    rmSync(tmp, { force: true });
    throw new BaselineError(`the C side does not compile:\n${compiled.stderr.toString()}`);
  }
  renameSync(tmp, binaryPath);
  const hashed = hashFiles([...files]);
  if (hashed)
    writeFileSync(
      stampPath,
      `${JSON.stringify({ command: stampCommand, compiler: version, files: hashed } satisfies Stamp, null, 2)}\n`,
    );
  return { binary: binaryPath, how: "built", ...info };
}

/** One side's figures over a round: per-operation times in ns. */
export interface Sample {
  p50: number;
  avg: number;
  min: number;
  p25: number;
  p75: number;
  p99: number;
  max: number;
  /** Timed samples, and the operations they covered. */
  samples: number;
  ticks: number;
}

interface Reply {
  ok: boolean;
  error?: string;
  ready?: boolean;
  warmupOps?: number;
  times?: number[];
  [member: string]: unknown;
}

/**
 * One cbench process for one case, holding the case's descriptors (as fds 3, 4, ...) for as long
 * as the case runs; commands go in on stdin, one JSON line comes back per command.
 */
export class CProcess {
  readonly #proc: Bun.Subprocess<"pipe", "pipe", "pipe">;
  readonly #lines: AsyncGenerator<string>;
  readonly #what: string;

  private constructor(proc: Bun.Subprocess<"pipe", "pipe", "pipe">, what: string) {
    this.#proc = proc;
    this.#what = what;
    this.#lines = lines(proc.stdout);
  }

  static async start(binary: string, counterpart: CCounterpart): Promise<CProcess> {
    const proc = Bun.spawn([binary, counterpart.op, ...counterpart.args.map(String)], {
      stdio: ["pipe", "pipe", "pipe", ...counterpart.fds],
    }) as unknown as Bun.Subprocess<"pipe", "pipe", "pipe">;
    const c = new CProcess(proc, `cbench ${counterpart.op}`);
    const ready = await c.#reply();
    if (!ready.ready) throw new Error(`${c.#what}: no ready line`);
    return c;
  }

  async #reply(): Promise<Reply> {
    const next = await this.#lines.next();
    if (next.done) {
      const code = await this.#proc.exited;
      const stderr = (await new Response(this.#proc.stderr).text()).trim();
      throw new Error(`${this.#what} exited (status ${code})${stderr ? `: ${stderr}` : ""}`);
    }
    const reply = JSON.parse(next.value) as Reply;
    if (!reply.ok) throw new Error(`${this.#what}: ${reply.error}`);
    return reply;
  }

  async #command(line: string): Promise<Reply> {
    this.#proc.stdin.write(`${line}\n`);
    await this.#proc.stdin.flush();
    return this.#reply();
  }

  /** Runs the op until `ops` runs and `ms` are done, or `maxMs` passed: how many ran. */
  async warmUp(ops: number, ms: number, maxMs: number): Promise<number> {
    return (await this.#command(`warmup ${ops} ${ms} ${maxMs}`)).warmupOps ?? 0;
  }

  /** One slice: an untimed run of `opsPerSample` ops, then `samples` timed ones; ns per op each. */
  async slice(samples: number, opsPerSample: number): Promise<number[]> {
    const r = await this.#command(`slice ${samples} ${opsPerSample}`);
    if (!r.times || r.times.length !== samples) throw new Error(`${this.#what}: slice gave no times`);
    return r.times;
  }

  /** What the op recorded itself since the last report (its own members, e.g. latencies). */
  async report(): Promise<Record<string, unknown>> {
    return this.#command("report") as Promise<Record<string, unknown>>;
  }

  async close(): Promise<void> {
    try {
      await this.#proc.stdin.end();
    } catch {
      // already gone
    }
    const code = await this.#proc.exited;
    if (code !== 0) throw new Error(`${this.#what} exited with status ${code}`);
  }

  kill(): void {
    this.#proc.kill();
  }
}

async function* lines(stream: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  const decoder = new TextDecoder();
  let pending = "";
  for await (const chunk of stream) {
    pending += decoder.decode(chunk, { stream: true });
    for (let nl = pending.indexOf("\n"); nl >= 0; nl = pending.indexOf("\n")) {
      const line = pending.slice(0, nl).trim();
      pending = pending.slice(nl + 1);
      if (line) yield line;
    }
  }
}

export function formatNs(ns: number): string {
  if (!Number.isFinite(ns)) return "n/a";
  if (ns < 1e3) return `${ns.toFixed(0)} ns`;
  if (ns < 1e6) return `${(ns / 1e3).toFixed(2)} µs`;
  if (ns < 1e9) return `${(ns / 1e6).toFixed(2)} ms`;
  return `${(ns / 1e9).toFixed(2)} s`;
}
