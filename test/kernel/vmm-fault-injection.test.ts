/**
 * Fault-injection sweep of the VMM operations (hw info, HWPT alloc, replace, dirty tracking, fault
 * queues, change-process): the kernel fails its 1st, 2nd, ... fault point until the call runs
 * clean. After each injected failure the error is the library's typed one, nothing leaks (fds,
 * pinned pages), and the objects still work.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import {
  changeProcess,
  DirtyBitmap,
  FaultQueue,
  HwPageTable,
  Iommufd,
  IommufdError,
  MemfdBuffer,
  readHwInfo,
  type Ioas,
} from "../../src/index.ts";
import { markMockDirty, MOCK_APERTURE_START, MockDomain } from "../../src/selftest.ts";
import { FailNth } from "../support/fail-nth.ts";
import { openFdCount, pinnedKiB, requireIommufd } from "../support/kernel.ts";

const MAX_POINTS = 300;
const LENGTH = 256 * 1024;

interface Env {
  iommufd: Iommufd;
  ioas: Ioas;
  mock: MockDomain;
  buffer: MemfdBuffer;
  hwpt?: HwPageTable;
  queue?: FaultQueue;
}

let failNth: FailNth;
const report: string[] = [];

beforeAll(() => {
  requireIommufd();
  if (!FailNth.available())
    throw new Error("/proc/self/task/<tid>/fail-nth is missing: the kernel needs CONFIG_FAULT_INJECTION");
  failNth = new FailNth();
});

afterAll(() => {
  failNth?.close();
  console.log(`VMM fault-injection sweep:\n${report.join("\n")}`);
});

function environment(options: { dirtyTable?: boolean; queue?: boolean } = {}): Env {
  const iommufd = Iommufd.open();
  const ioas = iommufd.createIoas();
  ioas.hugePages = false;
  const mock = MockDomain.attach(ioas);
  const buffer = MemfdBuffer.create(LENGTH);
  ioas.mapFile(buffer, { iova: MOCK_APERTURE_START });
  const env: Env = { iommufd, ioas, mock, buffer };
  if (options.queue) env.queue = FaultQueue.allocate(iommufd);
  if (options.dirtyTable) {
    env.hwpt = HwPageTable.allocate(ioas, mock, { dirtyTracking: true });
    env.hwpt.setDirtyTracking(true);
  }
  return env;
}

function dispose(env: Env): void {
  env.queue?.close();
  env.iommufd.close();
  env.buffer.close();
}

interface Case {
  name: string;
  setup(): Env;
  run(env: Env): unknown;
  /** After the call, failed or not: the objects still do their job. */
  verify(env: Env, failed: boolean): void;
}

function sweep(c: Case): void {
  {
    const env = c.setup();
    c.run(env);
    dispose(env);
  }
  const errnos: Record<string, number> = {};
  let tolerated = 0;
  for (let n = 1; n <= MAX_POINTS; n++) {
    const fds = openFdCount();
    const pinned = pinnedKiB();
    const env = c.setup();
    let error: unknown;
    failNth.arm(n);
    try {
      c.run(env);
    } catch (e) {
      error = e;
    }
    const hit = failNth.hit();
    if (error !== undefined && !(error instanceof IommufdError)) throw error;
    c.verify(env, error !== undefined);
    dispose(env);
    expect(openFdCount()).toBe(fds);
    expect(pinnedKiB()).toEqual(pinned);
    if (!hit) {
      expect(error).toBeUndefined();
      report.push(
        `  ${c.name.padEnd(34)} ${String(n - 1).padStart(3)} points  ${
          Object.entries(errnos)
            .map(([k, v]) => `${k} x${v}`)
            .join(", ") || "-"
        }${tolerated ? `  (tolerated by the kernel: ${tolerated})` : ""}`,
      );
      return;
    }
    if (error) errnos[(error as IommufdError).code] = (errnos[(error as IommufdError).code] ?? 0) + 1;
    else tolerated++;
  }
  throw new Error(`${c.name}: still hitting fault points after ${MAX_POINTS}`);
}

test("IOMMU_GET_HW_INFO", { timeout: 120_000 }, () => {
  sweep({
    name: "IOMMU_GET_HW_INFO",
    setup: () => environment(),
    run: (env) => readHwInfo(env.iommufd, env.mock),
    verify: (env) => expect(readHwInfo(env.iommufd, env.mock).type).toBe("selftest"),
  });
});

