/**
 * What a VMM needs beyond the IOAS, against the real kernel: hardware info, explicit hw page
 * tables with atomic replace, dirty tracking and I/O page faults. The selftest mock domain gives
 * page tables whose content the kernel checks for us; QEMU's edu behind the emulated Intel IOMMU
 * does real DMA and answers for VT-d.
 */
import { afterEach, beforeAll, describe, expect, test } from "bun:test";
import {
  DirtyBitmap,
  explainNoDirtyTracking,
  FaultQueue,
  HwPageTable,
  Iommufd,
  MemfdBuffer,
  readHwInfo,
  VfioDevice,
  type Ioas,
} from "../../src/index.ts";
import { isCloseOnExec } from "../../src/sys/fd.ts";
import { markMockDirty, MOCK_APERTURE_START, MOCK_PAGE_SIZE, MockDomain } from "../../src/testing/selftest.ts";
import { markAndReadDirty } from "../support/dirty.ts";
import { Edu, requireEduAddress } from "../support/edu.ts";
import { expectIommufdError, openFdCount, pinnedKiB, requireIommufd, testScope } from "../support/kernel.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
let eduAddress = "";

beforeAll(() => {
  requireIommufd();
  eduAddress = requireEduAddress();
});

const scope = testScope();
afterEach(scope.releaseAll);
const keep = scope.keep;

/** An iommufd with an IOAS (huge pages off, so dirty bits are per mock page) and a mock device. */
function mockSetup(options: { noDirtyTracking?: boolean } = {}): { iommufd: Iommufd; ioas: Ioas; mock: MockDomain } {
  const iommufd = keep(Iommufd.open());
  const ioas = iommufd.createIoas();
  ioas.hugePages = false;
  const mock = MockDomain.attach(ioas, options);
  return { iommufd, ioas, mock };
}

function boundEdu(iommufd: Iommufd): VfioDevice {
  const device = keep(VfioDevice.open(eduAddress));
  device.bind(iommufd);
  return device;
}

describe("IOMMU_GET_HW_INFO", () => {
  test("mock device: selftest type, its register value, dirty tracking offered", () => {
    const { iommufd, mock } = mockSetup();
    const info = readHwInfo(iommufd, mock);
    expect(info.type).toBe("selftest");
    expect(info.typeId).toBe(0xfeedbeef);
    expect(info.selftest).toEqual({ flags: 0, testReg: 0xdeadbeef });
    expect(info.data.byteLength).toBe(8);
    expect(info.capabilities.dirtyTracking).toBe(true);
    expect(explainNoDirtyTracking(info)).toBeUndefined();
  });

  test("mock device without dirty support: the capability is off and explained", () => {
    const { iommufd, mock } = mockSetup({ noDirtyTracking: true });
    const info = readHwInfo(iommufd, mock.deviceId);
    expect(info.capabilities.dirtyTracking).toBe(false);
    expect(explainNoDirtyTracking(info)).toContain("selftest");
  });

  test("edu behind QEMU's VT-d: cap/ecap decoded; no dirty tracking, and why", () => {
    const iommufd = keep(Iommufd.open());
    const device = boundEdu(iommufd);
    const info = readHwInfo(iommufd, device);
    console.log(
      `VT-d hw info: cap 0x${info.vtd?.capReg.toString(16)} ecap 0x${info.vtd?.ecapReg.toString(16)} ` +
        `caps ${JSON.stringify(info.capabilities)} maxPasidLog2 ${info.maxPasidLog2}\n  ${info.vtd?.names.join(" ")}`,
    );
    expect(info.type).toBe("intel-vtd");
    expect(info.data.byteLength).toBe(24);
    const vtd = info.vtd!;
    // QEMU is started with caching-mode=on and intremap=on.
    expect(vtd.cap.cachingMode).toBe(true);
    expect(vtd.ecap.interruptRemapping).toBe(true);
    expect(vtd.cap.adjustedGuestAddressWidths.length).toBeGreaterThan(0);
    expect(vtd.cap.maxGuestAddressWidth).toBeGreaterThanOrEqual(39);
    expect(info.capabilities.dirtyTracking).toBe(false);
    expect(vtd.ecap.secondStageAccessedDirty).toBe(false);
    expect(explainNoDirtyTracking(info)).toMatch(/VT-d unit lacks .*SLADS|scalable mode/);
  });

  test("errors: unknown device id ENOENT, not a device id EINVAL, unbound device EINVAL", () => {
    const { iommufd, ioas } = mockSetup();
    expectIommufdError(() => readHwInfo(iommufd, 999_999), "ENOENT", "IOMMU_GET_HW_INFO", "device");
    // An IOAS id is an object, but not a device.
    expectIommufdError(() => readHwInfo(iommufd, ioas.id), "ENOENT", "IOMMU_GET_HW_INFO", "device");
    expectIommufdError(() => readHwInfo(iommufd, 0), "EINVAL", "IOMMU_GET_HW_INFO", "device");
    const unbound = keep(VfioDevice.open(eduAddress));
    expectIommufdError(() => readHwInfo(iommufd, unbound), "EINVAL", "IOMMU_GET_HW_INFO", "device");
  });
});

