/**
 * Where the library's time per map+unmap pair goes, apart from the kernel. Runs anywhere (no
 * /dev/iommu needed):
 *
 *   bun bench/hotpath.ts [REGEX]      (only the cases whose name matches)
 *
 * "JS only" cases swap the libc ioctl binding for a JS function that returns 0, so that the whole
 * library path (argument checks, struct encoding, Mapping records) runs with no kernel and no
 * FFI; "FFI" cases make real ioctl calls on fd -1 (EBADF: the cheapest syscall there is) through
 * the library's binding and through a dlopen of its own.
 */
import { dlopen, FFIType, ptr, type Pointer } from "bun:ffi";
import { bench, do_not_optimize, group, run, summary } from "mitata";
import { Iommufd, MemfdBuffer, type Ioas } from "../src/index.ts";
import { counters } from "../src/sys/ioctl.ts";
import { libc } from "../src/sys/libc.ts";
import { IOMMU_IOAS_MAP_FILE, IOMMU_IOAS_UNMAP, iommu_ioas_copy } from "../src/uapi/iommufd.ts";
import { median } from "./runner.ts";
import { BENCH_IOVA } from "./suite.ts";

type Symbols = { ioctl: (fd: number, request: number, arg: Pointer | number) => number };

/** Runs `body` with libc's ioctl replaced by a no-op that reports success. */
function withFakeKernel<T>(body: () => T): { value: T; restore: () => void } {
  const symbols = libc() as unknown as Symbols;
  const real = symbols.ioctl;
  symbols.ioctl = () => 0;
  try {
    const restore = () => {
      symbols.ioctl = real;
    };
    return { value: body(), restore };
  } catch (error) {
    symbols.ioctl = real;
    throw error;
  }
}

const SIZE = 4096;

/**
 * mitata samples one call at a time when its first call took over 500 us (a cold JIT does), and
 * then timer overhead swamps a sub-microsecond pair: run the pair hot first.
 */
function warm(pair: () => unknown, n = 200_000): () => unknown {
  for (let i = 0; i < n; i++) pair();
  return pair;
}

/**
 * A buffer and `count` IOASes on an iommufd whose ioctls are JS no-ops (any open fd will do:
 * nothing reaches the kernel). `release` puts the real binding back and closes the buffer.
 */
function fakeIoases(count: number): { buffer: MemfdBuffer; ioases: Ioas[]; release: () => void } {
  const { value, restore } = withFakeKernel(() => {
    const buffer = MemfdBuffer.create(SIZE);
    const iommufd = Iommufd.fromFd(buffer.fd, { takeOwnership: false });
    return { buffer, ioases: Array.from({ length: count }, () => iommufd.createIoas()) };
  });
  return {
    ...value,
    release: () => {
      restore();
      value.buffer.close();
    },
  };
}

/** The library's own time per 4 KiB pair on this host, ioctl a JS no-op: what `bun bench` records. */
export interface HostJsCost {
  /** ns per pair: the minimum over `repeats` timed loops of `pairs` pairs each. */
  mapFile: number;
  map: number;
  copy: number;
  prepared: number;
  pairs: number;
  repeats: number;
}

/**
 * Time each pair in a loop compiled for it alone: a loop shared by all cases calls a different
 * closure each time, and that call site's own cost (about 6 ns, measured) would be counted in.
 */