test("IOMMU_HWPT_ALLOC (dirty tracking) then attach", { timeout: 120_000 }, () => {
  sweep({
    name: "IOMMU_HWPT_ALLOC + attach",
    setup: () => environment(),
    run(env) {
      env.hwpt = HwPageTable.allocate(env.ioas, env.mock, { dirtyTracking: true });
      return MockDomain.attach(env.hwpt);
    },
    verify(env) {
      // Whatever happened, a table can be made and holds the mapping.
      const table = env.hwpt ?? HwPageTable.allocate(env.ioas, env.mock);
      const user = MockDomain.attach(table);
      expect(user.checkMap(MOCK_APERTURE_START, LENGTH, env.buffer.address)).toBe(true);
    },
  });
});

test("replace (IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE)", { timeout: 120_000 }, () => {
  sweep({
    name: "replace",
    setup: () => environment({ dirtyTable: true }),
    run: (env) => env.mock.replace(env.hwpt!),
    verify(env) {
      // Attached to exactly one of the two tables, and that table maps the buffer.
      expect(env.mock.checkMap(MOCK_APERTURE_START, LENGTH, env.buffer.address)).toBe(true);
    },
  });
});

test("IOMMU_HWPT_SET_DIRTY_TRACKING and IOMMU_HWPT_GET_DIRTY_BITMAP", { timeout: 120_000 }, () => {
  const marks = new DirtyBitmap({ iova: MOCK_APERTURE_START, length: LENGTH, pageSize: 4096 });
  marks.bytes[0] = 0b1001;
  const expectTracking = (env: Env) => {
    // Whatever the call left, tracking can be switched on and records exactly what is marked.
    env.hwpt!.setDirtyTracking(true);
    markMockDirty(env.hwpt!, env.iommufd, marks);
    const bitmap = env.hwpt!.readDirty(new DirtyBitmap({ iova: MOCK_APERTURE_START, length: LENGTH }));
    expect(bitmap.dirtyRanges()).toEqual([
      { iova: MOCK_APERTURE_START, length: 4096 },
      { iova: MOCK_APERTURE_START + 3 * 4096, length: 4096 },
    ]);
  };
  sweep({
    name: "SET_DIRTY_TRACKING off + on",
    setup: () => environment({ dirtyTable: true }),
    run(env) {
      env.hwpt!.setDirtyTracking(false);
      env.hwpt!.setDirtyTracking(true);
    },
    verify: expectTracking,
  });
  const bitmap = new DirtyBitmap({ iova: MOCK_APERTURE_START, length: LENGTH });
  sweep({
    name: "GET_DIRTY_BITMAP",
    setup() {
      const env = environment({ dirtyTable: true });
      markMockDirty(env.hwpt!, env.iommufd, marks);
      return env;
    },
    run: (env) => env.hwpt!.readDirty(bitmap, { clear: false }),
    verify(env, failed) {
      if (!failed) expect(bitmap.countDirty()).toBe(2);
      expectTracking(env);
    },
  });
});

test("IOMMU_FAULT_QUEUE_ALLOC and a fault table", { timeout: 120_000 }, () => {
  sweep({
    name: "FAULT_QUEUE_ALLOC + HWPT_ALLOC(fault)",
    setup: () => environment(),
    run(env) {
      env.queue = FaultQueue.allocate(env.iommufd);
      env.hwpt = HwPageTable.allocate(env.ioas, env.mock, { faultQueue: env.queue });
    },
    verify(env) {
      env.queue ??= FaultQueue.allocate(env.iommufd);
      const queue = env.queue;
      const table = env.hwpt ?? HwPageTable.allocate(env.ioas, env.mock, { faultQueue: queue });
      env.mock.replace(table);
      env.mock.triggerPageFault({ address: 0x4000, groupId: 1 });
      const faults = queue.tryRead();
      expect(faults.map((f) => f.address)).toEqual([0x4000]);
      queue.respond(faults[0]!);
      env.mock.replace(env.ioas);
    },
  });
});

test("IOMMU_IOAS_CHANGE_PROCESS", { timeout: 120_000 }, () => {
  sweep({
    name: "IOAS_CHANGE_PROCESS",
    setup: () => environment(),
    run: (env) => changeProcess(env.iommufd, { warnIfPrivileged: false }),
    verify(env) {
      expect(env.mock.checkMap(MOCK_APERTURE_START, LENGTH, env.buffer.address)).toBe(true);
      env.ioas.unmap(MOCK_APERTURE_START, LENGTH);
      env.ioas.mapFile(env.buffer, { iova: MOCK_APERTURE_START });
    },
  });
});
