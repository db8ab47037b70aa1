/**
 * What the booted kernel of the test matrix has, for suites that run on every kernel
 * (scripts/test.ts lists them): where a feature is missing the test asserts the typed error
 * instead of skipping. The expectations are written down per kernel, not read from the library's
 * own detection, so that detection that drifts fails the run instead of silently moving tests from
 * one branch to the other. Outside the guest (a host with VFIO), the nodes and the library decide.
 */
import { existsSync } from "node:fs";

export interface KernelHas {
  /** /dev/iommu and VFIO cdevs. */
  iommufd: boolean;
  /** IOMMU_IOAS_MAP_FILE (6.13+): without it mapFile of a memfd maps by address. */
  mapFile: boolean;
  /** VFIO_DEVICE_FEATURE_DMA_BUF: a BAR exported as a dma-buf. */
  dmaBufExport: boolean;
  /**
   * A mapping without `readable` blocks device reads. Intel's driver before the generic page
   * table (6.12 here) sets bit 0 of every second-stage entry, which is the read bit there, so
   * reads through a write-only mapping go through (measured in the guest: every write-only
   * IOVA, fresh domain or not, was readable on 6.12 and on none on 7.2).
   */
  writeOnlyEnforced: boolean;
}

/** The kernels of the matrix (vm/images.ts), keyed by the series IOMMUFD_VM_KERNEL starts with. */
const MATRIX: Record<string, KernelHas> = {
  "7.2": { iommufd: true, mapFile: true, dmaBufExport: true, writeOnlyEnforced: true },
  "6.12": { iommufd: true, mapFile: false, dmaBufExport: false, writeOnlyEnforced: false },
  debian: { iommufd: false, mapFile: false, dmaBufExport: false, writeOnlyEnforced: false },
};

/** The matrix name of the guest's kernel (7.2, 6.12, debian), or undefined outside the guest. */
export function matrixKernel(): string | undefined {
  const booted = process.env.IOMMUFD_VM_KERNEL;
  if (!booted) return undefined;
  if (booted.startsWith("debian-")) return "debian";
  const series = /^(\d+\.\d+)/.exec(booted)?.[1];
  if (series && series in MATRIX) return series;
  throw new Error(`IOMMUFD_VM_KERNEL=${booted} is no kernel of the test matrix (7.2, 6.12, debian)`);
}

/** What the booted kernel has: the matrix's table in the guest, the nodes on a host. */
export function kernelHas(): KernelHas {
  const name = matrixKernel();
  if (name) return MATRIX[name]!;
  // A host: the node says iommufd; 6.13+ features are assumed present there (a host without
  // them fails those tests with the kernel's own errno, which names what is missing).
  const iommufd = existsSync("/dev/iommu");
  return { iommufd, mapFile: iommufd, dmaBufExport: iommufd, writeOnlyEnforced: iommufd };
}

/** A test title's suffix naming the branch a kernel takes, so the report says which one ran. */
export function onThisKernel(has: boolean, missing: string): string {
  return has ? "" : ` [${matrixKernel() ?? "this host"}: ${missing}]`;
}
