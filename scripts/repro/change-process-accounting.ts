#!/usr/bin/env bun
/**
 * Reproducer: IOMMU_IOAS_CHANGE_PROCESS mis-accounts pinned memory for a caller with
 * CAP_IPC_LOCK (seen on Linux 7.2.13, the test guest's kernel).
 *
 * Run as root where /dev/iommu and CONFIG_IOMMUFD_TEST exist (the test guest):
 *   bun run vm -- bun scripts/repro/change-process-accounting.ts
 * and, for comparison, unprivileged:
 *   bun run vm -- sh -c 'chmod 666 /dev/iommu; ulimit -l 65536; exec setpriv --reuid=65534 --regid=65534 --clear-groups bun scripts/repro/change-process-accounting.ts'
 *
 * What happens: the old process maps a 1 MiB memfd under the selftest mock domain (VmPin +1024 kB)
 * and hands the iommufd and memfd to a new process, which calls change-process and then unmaps.
 * Expected (and what an unprivileged caller gets): the old process's VmPin drops to 0 at the
 * hand-over, the new one's rises to 1024 kB, and returns to 0 at the unmap.
 * With CAP_IPC_LOCK the pages are accounted IOPT_PAGES_ACCOUNT_NONE: change-process skips the
 * uncharge/charge step for them (need_charge_update() is false) although mapping did charge
 * mm->pinned_vm (iopt_pages_update_pinned() charges pinned_vm in every mode) and change_mm()
 * moves the pages to the new mm. So the old process keeps VmPin 1024 kB it no longer pins, and
 * the new one's pinned_vm goes below zero at its unmap.
 *
 * Exit status: 0 when the accounting is right, 1 when it shows the bug.
 */
import { readFileSync } from "node:fs";
import { changeProcess, hasIpcLock, Iommufd, MemfdBuffer } from "../../src/index.ts";
import { MOCK_APERTURE_START, MockDomain } from "../../src/testing/selftest.ts";
import { adoptIoas } from "../../src/vmm/handover.ts";

const SIZE = 1 << 20;
const vmPin = () => Number(/^VmPin:\s+(-?\d+)/m.exec(readFileSync("/proc/self/status", "utf8"))?.[1]);

if (process.argv[2] === "--new") {
  const iommufd = Iommufd.fromFd(3);
  const buffer = MemfdBuffer.fromFd(4);
  const ioas = adoptIoas(iommufd, Number(process.argv[3]));
  const before = vmPin();
  changeProcess(iommufd, { warnIfPrivileged: false });
  const after = vmPin();
  console.log("changed");
  // Let the old process read its own VmPin before this one changes anything else.
  for await (const chunk of Bun.stdin.stream()) if (new TextDecoder().decode(chunk).includes("go")) break;
  ioas.unmap(MOCK_APERTURE_START, SIZE);
  console.log(JSON.stringify({ before, afterChange: after, afterUnmap: vmPin() }));
  buffer.close();
  iommufd.close();
} else {
  const privileged = hasIpcLock();
  const iommufd = Iommufd.open();
  const ioas = iommufd.createIoas();
  MockDomain.attach(ioas);
  const buffer = MemfdBuffer.create(SIZE);
  ioas.mapFile(buffer, { iova: MOCK_APERTURE_START });
  const oldBefore = vmPin();
  const child = Bun.spawn([process.execPath, import.meta.path, "--new", String(ioas.id)], {
    stdio: ["pipe", "pipe", "inherit", iommufd.fd, buffer.fd],
  });
  let output = "";
  const reader = child.stdout.getReader();
  while (!output.includes("changed\n")) {
    const { value, done } = await reader.read();
    if (done) break;
    output += new TextDecoder().decode(value);
  }
  const oldAfter = vmPin();
  child.stdin.write("go\n");
  await child.stdin.end();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    output += new TextDecoder().decode(value);
  }
  const report = JSON.parse(output.trim().split("\n").pop()!);
  await child.exited;
  const expected = { oldBefore: SIZE / 1024, oldAfter: 0, newAfterChange: SIZE / 1024, newAfterUnmap: 0 };
  const seen = {
    oldBefore,
    oldAfter,
    newAfterChange: report.afterChange - report.before,
    newAfterUnmap: report.afterUnmap,
  };
  const ok = JSON.stringify(seen) === JSON.stringify(expected);
  console.log(
    `caller ${privileged ? "has" : "lacks"} CAP_IPC_LOCK; kernel ${readFileSync("/proc/sys/kernel/osrelease", "utf8").trim()}`,
  );
  console.log(`expected VmPin (kB): ${JSON.stringify(expected)}`);
  console.log(`seen     VmPin (kB): ${JSON.stringify(seen)}`);
  console.log(ok ? "accounting correct" : "ACCOUNTING WRONG: the kernel bug described at the top of this file");
  buffer.close();
  iommufd.close();
  process.exitCode = ok ? 0 : 1;
}
