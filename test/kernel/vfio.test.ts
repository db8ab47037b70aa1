/**
 * VFIO and dma-bufs against the real kernel, with QEMU's edu device bound to vfio-pci behind the
 * emulated Intel IOMMU. Every DMA here is real: edu reads and writes guest RAM through the IOMMU.
 */
import { afterEach, beforeAll, describe, expect, test } from "bun:test";
import { createUdmabuf, DmaBuf, Iommufd, MemfdBuffer, VfioDevice, type Ioas } from "../../src/index.ts";
import { isCloseOnExec } from "../../src/sys/fd.ts";
import { revokeSelftestDmaBuf, selftestDmaBuf } from "../../src/testing/selftest.ts";
import { Edu, EDU_DEVICE, EDU_ID_VALUE, EDU_VENDOR, requireEduAddress } from "../support/edu.ts";
import { kernelHas, onThisKernel } from "../support/matrix.ts";
import { expectIommufdError, kernelLog, openFdCount, requireIommufd, testScope } from "../support/kernel.ts";

const KiB = 1024;
const has = kernelHas();
let eduAddress = "";

beforeAll(() => {
  requireIommufd();
  eduAddress = requireEduAddress();
});

// Everything a test opens is released after it, so a failing test cannot leak into the next.
const scope = testScope();
afterEach(scope.releaseAll);
const keep = scope.keep;

/** edu bound to a fresh iommufd and attached to a fresh IOAS, bus mastering on. */
function attachedEdu(): { iommufd: Iommufd; ioas: Ioas; device: VfioDevice; edu: Edu } {
  const iommufd = keep(Iommufd.open());
  const ioas = iommufd.createIoas();
  const device = keep(VfioDevice.open(eduAddress));
  device.bind(iommufd);
  device.attach(ioas);
  device.setBusMaster(true);
  const bar = device.mapRegion(0);
  return { iommufd, ioas, device, edu: new Edu(bar) };
}

describe("VfioDevice basics", () => {
  test("open by PCI address and by cdev path; the fd is close-on-exec", () => {
    using byAddress = VfioDevice.open(eduAddress);
    expect(byAddress.path).toMatch(/^\/dev\/vfio\/devices\/vfio\d+$/);
    expect(isCloseOnExec(byAddress.fd)).toBe(true);
    const path = byAddress.path;
    byAddress.close();
    using byPath = VfioDevice.open(path);
    expect(byPath.pciAddress).toBe(eduAddress);
  });

  test("before bind every ioctl but bind is EINVAL saying to bind first", () => {
    using device = VfioDevice.open(eduAddress);
    const e = expectIommufdError(() => device.info(), "EINVAL", "VFIO_DEVICE_GET_INFO");
    expect(e.message).toContain("bind");
    expectIommufdError(() => device.region(0), "EINVAL", "VFIO_DEVICE_GET_REGION_INFO");
  });

  test("info, regions and config space describe edu", () => {
    using iommufd = Iommufd.open();
    using device = VfioDevice.open(eduAddress);
    device.bind(iommufd);
    const info = device.info();
    expect(info.isPci).toBe(true);
    expect(info.numRegions).toBeGreaterThanOrEqual(9);
    const bar0 = device.region(0);
    expect(bar0.size).toBe(1024 * KiB);
    expect(bar0.mmappable && bar0.readable && bar0.writable).toBe(true);
    expect(device.pciId()).toEqual({ vendor: EDU_VENDOR, device: EDU_DEVICE });
  });

  test("bind returns a device id; attach returns the hw page table; detach works", () => {
    using iommufd = Iommufd.open();
    const ioas = iommufd.createIoas();
    using device = VfioDevice.open(eduAddress);
    const id = device.bind(iommufd);
    expect(id).toBeGreaterThan(0);
    const hwpt = device.attach(ioas);
    expect(hwpt).toBeGreaterThan(0);
    expect(hwpt).not.toBe(ioas.id);
    // The Intel IOMMU domain now decides the usable IOVA ranges.
    expect(ioas.iovaRanges().ranges.length).toBeGreaterThan(0);
    device.detach();
    expect(device.attachedTo).toBeUndefined();
  });

  test("attach before bind: EINVAL telling to bind first", () => {
    using iommufd = Iommufd.open();
    using device = VfioDevice.open(eduAddress);
    const e = expectIommufdError(() => device.attach(iommufd.createIoas()), "EINVAL", "VFIO_DEVICE_ATTACH_IOMMUFD_PT");
    expect(e.message).toContain("bind");
  });

  test("a PCI address that does not exist: ENODEV", () => {
    expectIommufdError(() => VfioDevice.open("0000:7f:1f.7"), "ENODEV", "VfioDevice.open", "pathOrPciAddress");
  });

  test("edu has no reset: EINVAL saying so", () => {
    using iommufd = Iommufd.open();
    using device = VfioDevice.open(eduAddress);
    device.bind(iommufd);
    expect(device.info().canReset).toBe(false);
    const e = expectIommufdError(() => device.reset(), "EINVAL", "VFIO_DEVICE_RESET");
    expect(e.message).toContain("does not support reset");
  });
});

