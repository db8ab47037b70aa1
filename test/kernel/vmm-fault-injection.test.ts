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
  MemfdBuffer,
  readHwInfo,
  type Ioas,
} from "../../src/index.ts";
import { markMockDirty, MOCK_APERTURE_START, MockDomain } from "../../src/testing/selftest.ts";
import { FailNth, formatSweepReports, type SweepReport, sweep } from "../support/fail-nth.ts";
import { requireIommufd } from "../support/kernel.ts";

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
const reports: SweepReport[] = [];

beforeAll(() => {
  requireIommufd();
  if (!FailNth.available())
    throw new Error("/proc/self/task/<tid>/fail-nth is missing: the kernel needs CONFIG_FAULT_INJECTION");
  failNth = new FailNth();
});

afterAll(() => {
  failNth?.close();
  console.log(`VMM fault-injection sweep:\n${formatSweepReports(reports)}`);
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

/** The shared sweep with this file's environment: verify gets whether the call failed. */
function sweepVmm(c: {
  name: string;
  setup(): Env;
  run(env: Env): unknown;
  verify(env: Env, failed: boolean): void;
  cannotFail?: string;
}): void {
  const report = sweep(failNth, {
    name: c.name,
    setup: c.setup,
    run: c.run,
    verify: (env, { error }) => c.verify(env, error !== undefined),
    dispose,
    cannotFail: c.cannotFail,
    maxPoints: MAX_POINTS,
  });
  reports.push(report);
}

test("IOMMU_GET_HW_INFO", { timeout: 120_000 }, () => {
  sweepVmm({
    name: "IOMMU_GET_HW_INFO",
    setup: () => environment(),
    run: (env) => readHwInfo(env.iommufd, env.mock),
    verify: (env) => expect(readHwInfo(env.iommufd, env.mock).type).toBe("selftest"),
  });
});

test("IOMMU_HWPT_ALLOC (dirty tracking) then attach", { timeout: 120_000 }, () => {
  sweepVmm({
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
  sweepVmm({
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
  sweepVmm({
    name: "SET_DIRTY_TRACKING off + on",
    setup: () => environment({ dirtyTable: true }),
    run(env) {
      env.hwpt!.setDirtyTracking(false);
      env.hwpt!.setDirtyTracking(true);
    },
    verify: expectTracking,
  });
  const bitmap = new DirtyBitmap({ iova: MOCK_APERTURE_START, length: LENGTH });
  sweepVmm({
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
  sweepVmm({
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
      // Back to the fds right after setup: the queue and table go (queue first: its destroy waits for the table).
      queue.close();
      table.destroy();
      env.queue = undefined;
      env.hwpt = undefined;
    },
  });
});

test("IOMMU_IOAS_CHANGE_PROCESS", { timeout: 120_000 }, () => {
  sweepVmm({
    name: "IOAS_CHANGE_PROCESS (cannot fail)",
    cannotFail:
      "iommufd_take_all_iova_rwsem() allocates only through xa_store(), whose __xas_nomem() retries a failed " +
      "node allocation outside the lock, and charge_current() allocates nothing",
    setup() {
      // Several IOASes with mappings: the kernel gathers and locks them all first.
      const env = environment();
      for (let i = 0; i < 3; i++) {
        const other = env.iommufd.createIoas();
        other.mapFile(env.buffer, { iova: MOCK_APERTURE_START });
      }
      return env;
    },
    run: (env) => changeProcess(env.iommufd, { warnIfPrivileged: false }),
    verify(env) {
      expect(env.mock.checkMap(MOCK_APERTURE_START, LENGTH, env.buffer.address)).toBe(true);
      env.ioas.unmap(MOCK_APERTURE_START, LENGTH);
      env.ioas.mapFile(env.buffer, { iova: MOCK_APERTURE_START });
    },
  });
});