describe("IOMMU_HWPT_ALLOC, attach and replace", () => {
  test("a table allocated on an IOAS holds its mappings, before and after allocation", () => {
    const { ioas, mock } = mockSetup();
    const buffer = keep(MemfdBuffer.create(64 * KiB));
    ioas.mapFile(buffer, { iova: MOCK_APERTURE_START });
    const hwpt = keep(HwPageTable.allocate(ioas, mock));
    expect(hwpt.id).toBeGreaterThan(0);
    expect(hwpt.id).not.toBe(mock.hwptId);
    // A second mock device attached to the new table sees the mapping made before the table existed.
    const second = keep(MockDomain.attach(hwpt));
    expect(second.hwptId).toBe(hwpt.id);
    expect(second.checkMap(MOCK_APERTURE_START, 64 * KiB, buffer.address)).toBe(true);
    const later = keep(MemfdBuffer.create(32 * KiB));
    ioas.mapFile(later, { iova: MOCK_APERTURE_START + MiB });
    expect(second.checkMap(MOCK_APERTURE_START + MiB, 32 * KiB, later.address)).toBe(true);
  });

  test("replace moves a device between tables atomically; the page-table check follows", () => {
    const { iommufd, ioas, mock } = mockSetup();
    const first = keep(MemfdBuffer.create(64 * KiB));
    ioas.mapFile(first, { iova: MOCK_APERTURE_START });
    const other = iommufd.createIoas();
    const second = keep(MemfdBuffer.create(64 * KiB));
    other.mapFile(second, { iova: MOCK_APERTURE_START });
    const hwpt = keep(HwPageTable.allocate(other, mock));
    const original = mock.hwptId;
    expect(mock.checkMap(MOCK_APERTURE_START, 64 * KiB, first.address)).toBe(true);
    expect(mock.replace(hwpt)).toBe(hwpt.id);
    expect(mock.checkMap(MOCK_APERTURE_START, 64 * KiB, second.address)).toBe(true);
    expect(mock.checkMap(MOCK_APERTURE_START, 64 * KiB, first.address)).toBe(false);
    // Back to the IOAS: the kernel hands out a table for it again.
    const back = mock.replace(ioas);
    expect(back).toBeGreaterThan(0);
    expect(mock.checkMap(MOCK_APERTURE_START, 64 * KiB, first.address)).toBe(true);
    void original;
  });

  test("edu: DMA before and after replacing its page table, and into a second IOAS", () => {
    const iommufd = keep(Iommufd.open());
    const ioas = iommufd.createIoas();
    const device = boundEdu(iommufd);
    const automatic = device.attach(ioas);
    device.setBusMaster(true);
    const edu = new Edu(device.mapRegion(0));
    const buffer = keep(MemfdBuffer.create(64 * KiB));
    ioas.mapFile(buffer, { iova: 0x100000 });
    const roundTrip = (iova: number, source: Uint8Array, target: Uint8Array, seed: number) => {
      for (let i = 0; i < 1024; i++) source[i] = (i * seed + 1) & 0xff;
      target.fill(0);
      edu.fromRam(iova, 0, 1024);
      edu.toRam(0, iova + 0x8000, 1024);
      return target.subarray(0, 1024).every((b, i) => b === source[i]);
    };
    const src = buffer.bytes.subarray(0, 1024);
    const dst = buffer.bytes.subarray(0x8000, 0x8400);
    expect(roundTrip(0x100000, src, dst, 3)).toBe(true);

    const hwpt = keep(HwPageTable.allocate(ioas, device));
    expect(device.attach(hwpt.id)).toBe(hwpt.id);
    expect(hwpt.id).not.toBe(automatic);
    expect(roundTrip(0x100000, src, dst, 5)).toBe(true);

    // Another IOAS with another buffer at the same IOVA: after the replace edu reaches only it.
    const other = iommufd.createIoas();
    const otherBuffer = keep(MemfdBuffer.create(64 * KiB));
    other.mapFile(otherBuffer, { iova: 0x100000 });
    const otherTable = keep(HwPageTable.allocate(other, device));
    // Released first (teardown runs in reverse): a table the device is attached to is EBUSY.
    keep({ close: () => device.detach() });
    device.attach(otherTable.id);
    buffer.bytes.fill(0xee);
    expect(
      roundTrip(0x100000, otherBuffer.bytes.subarray(0, 1024), otherBuffer.bytes.subarray(0x8000, 0x8400), 7),
    ).toBe(true);
    expect(buffer.bytes.every((b) => b === 0xee)).toBe(true);
    device.setBusMaster(false);
  });

  test("flags on the mock: dirty tracking and nest parent are offered; not without dirty support", () => {
    const { ioas, mock } = mockSetup();
    keep(HwPageTable.allocate(ioas, mock, { dirtyTracking: true }));
    const parent = keep(HwPageTable.allocate(ioas, mock, { nestParent: true }));
    expect(parent.nestParent).toBe(true);
    const plain = mockSetup({ noDirtyTracking: true });
    const e = expectIommufdError(
      () => HwPageTable.allocate(plain.ioas, plain.mock, { dirtyTracking: true }),
      "EOPNOTSUPP",
      "IOMMU_HWPT_ALLOC",
    );
    expect(e.message).toContain("dirty tracking");
  });

  test("flags on QEMU's VT-d: dirty tracking and nesting refused with EOPNOTSUPP, plain table works", () => {
    const iommufd = keep(Iommufd.open());
    const ioas = iommufd.createIoas();
    const device = boundEdu(iommufd);
    keep(HwPageTable.allocate(ioas, device));
    const dirty = expectIommufdError(
      () => HwPageTable.allocate(ioas, device, { dirtyTracking: true }),
      "EOPNOTSUPP",
      "IOMMU_HWPT_ALLOC",
    );
    expect(dirty.hint).toContain("readHwInfo");
    expectIommufdError(
      () => HwPageTable.allocate(ioas, device, { nestParent: true }),
      "EOPNOTSUPP",
      "IOMMU_HWPT_ALLOC",
    );
  });

  test("errors: unknown device ENOENT, destroyed IOAS EBADF, destroy while attached EBUSY", () => {
    const { iommufd, ioas, mock } = mockSetup();
    expectIommufdError(() => HwPageTable.allocate(ioas, 4242), "ENOENT", "IOMMU_HWPT_ALLOC");
    const gone = iommufd.createIoas();
    gone.destroy();
    expectIommufdError(() => HwPageTable.allocate(gone, mock), "EBADF", "IOMMU_HWPT_ALLOC", "ioas");
    const hwpt = HwPageTable.allocate(ioas, mock);
    const user = MockDomain.attach(hwpt);
    expectIommufdError(() => hwpt.destroy(), "EBUSY", "HwPageTable.destroy");
    expect(hwpt.destroyed).toBe(false);
    user.destroy();
    hwpt.destroy();
    expect(hwpt.destroyed).toBe(true);
    expectIommufdError(() => hwpt.setDirtyTracking(true), "EBADF", "IOMMU_HWPT_SET_DIRTY_TRACKING");
    // The IOAS is busy while a table mirrors it.
    const busy = HwPageTable.allocate(ioas, mock);
    expectIommufdError(() => ioas.destroy(), "EBUSY", "Ioas.destroy");
    busy.destroy();
  });

  test("closing the Iommufd marks its tables gone", () => {
    const { iommufd, ioas, mock } = mockSetup();
    const hwpt = HwPageTable.allocate(ioas, mock);
    iommufd.close();
    expect(hwpt.destroyed).toBe(true);
    expectIommufdError(() => hwpt.setDirtyTracking(false), "EBADF", "IOMMU_HWPT_SET_DIRTY_TRACKING");
  });
});