describe("registers through the BAR mapping", () => {
  test("identification register and liveness round trip", () => {
    const { edu } = attachedEdu();
    expect(edu.id()).toBe(EDU_ID_VALUE);
    expect(edu.liveness(0x12345678)).toBe(~0x12345678 >>> 0);
    expect(edu.liveness(0)).toBe(0xffffffff);
  });

  test("misaligned or out-of-range register access: EINVAL, never a fault", () => {
    const { device } = attachedEdu();
    using bar = device.mapRegion(0);
    expectIommufdError(() => bar.read32(2), "EINVAL", "RegionMapping.read32", "offset");
    expectIommufdError(() => bar.write32(bar.size, 1), "EINVAL", "RegionMapping.write32", "offset");
    bar.unmap();
    expectIommufdError(() => bar.read32(0), "EBADF", "RegionMapping.read32");
  });

  test("bus mastering can be switched on and off", () => {
    const { device } = attachedEdu();
    expect(device.busMaster).toBe(true);
    device.setBusMaster(false);
    expect(device.busMaster).toBe(false);
    device.setBusMaster(true);
    expect(device.busMaster).toBe(true);
  });
});

describe("zero-copy DMA through the IOMMU", () => {
  test("bytes JS writes reach the device, and bytes the device writes appear in the ArrayBuffer", () => {
    const { ioas, edu } = attachedEdu();
    using buffer = MemfdBuffer.create(64 * KiB);
    using mapping = ioas.mapFile(buffer, { iova: 0x100000 });
    const pattern = buffer.bytes.subarray(0, 2048);
    for (let i = 0; i < pattern.length; i++) pattern[i] = (i * 7 + 3) & 0xff;
    edu.fromRam(Number(mapping.iova), 0, 2048);
    edu.toRam(0, Number(mapping.iova) + 4096, 2048);
    // No copy call: the device wrote into the pages the JS view is made of.
    expect(Buffer.from(buffer.bytes.subarray(4096, 4096 + 2048)).equals(Buffer.from(pattern))).toBe(true);
  });

  test("map by VA works for DMA too", () => {
    const { ioas, edu } = attachedEdu();
    using buffer = MemfdBuffer.create(16 * KiB);
    using mapping = ioas.map(buffer, { iova: 0x200000 });
    buffer.bytes.set(new TextEncoder().encode("through the IOMMU"), 100);
    edu.fromRam(Number(mapping.iova) + 100, 16, 17);
    edu.toRam(16, Number(mapping.iova) + 8192, 17);
    expect(new TextDecoder().decode(buffer.bytes.subarray(8192, 8192 + 17))).toBe("through the IOMMU");
  });

  test("after unmap a DMA to the old IOVA does not reach the buffer, and the IOMMU records the fault", () => {
    const { ioas, edu } = attachedEdu();
    using buffer = MemfdBuffer.create(16 * KiB);
    const iova = 0x300000;
    const target = iova + 8192;
    const mapping = ioas.mapFile(buffer, { iova });
    buffer.bytes.fill(0x11, 0, 1024);
    edu.fromRam(iova, 0, 1024); // device buffer now holds 0x11s
    // Positive control: while mapped, the very same write lands.
    buffer.bytes.fill(0x22, 8192, 8192 + 1024);
    edu.toRam(0, target, 1024);
    expect(buffer.bytes.subarray(8192, 8192 + 1024).every((b) => b === 0x11)).toBe(true);
    buffer.bytes.fill(0x22, 8192, 8192 + 1024);
    mapping.unmap();
    // The IOMMU logs a DMA remapping fault at the page it refused. Its printing is rate limited
    // (10 per 5 s, shared with earlier tests' faults): if none shows, wait out the window once.
    const faultLine = new RegExp(
      `DMAR: \\[DMA Write[^\\]]*\\] Request device \\[[0-9a-f:.]+\\] fault addr 0x${target.toString(16)}\\b`,
    );
    const faults = () => kernelLog().filter((line) => faultLine.test(line)).length;
    const before = faults();
    let recorded = false;
    for (let attempt = 0; attempt < 2 && !recorded; attempt++) {
      if (attempt > 0) Bun.sleepSync(5500);
      edu.toRam(0, target, 1024); // blocked by the IOMMU
      expect(buffer.bytes.subarray(8192, 8192 + 1024).every((b) => b === 0x22)).toBe(true);
      for (let poll = 0; poll < 20 && !recorded; poll++) {
        recorded = faults() > before;
        if (!recorded) Bun.sleepSync(50);
      }
    }
    expect(recorded).toBe(true);
  }, 30_000);

  // The same pages are also mapped read-write at RW_IOVA: the positive control for every blocked
  // access, and the way to look at what edu read (its buffer is reached only by DMA).
  const RW_IOVA = 0x500000;
  const all = (bytes: Uint8Array, value: number) => bytes.every((b) => b === value);

  test("a read-only mapping lets the device read but not write; the same write through a writable one lands", () => {
    const { ioas, edu } = attachedEdu();
    using buffer = MemfdBuffer.create(16 * KiB);
    using ro = ioas.mapFile(buffer, { iova: 0x400000, writable: false });
    using _rw = ioas.mapFile(buffer, { iova: RW_IOVA });
    buffer.bytes.fill(0x5a, 0, 512);
    buffer.bytes.fill(0x33, 4096, 4096 + 512);
    buffer.bytes.fill(0, 8192, 8192 + 512);
    edu.fromRam(Number(ro.iova), 0, 512); // a read through the read-only IOVA
    edu.toRam(0, RW_IOVA + 8192, 512);
    expect(all(buffer.bytes.subarray(8192, 8192 + 512), 0x5a)).toBe(true);
    edu.toRam(0, Number(ro.iova) + 4096, 512); // a write through a read-only IOVA: blocked
    expect(all(buffer.bytes.subarray(4096, 4096 + 512), 0x33)).toBe(true);
    edu.toRam(0, RW_IOVA + 4096, 512); // the control: the same write to the same page lands
    expect(all(buffer.bytes.subarray(4096, 4096 + 512), 0x5a)).toBe(true);
  });

  // Where the kernel cannot make a mapping write-only (matrix.ts: writeOnlyEnforced), the test
  // asserts that the read goes through, so a kernel that starts enforcing it is noticed too.
  const writeOnlyTitle = has.writeOnlyEnforced
    ? "a write-only mapping lets the device write but not read; the same read through a readable one works"
    : `a write-only mapping lets the device write, and read too${onThisKernel(false, "the driver sets the second-stage read bit on every entry")}`;
  test(writeOnlyTitle, () => {
    const { ioas, edu } = attachedEdu();
    using buffer = MemfdBuffer.create(16 * KiB);
    using wo = ioas.mapFile(buffer, { iova: 0x400000, readable: false });
    using _rw = ioas.mapFile(buffer, { iova: RW_IOVA });
    buffer.bytes.fill(0x5a, 0, 512);
    buffer.bytes.fill(0x33, 4096, 4096 + 512);
    edu.fromRam(RW_IOVA, 0, 512); // edu's buffer holds 0x5a
    edu.toRam(0, Number(wo.iova) + 4096, 512); // a write through the write-only IOVA
    expect(all(buffer.bytes.subarray(4096, 4096 + 512), 0x5a)).toBe(true);
    buffer.bytes.fill(0x77, 0, 512);
    edu.fromRam(Number(wo.iova), 0, 512); // a read through a write-only IOVA: blocked
    buffer.bytes.fill(0, 8192, 8192 + 512);
    edu.toRam(0, RW_IOVA + 8192, 512);
    if (!has.writeOnlyEnforced) {
      expect(all(buffer.bytes.subarray(8192, 8192 + 512), 0x77)).toBe(true);
      return;
    }
    expect(buffer.bytes.subarray(8192, 8192 + 512).includes(0x77)).toBe(false);
    edu.fromRam(RW_IOVA, 0, 512); // the control: the same read of the same page works
    edu.toRam(0, RW_IOVA + 8192, 512);
    expect(all(buffer.bytes.subarray(8192, 8192 + 512), 0x77)).toBe(true);
  });
});

