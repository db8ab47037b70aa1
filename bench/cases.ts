/**
 * The benchmark's case list, shared by the library side (mitata) and the C baseline: one id
 * names the same ioctl sequence on both sides ("mapFile/mock/4KiB").
 */
import { existsSync, readFileSync } from "node:fs";

export type Op = "mapFile" | "prepared" | "map" | "copy" | "mapFileHuge" | "rawFfi" | "vfioDmabuf";
export type Domain = "none" | "mock" | "edu";

export interface CaseSpec {
  id: string;
  op: Op;
  domain: Domain;
  size: number;
  /** Pairs per timed iteration, on both sides (see pairsPerIteration). */
  k: number;
}

export interface SkippedCase {
  id: string;
  reason: string;
}

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

/** Fixed IOVA of every map: inside the mock domain's aperture, below edu's 28-bit DMA mask. */
export const BENCH_IOVA = 1 << 24;

export const VFIO_DEVICE = "/dev/vfio/devices/vfio0";
/** edu's BAR0 is 1 MiB: dma-bufs of it are at most that. */
const EDU_BAR0 = 1 * MiB;

export const OP_LABEL: Record<Op, string> = {
  mapFile: "MAP_FILE memfd + UNMAP",
  map: "MAP (by VA) memfd + UNMAP",
  copy: "COPY + UNMAP",
  mapFileHuge: "MAP_FILE 2M-hugetlb memfd + UNMAP",
  prepared: "MAP_FILE memfd + UNMAP through a PreparedMapping (ioas.prepareMapFile)",
  rawFfi: "raw bun:ffi MAP_FILE + UNMAP (no library)",
  vfioDmabuf: "MAP_FILE VFIO dma-buf (edu BAR0) + UNMAP",
};

export const DOMAIN_LABEL: Record<Domain, string> = {
  none: "no domain (bookkeeping only, nothing pinned)",
  mock: "kernel selftest mock domain (pages pinned and mapped)",
  edu: "edu behind the emulated Intel IOMMU (VT-d page table, caching mode)",
};

export function sizeLabel(bytes: number): string {
  if (bytes % GiB === 0) return `${bytes / GiB}GiB`;
  if (bytes % MiB === 0) return `${bytes / MiB}MiB`;
  if (bytes % KiB === 0) return `${bytes / KiB}KiB`;
  return `${bytes}B`;
}

export function caseId(op: Op, domain: Domain, size: number): string {
  return `${op}/${domain}/${sizeLabel(size)}`;
}

export interface Mode {
  quick: boolean;
  /**
   * Warm-up, the same rule on both sides: at least `warmupPairs` pairs and `warmupMs`, or
   * `warmupMaxMs` at most (large sizes under a domain take milliseconds per pair). Under TCG the
   * first tens of thousands of pairs run 2-5x slower: each JIT tier-up rewrites code pages, and
   * QEMU then throws away its translations of them.
   */
  warmupPairs: number;
  warmupMs: number;
  warmupMaxMs: number;
  /** Library side only, once per process: the first seconds of a Bun process in TCG are slow. */
  processWarmupMs: number;
  /**
   * The C side's stop rule; mitata's is fixed at 642 ms (its k_min_cpu_time), so only a full run,
   * which uses the same value, makes the two sides sample alike. Quick runs compare nothing.
   */
  minMs: number;
  /** C, library, C, library...: how many of each. */
  rounds: number;
}

export function mode(quick: boolean): Mode {
  return quick
    ? { quick, warmupPairs: 2000, warmupMs: 0, warmupMaxMs: 200, processWarmupMs: 0, minMs: 200, rounds: 1 }
    : { quick, warmupPairs: 40_000, warmupMs: 2000, warmupMaxMs: 4000, processWarmupMs: 8000, minMs: 642, rounds: 2 };
}

/**
 * Pairs per timed iteration. mitata batches calls (4096 per sample) only when its very first
 * call is fast, which a TCG guest rarely grants, and unbatched its clock reads (2.5 us each there)
 * would be a third of a 4 KiB pair. So each iteration is a loop of k pairs, about a millisecond
 * in the guest, on both sides; the tables divide by k. Fixed per domain and size, so that mitata's
 * summaries compare like with like inside a group.
 */
