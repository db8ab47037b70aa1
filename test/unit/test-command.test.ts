/**
 * The test command's own rules (scripts/test.ts, .ci/run): what counts as CI, how a bun test run is
 * judged, and that .ci/run's last line is always the summary. A test command that miscounts can
 * report green for a run that never happened.
 */
import { describe, expect, test } from "bun:test";
import { chmodSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { KERNEL_TEST_ARGS, MATRIX_SUITES, UNIT_TEST_ARGS, vmCommandArgs } from "../../scripts/test.ts";
import {
  judgeRun,
  parseBunTestSummary,
  skippedTests,
  UNIT_SKIPS_ALLOWED,
  unitRunOptions,
} from "../../scripts/verdict.ts";
import { isCI } from "../support/ci.ts";

const root = join(import.meta.dir, "../..");

/** stderr of a bun test run, as bun 1.x prints it. */
function bunOutput(
  lines: string[],
  summary: { pass: number; fail: number; skip?: number; todo?: number } | undefined,
): string {
  const tail = summary
    ? [
        "",
        ` ${summary.pass} pass`,
        ...(summary.skip ? [` ${summary.skip} skip`] : []),
        ...(summary.todo ? [` ${summary.todo} todo`] : []),
        ` ${summary.fail} fail`,
        ` ${summary.pass * 2} expect() calls`,
        `Ran ${summary.pass + summary.fail + (summary.skip ?? 0) + (summary.todo ?? 0)} tests across 1 file. [1.00s]`,
      ]
    : [];
  return ["", "test/kernel/x.test.ts:", ...lines, ...tail, ""].join("\n");
}

describe("isCI: one rule for scripts/test.ts, layout.test.ts and the kernel tests", () => {
  test.each([
    ["true", true],
    ["TRUE", true],
    ["1", true],
    ["yes", true],
    ["woodpecker", true],
    ["", false],
    [" ", false],
    ["0", false],
    ["false", false],
    ["False", false],
    ["no", false],
  ])("CI=%p -> %p", (value, expected) => {
    expect(isCI({ CI: value })).toBe(expected);
  });

  test("unset is not CI", () => {
    expect(isCI({})).toBe(false);
  });

  test("layout.test.ts and scripts/test.ts use it, and nothing else reads CI by hand", async () => {
    const glob = new Bun.Glob("{scripts,test,vm,bench}/**/*.ts");
    const readers: string[] = [];
    for await (const file of glob.scan({ cwd: root })) {
      if (file === "test/support/ci.ts") continue;
      const text = await Bun.file(join(root, file)).text();
      if (/process\.env\.CI\b|env\.CI\s*[=!]==?|\bCI\s*===\s*"/.test(text)) readers.push(file);
    }
    expect(readers).toEqual([]);
    expect(await Bun.file(join(root, "test/unit/layout.test.ts")).text()).toContain("isCI()");
    expect(await Bun.file(join(root, "scripts/test.ts")).text()).toContain("isCI()");
  });
});

describe("judging a bun test run", () => {
  test("a clean run passes", () => {
    const out = bunOutput(["(pass) a", "(pass) b"], { pass: 2, fail: 0 });
    expect(judgeRun("kernel tests", 0, out)).toEqual({ passed: 2, failed: 0, skipped: 0, problems: [] });
  });

  test("a run with no summary line fails even with exit status 0, and its per-test lines still count", () => {
    const out = bunOutput(["(pass) a", "(pass) b", "(pass) c"], undefined);
    const v = judgeRun("kernel tests", 0, out);
    expect(v.passed).toBe(3);
    expect(v.failed).toBe(1);
    expect(v.problems.join("\n")).toContain("without its summary line");
  });

  test("a failed test counts, and a non-zero status without one counts once", () => {
    expect(judgeRun("unit", 1, bunOutput(["(pass) a", "(fail) b"], { pass: 1, fail: 1 }))).toMatchObject({
      passed: 1,
      failed: 1,
    });
    const v = judgeRun("unit", 1, bunOutput(["(pass) a"], { pass: 1, fail: 0 }));
    expect(v).toMatchObject({ passed: 1, failed: 1 });
    expect(v.problems[0]).toContain("status 1");
  });

  test("a run that executed nothing fails", () => {
    const v = judgeRun("kernel tests", 0, bunOutput(["(skip) a"], { pass: 0, fail: 0, skip: 1 }));
    expect(v.failed).toBe(1);
    expect(v.problems[0]).toContain("no test was executed");
  });

  test("skips are skips outside CI, and failures (with their names) for the kernel tests under CI", () => {
    const out = bunOutput(["(pass) a", "(skip) needs root", "(todo) later"], { pass: 1, fail: 0, skip: 1, todo: 1 });
    expect(judgeRun("kernel tests", 0, out)).toEqual({ passed: 1, failed: 0, skipped: 2, problems: [] });
    const v = judgeRun("kernel tests", 0, out, { skipsFail: true });
    expect(v).toMatchObject({ passed: 1, failed: 2, skipped: 0 });
    expect(v.problems[0]).toContain("2 test(s) skipped under CI");
    expect(v.problems[0]).toContain("the test guest provides everything");
    expect(v.problems[0]).toContain("needs root; later");
  });

  test("unit tests under CI: a skip fails unless UNIT_SKIPS_ALLOWED names it", () => {
    const allowed =
      "(skip) MemfdBuffer rejects bad sizes > huge pages with none reserved: ENOMEM [skipped: 8 reserved]";
    const out = bunOutput(["(pass) a", allowed, "(skip) a new test that needs something"], {
      pass: 1,
      fail: 0,
      skip: 2,
    });
    expect(judgeRun("unit tests", 0, out, unitRunOptions(false))).toEqual({
      passed: 1,
      failed: 0,
      skipped: 2,
      problems: [],
    });
    const v = judgeRun("unit tests", 0, out, unitRunOptions(true));
    expect(v).toMatchObject({ passed: 1, failed: 1, skipped: 1 });
    expect(v.problems).toHaveLength(1);
    expect(v.problems[0]).toContain("a new test that needs something");
    expect(v.problems[0]).toContain("UNIT_SKIPS_ALLOWED");
    expect(v.problems[0]).not.toContain("huge pages");
    // bun 1.4.5 lists every skip again before the summary of a run of several files: still one skip
    // each, so the allowed one stays allowed (it failed every CI run before) and the other is named once.
    const twice = bunOutput(
      [
        allowed,
        "(skip) a new test that needs something",
        "",
        "2 tests skipped:",
        allowed,
        "(skip) a new test that needs something",
      ],
      {
        pass: 1,
        fail: 0,
        skip: 2,
      },
    );
    const listed = judgeRun("unit tests", 0, twice, unitRunOptions(true));
    expect(listed).toMatchObject({ passed: 1, failed: 1, skipped: 1 });
    expect(listed.problems[0]!.split("a new test that needs something")).toHaveLength(2);
    // Names that do not match the count one to one cannot be told apart: every skip fails.
    const unnamed = bunOutput(["(pass) a"], { pass: 1, fail: 0, skip: 1 });
    expect(judgeRun("unit tests", 0, unnamed, unitRunOptions(true))).toMatchObject({ failed: 1, skipped: 0 });
  });

  test("every allowed unit skip is a skipIf test in test/unit, with its reason; the unit run uses them", async () => {
    const sources: string[] = [];
    for await (const file of new Bun.Glob("test/unit/*.test.ts").scan({ cwd: root })) {
      sources.push(await Bun.file(join(root, file)).text());
    }
    for (const [name, reason] of Object.entries(UNIT_SKIPS_ALLOWED)) {
      const at = sources.find((text) => text.includes(name));
      expect({ name, found: at !== undefined }).toEqual({ name, found: true });
      expect(at!.slice(Math.max(0, at!.indexOf(name) - 200), at!.indexOf(name))).toContain("skipIf(");
      expect(reason.length).toBeGreaterThan(20);
    }
    const runner = await Bun.file(join(root, "scripts/test.ts")).text();
    expect(runner.includes("unitRunOptions(ci)")).toBe(true);
  });

  test("numbers a test prints do not count; ANSI colours do not hide the summary", () => {
    const out = `\x1b[32m 4 pass\x1b[0m\n 0 fail\n`;
    expect(parseBunTestSummary(out)).toMatchObject({ pass: 4, fail: 0, found: true });
    expect(parseBunTestSummary("pass 4\nRan 4 tests")).toMatchObject({ found: false, pass: 0 });
    expect(skippedTests("(skip) x [0.1ms]\n(pass) y\n(todo) z")).toEqual(["x [0.1ms]", "z"]);
  });
});

describe("time limits", () => {
  test("the limit the test command passes really holds: a 5.5 s test passes (bun's default stops it at 5 s)", () => {
    const dir = mkdtempSync(join(tmpdir(), "timeout-"));
    try {
      writeFileSync(
        join(dir, "slow.test.ts"),
        `import { test } from "bun:test";\ntest("slow", () => Bun.sleepSync(5500));\n`,
      );
      const withLimit = Bun.spawnSync([process.execPath, "test", ...UNIT_TEST_ARGS, "./slow.test.ts"], {
        cwd: dir,
        stderr: "pipe",
      });
      expect(parseBunTestSummary(withLimit.stderr.toString())).toMatchObject({ pass: 1, fail: 0, found: true });
      expect(Number(KERNEL_TEST_ARGS[1])).toBeGreaterThanOrEqual(60_000);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 20_000);
});

describe(".ci/run", () => {
  /** Runs a copy of .ci/run with a fake install step and a fake `bun` on PATH. */
  function ciRun(install: string, bunScript: string): { status: number; lines: string[] } {
    const dir = mkdtempSync(join(tmpdir(), "ci-run-"));
    try {
      mkdirSync(join(dir, ".ci"));
      mkdirSync(join(dir, "scripts"));
      mkdirSync(join(dir, "bin"));
      copyFileSync(join(root, ".ci/run"), join(dir, ".ci/run"));
      writeFileSync(join(dir, "scripts/install.sh"), `${install}\n`);
      writeFileSync(join(dir, "bin/bun"), `#!/bin/sh\n${bunScript}\n`);
      chmodSync(join(dir, "bin/bun"), 0o755);
      const run = Bun.spawnSync(["bash", join(dir, ".ci/run")], {
        env: { PATH: `${join(dir, "bin")}:${process.env.PATH}`, HOME: dir },
        stdout: "pipe",
        stderr: "pipe",
      });
      return { status: run.exitCode ?? -1, lines: run.stdout.toString().trimEnd().split("\n") };
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }

  test("green run: the test command's summary is the last line, status 0", () => {
    const r = ciRun("true", `echo "7 passed, 0 failed"`);
    expect(r).toMatchObject({ status: 0 });
    expect(r.lines.at(-1)).toBe("7 passed, 0 failed");
  });

  test("bun run's own line after a failing script does not push the summary up", () => {
    const r = ciRun("true", `echo "3 passed, 1 failed"; echo 'error: script "test" exited with code 1'; exit 1`);
    expect(r.status).toBe(1);
    expect(r.lines.at(-1)).toBe("3 passed, 1 failed");
  });

  test("no summary line (grep finds nothing): the fallback is still printed last, even with status 0", () => {
    const r = ciRun("true", `echo "something else"; exit 0`);
    expect(r.status).not.toBe(0);
    expect(r.lines.at(-1)).toBe("0 passed, 1 failed");
  });

  test("a failing install step still ends with a summary line", () => {
    const r = ciRun("echo broken >&2; exit 3", `echo "7 passed, 0 failed"`);
    expect(r.status).toBe(3);
    expect(r.lines.at(-1)).toBe("0 passed, 1 failed");
  });

  test("a summary with failures but status 0 is not a green run", () => {
    const r = ciRun("true", `echo "7 passed, 2 failed"; exit 0`);
    expect(r.status).toBe(1);
    expect(r.lines.at(-1)).toBe("7 passed, 2 failed");
  });
});

describe("the kernel matrix's suites (MATRIX_SUITES)", () => {
  test("every listed suite exists; the test-kernel-only suites are on no other kernel", () => {
    const testKernelOnly = ["fault-injection", "vmm-fault-injection", "hwpt", "handover", "memlock", "smoke"];
    for (const [kernel, files] of Object.entries(MATRIX_SUITES)) {
      expect(files.length).toBeGreaterThan(0);
      for (const file of files) {
        expect({ kernel, file, exists: existsSync(join(root, file)) }).toEqual({ kernel, file, exists: true });
        for (const name of testKernelOnly) expect(file.endsWith(`/${name}.test.ts`)).toBe(false);
      }
    }
  });

  test("the examples run on every kernel (the issue wants their output on each)", () => {
    for (const files of Object.values(MATRIX_SUITES)) expect(files).toContain("./test/kernel/examples.test.ts");
  });
});

describe("the host's test/vm stage and the arguments after --", () => {
  test("no arguments: all of test/vm", () => {
    expect(vmCommandArgs([], existsSync)).toEqual(["./test/vm"]);
  });
  test("kernel test files or only a filter: the stage is left out, not run on the host", () => {
    expect(vmCommandArgs(["test/kernel/nvme.test.ts", "test/kernel/nvme-type1.test.ts"], existsSync)).toBeUndefined();
    expect(vmCommandArgs(["-t", "write-only"], existsSync)).toBeUndefined();
  });
  test("a test/vm file keeps its flags and drops the kernel files", () => {
    expect(vmCommandArgs(["test/vm/cli.test.ts", "test/kernel/ioas.test.ts", "-t", "bad input"], existsSync)).toEqual([
      "./test/vm/cli.test.ts",
      "-t",
      "bad input",
    ]);
  });
});