// A kernel without VFIO dma-buf export or MAP_FILE (6.12 LTS): each dma-buf path is its typed
// error. Each kernel registers only its own branch: a skipped test fails the run under CI.
if (!has.dmaBufExport)
  describe(`dma-bufs${onThisKernel(false, "no VFIO dma-buf export, no MAP_FILE")}`, () => {
    test("exportDmaBuf is ENOTTY saying the kernel cannot export dma-bufs; supportsDmaBuf says false", () => {
      const { device } = attachedEdu();
      expect(device.supportsDmaBuf()).toBe(false);
      const e = expectIommufdError(
        () => device.exportDmaBuf({ region: 0, ranges: [{ offset: 0, length: 4096 }] }),
        "ENOTTY",
        "VFIO_DEVICE_FEATURE_DMA_BUF",
        "options",
      );
      expect(e.message).toContain("cannot export dma-bufs");
    });

    test("mapFile of a udmabuf is ENOTTY naming IOMMU_IOAS_MAP_FILE and why no address fallback applies", () => {
      if (has.mapFile) throw new Error("the matrix's table pairs dma-buf export with MAP_FILE");
      using iommufd = Iommufd.open();
      const ioas = iommufd.createIoas();
      using memfd = MemfdBuffer.create(64 * KiB);
      using udmabuf = createUdmabuf(memfd);
      const e = expectIommufdError(() => ioas.mapFile(udmabuf), "ENOTTY", "IOMMU_IOAS_MAP_FILE");
      expect(e.message).toContain("does not know IOMMU_IOAS_MAP_FILE (added in Linux 6.13");
      expect(e.message).toContain("a dma-buf has no address in this process");
      // The memfd itself still maps, by address.
      ioas.mapFile(memfd).unmap();
    });
  });

