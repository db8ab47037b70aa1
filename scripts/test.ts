// The project's one test command (`bun run test`): typecheck, unit tests on the host, kernel tests
// on /dev/iommu (the host's if it has one, else a QEMU guest per kernel of the matrix: all of
// test/kernel on 7.2, the device suites of MATRIX_SUITES on 6.12 and debian). Ends with exactly one line
// "N passed, N failed[, N skipped]" and a non-zero status if anything failed.
//
//   bun run test [-- --unit-only | --kernel-only] [-- <extra bun test args>]
//
// Under CI (test/support/ci.ts decides: CI set to anything but "", 0, false, no) the kernel tests
// are mandatory: no QEMU, no kernel, a broken guest or a skipped kernel test fails the run (the
// guest provides everything they need). Elsewhere a host that cannot run a guest skips them with
// one line saying why. A bun test run that ends without its summary line fails, whatever its status.

import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { isCI } from "../test/support/ci.ts";
import type { DeviceSpec } from "../vm/devices.ts";
import { vmAvailability } from "../vm/host.ts";
import { cachedKernel, isKernelName, KERNEL_NAMES, type KernelName, kernelImage } from "../vm/images.ts";
import { runInGuest } from "../vm/run.ts";
import { type JudgeOptions, judgeRun, parseBunTestSummary, unitRunOptions } from "./verdict.ts";

/** The guest's devices for the kernel tests (see /work/coord/vm-api.md or vm/devices.ts). */
export const KERNEL_TEST_DEVICES: DeviceSpec[] = [
  { kind: "edu" },
  { kind: "nvme", size: 64 << 20 },
  { kind: "nvme", size: 64 << 20, cmb: 16 << 20 },
];

const root = resolve(import.meta.dir, "..");
const ci = isCI();

/**
 * Per-test time limits, passed on the command line: bun test (1.4.5) ignores `timeout` in
 * bunfig.toml and would stop every test at 5 s, too short for a TCG guest on a shared machine.
 */
export const UNIT_TEST_ARGS = ["--timeout", "30000"];
export const KERNEL_TEST_ARGS = ["--timeout", "120000"];

const tally = { passed: 0, failed: 0, skipped: 0 };
const timings: string[] = [];
const problems: string[] = [];

/** Adds one bun test run to the tally. */
function account(label: string, exitCode: number, output: string, options: JudgeOptions = {}): void {
  const v = judgeRun(label, exitCode, output, options);
  tally.passed += v.passed;
  tally.failed += v.failed;
  tally.skipped += v.skipped;
  problems.push(...v.problems);
}

// bun test prints its summary on stderr; only that is parsed, so that a test printing " 9 pass"
// on stdout cannot skew the counts.
function tee() {
  let text = "";
  const decoder = new TextDecoder();
  return {
    out: (chunk: Uint8Array) => {
      process.stdout.write(chunk);
    },
    err: (chunk: Uint8Array) => {
      process.stderr.write(chunk);
      text += decoder.decode(chunk, { stream: true });
    },
    text: () => text,
  };
}

async function pump(stream: ReadableStream<Uint8Array>, sink: (chunk: Uint8Array) => void): Promise<void> {
  for await (const chunk of stream) sink(chunk);
}

async function bunTestOnHost(
  label: string,
  args: string[],
  options: JudgeOptions & { env?: Record<string, string> } = {},
): Promise<void> {
  const env = options.env;
  const t = tee();
  const proc = Bun.spawn([process.execPath, "test", ...args], {
    cwd: root,
    env: env ? { ...process.env, ...env } : undefined,
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
  });
  await Promise.all([pump(proc.stdout, t.out), pump(proc.stderr, t.err)]);
  account(label, await proc.exited, t.text(), options);
}

function header(title: string): void {
  console.log(`\n=== ${title} ===`);
}

async function timed(name: string, fn: () => Promise<void>): Promise<void> {
  const t0 = performance.now();
  await fn();
  timings.push(`${name} ${((performance.now() - t0) / 1000).toFixed(1)} s`);
}