export function measureHostJsCost(pairs = 1_000_000, repeats = 7): HostJsCost {
  const { buffer, ioases, release } = fakeIoases(2);
  const [dst, src] = ioases as [Ioas, Ioas];
  const prepared = dst.prepareMapFile(buffer, { iova: BENCH_IOVA });
  const context = {
    dst,
    src,
    buffer,
    prepared,
    at: { iova: BENCH_IOVA },
    copyAt: { srcIova: BENCH_IOVA, length: SIZE, iova: BENCH_IOVA },
  };
  const bodies = {
    mapFile: "c.dst.mapFile(c.buffer, c.at).unmap();",
    map: "c.dst.map(c.buffer, c.at).unmap();",
    copy: "c.dst.copy(c.src, c.copyAt).unmap();",
    prepared: "c.prepared.map(); c.prepared.unmap();",
  };
  const out = { pairs, repeats } as HostJsCost;
  try {
    for (const [name, body] of Object.entries(bodies) as [keyof typeof bodies, string][]) {
      const loop = new Function("c", "n", `for (let i = 0; i < n; i++) { ${body} }`) as (c: unknown, n: number) => void;
      loop(context, pairs); // warm-up: the JIT's top tier
      let best = Number.POSITIVE_INFINITY;
      for (let r = 0; r < repeats; r++) {
        const t0 = Bun.nanoseconds();
        loop(context, pairs);
        best = Math.min(best, (Bun.nanoseconds() - t0) / pairs);
      }
      out[name] = best;
    }
  } finally {
    prepared.release();
    release();
  }
  return out;
}

export function registerHotPathBenchmarks(): void {
  group("JS cost of one 4 KiB pair (ioctl = a JS no-op)", () => {
    summary(() => {
      bench("library mapFile+unmap", function* () {
        const { buffer, ioases, release } = fakeIoases(1);
        const options = { iova: BENCH_IOVA };
        try {
          yield warm(() => ioases[0]!.mapFile(buffer, options).unmap());
        } finally {
          release();
        }
      });

      bench("library prepared map+unmap", function* () {
        const { buffer, ioases, release } = fakeIoases(1);
        const prepared = ioases[0]!.prepareMapFile(buffer, { iova: BENCH_IOVA });
        try {
          yield warm(() => {
            prepared.map();
            prepared.unmap();
          });
        } finally {
          release();
        }
      });

      bench("library map(VA)+unmap", function* () {
        const { buffer, ioases, release } = fakeIoases(1);
        const options = { iova: BENCH_IOVA };
        try {
          yield warm(() => ioases[0]!.map(buffer, options).unmap());
        } finally {
          release();
        }
      });

      bench("library copy+unmap", function* () {
        const { ioases, release } = fakeIoases(2);
        const [dst, src] = ioases as [Ioas, Ioas];
        const options = { srcIova: BENCH_IOVA, length: SIZE, iova: BENCH_IOVA };
        try {
          yield warm(() => dst.copy(src, options).unmap());
        } finally {
          release();
        }
      });

      bench("floor: prefilled structs, 2 calls", function* () {
        const { restore } = withFakeKernel(() => undefined);
        const symbols = libc() as unknown as Symbols;
        const a = new Uint32Array(10);
        const b = new Uint32Array(6);
        const pa = ptr(a);
        const pb = ptr(b);
        try {
          yield warm(() => {
            symbols.ioctl(3, IOMMU_IOAS_MAP_FILE, pa);
            symbols.ioctl(3, IOMMU_IOAS_UNMAP, pb);
          });
        } finally {
          restore();
        }
      });
    });
  });

  group("pieces of the pair", () => {
    summary(() => {
      // copy() still encodes through the generic fill(); map, mapFile and unmap write words.
      const copy = iommu_ioas_copy.create();
      bench("StructBuffer.fill, copy (as copy() does)", () => {
        copy.fill({
          size: iommu_ioas_copy.size,
          flags: 7,
          dst_ioas_id: 1,
          src_ioas_id: 2,
          length: SIZE,
          src_iova: BENCH_IOVA,
        });
        copy.set("dst_iova", BENCH_IOVA);
      });
      const words = copy.u32;
      bench("Uint32Array stores, copy (as mapFile() does)", () => {
        words[0] = iommu_ioas_copy.size;
        words[1] = 7;
        words[2] = 1;
        words[3] = 2;
        words[4] = SIZE;
        words[5] = 0;
        words[6] = BENCH_IOVA;
        words[7] = 0;
        words[8] = BENCH_IOVA;
        words[9] = 0;
      });
      const live = new Set<object>();
      bench("record + forget a Mapping-like object in a Set", () => {
        const m = { iova: BENCH_IOVA, length: SIZE };
        live.add(m);
        live.delete(m);
        return m;
      });
      // The alternative proposed for Ioas's Set of live Mappings: links in the Mapping itself.
      type Linked = { iova: number; length: number; prev: Linked | null; next: Linked | null; live: boolean };
      let head: Linked | null = null;
      bench("record + forget a Mapping-like object in a linked list", () => {
        const m: Linked = { iova: BENCH_IOVA, length: SIZE, prev: null, next: head, live: true };
        if (head) head.prev = m;
        head = m;
        if (m.prev) m.prev.next = m.next;
        else head = m.next;
        if (m.next) m.next.prev = m.prev;
        m.live = false;
        return m;
      });
      bench("counters.ioctls++ (x2)", () => {
        counters.ioctls++;
        counters.ioctls++;
      });
    });
  });

  group("one ioctl through bun:ffi (fd -1: EBADF, a syscall doing nothing)", () => {
    summary(() => {
      // The library's binding itself: its one ioctl path (src/sys/ioctl.ts) throws on EBADF, which
      // would time the error, not the call.
      bench("library libc binding", () => do_not_optimize(libc().ioctl(-1, IOMMU_IOAS_UNMAP, null)));
      bench("dlopen of its own", function* () {
        const own = dlopen("libc.so.6", {
          ioctl: { args: [FFIType.i32, FFIType.u64, FFIType.ptr], returns: FFIType.i32 },
        });
        const call = own.symbols.ioctl;
        try {
          yield () => do_not_optimize(call(-1, IOMMU_IOAS_UNMAP, null));
        } finally {
          own.close();
        }
      });
    });
  });
}

