// The package as a user receives it, on the host (no guest): `bun pm pack` (whose prepack builds
// dist/), `bun add` of the tarball into a new project whose tsconfig.json is what `tsc --init`
// writes plus `"types": ["bun-types"]`, then `tsc --noEmit` over a file that imports every public
// entry, that file run by `bun`, the dist JavaScript behind the `default` condition loaded beside
// the sources behind `bun`, and the `bin` run from the project. Nothing of this repository is in
// the project but the typescript that checks it (the project's own, as `tsc --init` would use) and
// bun-types, linked from node_modules so that the test needs no registry.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync, realpathSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { danglingReferences } from "../../scripts/build.ts";
import { consumerProject, packPackage, root } from "./support.ts";

/** A user's first program: every public entry, some of their types, the library's own error. */
const PROGRAM = `import {
  errnoCode,
  type ErrnoCode,
  Iommufd,
  IommufdError,
  type IommufdErrorDetails,
  MemfdBuffer,
  type MemfdBufferOptions,
  OffsetAllocator,
} from "bun-iommufd";
import { type DecodedStatus, decodeStatus, NvmeController } from "bun-iommufd/nvme";
import { MOCK_PAGE_SIZE, MockDomain } from "bun-iommufd/selftest";

function openIommufd(): string {
  try {
    using iommufd = Iommufd.open();
    return iommufd instanceof Iommufd ? "opened" : "not an Iommufd";
  } catch (error) {
    if (!(error instanceof IommufdError)) throw error;
    const details: Pick<IommufdErrorDetails, "operation" | "errno"> = error;
    return \`\${details.operation} \${errnoCode(details.errno)}\`;
  }
}

// Each line below is an error only while the declarations carry real types: were an import
// unresolved (typed \`any\`), its directive would be unused, and that is an error too.
export function misuse(): void {
  // @ts-expect-error a size is a number
  MemfdBuffer.create("4096");
  // @ts-expect-error a status is a number
  decodeStatus("2");
  // @ts-expect-error the page size is a number
  const page: string = MOCK_PAGE_SIZE;
  // @ts-expect-error not an errno name
  const code: ErrnoCode = "ENOTANERRNO";
  console.log(page, code);
}

const options: MemfdBufferOptions = { name: "consumer" };
using buffer = MemfdBuffer.create(4096, options);
buffer.bytes.set([1, 2, 3]);
const status: DecodedStatus = decodeStatus(0x2);
const report = {
  open: openIommufd(),
  byte: buffer.bytes[2],
  offset: new OffsetAllocator(1 << 20).alloc(4096),
  status: status.name,
  nvme: typeof NvmeController,
  selftest: typeof MockDomain === "function" && MOCK_PAGE_SIZE > 0,
};
console.log(JSON.stringify(report));
`;

/** Which file each public entry resolves to under Bun, and whether its `default` file exports the same. */
const PROBE = `import { readFileSync } from "node:fs";
import { join } from "node:path";

const dir = join(import.meta.dir, "node_modules", "bun-iommufd");
const pkg = JSON.parse(readFileSync(join(dir, "package.json"), "utf8")) as {
  exports: Record<string, { default: string }>;
};
const entries = [];
for (const [entry, conditions] of Object.entries(pkg.exports)) {
  const specifier = "bun-iommufd" + entry.slice(1);
  const viaBun = Object.keys(await import(specifier)).sort();
  const viaDefault = Object.keys(await import(join(dir, conditions.default))).sort();
  entries.push({
    entry,
    resolved: Bun.resolveSync(specifier, import.meta.dir).slice(dir.length + 1),
    exports: viaBun.length,
    sameExports: viaBun.join() === viaDefault.join(),
  });
}
console.log(JSON.stringify(entries));
`;

const tsc = join(root, "node_modules", ".bin", "tsc");
// bun and the system only: nothing of this repository.
const PATH = [dirname(process.execPath), "/usr/local/bin", "/usr/bin", "/bin"].join(":");

let project = "";
let tarball = "";
let installed = "";
const seconds: Record<string, string> = {};

function timed<T>(name: string, fn: () => T): T {
  const t0 = performance.now();
  const value = fn();
  seconds[name] = ((performance.now() - t0) / 1000).toFixed(2);
  return value;
}

function run(argv: string[]): { code: number; stdout: string; stderr: string } {
  const r = Bun.spawnSync(argv, { cwd: project, env: { ...process.env, PATH }, stdout: "pipe", stderr: "pipe" });
  return { code: r.exitCode, stdout: r.stdout.toString(), stderr: r.stderr.toString() };
}