async function typecheck(): Promise<void> {
  header("typecheck: tsc --noEmit");
  const tsc = join(root, "node_modules/.bin/tsc");
  if (!existsSync(tsc)) {
    tally.failed += 1;
    problems.push("typecheck: node_modules/.bin/tsc is missing (run bun install)");
    return;
  }
  const proc = Bun.spawn([tsc, "--noEmit"], { cwd: root, stdin: "ignore", stdout: "inherit", stderr: "inherit" });
  if ((await proc.exited) === 0) {
    tally.passed += 1;
    console.log("typecheck passed");
  } else {
    tally.failed += 1;
    problems.push("typecheck: tsc reported errors");
  }
}

/** `bun run lint` (Biome: formatting and lint rules): counts as one test, like the typecheck. */
async function lint(): Promise<void> {
  header("lint: biome check (format and lint)");
  const biome = join(root, "node_modules/.bin/biome");
  if (!existsSync(biome)) {
    tally.failed += 1;
    problems.push("lint: node_modules/.bin/biome is missing (run bun install)");
    return;
  }
  const proc = Bun.spawn([biome, "check", "--error-on-warnings", "."], {
    cwd: root,
    stdin: "ignore",
    stdout: "inherit",
    stderr: "inherit",
  });
  if ((await proc.exited) === 0) {
    tally.passed += 1;
    console.log("lint passed");
  } else {
    tally.failed += 1;
    problems.push("lint: biome reported formatting or lint errors (bun run format fixes the formatting)");
  }
}

async function unitTests(extra: string[]): Promise<void> {
  header("unit tests (host)");
  await bunTestOnHost("unit tests", [...UNIT_TEST_ARGS, "./test/unit", ...extra], unitRunOptions(ci));
}

/**
 * The device suites that run on the other kernels of the matrix besides 7.2 (which runs all of
 * test/kernel). Each suite asserts the typed error where its kernel lacks a feature (see
 * test/support/matrix.ts). Left out everywhere but 7.2, because they need what only the test
 * kernel has: fault-injection and vmm-fault-injection (fault injection and the selftest hooks),
 * hwpt, handover, memlock and ioas (iommufd-only objects and accounting: HWPT, change-process, the
 * selftest mock domain), doctor (its "every check green" is the 7.2 guest's), smoke (/dev/iommu).
 */
export const MATRIX_SUITES: Record<Exclude<KernelName, "7.2">, string[]> = {
  // iommufd without MAP_FILE or VFIO dma-buf export, and the type1 container. heap's selftest
  // mock-domain tests and nvme's fault-injection sweep are registered on 7.2 only.
  "6.12": ["vfio", "irq", "heap", "nvme", "type1", "nvme-type1", "features", "examples", "vm-devices"].map(
    (name) => `./test/kernel/${name}.test.ts`,
  ),
  // No iommufd at all: type1 only. vfio, irq, heap and nvme open devices through cdevs with an
  // Iommufd (their type1 twins are type1 and nvme-type1; features asserts Iommufd.open's ENOENT).
  debian: ["type1", "nvme-type1", "features", "examples", "vm-devices"].map((name) => `./test/kernel/${name}.test.ts`),
};

async function kernelTests(extra: string[], kernels: KernelName[]): Promise<void> {
  if (existsSync("/dev/iommu")) {
    header("kernel tests (host /dev/iommu)");
    await bunTestOnHost("kernel tests", [...KERNEL_TEST_ARGS, "./test/kernel", ...extra], { skipsFail: ci });
    return;
  }
  const available = vmAvailability();
  if (!available.ok) {
    if (ci) {
      header("kernel tests (guest)");
      tally.failed += 1;
      problems.push(`kernel tests: cannot boot the test guest: ${available.reason}`);
    } else {
      console.log(`\nskipping the kernel tests: no /dev/iommu and ${available.reason}`);
      tally.skipped += 1;
    }
    return;
  }
  for (const kernel of kernels) {
    if (kernel !== "7.2" && !ci && !(await cachedKernel(kernel))) {
      console.log(`\nkernel ${kernel}: not cached, its run is left out outside CI (bash vm/kernel.sh build ${kernel})`);
      continue;
    }
    const files = kernel === "7.2" ? ["./test/kernel"] : MATRIX_SUITES[kernel];
    await timed(`kernel tests on ${kernel}`, () => kernelTestsInGuest(kernel, files, extra));
  }
}

