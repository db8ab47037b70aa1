/**
 * The map suite: one map + unmap pair per operation, through the library's public API, against
 * the same ioctls in C (bench/baseline/ops_map.c) on the same iommufd, IOAS and memfd/dma-buf.
 * Domain edu-type1 is the same edu through the other backend: a VFIO type1 container holding
 * edu's group, VFIO_IOMMU_MAP_DMA + UNMAP_DMA on both sides (bench/baseline/ops_type1.c).
 */
import { Iommufd, type MemfdBuffer, VfioContainer, VfioDevice, type Ioas, type MappableFile } from "../../src/index.ts";
import { MockDomain } from "../../src/testing/selftest.ts";
import { layoutBuffer } from "../layout.ts";
import { rawMapFilePair } from "../rawffi.ts";
import {
  BENCH_IOVA,
  defineSuite,
  GiB,
  KiB,
  MiB,
  Scope,
  sizeLabel,
  type BenchCase,
  type BenchEnv,
  type CaseInstance,
  type Layout,
  type Tier,
} from "../suite.ts";

/** edu's BAR0 is 1 MiB: dma-bufs of it are at most that. */
const EDU_BAR0 = 1 * MiB;

export type MapOp = "mapFile" | "prepared" | "rawFfi" | "map" | "copy" | "vfioDmabuf";
export type Domain = "none" | "mock" | "edu" | "edu-type1";
type LayoutKind = "scattered" | "huge" | "single-page" | "device";

const TITLE: Record<MapOp, string> = {
  mapFile: "ioas.mapFile(memfd) + mapping.unmap() (MAP_FILE + UNMAP)",
  prepared: "PreparedMapping map() + unmap() (ioas.prepareMapFile: MAP_FILE + UNMAP)",
  rawFfi: "bare bun:ffi MAP_FILE + UNMAP, structs encoded once (no library: the floor)",
  map: "ioas.map(memfd by address) + unmap() (MAP + UNMAP)",
  copy: "dst.copy(src) + unmap() (COPY + UNMAP)",
  vfioDmabuf: "mapFile of a VFIO dma-buf of edu's BAR0 + unmap()",
};

/** The only op of domain edu-type1: type1 has no map by file, no COPY, no prepared map. */
const TYPE1_TITLE = "container.mapDma(memfd by address) + unmap() (VFIO_IOMMU_MAP_DMA + UNMAP_DMA)";

const DOMAIN: Record<Domain, string> = {
  none: "no domain: bookkeeping only, nothing pinned",
  mock: "kernel selftest mock domain: pages pinned and mapped",
  edu: "edu behind the emulated Intel IOMMU (VT-d page table, caching mode)",
  "edu-type1": "edu behind the emulated Intel IOMMU, through a VFIO type1 container (its group, not its cdev)",
};

/** Operations per timed iteration: about a millisecond in the guest, the same on both sides. */
function opsPerIteration(domain: Domain, size: number): number {
  if (domain === "none") return 128;
  if (size <= 4 * KiB) return 32;
  if (size <= 64 * KiB) return 8;
  return 1;
}

interface Plan {
  op: MapOp;
  domain: Domain;
  size: number;
  layout: LayoutKind;
  tier: Tier;
}

function id(p: Plan): string {
  const base = `${p.op}/${p.domain}/${sizeLabel(p.size)}`;
  return p.layout === "scattered" || p.layout === "huge" ? `${base}/${p.layout}` : base;
}

