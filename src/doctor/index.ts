/**
 * `bun-iommufd doctor`: can this machine run the library, and if not, what to change. The CLI in
 * bin/ only prints what runDoctor() returns, so everything here is usable (and tested) as an API.
 *
 * @example
 * ```ts
 * import { formatReport, runDoctor } from "./src/doctor/index.ts"; // from the package root
 * const report = runDoctor();
 * console.log(formatReport(report));
 * process.exitCode = report.exitCode;
 * ```
 */
import {
  type CheckResult,
  type CheckStatus,
  checkConfig,
  checkFeatures,
  checkHugePages,
  checkIommufd,
  checkKernel,
  checkMemlock,
} from "./checks.ts";
import { checkBackend } from "./backend-check.ts";
import { checkDmaBuf, checkIommu, checkVfio } from "./device-checks.ts";
import { gatherFacts, realSystem, type DoctorFacts, type DoctorSystem, type GatherOptions } from "./facts.ts";

export * from "./backend-check.ts";
export * from "./checks.ts";
export * from "./device-checks.ts";
export * from "./facts.ts";
export * from "./parse.ts";

export interface DoctorReport {
  /** Whether the library can do DMA here: through iommufd, or else through a VFIO type1 container. */
  usable: boolean;
  /** Which backend makes it usable: iommufd when /dev/iommu works, else type1; undefined when neither. */
  backend: "iommufd" | "type1" | undefined;
  /** 0 when usable, else 1: what the CLI exits with. */
  exitCode: 0 | 1;
  /** One line on the outcome, naming the first failure when there is one. */
  verdict: string;
  kernel: string;
  arch: string;
  uid: number | undefined;
  inVm: boolean;
  counts: Record<CheckStatus, number>;
  checks: CheckResult[];
  facts: DoctorFacts;
}

export interface DoctorOptions extends GatherOptions {
  /** Replace the real machine (tests). */
  system?: DoctorSystem;
}

/** All checks, in the order they are printed. */
export function evaluate(facts: DoctorFacts): CheckResult[] {
  return [
    checkKernel(facts),
    checkConfig(facts),
    checkIommufd(facts),
    checkFeatures(facts),
    checkMemlock(facts),
    checkIommu(facts),
    checkVfio(facts),
    checkBackend(facts),
    checkHugePages(facts),
    checkDmaBuf(facts),
  ];
}

/** Build a report from facts; pure. */
export function reportFrom(facts: DoctorFacts): DoctorReport {
  const checks = evaluate(facts);
  const status = (id: string) => checks.find((c) => c.id === id)?.status;
  // Without iommufd the library still works through a VFIO container (Debian's stock kernels).
  const backend =
    status("iommufd") === "pass"
      ? "iommufd"
      : facts.vfioContainer === true && status("backend") === "pass"
        ? "type1"
        : undefined;
  const usable = backend !== undefined;
  const counts: Record<CheckStatus, number> = { pass: 0, warn: 0, fail: 0 };
  for (const check of checks) counts[check.status]++;
  const iommufd = checks.find((c) => c.id === "iommufd");
  const warnings = counts.warn === 1 ? "1 warning" : `${counts.warn} warnings`;
  const notes = counts.warn ? ` (${warnings} about optional features)` : "";
  const verdict =
    backend === "iommufd"
      ? `iommufd is usable here${notes}`
      : backend === "type1"
        ? `usable here through the VFIO type1 backend (/dev/vfio/vfio); iommufd is not: ${iommufd?.summary ?? "see above"}`
        : `iommufd is NOT usable here, nor a VFIO container: ${iommufd?.summary ?? "see above"}.${iommufd?.fix ? ` Fix: ${iommufd.fix}` : ""}`;
  return {
    usable,
    backend,
    exitCode: usable ? 0 : 1,
    verdict,
    kernel: facts.kernelRelease,
    arch: facts.arch,
    uid: facts.uid,
    inVm: facts.inVm,
    counts,
    checks,
    facts,
  };
}

/** Gather the facts of this machine (or `options.system`) and judge them. Never throws for a missing file. */
export function runDoctor(options: DoctorOptions = {}): DoctorReport {
  return reportFrom(gatherFacts(options.system ?? realSystem, options));
}

const LABEL: Record<CheckStatus, string> = { pass: "PASS", warn: "WARN", fail: "FAIL" };
const COLOR: Record<CheckStatus, string> = { pass: "\x1b[32m", warn: "\x1b[33m", fail: "\x1b[31m" };
const RESET = "\x1b[0m";

export interface FormatOptions {
  /** ANSI colours on the PASS/WARN/FAIL labels. Default false. */
  color?: boolean;
  /** Print the detail lines (devices, pools, options). Default true. */
  details?: boolean;
}

/** The human-readable report: one line per check, its fix under it, then the verdict. */
export function formatReport(report: DoctorReport, options: FormatOptions = {}): string {
  const color = options.color ?? false;
  const width = Math.max(...report.checks.map((c) => c.title.length));
  const where = report.inVm ? ", in the QEMU test guest" : "";
  const who = report.uid === undefined ? "" : `, uid ${report.uid}`;
  const lines = [`bun-iommufd doctor: Linux ${report.kernel} (${report.arch}${who}${where})`, ""];
  for (const check of report.checks) {
    const label = color ? `${COLOR[check.status]}${LABEL[check.status]}${RESET}` : LABEL[check.status];
    lines.push(`${label}  ${check.title.padEnd(width)}  ${check.summary}`);
    const indent = " ".repeat(6 + width + 2);
    if (check.fix) lines.push(`${indent}fix: ${check.fix}`);
    if (options.details ?? true) for (const detail of check.details ?? []) lines.push(`${indent}${detail}`);
  }
  const { pass, warn, fail } = report.counts;
  lines.push("", `${pass} passed, ${warn} warnings, ${fail} failed: ${report.verdict}`);
  return lines.join("\n");
}

/** The --json output: the report with its facts, stable field names. */
export function reportJson(report: DoctorReport): string {
  return JSON.stringify(report, null, 2);
}
