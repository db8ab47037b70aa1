/**
 * Fault-injection sweep: every operation is run with the kernel failing its 1st, 2nd, ... fault
 * point until it completes without a fault. After each injected failure the error must be the
 * library's, nothing may leak, the IOAS must still work, and the library's idea of what is mapped
 * must match the kernel's.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import {
  DmaHeap,
  findPciDevices,
  Iommufd,
  IommufdError,
  MemfdBuffer,
  VfioDevice,
  type DmaBuf,
  type Ioas,
  type IrqSet,
  type Mapping,
} from "../../src/index.ts";
import { MOCK_APERTURE_START, MockDomain } from "../../src/selftest.ts";
import { EDU_DEVICE, EDU_VENDOR } from "../support/edu.ts";
import { FailNth } from "../support/fail-nth.ts";
import { openFdCount, pinnedKiB, requireIommufd } from "../support/kernel.ts";

const KiB = 1024;
const MAX_POINTS = 400;

type Domain = "none" | "mock" | "edu";

interface Env {
  iommufd: Iommufd;
  ioas: Ioas;
  buffer: MemfdBuffer;
  base: number;
  mock?: MockDomain;
  device?: VfioDevice;
  extra: Record<string, unknown>;
}

let failNth: FailNth;
let eduAddress: string | undefined;
const report: { name: string; points: number; errnos: Record<string, number>; tolerated: number }[] = [];

beforeAll(() => {
  requireIommufd();
  if (!FailNth.available())
    throw new Error("/proc/self/task/<tid>/fail-nth is missing: the kernel needs CONFIG_FAULT_INJECTION");
  failNth = new FailNth();
  eduAddress = findPciDevices(EDU_VENDOR, EDU_DEVICE)[0];
});

afterAll(() => {
  failNth?.close();
  const lines = report.map(
    (r) =>
      `  ${r.name.padEnd(34)} ${String(r.points).padStart(3)} points  ` +
      `${
        Object.entries(r.errnos)
          .map(([code, n]) => `${code} x${n}`)
          .join(", ") || "-"
      }` +
      (r.tolerated ? `  (tolerated by the kernel: ${r.tolerated})` : ""),
  );
  console.log(`fault-injection sweep:\n${lines.join("\n")}`);
});

function environment(domain: Domain, options: { huge?: boolean } = {}): Env {
  const iommufd = Iommufd.open();
  const ioas = iommufd.createIoas();
  const env: Env = {
    iommufd,
    ioas,
    buffer: options.huge ? MemfdBuffer.create(2 << 20, { hugePages: "2MB" }) : MemfdBuffer.create(64 * KiB),
    base: domain === "mock" ? MOCK_APERTURE_START : 0x100000,
    extra: {},
  };
  env.buffer.bytes.fill(1);
  if (domain === "mock") env.mock = MockDomain.attach(ioas);
  if (domain === "edu") {
    if (!eduAddress) throw new Error("no edu device in this VM");
    env.device = VfioDevice.open(eduAddress);
    env.device.bind(iommufd);
    env.device.attach(ioas);
  }
  return env;
}

function dispose(env: Env): void {
  // Whatever a case's setup parked in `extra` (dma-bufs, heaps) is the environment's to release.
  for (const value of Object.values(env.extra)) (value as { close?(): void }).close?.();
  env.device?.close();
  env.mock?.destroy();
  env.iommufd.close();
  env.buffer.close();
}

/** A fresh fixed-IOVA map at `iova` succeeds (nothing hidden is there) and is undone. */
function expectIovaFree(env: Env, iova: number, length: number): void {
  const probe = env.ioas.mapFile(env.buffer, { iova, length });
  probe.unmap();
}

/** The kernel still has something at `iova`: a fixed map there is refused with EEXIST. */
function expectIovaTaken(env: Env, iova: number, length: number): void {
  let code = "";
  try {
    env.ioas.mapFile(env.buffer, { iova, length }).unmap();
  } catch (error) {
    code = (error as IommufdError).code;
  }
  expect(code).toBe("EEXIST");
}

interface Case<T> {
  name: string;
  setup(): Env;
  run(env: Env): T;
  /** Checks after the call, with its outcome. */
  verify(env: Env, outcome: { result?: T; error?: IommufdError }): void;
  /** Releases what the call made (when it succeeded). */
  release?(env: Env, result: T): void;
}