async function kernelTestsInGuest(kernel: KernelName, files: string[], extra: string[]): Promise<void> {
  const label = `kernel tests on ${kernel}`;
  header(`${label} (QEMU guest${kernel === "7.2" ? "" : `: ${files.map((f) => f.replace(/^.*\//, "")).join(" ")}`})`);
  const t = tee();
  const diskDir = mkdtempSync(join(tmpdir(), "bun-iommufd-test-disks-"));
  const outDir = mkdtempSync(join(tmpdir(), "bun-iommufd-test-out-"));
  try {
    const result = await runInGuest({
      command: ["bun", "test", ...KERNEL_TEST_ARGS, ...files, ...extra],
      cwd: root,
      kernel,
      // vfio0 = edu, vfio1 = NVMe A, vfio2 = NVMe B with a CMB (A can DMA into B's CMB).
      devices: KERNEL_TEST_DEVICES,
      diskDir,
      outDir,
      onStdout: t.out,
      onStderr: t.err,
    });
    kernelResult(label, result, t.text());
    // After the guest powered off and before its disk images go: the host reads what the NVMe
    // tests wrote, at the same offsets of the image file (test/host/nvme-image.test.ts).
    // A filtered run (-- -t ...) may not have run the NVMe tests: then there is nothing to check.
    const manifests = ["nvme-written.json", "nvme-type1-written.json"];
    if (extra.length === 0 || manifests.some((name) => existsSync(join(outDir, name)))) {
      header(`NVMe disk images on the host after the ${kernel} guest (test/host)`);
      await bunTestOnHost(`host checks after the ${kernel} guest`, [...UNIT_TEST_ARGS, "./test/host"], {
        env: { IOMMUFD_VM_RESULTS: outDir },
      });
    }
  } finally {
    rmSync(diskDir, { recursive: true, force: true });
    rmSync(outDir, { recursive: true, force: true });
  }
}

function kernelResult(label: string, result: Awaited<ReturnType<typeof runInGuest>>, text: string): void {
  if (result.failure) {
    // Whatever ran before the guest failed still counts, plus one failure for the guest itself.
    const s = parseBunTestSummary(text);
    tally.passed += s.pass;
    tally.failed += s.fail + 1;
    tally.skipped += s.skip + s.todo;
    problems.push(`${label}: ${result.message ?? result.failure}`);
    return;
  }
  account(label, result.exitCode, text, { skipsFail: ci });
}

/**
 * The guest as a command (test/vm, on the host): bad input to `bun-iommufd vm`, and a consumer
 * project that depends on the packed package and runs its own edu DMA test in the guest.
 */
async function vmCommandTests(extra: string[]): Promise<void> {
  header("test guest as a command (bad input; consumer project with the packed package)");
  const args = vmCommandArgs(extra, existsSync);
  if (args === undefined) {
    console.log("left out: the arguments after -- name tests outside test/vm (or only a filter)");
    return;
  }
  await bunTestOnHost("vm command tests", [...KERNEL_TEST_ARGS, ...args], { skipsFail: ci });
}

/**
 * What the host's test/vm run gets from the arguments after `--`: all of test/vm with no
 * arguments; with some, only the ones naming test/vm files (plus the flags), or undefined (leave
 * the stage out) when they name tests elsewhere or only filter: `-- test/kernel/nvme.test.ts`
 * would otherwise run that kernel file on the host, and `-t` finds nothing in test/vm.
 */
export function vmCommandArgs(extra: string[], exists: (path: string) => boolean): string[] | undefined {
  if (extra.length === 0) return ["./test/vm"];
  const paths = extra.filter((a) => !a.startsWith("-") && exists(a));
  const inVm = paths.filter((p) => resolve(p).startsWith(join(root, "test", "vm")));
  if (inVm.length === 0) return undefined;
  return [
    ...inVm.map((p) => (p.startsWith(".") || p.startsWith("/") ? p : `./${p}`)),
    ...extra.filter((a) => !paths.includes(a)),
  ];
}

/**
 * `bun bench --quick` end to end (C baseline build, guest, both sides, report): counts as one
 * test. It asserts that the benchmark runs and reports every case, never a timing.
 */
async function benchSmoke(): Promise<void> {
  header("benchmark smoke run: bun bench --quick");
  const proc = Bun.spawn([process.execPath, join(root, "bench", "main.ts"), "--quick", "--json"], {
    cwd: root,
    stdin: "ignore",
    stdout: "pipe",
    stderr: "inherit",
  });
  const output = await new Response(proc.stdout).text();
  const status = await proc.exited;
  let cases = 0;
  try {
    const report = JSON.parse(output.slice(output.indexOf("{")));
    cases = (report.cases ?? report.results ?? []).length;
  } catch {
    // counted as a failure below
  }
  if (status === 0 && cases > 0) {
    tally.passed += 1;
    console.log(`benchmark smoke run passed: ${cases} cases reported`);
  } else {
    tally.failed += 1;
    problems.push(`benchmark smoke run: exit status ${status}, ${cases} cases in its JSON report`);
  }
}

function usage(): string {
  return `usage: bun run test [-- [--unit-only | --kernel-only] [-- <bun test args>]]

  --unit-only     typecheck, lint and unit tests only
  --kernel-only   kernel tests only (in a QEMU guest unless the host has /dev/iommu)
  --no-bench      leave out the benchmark smoke run (bun bench --quick)
  --kernel NAME   run the kernel tests on this kernel of the matrix only (${KERNEL_NAMES.join(", ")});
                  repeatable. Default: all (6.12 outside CI only when cached)
  -- ARGS         passed on to each bun test run (e.g. -t <pattern>)`;
}

async function main(argv: string[]): Promise<number> {
  let unit = true;
  let kernel = true;
  let bench = true;
  const kernels: KernelName[] = [];
  const extra: string[] = [];
  // `bun run test -- x` passes x, `bun scripts/test.ts -- x` passes "--" too.
  if (argv[0] === "--") argv = argv.slice(1);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === "--") {
      extra.push(...argv.slice(i + 1));
      break;
    }
    if (a === "--kernel") {
      const name = argv[++i] ?? "";
      if (!isKernelName(name)) {
        console.error(`scripts/test.ts: --kernel takes one of ${KERNEL_NAMES.join(", ")}, not "${name}"`);
        return 2;
      }
      kernels.push(name);
    } else if (a === "--unit-only") kernel = false;
    else if (a === "--no-bench") bench = false;
    else if (a === "--kernel-only") unit = false;
    else if (a === "-h" || a === "--help") {
      console.log(usage());
      return 0;
    } else {
      console.error(`scripts/test.ts: unknown option ${a}\n${usage()}`);
      return 2;
    }
  }
  if (!unit && !kernel) {
    console.error("scripts/test.ts: --unit-only and --kernel-only exclude each other");
    return 2;
  }

  const t0 = performance.now();
  // The guest's kernels come first: the 7.2 build also keeps the selftest header that the unit
  // layout test checks, and a broken build should be reported before anything else runs. The
  // other kernels of the matrix run MATRIX_SUITES and test/vm/kernels.test.ts: under CI all of
  // them (a skip fails there); elsewhere the stock kernel (a download) but not the second build
  // (15 min).
  if (kernel && !existsSync("/dev/iommu") && vmAvailability().ok) {
    await timed("kernel", async () => {
      header("test kernels (vm/kernel.sh build, cached after the first build)");
      for (const name of KERNEL_NAMES) {
        if (name === "6.12" && !ci && !(await cachedKernel(name))) {
          console.log("kernel 6.12: not built outside CI (bash vm/kernel.sh build 6.12 adds it to the matrix)");
          continue;
        }
        try {
          console.log(`kernel ${name}: ${await kernelImage(name)}`);
        } catch (error) {
          tally.failed += 1;
          problems.push(`test kernel ${name}: ${(error as Error).message}`);
        }
      }
    });
  }
  if (unit) {
    await timed("typecheck", typecheck);
    await timed("lint", lint);
    await timed("unit tests", () => unitTests(extra));
  }
  if (kernel) await kernelTests(extra, kernels.length ? kernels : [...KERNEL_NAMES]);
  if (kernel) await timed("vm command tests", () => vmCommandTests(extra));
  if (kernel && bench && (existsSync("/dev/iommu") || vmAvailability().ok)) await timed("bench smoke", benchSmoke);

  console.log("");
  for (const p of problems) console.log(`FAILED  ${p}`);
  console.log(`timings: ${timings.join(", ")}; total ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  const skipped = tally.skipped ? `, ${tally.skipped} skipped` : "";
  console.log(`${tally.passed} passed, ${tally.failed} failed${skipped}`);
  return tally.failed > 0 ? 1 : 0;
}

if (import.meta.main) {
  process.exitCode = await main(process.argv.slice(2));
}
