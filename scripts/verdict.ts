// How scripts/test.ts judges one bun test run: the summary counts, what fails a run, and which
// skips are allowed under CI. Kept apart from the runner so the rules can be tested alone
// (test/unit/test-command.test.ts).

export interface BunTestSummary {
  pass: number;
  fail: number;
  skip: number;
  todo: number;
  /** Whether any summary line was seen at all. */
  found: boolean;
}

/** Counts from the summary bun test prints at the end (" 12 pass", " 0 fail", " 3 skip"). */
export function parseBunTestSummary(output: string): BunTestSummary {
  const s: BunTestSummary = { pass: 0, fail: 0, skip: 0, todo: 0, found: false };
  const plain = output.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, "").replaceAll("\r", "");
  for (const line of plain.split("\n")) {
    const m = /^\s*(\d+)\s+(pass|fail|skip|todo)\s*$/.exec(line);
    if (!m) continue;
    // The last occurrence wins: the summary comes after anything a test itself printed.
    s[m[2] as "pass" | "fail" | "skip" | "todo"] = Number(m[1]);
    s.found = true;
  }
  // A run cut short (guest panic, timeout) prints no summary; its per-test lines still count.
  if (!s.found) {
    for (const m of plain.matchAll(/^\((pass|fail|skip|todo)\) /gm)) s[m[1] as "pass" | "fail" | "skip" | "todo"]++;
  }
  return s;
}

/** What one bun test run adds to the tally. */
export interface RunVerdict {
  passed: number;
  failed: number;
  skipped: number;
  problems: string[];
}

/**
 * The unit tests that may skip under CI, each with its reason: they depend on what the host has,
 * which CI does not choose. A skipped unit test whose name contains none of these fails a CI run.
 */
export const UNIT_SKIPS_ALLOWED: Readonly<Record<string, string>> = {
  "no /dev/iommu: the /dev/iommu check fails": "the host has /dev/iommu: the doctor's failing check cannot show",
  "Iommufd.open on this machine without /dev/iommu": "the host has /dev/iommu: the kernel tests open it for real",
  "huge pages with none reserved": "the host reserves huge pages: mmap of a huge-page memfd cannot fail",
};

/** How scripts/test.ts judges the unit tests: under CI a skip fails unless UNIT_SKIPS_ALLOWED names it. */
export function unitRunOptions(ci: boolean): JudgeOptions {
  return { skipsFail: ci, allowedSkips: UNIT_SKIPS_ALLOWED };
}

export interface JudgeOptions {
  /** Every skipped or todo test is a failure (under CI)... */
  skipsFail?: boolean;
  /** ...but these: a part of the test's name -> why it may skip. */
  allowedSkips?: Readonly<Record<string, string>>;
}

/**
 * Judges one bun test run from its exit status and stderr. Failures: a failed test; a run with no
 * summary line (cut short, whatever its exit status); a run that ran nothing; a non-zero exit with
 * no failed test; and, with `skipsFail` (under CI), every skipped or todo test that `allowedSkips`
 * does not name (all of them when the names cannot be matched one to one with the count).
 */
export function judgeRun(label: string, exitCode: number, output: string, options: JudgeOptions = {}): RunVerdict {
  const s = parseBunTestSummary(output);
  const v: RunVerdict = { passed: s.pass, failed: s.fail, skipped: s.skip + s.todo, problems: [] };
  if (s.fail > 0) v.problems.push(`${label}: ${s.fail} test(s) failed`);
  if (!s.found) {
    v.failed += 1;
    v.problems.push(
      `${label}: bun test ended without its summary line (exit status ${exitCode}): the run was cut short`,
    );
  } else if (s.pass + s.fail === 0) {
    v.failed += 1;
    v.problems.push(`${label}: no test was executed${s.skip ? ` (${s.skip} skipped)` : ""}`);
  } else if (exitCode !== 0 && s.fail === 0) {
    v.failed += 1;
    v.problems.push(`${label}: bun test exited with status ${exitCode} without reporting a failed test`);
  }
  if (options.skipsFail && v.skipped > 0) {
    const names = skippedTests(output);
    const allowed = Object.keys(options.allowedSkips ?? {});
    const unexplained =
      names.length === v.skipped ? names.filter((name) => !allowed.some((part) => name.includes(part))) : names;
    const failing = names.length === v.skipped ? unexplained.length : v.skipped;
    if (failing > 0) {
      v.failed += failing;
      v.problems.push(
        `${label}: ${failing} test(s) skipped under CI; ` +
          (options.allowedSkips
            ? "a skip is allowed only for a reason UNIT_SKIPS_ALLOWED (scripts/verdict.ts) names"
            : "the test guest provides everything they need (/dev/iommu, edu on vfio-pci, fault injection, root), so a skip is a failure") +
          (unexplained.length ? `: ${unexplained.join("; ")}` : ""),
      );
      v.skipped -= failing;
    }
  }
  return v;
}

/**
 * The names bun test prints for skipped and todo tests ("(skip) name", "(todo) name"), each once:
 * a run of several files lists them again before its summary ("1 tests skipped:"), and counted
 * twice they would never match the summary's count, so no allowed skip could be told apart.
 */
export function skippedTests(output: string): string[] {
  const plain = output.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, "").replaceAll("\r", "");
  return [...new Set([...plain.matchAll(/^\((?:skip|todo)\) (.*)$/gm)].map((m) => m[1]!.trim()))];
}