beforeAll(() => {
  const packed = timed("pack", packPackage);
  tarball = packed.tarball;
  const summary = packed.output.split("\n").filter((l) => /^(Total files|Packed size|Unpacked size):/.test(l));
  console.log(`${basename(tarball)} (${statSync(tarball).size} bytes): ${summary.join(", ")}`);
  project = timed("install", () => consumerProject(tarball));
  installed = join(project, "node_modules", "bun-iommufd");
  symlinkSync(realpathSync(join(root, "node_modules", "bun-types")), join(project, "node_modules", "bun-types"));
  writeFileSync(join(project, "index.ts"), PROGRAM);
  writeFileSync(join(project, "probe.ts"), PROBE);
}, 120_000);

afterAll(() => {
  console.log(
    `consumer phases (s): ${Object.entries(seconds)
      .map(([k, v]) => `${k} ${v}`)
      .join(", ")}`,
  );
  if (project) rmSync(project, { recursive: true, force: true });
  if (tarball) rmSync(dirname(tarball), { recursive: true, force: true });
});

describe("the packed package in a new TypeScript project", () => {
  test("the tarball holds the built entries, the sources, the bin and the guest's files, and no tests", () => {
    const list = Bun.spawnSync(["tar", "-tzf", tarball], { stdout: "pipe", stderr: "pipe" });
    expect(list.exitCode).toBe(0);
    const files = list.stdout
      .toString()
      .trim()
      .split("\n")
      .map((f) => f.replace(/^package\//, ""));
    const top = [...new Set(files.map((f) => f.split("/")[0]))].sort();
    expect(top).toEqual(["CHANGELOG.md", "LICENSE", "README.md", "bin", "dist", "package.json", "src", "vm"]);
    expect(files.filter((f) => /\.test\.ts$|(^|\/)(test|bench)\//.test(f))).toEqual([]);
    for (const file of ["dist/index.js", "dist/index.d.ts", "bin/bun-iommufd.ts", "vm/kernel.sh", "vm/guest-init.sh"])
      expect(files).toContain(file);
    expect(danglingReferences(join(installed, "dist"))).toEqual([]);
  });

  test("tsc --noEmit passes with the tsconfig.json `tsc --init` writes, plus bun-types", () => {
    const init = run([tsc, "--init"]);
    expect(init.code).toBe(0);
    const config = readFileSync(join(project, "tsconfig.json"), "utf8");
    // The one line changed; if `tsc --init` stops writing it, this test should say so, not guess.
    expect(config.match(/"types": \[\],/g)).toHaveLength(1);
    writeFileSync(join(project, "tsconfig.json"), config.replace(/"types": \[\],/, '"types": ["bun-types"],'));
    const check = timed("tsc", () => run([tsc, "--noEmit"]));
    if (check.code !== 0) console.log(`--- tsc --noEmit in the consumer ---\n${check.stdout}${check.stderr}`);
    expect(check.stdout + check.stderr).toBe("");
    expect(check.code).toBe(0);
  }, 60_000);

  test("bun runs the program: every entry loads, and opening /dev/iommu ends in the library's own error", () => {
    const r = timed("run", () => run([process.execPath, "index.ts"]));
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    const report = JSON.parse(r.stdout);
    expect(report).toEqual({
      open: expect.stringMatching(/^(opened|Iommufd\.open E[A-Z]+)$/),
      byte: 3,
      offset: 0,
      status: expect.stringMatching(/\w/),
      nvme: "function",
      selftest: true,
    });
  });

  test("Bun resolves each entry to its sources; the `default` JavaScript loads and exports the same", () => {
    const r = run([process.execPath, "probe.ts"]);
    expect(r.stderr).toBe("");
    const entries = JSON.parse(r.stdout) as {
      entry: string;
      resolved: string;
      exports: number;
      sameExports: boolean;
    }[];
    expect(entries.map((e) => e.entry).sort()).toEqual([".", "./nvme", "./selftest"]);
    for (const e of entries) {
      expect(e.resolved).toMatch(/^src\/.*\.ts$/);
      expect(e.exports).toBeGreaterThan(0);
      expect(e.sameExports).toBe(true);
    }
  });

  test("the bin runs from the project: help, the doctor, and the guest's host check", () => {
    const bunx = [process.execPath, "x", "bun-iommufd"];
    const help = run([...bunx, "--help"]);
    expect(help.code).toBe(0);
    expect(help.stdout).toContain("usage: bun-iommufd doctor");
    const doctor = run([...bunx, "doctor", "--json", "--no-device-probe"]);
    expect([0, 1]).toContain(doctor.code);
    expect(JSON.parse(doctor.stdout)).toHaveProperty("exitCode", doctor.code);
    // vm/ is loaded only for this command, with its shell scripts beside it.
    const check = run([...bunx, "vm", "--check"]);
    expect(check.stderr).not.toMatch(/Cannot find|ENOENT/);
    expect([0, 1]).toContain(check.code);
  }, 60_000);
});
