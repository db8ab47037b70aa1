/**
 * The library side of the map/unmap benchmark: one mitata bench per case, each running exactly
 * the ioctl sequence of the same case in bench/baseline/map_bench.c, through the public API.
 */
import { barplot, bench, do_not_optimize, group, summary } from "mitata";
import { Iommufd, MemfdBuffer, type Ioas, type MappableFile } from "../src/index.ts";
import { MockDomain } from "../src/selftest.ts";
import { VfioDevice } from "../src/vfio/device.ts";
import { BENCH_IOVA, DOMAIN_LABEL, KiB, sizeLabel, VFIO_DEVICE, type CaseSpec, type Mode } from "./cases.ts";
import { rawMapFilePair } from "./rawffi.ts";

interface Prepared {
  pair: () => void;
  close: () => void;
}

/** Objects of one case, closed in reverse order of creation. */
class Scope {
  readonly #items: { close?(): void; destroy?(): void }[] = [];
  keep<T extends { close?(): void; destroy?(): void }>(item: T): T {
    this.#items.push(item);
    return item;
  }
  close(): void {
    for (const item of this.#items.splice(0).reverse()) {
      try {
        if (item.destroy) item.destroy();
        else item.close?.();
      } catch {
        // Teardown of a benchmark case: the iommufd's close takes whatever is left.
      }
    }
  }
}

function attachDomain(scope: Scope, spec: CaseSpec, ioas: Ioas, device: () => VfioDevice): void {
  if (spec.domain === "mock") scope.keep(MockDomain.attach(ioas));
  else if (spec.domain === "edu") device().attach(ioas);
}

/** Builds a case's objects (outside the timing) and returns its map+unmap pair. */
export function prepare(spec: CaseSpec): Prepared {
  const scope = new Scope();
  try {
    const iommufd = scope.keep(Iommufd.open());
    const ioas = iommufd.createIoas();
    let vfio: VfioDevice | undefined;
    const device = (): VfioDevice => {
      if (!vfio) {
        vfio = scope.keep(VfioDevice.open(VFIO_DEVICE));
        vfio.bind(iommufd);
      }
      return vfio;
    };
    attachDomain(scope, spec, ioas, device);

    const options = { iova: BENCH_IOVA };
    let file: MappableFile;
    let buffer: MemfdBuffer | undefined;
    if (spec.op === "vfioDmabuf") {
      file = scope.keep(device().exportDmaBuf({ region: 0, ranges: [{ offset: 0, length: spec.size }] }));
    } else {
      buffer = scope.keep(
        MemfdBuffer.create(spec.size, {
          name: "bun-iommufd-bench",
          hugePages: spec.op === "mapFileHuge" ? "2MB" : false,
        }),
      );
      // Touch every page, as the C side's memset does: the first pin must not also fault them in.
      buffer.bytes.fill(1);
      file = buffer;
    }

    let pair: () => void;
    switch (spec.op) {
      case "map": {
        const source = buffer!;
        pair = () => ioas.map(source, options).unmap();
        break;
      }
      case "copy": {
        // The source IOAS holds the buffer, pinned once under its own domain; each pair maps the
        // same pages into the destination and removes them.
        const src = iommufd.createIoas();
        if (spec.domain === "mock") scope.keep(MockDomain.attach(src));
        src.mapFile(file, options);
        const copyOptions = { srcIova: BENCH_IOVA, length: spec.size, iova: BENCH_IOVA };
        pair = () => ioas.copy(src, copyOptions).unmap();
        break;
      }
      case "prepared": {
        // The library's hot path for per-I/O mapping: validated and encoded once, one ioctl each.
        const prepared = ioas.prepareMapFile(file, { ...options, length: spec.size });
        pair = () => {
          prepared.map();
          prepared.unmap();
        };
        break;
      }
      case "rawFfi":
        pair = rawMapFilePair(iommufd.fd, ioas.id, file.fd, spec.size, BENCH_IOVA);
        break;
      default:
        pair = () => ioas.mapFile(file, options).unmap();
    }
    return { pair, close: () => scope.close() };
  } catch (error) {
    scope.close();
    throw error;
  }
}

/** The shared warm-up rule (Mode.warmupPairs): map_bench.c applies the same one. */
export function warmUp(pair: () => void, m: Mode): number {
  const start = performance.now();
  let n = 0;
  for (;;) {
    const elapsed = performance.now() - start;
    if ((n >= m.warmupPairs && elapsed >= m.warmupMs) || elapsed >= m.warmupMaxMs) return n;
    pair();
    n++;
  }
}

/** One timed iteration: k pairs (see pairsPerIteration). */
function iteration(pair: () => void, k: number): () => void {
  if (k === 1) return pair;
  return () => {
    for (let i = 0; i < k; i++) pair();
  };
}

/** The mitata name of a case: its id, and the pairs each reported time covers. */
export function benchName(spec: CaseSpec): string {
  return spec.k === 1 ? spec.id : `${spec.id} (x${spec.k})`;
}

/**
 * Runs 4 KiB MAP_FILE pairs for a while before anything is measured: in a TCG guest a fresh Bun
 * process runs everything slowly for its first seconds (see Mode.processWarmupMs).
 */
export function warmProcess(m: Mode): void {
  if (m.processWarmupMs <= 0) return;
  const prepared = prepare({ id: "process warm-up", op: "mapFile", domain: "none", size: 4 * KiB, k: 1 });
  try {
    warmUp(prepared.pair, { ...m, warmupPairs: 0, warmupMs: 0, warmupMaxMs: m.processWarmupMs });
  } finally {
    prepared.close();
  }
}

/**
 * Registers one mitata bench per case, grouped by domain and size so that mitata's summary and
 * barplot compare the ways of mapping the same bytes.
 */
export function registerLibraryBenchmarks(cases: CaseSpec[], m: Mode, warmups: Map<string, number>): void {
  const groups = new Map<string, CaseSpec[]>();
  for (const spec of cases) {
    const key = `${spec.domain} ${spec.size}`;
    const list = groups.get(key) ?? groups.set(key, []).get(key)!;
    list.push(spec);
  }
  for (const list of groups.values()) {
    const first = list[0]!;
    group(`${sizeLabel(first.size)}, ${DOMAIN_LABEL[first.domain]}; times per ${first.k} pair(s)`, () => {
      summary(() => {
        barplot(() => {
          for (const spec of list) {
            bench(benchName(spec), function* () {
              const prepared = prepare(spec);
              try {
                warmups.set(spec.id, warmUp(prepared.pair, m));
                const run = iteration(prepared.pair, spec.k);
                yield () => do_not_optimize(run());
              } finally {
                prepared.close();
              }
            });
          }
        });
      });
    });
  }
}