function sweep<T>(c: Case<T>): void {
  // Warm-up: the first call through a new FFI path may do work of its own on this thread.
  {
    const env = c.setup();
    const result = c.run(env);
    c.release?.(env, result);
    dispose(env);
  }
  const entry = { name: c.name, points: 0, errnos: {} as Record<string, number>, tolerated: 0 };
  for (let n = 1; n <= MAX_POINTS; n++) {
    const fds = openFdCount();
    const pinned = pinnedKiB();
    const env = c.setup();
    let result: T | undefined;
    let error: unknown;
    failNth.arm(n);
    try {
      result = c.run(env);
    } catch (e) {
      error = e;
    }
    const hit = failNth.hit();
    if (error !== undefined && !(error instanceof IommufdError)) throw error;
    const typed = error as IommufdError | undefined;
    if (typed) {
      expect(typed.errno).toBeGreaterThan(0);
      expect(typed.message.length).toBeGreaterThan(20);
    }
    c.verify(env, { result, error: typed });
    if (!typed) c.release?.(env, result as T);
    dispose(env);
    expect(openFdCount()).toBe(fds);
    expect(pinnedKiB()).toEqual(pinned);
    if (!hit) {
      expect(typed).toBeUndefined(); // with no fault injected, the call must succeed
      entry.points = n - 1;
      report.push(entry);
      return;
    }
    if (typed) entry.errnos[typed.code] = (entry.errnos[typed.code] ?? 0) + 1;
    else entry.tolerated++;
  }
  throw new Error(`${c.name}: still hitting fault points after ${MAX_POINTS}`);
}

function mapCase(name: string, domain: Domain, how: "map" | "mapFile", huge = false): Case<Mapping> {
  return {
    name,
    setup: () => environment(domain, { huge }),
    run: (env) =>
      how === "map" ? env.ioas.map(env.buffer, { iova: env.base }) : env.ioas.mapFile(env.buffer, { iova: env.base }),
    verify(env, { result, error }) {
      if (error) {
        expect(env.ioas.mappings).toHaveLength(0);
        if (env.mock) expect(env.mock.checkMap(env.base, env.buffer.size, env.buffer.address)).toBe(false);
        expectIovaFree(env, env.base, env.buffer.size);
      } else {
        expect(result!.mapped).toBe(true);
        if (env.mock) expect(env.mock.checkMap(env.base, env.buffer.size, env.buffer.address)).toBe(true);
        expectIovaTaken(env, env.base, 4096);
      }
    },
    release: (_env, mapping) => mapping.unmap(),
  };
}

function unmapCase(name: string, how: "ioas" | "mapping"): Case<void> {
  return {
    name,
    setup() {
      const env = environment("mock");
      env.extra.mapping = env.ioas.mapFile(env.buffer, { iova: env.base });
      return env;
    },
    run(env) {
      const mapping = env.extra.mapping as Mapping;
      if (how === "ioas") env.ioas.unmap(env.base, env.buffer.size);
      else mapping.unmap();
    },
    verify(env, { error }) {
      const mapping = env.extra.mapping as Mapping;
      if (error) {
        // ENOENT here does not mean "nothing was mapped": the record must stay, and the kernel agrees.
        expect(mapping.mapped).toBe(true);
        expectIovaTaken(env, env.base, 4096);
        expect(env.mock!.checkMap(env.base, env.buffer.size, env.buffer.address)).toBe(true);
        mapping.unmap(); // and it can be unmapped later
      }
      expect(mapping.mapped).toBe(false);
      expect(env.mock!.checkMap(env.base, env.buffer.size, env.buffer.address)).toBe(false);
      expectIovaFree(env, env.base, env.buffer.size);
    },
  };
}