describe("dirty tracking", () => {
  const LENGTH = 320 * KiB;

  function dirtySetup() {
    const { iommufd, ioas, mock } = mockSetup();
    const buffer = keep(MemfdBuffer.create(LENGTH));
    ioas.mapFile(buffer, { iova: MOCK_APERTURE_START });
    const hwpt = keep(HwPageTable.allocate(ioas, mock, { dirtyTracking: true }));
    hwpt.setDirtyTracking(true);
    return { iommufd, ioas, mock, hwpt, buffer };
  }

  /** Mark the given pages (`pageSize` each, counted from `iova`) dirty through the mock IOMMU. */
  function mark(
    iommufd: Iommufd,
    hwpt: HwPageTable,
    pages: number[],
    pageSize = 4096,
    iova = MOCK_APERTURE_START,
    length = LENGTH,
  ): number {
    const marks = new DirtyBitmap({ iova, length, pageSize });
    for (const page of pages) marks.bytes[page >> 3]! |= 1 << (page & 7);
    return markMockDirty(hwpt, iommufd, marks);
  }

  const dirtyPages = (bitmap: DirtyBitmap) => [...Array(bitmap.pages).keys()].filter((p) => bitmap.isPageDirty(p));

  test("bits set exactly where marked, cleared by a read, kept with NO_CLEAR", () => {
    const { iommufd, hwpt } = dirtySetup();
    const pages = [0, 1, 31, 32, 33, 50, 79];
    expect(mark(iommufd, hwpt, pages)).toBe(pages.length);
    const bitmap = new DirtyBitmap({ iova: MOCK_APERTURE_START, length: LENGTH, pageSize: 4096 });
    expect(bitmap.pages).toBe(80);
    expect(bitmap.bytes.byteLength).toBe(16);
    hwpt.readDirty(bitmap, { clear: false });
    expect(dirtyPages(bitmap)).toEqual(pages);
    expect(bitmap.countDirty()).toBe(pages.length);
    expect(bitmap.isDirty(MOCK_APERTURE_START + 50 * 4096 + 5)).toBe(true);
    expect(bitmap.isDirty(MOCK_APERTURE_START + 49 * 4096)).toBe(false);
    // NO_CLEAR left the IOMMU's bits: the next read sees them again, and clears them.
    hwpt.readDirty(bitmap);
    expect(dirtyPages(bitmap)).toEqual(pages);
    hwpt.readDirty(bitmap);
    expect(bitmap.countDirty()).toBe(0);
    expect(bitmap.dirtyRanges()).toEqual([]);
  });

  test("page size choice: 4 KiB bits over 2 KiB mock pages, 64 KiB bits, ranges merged", () => {
    const { iommufd, hwpt } = dirtySetup();
    mark(iommufd, hwpt, [3, 4, 5, 40], MOCK_PAGE_SIZE);
    const at4k = new DirtyBitmap({ iova: MOCK_APERTURE_START, length: LENGTH, pageSize: 4096 });
    hwpt.readDirty(at4k, { clear: false });
    // mock pages 3,4,5 lie in 4 KiB pages 1 and 2; page 40 in 4 KiB page 20.
    expect(at4k.dirtyRanges()).toEqual([
      { iova: MOCK_APERTURE_START + 4096, length: 8192 },
      { iova: MOCK_APERTURE_START + 20 * 4096, length: 4096 },
    ]);
    const at64k = new DirtyBitmap({ iova: MOCK_APERTURE_START, length: LENGTH, pageSize: 64 * KiB });
    hwpt.readDirty(at64k);
    expect([...Array(at64k.pages).keys()].filter((p) => at64k.isPageDirty(p))).toEqual([0, 1]);
  });

  test("an odd sub-range: only its own pages, bit 0 at its start; caller-owned unaligned storage", () => {
    const { iommufd, hwpt } = dirtySetup();
    mark(iommufd, hwpt, [4, 5, 6, 15, 25, 26, 75]);
    const storage = new Uint8Array(64);
    // 21 pages starting at page 5, written at byte offset 3 of the caller's buffer.
    const bitmap = new DirtyBitmap({
      iova: MOCK_APERTURE_START + 5 * 4096,
      length: 21 * 4096,
      pageSize: 4096,
      storage: storage.subarray(3),
    });
    storage.fill(0xff);
    hwpt.readDirty(bitmap, { clear: false });
    expect(dirtyPages(bitmap)).toEqual([0, 1, 10, 20]);
    // Nothing outside the bitmap's own bytes was touched.
    expect(storage[2]).toBe(0xff);
    expect(storage[3 + bitmap.bytes.byteLength]).toBe(0xff);
  });

  test("a page size below the table's IOVA granule is refused: the kernel would report half the bits", () => {
    const { iommufd, hwpt } = dirtySetup();
    mark(iommufd, hwpt, [1, 3], MOCK_PAGE_SIZE);
    expect(hwpt.granule).toBe(4096);
    const fine = new DirtyBitmap({ iova: MOCK_APERTURE_START, length: LENGTH, pageSize: MOCK_PAGE_SIZE });
    const e = expectIommufdError(() => hwpt.readDirty(fine), "EINVAL", "IOMMU_HWPT_GET_DIRTY_BITMAP", "bitmap");
    expect(e.message).toContain("4096");
  });

  test("a range with an unmapped hole is refused: the kernel would drop every bit after the hole", () => {
    const { iommufd, ioas, hwpt, buffer } = dirtySetup();
    const beyond = MOCK_APERTURE_START + LENGTH + 64 * KiB;
    ioas.mapFile(buffer, { iova: beyond });
    const marks = new DirtyBitmap({ iova: beyond, length: LENGTH });
    marks.bytes.fill(0xff);
    expect(markMockDirty(hwpt, iommufd, marks)).toBe(LENGTH / 4096);
    const across = new DirtyBitmap({ iova: MOCK_APERTURE_START, length: 2 * LENGTH + 64 * KiB });
    const e = expectIommufdError(() => hwpt.readDirty(across), "EINVAL", "IOMMU_HWPT_GET_DIRTY_BITMAP", "bitmap");
    expect(e.message).toContain("not mapped from end to end");
    // Each mapped range on its own is exact.
    const second = new DirtyBitmap({ iova: beyond, length: LENGTH });
    expect(hwpt.readDirty(second).countDirty()).toBe(LENGTH / 4096);
  });

  test("bitmap errors caught before the kernel: too small, page size, alignment", () => {
    expectIommufdError(
      () => new DirtyBitmap({ iova: MOCK_APERTURE_START, length: LENGTH, pageSize: 4096, storage: new Uint8Array(8) }),
      "EMSGSIZE",
      "DirtyBitmap",
      "options.storage",
    );
    expectIommufdError(
      () => new DirtyBitmap({ iova: 0, length: 3 * 4096, pageSize: 3000 }),
      "EINVAL",
      "DirtyBitmap",
      "options.pageSize",
    );
    expectIommufdError(() => new DirtyBitmap({ iova: 100, length: 4096 }), "EINVAL", "DirtyBitmap", "options.iova");
    expectIommufdError(() => new DirtyBitmap({ iova: 0, length: 5000 }), "EINVAL", "DirtyBitmap", "options.length");
    expectIommufdError(() => new DirtyBitmap({ iova: 0, length: 0 }), "EINVAL", "DirtyBitmap", "options.length");
  });

  test("kernel errors: a table without dirty tracking says so (EOPNOTSUPP); toggling is idempotent", () => {
    const { iommufd, ioas, mock } = mockSetup();
    const buffer = keep(MemfdBuffer.create(64 * KiB));
    ioas.mapFile(buffer, { iova: MOCK_APERTURE_START });
    const plain = keep(HwPageTable.allocate(ioas, mock));
    const e = expectIommufdError(() => plain.setDirtyTracking(true), "EOPNOTSUPP", "IOMMU_HWPT_SET_DIRTY_TRACKING");
    expect(e.message).toContain("cannot track dirty pages");
    const bitmap = new DirtyBitmap({ iova: MOCK_APERTURE_START, length: 64 * KiB });
    expectIommufdError(() => plain.readDirty(bitmap), "EOPNOTSUPP", "IOMMU_HWPT_GET_DIRTY_BITMAP");
    const tracked = keep(HwPageTable.allocate(ioas, mock, { dirtyTracking: true }));
    // Enabling twice is fine (the mock driver treats it as no change), as is disabling twice. After
    // each call the kernel's own state matches: it records marked pages only while tracking is on.
    const marks = new DirtyBitmap({ iova: MOCK_APERTURE_START, length: 64 * KiB, pageSize: 4096 });
    marks.bytes[0] = 0b100;
    const marked = [{ iova: MOCK_APERTURE_START + 2 * 4096, length: 4096 }];
    for (const enabled of [true, true, false, false]) {
      tracked.setDirtyTracking(enabled);
      expect(tracked.dirtyTracking).toBe(enabled);
      expect(markAndReadDirty(tracked, marks)).toEqual(enabled ? marked : undefined);
    }
    void iommufd;
  });

  test("VT-d in the guest: no dirty-tracking table, a typed error and no crash", () => {
    const iommufd = keep(Iommufd.open());
    const ioas = iommufd.createIoas();
    const device = boundEdu(iommufd);
    device.attach(ioas);
    const hwpt = keep(HwPageTable.allocate(ioas, device));
    expectIommufdError(() => hwpt.setDirtyTracking(true), "EOPNOTSUPP", "IOMMU_HWPT_SET_DIRTY_TRACKING");
    const bitmap = new DirtyBitmap({ iova: 0x100000, length: 64 * KiB });
    expectIommufdError(() => hwpt.readDirty(bitmap), "EOPNOTSUPP", "IOMMU_HWPT_GET_DIRTY_BITMAP");
  });

  test("fds and pinned pages return to where they started", () => {
    const fds = openFdCount();
    const pinned = pinnedKiB().pin;
    {
      using iommufd = Iommufd.open();
      const ioas = iommufd.createIoas();
      ioas.hugePages = false;
      const mock = MockDomain.attach(ioas);
      using buffer = MemfdBuffer.create(LENGTH);
      const mapping = ioas.mapFile(buffer, { iova: MOCK_APERTURE_START });
      using hwpt = HwPageTable.allocate(ioas, mock, { dirtyTracking: true });
      hwpt.setDirtyTracking(true);
      hwpt.readDirty(new DirtyBitmap({ iova: MOCK_APERTURE_START, length: LENGTH }));
      expect(pinnedKiB().pin).toBeGreaterThan(pinned);
      hwpt.setDirtyTracking(false);
      mapping.unmap();
      mock.destroy();
    }
    expect(openFdCount()).toBe(fds);
    expect(pinnedKiB().pin).toBe(pinned);
  });
});

