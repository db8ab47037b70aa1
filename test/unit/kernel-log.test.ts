/**
 * The guest's kernel-log reader (vm/kernel-log.ts) decides whether a kernel WARNING fails the run.
 * Fixed dmesg text shaped like 7.2.13's output, with hand-written expectations: a reader that
 * misses a WARN hides the pin-accounting checks; one that flags fault-injection noise fails every
 * sweep.
 */
import { describe, expect, test } from "bun:test";
import { COMMAND_END_MARKER, COMMAND_START_MARKER, commandWindow, kernelWarnings } from "../../vm/kernel-log.ts";

// A WARN_ON in iommufd's pin accounting, as dmesg prints it (the header is KERN_WARNING).
const WARN = `[   41.201553] ------------[ cut here ]------------
[   41.201601] WARNING: CPU: 1 PID: 211 at drivers/iommu/iommufd/pages.c:1045 update_unpinned+0x5d/0x70
[   41.201700] Modules linked in:
[   41.201750] CPU: 1 UID: 0 PID: 211 Comm: bun Not tainted 7.2.13 #1 PREEMPT(voluntary)
[   41.201800] RIP: 0010:update_unpinned+0x5d/0x70
[   41.201900] Call Trace:
[   41.201910]  <TASK>
[   41.201920]  iopt_area_unfill_domains+0x10b/0x1c0
[   41.201930]  iopt_unmap_iova_range+0x1f5/0x2a0
[   41.201940]  </TASK>
[   41.201950] ---[ end trace 0000000000000000 ]---`;

// What fault injection legitimately leaves in the log: warn_alloc's report with its stack dump,
// and DMAR faults from DMAs the tests block on purpose.
const NOISE = `[   40.100000] bun: page allocation failure: order:0, mode:0xcc0(GFP_KERNEL), nodemask=(null),cpuset=/,mems_allowed=0
[   40.100010] CPU: 0 UID: 0 PID: 211 Comm: bun Not tainted 7.2.13 #1 PREEMPT(voluntary)
[   40.100020] Call Trace:
[   40.100030]  <TASK>
[   40.100040]  dump_stack_lvl+0x5d/0x80
[   40.100050]  warn_alloc+0x164/0x190
[   40.100060]  </TASK>
[   40.100070] Mem-Info:
[   40.200000] DMAR: DRHD: handling fault status reg 2
[   40.200010] DMAR: [DMA Write NO_PASID] Request device [0000:00:03.0] fault addr 0x302000 [fault reason 0x05] PTE Write access is not set`;

const BUG = `[   50.000000] BUG: kernel NULL pointer dereference, address: 0000000000000008
[   50.000010] #PF: supervisor read access in kernel mode
[   50.000020] Oops: Oops: 0000 [#1] SMP NOPTI
[   50.000030] RIP: 0010:acpi_ut_update_object_reference+0x1a/0x1f0`;

describe("kernelWarnings", () => {
  test("a WARN is one report: from cut-here through the WARNING line to the end-trace line", () => {
    const reports = kernelWarnings(`${NOISE}\n${WARN}\n[   42.0] next line\n`);
    expect(reports).toHaveLength(1);
    const lines = reports[0]!.split("\n");
    expect(lines[0]).toContain("[ cut here ]");
    expect(lines[1]).toContain("WARNING: CPU: 1 PID: 211 at drivers/iommu/iommufd/pages.c:1045 update_unpinned");
    expect(lines.at(-1)).toContain("---[ end trace");
    expect(reports[0]).toContain("iopt_unmap_iova_range");
    expect(reports[0]).not.toContain("next line");
  });

  test("fault-injection noise (page allocation failure with its stack, DMAR faults) is not a report", () => {
    expect(kernelWarnings(NOISE)).toEqual([]);
  });

  test("BUG and Oops are reports; raw dmesg (-r) level prefixes and console escapes do not hide them", () => {
    const raw = WARN.split("\n")
      .map((l) => `<4>${l}`)
      .join("\n");
    expect(kernelWarnings(raw)).toHaveLength(1);
    const console = `\x1b[0m${BUG.replaceAll("\n", "\r\n")}\r\n`;
    const reports = kernelWarnings(console);
    expect(reports.length).toBeGreaterThanOrEqual(1);
    expect(reports.join("\n")).toContain("BUG: kernel NULL pointer dereference");
    expect(reports.join("\n")).toContain("Oops: 0000");
  });
});

describe("commandWindow", () => {
  test("only what the kernel logged while the command ran counts", () => {
    const boot = WARN.replaceAll("41.", "1.");
    const dmesg = `${boot}\n[    3.0] ${COMMAND_START_MARKER}\n${NOISE}\n[   60.0] ${COMMAND_END_MARKER} 0\n${BUG}\n`;
    const window = commandWindow(dmesg);
    expect(window).toContain("page allocation failure");
    expect(window).not.toContain("cut here");
    expect(window).not.toContain("BUG:");
    expect(kernelWarnings(window)).toEqual([]);
  });

  test("a WARN while the command ran is in the window; a command that never finished keeps the rest", () => {
    const dmesg = `[    3.0] ${COMMAND_START_MARKER}\n${WARN}\n`;
    expect(kernelWarnings(commandWindow(dmesg))).toHaveLength(1);
    expect(commandWindow("no markers at all\n")).toBe("");
  });
});
