/**
 * Builds and runs the C baseline (bench/baseline/map_bench.c). It is built on the host, where
 * the tree is writable and the compiler native, before any guest boots; a guest only runs it.
 */
import { existsSync, mkdirSync, mkdtempSync, readdirSync, renameSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { cacheRoot, selftestHeaderDir, uapiIncludeDir } from "../test/support/headers.ts";
import type { CaseSpec, Mode } from "./cases.ts";

const here = import.meta.dir;
const source = join(here, "baseline", "map_bench.c");
export const hostBinary = join(here, "baseline", "build", "map_bench");

export interface Build {
  binary?: string;
  /** Why there is no binary, or what it lacks. */
  note?: string;
  command?: string[];
}

/**
 * iommufd_test.h is not exported UAPI. vm/kernel.sh keeps a copy beside the kernel it builds; a
 * kernel cached without one still has its source package in the download cache, so take the
 * header from there (once: 15 s of xz).
 */
function selftestHeader(buildDir: string): string | undefined {
  const kept = selftestHeaderDir();
  if (kept) return kept;
  const dir = join(buildDir, "include");
  if (existsSync(join(dir, "iommufd_test.h"))) return dir;
  const downloads = join(cacheRoot(), "downloads");
  if (!existsSync(downloads)) return undefined;
  const deb = readdirSync(downloads)
    .filter((n) => /^linux-source-.*\.deb$/.test(n))
    .map((n) => join(downloads, n))
    .sort((a, b) => statSync(b).mtimeMs - statSync(a).mtimeMs)[0];
  if (!deb) return undefined;
  mkdirSync(dir, { recursive: true });
  const tmp = join(dir, `iommufd_test.h.${process.pid}`);
  const sh = Bun.spawnSync(
    [
      "sh",
      "-c",
      `dpkg-deb --fsys-tarfile "$1" | tar -xO --wildcards '*.tar.xz' | tar -xJO --wildcards '*/drivers/iommu/iommufd/iommufd_test.h' > "$2"`,
      "sh",
      deb,
      tmp,
    ],
    { stderr: "pipe" },
  );
  if (sh.exitCode !== 0 || statSync(tmp).size === 0) return undefined;
  renameSync(tmp, join(dir, "iommufd_test.h"));
  return dir;
}

/** cc -O2 against the kernel's UAPI headers (and iommufd_test.h when a test kernel was built). */
export function buildBaseline(outDir = join(here, "baseline", "build")): Build {
  if (!Bun.which("cc")) return { note: "no C compiler (cc) in PATH: the C baseline is skipped" };
  let include: string;
  try {
    include = uapiIncludeDir();
  } catch (error) {
    return { note: `no kernel UAPI headers: ${(error as Error).message.split("\n")[0]}` };
  }
  try {
    mkdirSync(outDir, { recursive: true });
  } catch {
    outDir = mkdtempSync(join(tmpdir(), "map-bench-"));
  }
  const selftest = selftestHeader(outDir);
  const binary = join(outDir, "map_bench");
  const command = [
    "cc",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    ...(selftest ? ["-DHAVE_IOMMUFD_TEST_H", `-I${selftest}`] : []),
    `-I${include}`,
    "-o",
    binary,
    source,
  ];
  const cc = Bun.spawnSync(command, { stdout: "pipe", stderr: "pipe" });
  if (cc.exitCode !== 0) return { note: `cc failed:\n${cc.stderr.toString()}`, command };
  return {
    binary,
    command,
    note: selftest
      ? undefined
      : "built without iommufd_test.h (no test kernel built yet): the C side has no mock domain",
  };
}

/** The binary built on the host; inside a guest without one, a build into /tmp as a fallback. */
export function baselineBinary(): Build {
  if (existsSync(hostBinary)) return { binary: hostBinary };
  return buildBaseline(mkdtempSync(join(tmpdir(), "map-bench-")));
}

export interface CStats {
  id: string;
  ok: boolean;
  error?: string;
  warmupPairs?: number;
  batch?: number;
  samples?: number;
  ticks?: number;
  avg?: number;
  min?: number;
  p25?: number;
  p50?: number;
  p75?: number;
  p99?: number;
  max?: number;
}

/** Runs the given cases in one process, in order; one result per case (missing ones as errors). */
export async function runBaseline(
  binary: string,
  cases: CaseSpec[],
  m: Mode,
  log: (line: string) => void,
): Promise<Map<string, CStats>> {
  const out = new Map<string, CStats>();
  if (cases.length === 0) return out;
  const proc = Bun.spawn(
    [
      binary,
      "--warmup-pairs",
      String(m.warmupPairs),
      "--warmup-ms",
      String(m.warmupMs),
      "--warmup-max-ms",
      String(m.warmupMaxMs),
      "--min-ms",
      String(m.minMs),
      ...cases.map((c) => `${c.id}:${c.k}`),
    ],
    { stdout: "pipe", stderr: "pipe" },
  );
  // Lines arrive as cases finish: print them as progress, since a full run takes minutes.
  const decoder = new TextDecoder();
  let pending = "";
  for await (const chunk of proc.stdout as ReadableStream<Uint8Array>) {
    pending += decoder.decode(chunk, { stream: true });
    for (let nl = pending.indexOf("\n"); nl >= 0; nl = pending.indexOf("\n")) {
      const line = pending.slice(0, nl);
      pending = pending.slice(nl + 1);
      if (!line.trim()) continue;
      try {
        const stats = JSON.parse(line) as CStats;
        out.set(stats.id, stats);
        log(
          stats.ok
            ? `  C ${stats.id.padEnd(28)} ${formatNs(stats.p50!)}/pair (p50)`
            : `  C ${stats.id.padEnd(28)} error: ${stats.error}`,
        );
      } catch {
        log(`  C: unexpected output: ${line}`);
      }
    }
  }
  const code = await proc.exited;
  const stderr = (await new Response(proc.stderr as ReadableStream).text()).trim();
  for (const spec of cases) {
    if (!out.has(spec.id)) {
      out.set(spec.id, {
        id: spec.id,
        ok: false,
        error: `map_bench exited with status ${code} before this case${stderr ? `: ${stderr}` : ""}`,
      });
    }
  }
  return out;
}

export function formatNs(ns: number): string {
  if (!Number.isFinite(ns)) return "n/a";
  if (ns < 1e3) return `${ns.toFixed(0)} ns`;
  if (ns < 1e6) return `${(ns / 1e3).toFixed(2)} µs`;
  if (ns < 1e9) return `${(ns / 1e6).toFixed(2)} ms`;
  return `${(ns / 1e9).toFixed(2)} s`;
}