/** What runs in which tier. Default = what a user tracks; quick = every op and C op once, small. */
function plans(): Plan[] {
  const out: Plan[] = [];
  const add = (tier: Tier, op: MapOp, domain: Domain, size: number, layout?: LayoutKind) =>
    out.push({
      op,
      domain,
      size,
      tier,
      layout: layout ?? (op === "vfioDmabuf" ? "device" : size <= 4 * KiB ? "single-page" : "scattered"),
    });
  // The per-call overhead, where the library's own cost shows most.
  for (const op of ["rawFfi", "prepared", "mapFile"] as const) add("quick", op, "none", 4 * KiB);
  for (const op of ["prepared", "mapFile", "map", "copy"] as const) add("quick", op, "mock", 4 * KiB);
  add("quick", "mapFile", "mock", 64 * KiB);
  add("quick", "mapFile", "mock", 2 * MiB, "huge");
  // What a user tracks: sizes and both layouts under a real page table.
  add("default", "mapFile", "mock", 2 * MiB);
  add("default", "mapFile", "mock", 64 * MiB);
  add("default", "mapFile", "mock", 64 * MiB, "huge");
  add("default", "map", "mock", 2 * MiB, "huge");
  add("default", "copy", "mock", 2 * MiB, "huge");
  for (const op of ["prepared", "mapFile"] as const) add("default", op, "edu", 4 * KiB);
  add("default", "mapFile", "edu", 2 * MiB);
  add("default", "mapFile", "edu", 2 * MiB, "huge");
  add("default", "vfioDmabuf", "edu", 64 * KiB);
  // The type1 backend's twins of the edu cases (type1 maps by address only: op map).
  add("quick", "map", "edu-type1", 4 * KiB);
  add("default", "map", "edu-type1", 2 * MiB, "huge");
  // Everything else.
  add("full", "rawFfi", "mock", 4 * KiB);
  for (const op of ["map", "copy"] as const) add("full", op, "none", 4 * KiB);
  for (const size of [64 * KiB, 2 * MiB, 64 * MiB]) {
    if (size !== 64 * KiB) add("full", "map", "mock", size);
    add("full", "copy", "mock", size);
    if (size === 64 * KiB) add("full", "map", "mock", size);
  }
  add("full", "map", "mock", 64 * MiB, "huge");
  add("full", "copy", "mock", 64 * MiB, "huge");
  add("full", "mapFile", "mock", 1 * GiB);
  add("full", "mapFile", "mock", 1 * GiB, "huge");
  add("full", "mapFile", "none", 64 * MiB);
  add("full", "mapFile", "edu", 64 * KiB);
  add("full", "mapFile", "edu", 64 * MiB);
  add("full", "mapFile", "edu", 64 * MiB, "huge");
  add("full", "vfioDmabuf", "edu", 4 * KiB);
  add("full", "vfioDmabuf", "edu", 1 * MiB);
  add("full", "map", "edu-type1", 64 * KiB);
  add("full", "map", "edu-type1", 2 * MiB);
  add("full", "map", "edu-type1", 64 * MiB);
  add("full", "map", "edu-type1", 64 * MiB, "huge");
  return out;
}

function whyNot(p: Plan, env: BenchEnv): string | undefined {
  if (p.domain === "mock" && !env.mock) return "no mock domain: the kernel lacks CONFIG_IOMMUFD_TEST";
  if ((p.domain === "edu" || p.domain === "edu-type1" || p.op === "vfioDmabuf") && !env.edu) {
    return "no edu device on vfio-pci";
  }
  if (p.domain === "edu-type1" && !env.type1) return "no VFIO type1 container: the kernel lacks CONFIG_VFIO_CONTAINER";
  if (p.op === "vfioDmabuf" && p.size > EDU_BAR0) return "edu's BAR0 is 1 MiB";
  if (p.layout === "huge" && env.hugeFree < p.size) {
    return `needs ${p.size / MiB} MiB of free 2 MiB huge pages, ${env.hugeFree / MiB} MiB free (raise /proc/sys/vm/nr_hugepages)`;
  }
  if (p.size >= GiB && env.memAvailable < p.size + 2 * GiB) {
    return `needs ${(p.size + 2 * GiB) / GiB} GiB available, ${(env.memAvailable / GiB).toFixed(1)} GiB here`;
  }
  return undefined;
}

function caseBuffer(p: Plan): { buffer: MemfdBuffer; layout: Layout } {
  return layoutBuffer(p.size, p.layout === "huge" ? "huge" : p.size <= 4 * KiB ? "single-page" : "scattered");
}

/** edu through its group in a type1 container: the container maps by address on both sides. */
function setupType1(p: Plan, env: BenchEnv): CaseInstance {
  const scope = new Scope();
  try {
    const container = scope.keep(VfioContainer.open());
    container.openDevice(env.edu!);
    const made = caseBuffer(p);
    const source = scope.keep(made.buffer);
    const options = { iova: BENCH_IOVA };
    return {
      lib: () => container.mapDma(source, options).unmap(),
      c: { op: "map_dma", fds: [container.fd, source.fd], args: [p.size, BENCH_IOVA] },
      layout: made.layout,
      close: () => scope.close(),
    };
  } catch (error) {
    throw scope.abandon(error);
  }
}

