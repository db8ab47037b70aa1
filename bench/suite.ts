/**
 * The benchmark's plug-in point: every measured operation is a BenchCase in a suite. A suite is
 * a file in bench/suites/ that calls defineSuite() and is listed in bench/suites/index.ts.
 *
 * A case measures one operation through the library ("lib") and, when it has one, the same
 * operation in C ("c", bench/baseline/) on the very objects the library side set up: the C
 * program is handed the case's file descriptors (iommufd, memfd, dma-buf, device...) when it is
 * spawned, so both sides map the same pages into the same IOAS. A case may instead (or as well)
 * compare with a second library operation ("reference", e.g. mapFile+unmap beside a heap
 * alloc+free): its `speedup` is reference time over lib time.
 *
 * The runner (bench/runner.ts) alternates the sides per round (C, lib, lib, C, C, lib, ...),
 * forms one ratio per round (lib / C) and reports the median with an interval. See
 * /work/coord/bench-api.md or bench/README.md ("Adding a case").
 */

/** The smallest run that includes a case: quick (CI smoke) < default (`bun bench`) < full. */
export type Tier = "quick" | "default" | "full";
export const TIERS: Tier[] = ["quick", "default", "full"];

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

/** Fixed IOVA of the suites' maps: inside the mock domain's aperture, below edu's 28-bit DMA mask. */
export const BENCH_IOVA = 1 << 24;

/** What the machine offers, probed once before any case is planned. Suites may add fields. */
export interface BenchEnv {
  /** The kernel has the selftest mock domain (CONFIG_IOMMUFD_TEST). */
  mock: boolean;
  /** QEMU's edu on vfio-pci, as a VFIO cdev path, when present. */
  edu?: string;
  /** The kernel has the legacy VFIO container with the type1 IOMMU (/dev/vfio/vfio). */
  type1: boolean;
  /** Free 2 MiB huge pages, in bytes. */
  hugeFree: number;
  memAvailable: number;
  /** /proc/self/pagemap shows physical frame numbers (root): layouts can be checked. */
  pagemap: boolean;
  /** Running in the QEMU/TCG guest of vm/run.ts. */
  vm: boolean;
  /** Other suites' probes (NVMe controllers, interrupt-capable devices...): name -> value. */
  extra: Record<string, unknown>;
}

/** How the pages of a case's buffer lie in physical memory, as checked through pagemap. */
export interface Layout {
  /** "scattered": 4 KiB pages, no two neighbours physically adjacent (on purpose). "huge": 2 MiB hugetlb pages. */
  kind: "scattered" | "huge" | "single-page" | "device";
  pages: number;
  /** Physically contiguous runs in address order, and the longest, in 4 KiB pages (when checked). */
  runs?: number;
  longestRun?: number;
  /** Why it could not be checked. */
  unchecked?: string;
}

/**
 * The C side of a case: an op of the C program (bench/baseline/ops_*.c, registered with
 * BENCH_OP) run on the library side's objects.
 */
export interface CCounterpart {
  /** The op's name in C ("map_file", "map_va", "copy"...). */
  op: string;
  /** Descriptors handed to the C program: they are fds 3, 4, ... there, in this order. */
  fds: number[];
  /** The op's integer arguments (IOAS ids, sizes, IOVAs), as the C op reads them. */
  args: (number | bigint)[];
}

/** A case set up and ready to time. Everything is created outside the timing. */
export interface CaseInstance {
  /** One operation through the library (a map+unmap pair, an alloc+free...). May return a Promise. */
  lib: () => unknown;
  /** The same operation in C, on these objects. Required when the case says `c: true`. */
  c?: CCounterpart;
  /** A second library operation this one is compared with: speedup = reference / lib. */
  reference?: () => unknown;
  /** Physical layout of the memory the operation maps, when it matters. */
  layout?: Layout;
  /** Releases everything setup() made (also called after a failure mid-run). */
  close(): void;
}

export interface BenchCase {
  /** Unique, path-like, stable across runs (history is keyed by it): "mapFile/mock/2MiB/huge". */
  id: string;
  /** The suite it belongs to (set by defineSuite). */
  suite: string;
  /** What one operation is, for people. */
  title: string;
  /** Bytes per operation, for GiB/s and the time-against-size chart. */
  bytes?: number;
  /** Operations per timed iteration on both sides (a clock read costs microseconds under TCG). */
  k: number;
  tier: Tier;
  /** Compared with earlier runs and shown in `bun bench history`. */
  tracked: boolean;
  /** Whether the plan includes a C side: a quick run fails when a case with `c: true` reports none. */
  c: boolean;
  /** Whether the plan includes a reference side (speedup). */
  reference?: boolean;
  /**
   * Measured round by round, taking turns with the interleaved cases next to it in the plan
   * (runner.ts runInterleaved). Only for setups that can all be held open at once.
   */
  interleave?: boolean;
  /** Why the case cannot run on this machine, or undefined when it can. Checked before setup. */
  skip?(env: BenchEnv): string | undefined;
  setup(env: BenchEnv): CaseInstance | Promise<CaseInstance>;
}

export interface Suite {
  name: string;
  /** One line for people: what the suite measures and against what. */
  description: string;
  /** The cases for this machine (all tiers: the runner picks by tier and --filter). */
  cases(env: BenchEnv): Omit<BenchCase, "suite">[];
}

const suites: Suite[] = [];

/** Registers a suite; called at the top level of a bench/suites/ file. */
export function defineSuite(suite: Suite): void {
  if (suites.some((s) => s.name === suite.name)) throw new Error(`bench: suite ${suite.name} defined twice`);
  suites.push(suite);
}

export function registeredSuites(): readonly Suite[] {
  return suites;
}

export function inTier(caseTier: Tier, runTier: Tier): boolean {
  return TIERS.indexOf(caseTier) <= TIERS.indexOf(runTier);
}

export function sizeLabel(bytes: number): string {
  if (bytes % GiB === 0) return `${bytes / GiB}GiB`;
  if (bytes % MiB === 0) return `${bytes / MiB}MiB`;
  if (bytes % KiB === 0) return `${bytes / KiB}KiB`;
  return `${bytes}B`;
}

/** Objects of one case, closed in reverse order of creation (errors of one do not stop the rest). */
export class Scope {
  readonly #items: { close?(): void; destroy?(): void }[] = [];
  keep<T extends { close?(): void; destroy?(): void }>(item: T): T {
    this.#items.push(item);
    return item;
  }
  close(): void {
    const errors: unknown[] = [];
    for (const item of this.#items.splice(0).reverse()) {
      try {
        if (item.destroy) item.destroy();
        else item.close?.();
      } catch (error) {
        errors.push(error);
      }
    }
    if (errors.length) throw new AggregateError(errors, `bench: ${errors.length} teardown error(s)`);
  }
  /** For a setup that failed half-way: releases what it kept and gives back the setup's error to throw. */
  abandon(error: unknown): unknown {
    try {
      this.close();
    } catch {
      // the setup error is the one to report
    }
    return error;
  }
}
