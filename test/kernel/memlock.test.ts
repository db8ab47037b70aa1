/**
 * RLIMIT_MEMLOCK: iommufd charges pinned pages only to callers without CAP_IPC_LOCK, so the child
 * runs as `nobody` with `ulimit -l 256`.
 */
import { beforeAll, expect, test } from "bun:test";
import { chmodSync, statSync } from "node:fs";
import { join } from "node:path";
import { requireIommufd } from "../support/kernel.ts";

beforeAll(requireIommufd);

const root = process.getuid?.() === 0;

test.skipIf(!root)(
  "mapping more than RLIMIT_MEMLOCK allows: ENOMEM naming the limit, and the IOAS stays consistent" +
    (root ? "" : " [skipped: needs root to drop to another user]"),
  () => {
    const mode = statSync("/dev/iommu").mode & 0o777;
    chmodSync("/dev/iommu", 0o666);
    try {
      const child = join(import.meta.dir, "fixtures", "memlock-child.ts");
      const run = Bun.spawnSync(
        [
          "sh",
          "-c",
          `ulimit -l 256 && exec setpriv --reuid=65534 --regid=65534 --clear-groups "$0" "$1"`,
          process.execPath,
          child,
        ],
        { env: { ...process.env, HOME: "/tmp" }, stdout: "pipe", stderr: "pipe" },
      );
      const stderr = run.stderr.toString();
      expect({ exitCode: run.exitCode, stderr: run.exitCode ? stderr : "" }).toEqual({ exitCode: 0, stderr: "" });
      const report = JSON.parse(run.stdout.toString().trim().split("\n").pop()!);
      expect(report.uid).toBe(65534);
      expect(report.smallMapped).toBe(true);
      expect(report.bigMapped).toBeUndefined();
      expect(report.bigError).toMatchObject({ name: "IommufdError", code: "ENOMEM", operation: "IOMMU_IOAS_MAP_FILE" });
      expect(report.bigError.message).toContain("locked-memory limit");
      expect(report.bigError.hint).toContain("ulimit -l");
      expect(report.recorded).toBe(1);
      expect(report.secondMapped).toBe(true);
      expect(report.pageTableOk).toBe(true);
    } finally {
      chmodSync("/dev/iommu", mode);
    }
  },
);
