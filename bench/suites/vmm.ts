/**
 * The vmm suite: reading the dirty bitmap of a live-migration pass. IOMMU_HWPT_GET_DIRTY_BITMAP
 * of 1 GiB of IOVA at 4 KiB granularity (a 32 KiB bitmap) on a dirty-tracking hw page table of
 * the selftest mock domain, through HwPageTable.readDirty() and in C on the same table
 * (bench/baseline/ops_vmm.c). Setup in bench/dirty.ts: a 64 MiB memfd mapped 16 times back to
 * back gives 1 GiB of IOVA over 64 MiB of memory; every 7th page is marked dirty once, so after the
 * first read each pass walks clean page tables, as a converged migration does.
 */
import { DIRTY_LABEL, setupDirtyBench } from "../dirty.ts";
import { defineSuite, GiB, MiB, sizeLabel, type BenchCase, type Tier } from "../suite.ts";

function dirtyCase(range: number, tier: Tier): Omit<BenchCase, "suite"> {
  return {
    id: `dirty/mock/${sizeLabel(range)}@4KiB`,
    title: DIRTY_LABEL.replace("1 GiB", sizeLabel(range)),
    k: 1,
    tier,
    tracked: tier !== "quick",
    c: true,
    skip: (env) => (env.mock ? undefined : "no mock domain: the kernel lacks CONFIG_IOMMUFD_TEST"),
    setup() {
      const bench = setupDirtyBench(range);
      return {
        lib: bench.read,
        c: { op: "dirty_bitmap", fds: [bench.iommufdFd], args: [bench.hwptId, bench.iova, range, 4096] },
        close: bench.dispose,
      };
    },
  };
}

defineSuite({
  name: "vmm",
  description:
    "dirty-bitmap read (IOMMU_HWPT_GET_DIRTY_BITMAP) of a migration pass, library against C on the same table",
  cases: () => [dirtyCase(64 * MiB, "quick"), dirtyCase(1 * GiB, "default")],
});
