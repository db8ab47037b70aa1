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
import { IOMMU_HW_INFO_SELFTEST_REGVAL } from "../../src/uapi/iommufd-test.ts";
import { markAndReadDirty } from "../support/dirty.ts";
import { FailNth, formatSweepReports, type SweepReport, sweep } from "../support/fail-nth.ts";
import { expectIommufdError, requireIommufd } from "../support/kernel.ts";

const MAX_POINTS = 300;
const LENGTH = 256 * 1024;
/** Pages 0 and 3 of the buffer, marked dirty in the mock IOMMU by the dirty-tracking checks. */
const MARKS = new DirtyBitmap({ iova: MOCK_APERTURE_START, length: LENGTH, pageSize: 4096 });
MARKS.bytes[0] = 0b1001;
const MARKED = [
  { iova: MOCK_APERTURE_START, length: 4096 },
  { iova: MOCK_APERTURE_START + 3 * 4096, length: 4096 },
];

interface Env {
  iommufd: Iommufd;
  ioas: Ioas;
  mock: MockDomain;
  buffer: MemfdBuffer;
  /** The hw page table the kernel made when the mock device attached to the IOAS. */
  autoDomain: number;
  hwpt?: HwPageTable;
  queue?: FaultQueue;
  bitmap?: DirtyBitmap;
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
  const env: Env = { iommufd, ioas, mock, buffer, autoDomain: mock.hwptId };
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

/** The shared sweep with this file's environment: verify gets whether the call failed, and its result. */
function sweepVmm<R>(c: {
  name: string;
  setup(): Env;
  run(env: Env): R;
  verify(env: Env, failed: boolean, result: R | undefined): void;
  cannotFail?: string;
}): void {
  const report = sweep(failNth, {
    name: c.name,
    setup: c.setup,
    run: c.run,
    verify: (env, { result, error }) => c.verify(env, error !== undefined, result),
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
    verify(env, failed, result) {
      const clean = readHwInfo(env.iommufd, env.mock);
      expect(clean.type).toBe("selftest");
      expect(clean.selftest).toEqual({ flags: 0, testReg: IOMMU_HW_INFO_SELFTEST_REGVAL });
      // A success (also after a tolerated fault) returned the whole answer, decoded.
      if (!failed) expect(result).toEqual(clean);
    },
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
    verify(env, failed, attached) {
      if (!failed) {
        // The device is on the new table, and the kernel agrees: it will not destroy a table in use.
        expect(attached!.hwptId).toBe(env.hwpt!.id);
        expectIommufdError(() => env.iommufd.destroyObject(env.hwpt!.id), "EBUSY", "IOMMU_DESTROY");
      }
      // Whatever happened, a table can be made and holds the mapping, and it tracks dirty pages.
      const table = env.hwpt ?? HwPageTable.allocate(env.ioas, env.mock, { dirtyTracking: true });
      const user = attached ?? MockDomain.attach(table);
      expect(user.checkMap(MOCK_APERTURE_START, LENGTH, env.buffer.address)).toBe(true);
      table.setDirtyTracking(true);
      expect(markAndReadDirty(table, MARKS)).toEqual(MARKED);
    },
  });
});

test("replace (IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE)", { timeout: 120_000 }, () => {
  sweepVmm({
    name: "replace",
    setup: () => environment({ dirtyTable: true }),
    run: (env) => env.mock.replace(env.hwpt!),
    verify(env, failed, now) {
      // Both tables map the buffer, so which one the device is on is asked by id: the library's
      // answer, and the kernel's (it refuses to destroy the table a device holds; the automatic
      // domain goes away with its last device).
      const on = failed ? env.autoDomain : env.hwpt!.id;
      if (!failed) expect(now).toBe(on);
      expect(env.mock.hwptId).toBe(on);
      expectIommufdError(() => env.iommufd.destroyObject(on), "EBUSY", "IOMMU_DESTROY");
      if (!failed) expectIommufdError(() => env.iommufd.destroyObject(env.autoDomain), "ENOENT", "IOMMU_DESTROY");
      expect(env.mock.checkMap(MOCK_APERTURE_START, LENGTH, env.buffer.address)).toBe(true);
    },
  });
});

test("IOMMU_HWPT_SET_DIRTY_TRACKING and IOMMU_HWPT_GET_DIRTY_BITMAP", { timeout: 120_000 }, () => {
  const expectTracking = (env: Env) => {
    // First what the call left: the library's flag is the kernel's state (the kernel records
    // marked pages only while tracking is on).
    const left = markAndReadDirty(env.hwpt!, MARKS);
    expect(left === undefined ? "off" : "on").toBe(env.hwpt!.dirtyTracking ? "on" : "off");
    if (left) expect(left).toEqual(MARKED);
    // Then, whatever it left, tracking can be switched on and records exactly what is marked.
    env.hwpt!.setDirtyTracking(true);
    expect(markAndReadDirty(env.hwpt!, MARKS)).toEqual(MARKED);
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
  sweepVmm({
    name: "GET_DIRTY_BITMAP",
    setup() {
      const env = environment({ dirtyTable: true });
      markMockDirty(env.hwpt!, env.iommufd, MARKS);
      // Stale bits in the caller's bitmap: the library zeroes it first (the kernel only sets bits).
      env.bitmap = new DirtyBitmap({ iova: MOCK_APERTURE_START, length: LENGTH });
      env.bitmap.bytes.fill(0xff);
      return env;
    },
    run: (env) => env.hwpt!.readDirty(env.bitmap!, { clear: false }),
    verify(env, failed, result) {
      // Which pages, not how many.
      if (!failed) expect(result!.dirtyRanges()).toEqual(MARKED);
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