/**
 * The same measurement in `processes` fresh Bun processes, per pair the median over them: one
 * process's JIT may settle on code half again as slow for the same library (measured: mapFile+unmap
 * 44 ns in one process, 70-78 in the next, alternating at random), so a single process's figure
 * would track the JIT's luck, not the library.
 */
export function measureHostJsCostInProcesses(processes: number, pairs: number): HostJsCost & { each: HostJsCost[] } {
  const each: HostJsCost[] = [];
  for (let i = 0; i < processes; i++) {
    const child = Bun.spawnSync([process.execPath, import.meta.path, "--host-js-json", String(pairs)], {
      stdout: "pipe",
      stderr: "pipe",
    });
    if (child.exitCode !== 0)
      throw new Error(`bench/hotpath.ts --host-js-json failed: ${child.stderr.toString().trim()}`);
    each.push(JSON.parse(child.stdout.toString()) as HostJsCost);
  }
  const ops = ["mapFile", "map", "copy", "prepared"] as const;
  const out = { pairs, repeats: each[0]?.repeats ?? 0, each } as HostJsCost & { each: HostJsCost[] };
  for (const op of ops) out[op] = median(each.map((c) => c[op]));
  return out;
}

if (import.meta.main && process.argv[2] === "--host-js-json") {
  process.stdout.write(JSON.stringify(measureHostJsCost(Number(process.argv[3]) || undefined)));
} else if (import.meta.main) {
  const cost = measureHostJsCost();
  console.log(
    `library JS per 4 KiB pair (ioctl a no-op, min of ${cost.repeats} x ${cost.pairs}): ` +
      `mapFile ${cost.mapFile.toFixed(1)} ns, map ${cost.map.toFixed(1)}, copy ${cost.copy.toFixed(1)}, prepared ${cost.prepared.toFixed(1)}`,
  );
  registerHotPathBenchmarks();
  const pattern = process.argv[2];
  await run(pattern ? { filter: new RegExp(pattern) } : {});
}