export function pairsPerIteration(domain: Domain, size: number): number {
  if (domain === "none") return 128;
  if (size <= 4 * KiB) return 32;
  if (size <= 64 * KiB) return 8;
  return 1;
}

function meminfo(): Map<string, number> {
  const out = new Map<string, number>();
  try {
    for (const line of readFileSync("/proc/meminfo", "utf8").split("\n")) {
      const m = /^(\S+):\s+(\d+)(?: kB)?/.exec(line);
      if (m) out.set(m[1]!, Number(m[2]) * (line.endsWith("kB") ? 1024 : 1));
    }
  } catch {
    // no /proc: every memory check below then fails closed
  }
  return out;
}

export interface Probe {
  /** Free 2 MiB huge pages, in bytes. */
  hugeFree: number;
  memAvailable: number;
  vfio: boolean;
  mock: boolean;
}

/**
 * Which cases this machine can run, and why not the others. The domains themselves (mock needs
 * CONFIG_IOMMUFD_TEST) are probed by the caller, which can open /dev/iommu.
 */
export function planCases(
  m: Mode,
  probe: Probe,
  filter: RegExp | undefined,
): { cases: CaseSpec[]; skipped: SkippedCase[] } {
  const sizes = m.quick ? [4 * KiB, 64 * KiB] : [4 * KiB, 64 * KiB, 2 * MiB, 64 * MiB, 1 * GiB];
  const domains: Domain[] = ["none", "mock", "edu"];
  const ops: Op[] = ["rawFfi", "mapFile", "prepared", "map", "copy", "mapFileHuge", "vfioDmabuf"];
  const cases: CaseSpec[] = [];
  const skipped: SkippedCase[] = [];
  for (const domain of domains) {
    for (const size of sizes) {
      for (const op of ops) {
        const id = caseId(op, domain, size);
        if (filter && !filter.test(id)) continue;
        const reason = whyNot(op, domain, size, m, probe);
        if (reason === null) continue; // not a combination worth listing
        if (reason) skipped.push({ id, reason });
        else cases.push({ id, op, domain, size, k: pairsPerIteration(domain, size) });
      }
    }
  }
  return { cases, skipped };
}

/** "" when the case runs, a reason when it is skipped here, null when it is never a case. */
function whyNot(op: Op, domain: Domain, size: number, m: Mode, probe: Probe): string | null {
  // The raw-FFI reference exists to explain the 4 KiB overhead; at larger sizes the kernel dominates.
  if (op === "rawFfi" && (size !== 4 * KiB || domain === "edu")) return null;
  if (op === "mapFileHuge" && size < 2 * MiB) return null;
  if (op === "vfioDmabuf" && size > EDU_BAR0) return null;
  // One edu device attaches to one IOAS; a copy needs two with domains.
  if (op === "copy" && domain === "edu") return null;
  // edu's page table is emulated by QEMU with an invalidation per map: keep its sizes modest.
  if (domain === "edu" && size > 64 * MiB) return null;
  if (domain === "edu" && m.quick) return null;

  if (domain === "mock" && !probe.mock) return "no mock domain: the kernel lacks CONFIG_IOMMUFD_TEST";
  if ((domain === "edu" || op === "vfioDmabuf") && !probe.vfio) return `no ${VFIO_DEVICE}`;
  if (op === "mapFileHuge" && probe.hugeFree < size) {
    return `needs ${size / MiB} MiB of free 2 MiB huge pages, ${probe.hugeFree / MiB} MiB free (raise /proc/sys/vm/nr_hugepages)`;
  }
  // The library and the C side each hold one buffer at a time (one after the other), but a
  // pinned GiB beside a 4 GiB guest's page cache is where the OOM killer starts looking.
  if (size >= GiB && probe.memAvailable < size + 2 * GiB) {
    return `needs ${(size + 2 * GiB) / GiB} GiB available, ${(probe.memAvailable / GiB).toFixed(1)} GiB here`;
  }
  return "";
}

export function probeMachine(): Omit<Probe, "mock"> {
  const info = meminfo();
  const hugeSize = info.get("Hugepagesize") ?? 0;
  return {
    hugeFree: hugeSize === 2 * MiB ? (info.get("HugePages_Free") ?? 0) * hugeSize : 0,
    memAvailable: info.get("MemAvailable") ?? 0,
    vfio: existsSync(VFIO_DEVICE),
  };
}
