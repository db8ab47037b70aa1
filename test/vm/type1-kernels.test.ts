// The VFIO type1 suites on the other kernels of the matrix: Debian's stock 6.1 (no iommufd at all,
// the hosts this backend is for) and 6.12 LTS, each booted with edu and two NVMe controllers. The
// default 7.2 guest runs the same suites with the other kernel tests. Skipped where the kernel is
// not cached (under CI a skip fails: scripts/test.ts fetches and builds the matrix first).
import { afterAll, describe, expect, test } from "bun:test";
import { cachedKernel, KERNEL_NAMES, type KernelName } from "../../vm/images.ts";
import { bin, noGuest, processesMentioning, removeMarkers, runCli } from "./support.ts";

afterAll(removeMarkers);

const SUITES = ["test/kernel/type1.test.ts", "test/kernel/nvme-type1.test.ts"];
const others = KERNEL_NAMES.filter((name): name is Exclude<KernelName, "7.2"> => name !== "7.2");
const cached = new Map<KernelName, string | undefined>();
for (const name of others) cached.set(name, noGuest ? undefined : await cachedKernel(name));

for (const name of others) {
  const skip = noGuest ?? (cached.get(name) ? undefined : `not cached: bash vm/kernel.sh build ${name}`);
  describe.skipIf(skip !== undefined)(`type1 on --kernel ${name}`, () => {
    test("the container, group, edu DMA and DmaHeap suite and the NVMe-on-type1 suite pass", async () => {
      const devices = ["--device", "edu", "--device", "nvme", "--device", "nvme,cmb=16M"];
      const argv = [process.execPath, bin, "vm", "--kernel", name, ...devices, "--"];
      const r = await runCli([...argv, "bun", "test", "--timeout", "120000", ...SUITES]);
      const summary = /(\d+) pass[\s\S]*?(\d+) fail/.exec(r.stderr);
      console.log(`type1 on --kernel ${name}: ${summary ? `${summary[1]} pass, ${summary[2]} fail` : "no summary"}`);
      if (r.code !== 0) console.log(r.stderr);
      expect(r.code).toBe(0);
      expect(Number(summary?.[1])).toBeGreaterThanOrEqual(30);
      expect(processesMentioning(r.marker)).toEqual([]);
    }, 600_000);
  });
}
