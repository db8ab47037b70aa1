// Reading the guest kernel's log: which reports (WARNING, BUG, Oops...) it holds, and which of them
// happened while the command ran. Pure functions, no side effects at import.

/** Lines that open a kernel report. warn_alloc's "page allocation failure" (expected under fault
 * injection) and IOMMU fault lines are not reports: they carry no kernel bug. */
const REPORT_START =
  /(------------\[ cut here \]------------|WARNING: CPU: |\bWARNING: .* at |\bBUG: |kernel BUG at |\bOops: |general protection fault|UBSAN: |KASAN: |Kernel panic - not syncing|INFO: task .* blocked for more than|watchdog: BUG: soft lockup|rcu: INFO: rcu_.* stall)/;
const REPORT_END = /---\[ end (trace|Kernel panic)/;
const MAX_REPORT_LINES = 40;

/** The harness's markers around the command (written to /dev/kmsg by vm/guest-init.sh). */
export const COMMAND_START_MARKER = "iommufd-vm: command starting";
export const COMMAND_END_MARKER = "iommufd-vm: command exited";

function plainLines(log: string): string[] {
  // Console logs carry escape sequences and carriage returns; dmesg -r carries "<4>" prefixes.
  return log
    .replace(/\x1b(\[[0-9;?]*[A-Za-z]|.)/g, "")
    .replaceAll("\r", "")
    .split("\n")
    .map((l) => l.replace(/^<\d+>/, ""));
}

/**
 * The kernel reports in a log (dmesg or serial console), one string per report: its first line
 * and what follows up to the report's "---[ end trace" line (at most 40 lines). A "cut here" line
 * and the WARNING that follows it count as one report.
 */
export function kernelWarnings(log: string): string[] {
  const lines = plainLines(log);
  const reports: string[] = [];
  let current: string[] | undefined;
  const flush = () => {
    while (current?.length && current.at(-1)!.trim() === "") current.pop();
    if (current?.some((l) => !l.includes("[ cut here ]"))) reports.push(current.join("\n"));
    current = undefined;
  };
  for (const line of lines) {
    if (REPORT_START.test(line)) {
      const onlyCutHere = current?.length === 1 && current[0]!.includes("[ cut here ]");
      if (onlyCutHere && !line.includes("[ cut here ]")) {
        current!.push(line);
        continue;
      }
      flush();
      current = [line];
      continue;
    }
    if (!current) continue;
    if (current.length < MAX_REPORT_LINES) current.push(line);
    if (REPORT_END.test(line)) flush();
  }
  flush();
  return reports;
}

/**
 * The part of the guest's kernel log written while the command ran (between the harness's
 * markers); from the start marker to the end when the command did not finish; "" without markers.
 */
export function commandWindow(dmesg: string): string {
  const start = dmesg.indexOf(COMMAND_START_MARKER);
  if (start < 0) return "";
  const from = dmesg.indexOf("\n", start);
  if (from < 0) return "";
  const end = dmesg.indexOf(COMMAND_END_MARKER, from);
  if (end < 0) return dmesg.slice(from + 1);
  return dmesg.slice(from + 1, dmesg.lastIndexOf("\n", end) + 1);
}