if (has.dmaBufExport)
  describe("dma-bufs", () => {
    test("a single-range VFIO dma-buf of BAR0 maps with mapFile, and unmaps", () => {
      const { iommufd, device } = attachedEdu();
      const target = iommufd.createIoas();
      expect(device.supportsDmaBuf()).toBe(true);
      using dmabuf = device.exportDmaBuf({ region: 0, ranges: [{ offset: 0, length: 4096 }] });
      expect(dmabuf.size).toBe(4096);
      expect(isCloseOnExec(dmabuf.fd)).toBe(true);
      const mapping = target.mapFile(dmabuf);
      expect(mapping.length).toBe(4096);
      mapping.unmap();
    });

    test("a two-range VFIO dma-buf exports, but mapping it is EOPNOTSUPP saying only single-range maps", () => {
      const { iommufd, device } = attachedEdu();
      const target = iommufd.createIoas();
      using dmabuf = device.exportDmaBuf({
        region: 0,
        ranges: [
          { offset: 0, length: 4096 },
          { offset: 8192, length: 4096 },
        ],
      });
      const e = expectIommufdError(() => target.mapFile(dmabuf), "EOPNOTSUPP", "IOMMU_IOAS_MAP_FILE", "file");
      expect(e.message).toContain("single-range VFIO PCI dma-bufs");
      expect(e.message).toContain("more than one range");
    });

    test("a udmabuf is refused with EOPNOTSUPP naming udmabuf", () => {
      using iommufd = Iommufd.open();
      const ioas = iommufd.createIoas();
      using memfd = MemfdBuffer.create(64 * KiB);
      using udmabuf = createUdmabuf(memfd);
      const e = expectIommufdError(() => ioas.mapFile(udmabuf), "EOPNOTSUPP", "IOMMU_IOAS_MAP_FILE", "file");
      expect(e.message).toContain("udmabuf");
    });

    test("after the device is closed its dma-buf is revoked: ENODEV saying so; an earlier mapping still unmaps", () => {
      const iommufd = keep(Iommufd.open());
      const target = iommufd.createIoas();
      const device = VfioDevice.open(eduAddress);
      device.bind(iommufd);
      device.attach(iommufd.createIoas());
      using dmabuf = device.exportDmaBuf({ region: 0, ranges: [{ offset: 4096, length: 4096 }] });
      const early = target.mapFile(dmabuf);
      device.close();
      const e = expectIommufdError(() => target.mapFile(dmabuf), "ENODEV", "IOMMU_IOAS_MAP_FILE", "file");
      expect(e.message).toContain("revoked");
      early.unmap();
    });

    test("ranges are checked against the BAR before the kernel: past the end and unaligned are EINVAL", () => {
      const { device } = attachedEdu();
      const size = device.region(0).size;
      expectIommufdError(
        () => device.exportDmaBuf({ region: 0, ranges: [{ offset: size - 4096, length: 8192 }] }),
        "EINVAL",
        "VFIO_DEVICE_FEATURE_DMA_BUF",
        "options.ranges[0]",
      );
      expectIommufdError(
        () => device.exportDmaBuf({ region: 0, ranges: [{ offset: 100, length: 4096 }] }),
        "EINVAL",
        "VFIO_DEVICE_FEATURE_DMA_BUF",
        "options.ranges[0]",
      );
      expectIommufdError(
        () => device.exportDmaBuf({ region: 0, ranges: [] }),
        "EINVAL",
        "VFIO_DEVICE_FEATURE_DMA_BUF",
        "options.ranges",
      );
    });

    test("selftest dma-buf: maps; length past its end is refused; after revoke mapping is ENODEV", () => {
      using iommufd = Iommufd.open();
      const ioas = iommufd.createIoas();
      using dmabuf = selftestDmaBuf(iommufd, 64 * KiB);
      expect(dmabuf).toBeInstanceOf(DmaBuf);
      expect(dmabuf.size).toBe(64 * KiB);
      const mapping = ioas.mapFile(dmabuf);
      mapping.unmap();
      expectIommufdError(
        () => ioas.mapFile(dmabuf, { length: 128 * KiB }),
        "EINVAL",
        "IOMMU_IOAS_MAP_FILE",
        "options.length",
      );
      revokeSelftestDmaBuf(iommufd, dmabuf);
      const e = expectIommufdError(() => ioas.mapFile(dmabuf), "ENODEV", "IOMMU_IOAS_MAP_FILE", "file");
      expect(e.message).toContain("revoked");
    });
  });