describe("fault-injection sweep", () => {
  test("Iommufd.open", () => {
    sweep<Iommufd>({
      name: "Iommufd.open",
      setup: () => environment("none"),
      run: () => Iommufd.open(),
      verify(_env, { result, error }) {
        if (!error) expect(result!.createIoas().id).toBeGreaterThan(0);
      },
      release: (_env, iommufd) => iommufd.close(),
    });
  });

  test("createIoas", () => {
    sweep<Ioas>({
      name: "createIoas",
      setup: () => environment("none"),
      run: (env) => env.iommufd.createIoas(),
      verify(env, { result, error }) {
        const ioas = error ? env.iommufd.createIoas() : result!;
        ioas.mapFile(env.buffer).unmap();
      },
      release: (_env, ioas) => ioas.destroy(),
    });
  });

  test("map and mapFile: no domain, mock domain, huge pages", () => {
    sweep(mapCase("mapFile (no domain)", "none", "mapFile"));
    sweep(mapCase("mapFile (mock domain)", "mock", "mapFile"));
    sweep(mapCase("map by VA (mock domain)", "mock", "map"));
    sweep(mapCase("map by VA (no domain)", "none", "map"));
    sweep(mapCase("mapFile (mock domain, 2M huge pages)", "mock", "mapFile", true));
  });

  test("mapFile with edu attached behind the emulated Intel IOMMU", () => {
    sweep(mapCase("mapFile (edu, Intel IOMMU)", "edu", "mapFile"));
  });

  test("unmap, Mapping.unmap and unmapAll keep their record when the kernel fails", () => {
    sweep(unmapCase("Ioas.unmap (mock domain)", "ioas"));
    sweep(unmapCase("Mapping.unmap (mock domain)", "mapping"));
    sweep<number>({
      name: "unmapAll (mock domain)",
      setup() {
        const env = environment("mock");
        env.ioas.mapFile(env.buffer, { iova: env.base, length: 32 * KiB });
        env.ioas.mapFile(env.buffer, { iova: env.base + 32 * KiB, offset: 32 * KiB, length: 32 * KiB });
        return env;
      },
      run: (env) => env.ioas.unmapAll(),
      verify(env, { result, error }) {
        if (error) {
          expect(env.ioas.mappings.length).toBeGreaterThan(0);
          expect(env.ioas.unmapAll()).toBeGreaterThan(0);
        } else {
          expect(result).toBe(64 * KiB);
        }
        expect(env.ioas.mappings).toHaveLength(0);
        expectIovaFree(env, env.base, 64 * KiB);
      },
    });
  });

  test("copy", () => {
    sweep<Mapping>({
      name: "copy (mock domain on the target)",
      setup() {
        const env = environment("mock");
        const source = env.iommufd.createIoas();
        env.extra.source = source;
        env.extra.from = source.mapFile(env.buffer);
        return env;
      },
      run: (env) => {
        const from = env.extra.from as Mapping;
        return env.ioas.copy(env.extra.source as Ioas, { srcIova: from.iova, length: from.length, iova: env.base });
      },
      verify(env, { result, error }) {
        if (error) {
          expect(env.ioas.mappings).toHaveLength(0);
          expectIovaFree(env, env.base, env.buffer.size);
        } else {
          expect(env.mock!.checkMap(result!.iova, env.buffer.size, env.buffer.address)).toBe(true);
        }
      },
      release: (_env, mapping) => mapping.unmap(),
    });
  });

  test("iovaRanges and allowIovas", () => {
    sweep({
      name: "iovaRanges (mock domain)",
      setup: () => environment("mock"),
      run: (env) => env.ioas.iovaRanges(),
      verify(env, { result, error }) {
        if (!error) expect(result!.ranges[0]!.start).toBe(MOCK_APERTURE_START);
        env.ioas.mapFile(env.buffer).unmap();
      },
    });
    sweep({
      name: "allowIovas",
      setup: () => environment("none"),
      run: (env) => env.ioas.allowIovas([{ start: 0x4000_0000, last: 0x4fff_ffff }]),
      verify(env, { error }) {
        const mapping = env.ioas.mapFile(env.buffer);
        if (!error) expect(Number(mapping.iova)).toBeGreaterThanOrEqual(0x4000_0000);
        mapping.unmap();
      },
    });
  });

  test("VFIO attach, exportDmaBuf and mapFile of a VFIO dma-buf", () => {
    if (!eduAddress) throw new Error("no edu device in this VM");
    const address = eduAddress;
    // VfioDevice.bind is not swept: a fault injected inside vfio-pci's device enable (ACPI IRQ
    // routing) leaves 7.2.13's ACPI interpreter corrupt, and the next close oopses in
    // acpi_ut_update_object_reference. That is a kernel bug outside iommufd; the sweep starts
    // after the device is bound.
    sweep<number>({
      name: "VfioDevice.attach",
      setup() {
        const env = environment("none");
        env.device = VfioDevice.open(address);
        env.device.bind(env.iommufd);
        return env;
      },
      run: (env) => env.device!.attach(env.ioas),
      verify(env, { error }) {
        if (error) {
          expect(env.device!.attachedTo).toBeUndefined();
          env.device!.attach(env.ioas);
        }
        env.ioas.mapFile(env.buffer, { iova: 0x100000 }).unmap();
      },
    });
    sweep<DmaBuf>({
      name: "VfioDevice.exportDmaBuf",
      setup: () => environment("edu"),
      run: (env) => env.device!.exportDmaBuf({ region: 0, ranges: [{ offset: 0, length: 4096 }] }),
      verify(env, { result, error }) {
        if (!error) expect(result!.size).toBe(4096);
        else env.device!.exportDmaBuf({ region: 0, ranges: [{ offset: 0, length: 4096 }] }).close();
      },
      release: (_env, dmabuf) => dmabuf.close(),
    });
    sweep<Mapping>({
      name: "mapFile of a VFIO dma-buf",
      setup() {
        const env = environment("edu");
        env.extra.dmabuf = env.device!.exportDmaBuf({ region: 0, ranges: [{ offset: 0, length: 4096 }] });
        env.extra.target = env.iommufd.createIoas();
        return env;
      },
      run: (env) => (env.extra.target as Ioas).mapFile(env.extra.dmabuf as DmaBuf, { iova: 0x100000 }),
      verify(env, { error }) {
        const target = env.extra.target as Ioas;
        if (error) {
          expect(target.mappings).toHaveLength(0);
          target.mapFile(env.extra.dmabuf as DmaBuf, { iova: 0x100000 }).unmap();
        } else {
          expect(target.mappings).toHaveLength(1);
        }
      },
      release: (_env, mapping) => mapping.unmap(),
    });
  });

  test("DmaHeap create and close", () => {
    sweep<DmaHeap>({
      name: "DmaHeap.create (mock domain)",
      setup: () => environment("mock"),
      run: (env) => DmaHeap.create(env.ioas, { size: 256 * KiB, hugePages: false, iova: env.base }),
      verify(env, { result, error }) {
        if (error) {
          expect(env.ioas.mappings).toHaveLength(0);
          expectIovaFree(env, env.base, env.buffer.size);
        } else {
          const buffer = result!.alloc(4096);
          buffer.bytes[0] = 1;
          expect(env.mock!.checkMap(buffer.iova, 4096, result!.address + buffer.offset)).toBe(true);
        }
      },
      release: (_env, heap) => heap.close(),
    });
    sweep<void>({
      name: "DmaHeap.close (mock domain)",
      setup() {
        const env = environment("mock");
        env.extra.heap = DmaHeap.create(env.ioas, { size: 256 * KiB, hugePages: false, iova: env.base });
        return env;
      },
      run: (env) => (env.extra.heap as DmaHeap).close(),
      verify(env, { error }) {
        const heap = env.extra.heap as DmaHeap;
        if (error) {
          expect(heap.closed).toBe(false); // a failed close leaves the heap whole
          heap.close();
        }
        expect(heap.closed).toBe(true);
        expect(env.ioas.mappings).toHaveLength(0);
        expectIovaFree(env, env.base, env.buffer.size);
      },
    });
  });

  test("VFIO interrupts: enableIrq (MSI, INTx) and IrqSet.close on edu", () => {
    if (!eduAddress) throw new Error("no edu device in this VM");
    // After a failed enable nothing may stay behind in the kernel or the library: the index
    // enables afresh and a software trigger reaches the new eventfd.
    const expectWorking = (env: Env, kind: "msi" | "intx") => {
      const set = env.device!.enableIrq(kind);
      set.vectors[0]!.trigger();
      expect(set.vectors[0]!.poll()).toBe(1);
      set.close();
    };
    for (const kind of ["msi", "intx"] as const) {
      sweep<IrqSet>({
        name: `VfioDevice.enableIrq (${kind}, edu)`,
        setup() {
          const env = environment("edu");
          env.device!.setBusMaster(true);
          return env;
        },
        run: (env) => env.device!.enableIrq(kind),
        verify(env, { result, error }) {
          if (error) {
            expectWorking(env, kind);
          } else {
            result!.vectors[0]!.trigger();
            expect(result!.vectors[0]!.poll()).toBe(1);
          }
        },
        release: (_env, set) => set.close(),
      });
    }
    sweep<void>({
      name: "IrqSet.close (msi, edu)",
      setup() {
        const env = environment("edu");
        env.device!.setBusMaster(true);
        env.extra.set = env.device!.enableIrq("msi");
        return env;
      },
      run: (env) => (env.extra.set as IrqSet).close(),
      verify(env, { error }) {
        const set = env.extra.set as IrqSet;
        if (error) {
          expect(set.closed).toBe(false); // a failed disable leaves the set whole
          set.close();
        }
        expect(set.closed).toBe(true);
        expectWorking(env, "msi");
      },
    });
  }, 180_000);

  test("the sweep injected faults at all (it is not a no-op)", () => {
    const byName = Object.fromEntries(report.map((r) => [r.name, r]));
    expect(byName.createIoas!.points).toBeGreaterThanOrEqual(1);
    expect(byName["mapFile (mock domain)"]!.points).toBeGreaterThanOrEqual(3);
    expect(Object.keys(byName["mapFile (mock domain)"]!.errnos).length).toBeGreaterThanOrEqual(1);
  });
});