describe("I/O page faults", () => {
  function faultSetup() {
    const { iommufd, ioas, mock } = mockSetup();
    const queue = keep(FaultQueue.allocate(iommufd));
    const hwpt = keep(HwPageTable.allocate(ioas, mock, { faultQueue: queue }));
    mock.replace(hwpt);
    // Released before the table it is attached to (teardown runs in reverse; else EBUSY).
    keep(mock);
    return { iommufd, ioas, mock, queue, hwpt };
  }

  test("a triggered fault arrives decoded through an awaited read; the response is accepted once", async () => {
    const { mock, queue } = faultSetup();
    expect(isCloseOnExec(queue.fd)).toBe(true);
    expect(queue.tryRead()).toEqual([]);
    const pending = queue.read({ timeoutMs: 10_000 });
    mock.triggerPageFault({ address: 0xdeadb000, groupId: 2, read: true, write: true });
    const faults = await pending;
    expect(faults).toHaveLength(1);
    const fault = faults[0]!;
    expect(fault).toMatchObject({
      deviceId: mock.deviceId,
      pasid: undefined,
      groupId: 2,
      lastPage: true,
      read: true,
      write: true,
      exec: false,
      privileged: false,
      address: 0xdeadb000,
      length: 0,
    });
    queue.respond(fault, "success");
    const again = expectIommufdError(() => queue.respond(fault), "EINVAL", "FaultQueue.respond", "fault");
    expect(again.message).toContain(`cookie ${fault.cookie}`);
  });

  test("several queued faults come in one read, in order; an invalid response is accepted", async () => {
    const { mock, queue } = faultSetup();
    mock.triggerPageFault({ address: 0x1000, groupId: 1 });
    mock.triggerPageFault({ address: 0x2000, groupId: 3, write: true });
    const faults = await queue.read({ timeoutMs: 10_000 });
    expect(faults.map((f) => [f.address, f.pasid, f.groupId, f.write])).toEqual([
      [0x1000, undefined, 1, false],
      [0x2000, undefined, 3, true],
    ]);
    for (const fault of faults) queue.respond(fault, "invalid");
    expect(queue.tryRead()).toEqual([]);
  });

  test("read errors: timeout ETIMEDOUT, a second waiter EBUSY, close while waiting EBADF", async () => {
    const { queue } = faultSetup();
    let timedOut: unknown;
    await queue.read({ timeoutMs: 50 }).catch((e) => (timedOut = e));
    expect(timedOut).toMatchObject({ code: "ETIMEDOUT", operation: "FaultQueue.read" });
    const waiting = queue.read();
    let second: unknown;
    await queue.read().catch((e) => (second = e));
    expect(second).toMatchObject({ code: "EBUSY" });
    let closed: unknown;
    setTimeout(() => queue.close(), 20);
    await waiting.catch((e) => (closed = e));
    expect(closed).toMatchObject({ code: "EBADF", operation: "FaultQueue.read" });
    expectIommufdError(() => queue.tryRead(), "EBADF", "FaultQueue.read");
    expectIommufdError(() => queue.respond(1), "EBADF", "FaultQueue.respond");
  });

  test("a nest parent cannot take a fault queue", () => {
    const { ioas, mock, iommufd } = mockSetup();
    using queue = FaultQueue.allocate(iommufd);
    expectIommufdError(
      () => HwPageTable.allocate(ioas, mock, { nestParent: true, faultQueue: queue }),
      "EOPNOTSUPP",
      "IOMMU_HWPT_ALLOC",
      "options.faultQueue",
    );
  });

  test("fds return to the start once a queue whose reader was waiting is closed (the poller thread too)", async () => {
    // Terminated poller threads release their event-loop fds asynchronously (earlier tests' too):
    // collect garbage and wait for a settled count on both sides.
    const settled = async (target?: number) => {
      Bun.gc(true);
      let last = openFdCount();
      for (let i = 0; i < 100; i++) {
        await Bun.sleep(20);
        Bun.gc(true);
        const now = openFdCount();
        if (target === undefined ? now === last : now === target) return now;
        last = now;
      }
      return openFdCount();
    };
    const fds = await settled();
    {
      const { iommufd, ioas, mock } = mockSetup();
      const queue = FaultQueue.allocate(iommufd);
      const hwpt = HwPageTable.allocate(ioas, mock, { faultQueue: queue });
      mock.replace(hwpt);
      const waiting = queue.read();
      await Bun.sleep(50);
      queue.close();
      await waiting.catch(() => undefined);
      mock.replace(ioas);
      hwpt.destroy();
      iommufd.close();
    }
    expect(await settled(fds)).toBe(fds);
  }, 30_000);
});
