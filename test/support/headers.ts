/** Where the real kernel headers are, for tests that compile C against them. */
import { existsSync, readdirSync, statSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { DEFAULT_KERNEL } from "../../vm/images.ts";

export const projectRoot = join(import.meta.dir, "..", "..");

export function cacheRoot(): string {
  return process.env.IOMMUFD_CACHE_DIR ?? join(process.env.XDG_CACHE_HOME ?? join(homedir(), ".cache"), "bun-iommufd");
}

/**
 * The include dir of Debian's linux-libc-dev 7.x (fetched into the cache by vm/kernel.sh, which
 * never touches the system's own headers). Throws with the script's output when it cannot.
 */
export function uapiIncludeDir(): string {
  const result = Bun.spawnSync(["bash", join(projectRoot, "vm", "kernel.sh"), "headers"], {
    stdout: "pipe",
    stderr: "pipe",
  });
  const dir = result.stdout.toString().trim().split("\n").pop() ?? "";
  if (result.exitCode !== 0 || !existsSync(join(dir, "linux", "iommufd.h"))) {
    throw new Error(`vm/kernel.sh headers failed:\n${result.stderr.toString()}`);
  }
  return dir;
}

/**
 * The selftest header kept beside the newest cached test kernel (7.2), if one was built. Only the
 * test kernel's: the 6.12 build of the matrix keeps its own, an older selftest ABI.
 */
export function selftestHeaderDir(): string | undefined {
  const kernels = join(cacheRoot(), "kernels");
  if (!existsSync(kernels)) return undefined;
  const dirs = readdirSync(kernels)
    .filter((name) => name.startsWith(`linux-source-${DEFAULT_KERNEL}-`))
    .map((name) => join(kernels, name, "include"))
    .filter((dir) => existsSync(join(dir, "iommufd_test.h")))
    .sort((a, b) => statSync(b).mtimeMs - statSync(a).mtimeMs);
  return dirs[0];
}