describe("lifetimes", () => {
  const orders: [string, string[]][] = [
    ["device, ioas, iommufd", ["device", "ioas", "iommufd"]],
    ["iommufd, device", ["iommufd", "device", "ioas"]],
    ["ioas first (attached: EBUSY), then device, then ioas", ["ioas-busy", "device", "ioas", "iommufd"]],
  ];
  for (const [name, order] of orders) {
    test(`closing ${name} leaves no fd behind and does not crash`, () => {
      const fds = openFdCount();
      const iommufd = Iommufd.open();
      const ioas = iommufd.createIoas();
      const device = VfioDevice.open(eduAddress);
      device.bind(iommufd);
      device.attach(ioas);
      const bar = device.mapRegion(0);
      const buffer = MemfdBuffer.create(16 * KiB);
      const mapping = ioas.mapFile(buffer, { iova: 0x500000 });
      for (const step of order) {
        if (step === "device") device.close();
        if (step === "ioas") ioas.destroy();
        if (step === "iommufd") iommufd.close();
        if (step === "ioas-busy") expectIommufdError(() => ioas.destroy(), "EBUSY", "Ioas.destroy");
      }
      expect(mapping.mapped).toBe(false);
      expect(bar.mapped).toBe(false);
      buffer.close();
      iommufd.close();
      expect(openFdCount()).toBe(fds);
    });
  }
});