function setup(p: Plan, env: BenchEnv): CaseInstance {
  if (p.domain === "edu-type1") return setupType1(p, env);
  const scope = new Scope();
  try {
    const iommufd = scope.keep(Iommufd.open());
    const ioas = iommufd.createIoas();
    let vfio: VfioDevice | undefined;
    const device = (): VfioDevice => {
      if (!vfio) {
        vfio = scope.keep(VfioDevice.open(env.edu!));
        vfio.bind(iommufd);
      }
      return vfio;
    };
    const attach = (target: Ioas) => {
      if (p.domain === "mock") scope.keep(MockDomain.attach(target));
      else if (p.domain === "edu") device().attach(target);
    };
    attach(ioas);

    const options = { iova: BENCH_IOVA };
    let file: MappableFile;
    let buffer: MemfdBuffer | undefined;
    let layout: Layout;
    if (p.op === "vfioDmabuf") {
      file = scope.keep(device().exportDmaBuf({ region: 0, ranges: [{ offset: 0, length: p.size }] }));
      layout = { kind: "device", pages: p.size / (4 * KiB) };
    } else {
      const made = caseBuffer(p);
      buffer = scope.keep(made.buffer);
      layout = made.layout;
      file = buffer;
    }
    const mapArgs = [ioas.id, p.size, BENCH_IOVA];
    let lib: () => unknown;
    let c: CaseInstance["c"] = { op: "map_file", fds: [iommufd.fd, file.fd], args: mapArgs };
    switch (p.op) {
      case "map": {
        const source = buffer!;
        lib = () => ioas.map(source, options).unmap();
        c = { op: "map_va", fds: [iommufd.fd, file.fd], args: mapArgs };
        break;
      }
      case "copy": {
        // The source IOAS holds the buffer, pinned once under its own domain; each pair maps the
        // same pages into the destination and removes them. edu attaches to one IOAS only, so
        // the copy's source has no domain then.
        const src = iommufd.createIoas();
        if (p.domain === "mock") scope.keep(MockDomain.attach(src));
        src.mapFile(file, options);
        const copyOptions = { srcIova: BENCH_IOVA, length: p.size, iova: BENCH_IOVA };
        lib = () => ioas.copy(src, copyOptions).unmap();
        c = { op: "copy", fds: [iommufd.fd], args: [...mapArgs, src.id] };
        break;
      }
      case "prepared": {
        const prepared = ioas.prepareMapFile(file, { ...options, length: p.size });
        lib = () => {
          prepared.map();
          prepared.unmap();
        };
        break;
      }
      case "rawFfi":
        lib = rawMapFilePair(iommufd.fd, ioas.id, file.fd, p.size, BENCH_IOVA);
        break;
      default:
        lib = () => ioas.mapFile(file, options).unmap();
    }
    return { lib, c, layout, close: () => scope.close() };
  } catch (error) {
    throw scope.abandon(error);
  }
}

defineSuite({
  name: "map",
  description: "map + unmap pairs through the library against the same ioctls in C, on the same IOAS and pages",
  cases(): Omit<BenchCase, "suite">[] {
    return plans().map((p) => ({
      id: id(p),
      title: `${p.domain === "edu-type1" ? TYPE1_TITLE : TITLE[p.op]}; ${DOMAIN[p.domain]}${p.layout === "scattered" ? "; scattered 4 KiB pages" : p.layout === "huge" ? "; 2 MiB huge pages" : ""}`,
      bytes: p.size,
      k: opsPerIteration(p.domain, p.size),
      tier: p.tier,
      tracked: p.tier !== "full",
      c: true,
      // The per-call cases, each its own iommufd and a page or a few: their lib/C is the one a
      // slow spell of the machine moves most, so their rounds take turns (runner.ts).
      interleave: (p.domain === "none" || p.domain === "mock") && p.size <= 64 * KiB,
      skip: (env) => whyNot(p, env),
      setup: (env) => setup(p, env),
    }));
  },
});
