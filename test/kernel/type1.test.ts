/**
 * The VFIO type1 backend against the real kernel: edu opened through its IOMMU group into a
 * container (/dev/vfio/vfio), DMA through the type1 IOMMU, and every refusal with its own error.
 * The guest binds edu to vfio-pci and other suites open it through its cdev: a device is open
 * through one path at a time, so each test opens, uses and closes its container.
 */
import { beforeAll, describe, expect, test } from "bun:test";
import { existsSync, readFileSync, readlinkSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import { DmaHeap, Iommufd, MemfdBuffer, readHwInfo, VfioContainer, VfioDevice } from "../../src/index.ts";
import { isCloseOnExec } from "../../src/sys/fd.ts";
import { DMA_ENTRY_LIMIT_PATH } from "../../src/type1/ioctls.ts";
import { Edu, EDU_DEVICE, EDU_ID_VALUE, EDU_VENDOR, requireEduAddress } from "../support/edu.ts";
import { kernelHas } from "../support/matrix.ts";
import { expectIommufdError, fdCheckedScope } from "../support/kernel.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
let eduAddress = "";
let eduGroup = 0;

beforeAll(() => {
  if (!existsSync("/dev/vfio/vfio")) {
    throw new Error("/dev/vfio/vfio is missing: the type1 tests need a kernel with CONFIG_VFIO_CONTAINER");
  }
  eduAddress = requireEduAddress();
  eduGroup = Number(basename(readlinkSync(join("/sys/bus/pci/devices", eduAddress, "iommu_group"))));
});

const scope = fdCheckedScope();
const keep = scope.keep;

/** edu through its group in a fresh container, bus mastering on, BAR0 mapped. */
function containedEdu(): { container: VfioContainer; device: VfioDevice; edu: Edu } {
  const container = keep(VfioContainer.open());
  const device = container.openDevice(eduAddress);
  device.setBusMaster(true);
  return { container, device, edu: new Edu(device.mapRegion(0)) };
}

describe("container and group", () => {
  test("the container, the group and the device fds are close-on-exec; the group is viable and set", () => {
    using container = VfioContainer.open();
    expect(container.backend).toBe("type1");
    expect(isCloseOnExec(container.fd)).toBe(true);
    const device = container.openDevice(eduAddress);
    expect(device.backend).toBe("type1");
    expect(device.pciAddress).toBe(eduAddress);
    expect(isCloseOnExec(device.fd)).toBe(true);
    expect(container.groups).toHaveLength(1);
    const group = container.groups[0]!;
    expect(device.group).toBe(group);
    expect(group.number).toBe(eduGroup);
    expect(group.path).toBe(`/dev/vfio/${eduGroup}`);
    expect(isCloseOnExec(group.fd)).toBe(true);
    expect(group.status()).toEqual({ viable: true, containerSet: true });
    expect(group.devices).toEqual([device]);
  });

  test("IOVA ranges and the mapping budget come from VFIO_IOMMU_GET_INFO", () => {
    const { container } = containedEdu();
    const { ranges, alignment } = container.iovaRanges();
    expect(alignment).toBe(4096);
    // The Intel IOMMU keeps the MSI window (0xfee00000..0xfeefffff) out of every range.
    expect(ranges.length).toBeGreaterThanOrEqual(2);
    expect(ranges.some((r) => BigInt(r.start) <= 0xfee00000n && 0xfee00000n <= BigInt(r.last))).toBe(false);
    const before = container.info();
    expect(before.pageSizes & 4096n).toBe(4096n);
    expect(before.dmaAvailable).toBe(Number(readFileSync(DMA_ENTRY_LIMIT_PATH, "utf8")));
    using buffer = MemfdBuffer.create(16 * KiB);
    using _mapping = container.mapDma(buffer);
    expect(container.info().dmaAvailable).toBe(before.dmaAvailable! - 1);
  });

  test("closing the container closes its groups and devices, unmaps everything, and leaks no fd", () => {
    const container = VfioContainer.open();
    const device = container.openDevice(eduAddress);
    const bar = device.mapRegion(0);
    const group = device.group!;
    const buffer = MemfdBuffer.create(16 * KiB);
    const mapping = container.mapDma(buffer);
    container.close();
    expect([container.closed, group.closed, device.closed, bar.mapped, mapping.mapped]).toEqual([
      true,
      true,
      true,
      false,
      false,
    ]);
    buffer.close();
    expectIommufdError(() => container.mapDma(buffer), "EBADF", "VFIO_IOMMU_MAP_DMA");
    // The group is free again: another container takes it.
    using again = VfioContainer.open();
    again.openDevice(eduAddress);
  });

  test("closing the last group drops the IOMMU and its mappings; the next device sets it again", () => {
    using container = VfioContainer.open();
    const device = container.openDevice(eduAddress);
    using buffer = MemfdBuffer.create(16 * KiB);
    const mapping = container.mapDma(buffer, { iova: 0x100000 });
    device.group!.close();
    expect(device.closed).toBe(true);
    expect(mapping.mapped).toBe(false);
    expectIommufdError(() => container.mapDma(buffer), "EINVAL", "VFIO_IOMMU_MAP_DMA");
    container.openDevice(eduAddress);
    // The old IOVA is free: the kernel really dropped the mapping with the IOMMU.
    using again = container.mapDma(buffer, { iova: 0x100000 });
    expect(again.iova).toBe(0x100000);
  });
});

describe("a device opened through its group works like one opened through its cdev", () => {
  test("info, regions, config space, registers, bus mastering", () => {
    const { device, edu } = containedEdu();
    const info = device.info();
    expect(info.isPci).toBe(true);
    expect(info.numRegions).toBeGreaterThanOrEqual(9);
    expect(device.region(0).size).toBe(1024 * KiB);
    expect(device.pciId()).toEqual({ vendor: EDU_VENDOR, device: EDU_DEVICE });
    expect(edu.id()).toBe(EDU_ID_VALUE);
    expect(edu.liveness(0x12345678)).toBe(~0x12345678 >>> 0);
    device.setBusMaster(false);
    expect(device.busMaster).toBe(false);
    device.setBusMaster(true);
    expect(device.busMaster).toBe(true);
  });

  test("reset: edu has none, and says so as through its cdev", () => {
    const { device } = containedEdu();
    expect(device.info().canReset).toBe(false);
    const e = expectIommufdError(() => device.reset(), "EINVAL", "VFIO_DEVICE_RESET");
    expect(e.message).toContain("does not support reset");
  });

  test("reset where the device has one: an NVMe controller's function reset clears its enable bit", () => {
    const nvme = (
      JSON.parse(process.env.IOMMUFD_VM_DEVICES ?? "[]") as { kind: string; driver: string; addr: string }[]
    ).find((d) => d.kind === "nvme" && d.driver === "vfio-pci");
    if (!nvme) throw new Error("no NVMe controller on vfio-pci in this guest; run through bun run test");
    using container = VfioContainer.open();
    const device = container.openDevice(nvme.addr);
    expect(device.info().canReset).toBe(true);
    using bar = device.mapRegion(0);
    const CC = 0x14;
    bar.write32(CC, bar.read32(CC) | 1); // CC.EN: a reset must clear it
    expect(bar.read32(CC) & 1).toBe(1);
    device.reset();
    expect(bar.read32(CC) & 1).toBe(0);
  });

  test("interrupt info, and an MSI raised by edu arrives in its eventfd", async () => {
    const { device, edu } = containedEdu();
    expect(device.irqs().map((i) => i.count)).toEqual(device.irqs().map((i) => i.count));
    expect(device.irqInfo("msi").count).toBe(1);
    using msi = device.enableIrq("msi");
    edu.raiseInterrupt(1);
    const count = await msi.vectors[0]!.wait({ signal: AbortSignal.timeout(10_000) });
    expect(count).toBeGreaterThanOrEqual(1);
    edu.ackInterrupt(1);
  });
});

describe("DMA through the type1 IOMMU", () => {
  test("edu round trip at a chosen and at an allocated IOVA: bytes equal both ways", () => {
    const { container, edu } = containedEdu();
    using buffer = MemfdBuffer.create(64 * KiB);
    using fixed = container.mapDma(buffer, { iova: 0x200000, length: 32 * KiB });
    using picked = container.mapDma(buffer, { offset: 32 * KiB, length: 32 * KiB });
    expect(fixed.iova).toBe(0x200000);
    expect(typeof picked.iova).toBe("number");
    expect(Number(picked.iova) % 4096).toBe(0);
    const pattern = buffer.bytes.subarray(0, 2048);
    for (let i = 0; i < pattern.length; i++) pattern[i] = (i * 13 + 5) & 0xff;
    edu.fromRam(0x200000, 0, 2048);
    edu.toRam(0, Number(picked.iova) + 4096, 2048);
    const landed = buffer.bytes.subarray(32 * KiB + 4096, 32 * KiB + 4096 + 2048);
    expect(Buffer.from(landed).equals(Buffer.from(pattern))).toBe(true);
  });

  test("an ArrayBuffer-backed page-aligned { address, length } maps too", () => {
    const { container, edu } = containedEdu();
    using buffer = MemfdBuffer.create(16 * KiB);
    using mapping = container.mapDma({ address: buffer.address, length: 16 * KiB });
    buffer.bytes.set(new TextEncoder().encode("through type1"), 64);
    edu.fromRam(Number(mapping.iova) + 64, 0, 13);
    edu.toRam(0, Number(mapping.iova) + 8192, 13);
    expect(new TextDecoder().decode(buffer.bytes.subarray(8192, 8192 + 13))).toBe("through type1");
  });

  test("after unmap a DMA to the old IOVA does not reach the buffer", () => {
    const { container, edu } = containedEdu();
    using buffer = MemfdBuffer.create(16 * KiB);
    const mapping = container.mapDma(buffer, { iova: 0x300000 });
    buffer.bytes.fill(0x11, 0, 1024);
    edu.fromRam(0x300000, 0, 1024);
    // Positive control: while mapped, the same write lands.
    buffer.bytes.fill(0x22, 8192, 8192 + 1024);
    edu.toRam(0, 0x300000 + 8192, 1024);
    expect(buffer.bytes.subarray(8192, 8192 + 1024).every((b) => b === 0x11)).toBe(true);
    buffer.bytes.fill(0x22, 8192, 8192 + 1024);
    mapping.unmap();
    expect(mapping.mapped).toBe(false);
    edu.toRam(0, 0x300000 + 8192, 1024); // blocked by the IOMMU
    expect(buffer.bytes.subarray(8192, 8192 + 1024).every((b) => b === 0x22)).toBe(true);
  });

  test("unmap by range returns the bytes and forgets the mappings inside; nothing there is 0", () => {
    const { container } = containedEdu();
    using buffer = MemfdBuffer.create(64 * KiB);
    const a = container.mapDma(buffer, { iova: 0x400000, length: 16 * KiB });
    const b = container.mapDma(buffer, { iova: 0x404000, length: 16 * KiB, offset: 16 * KiB });
    expect(container.unmap(0x400000, 32 * KiB)).toBe(32 * KiB);
    expect([a.mapped, b.mapped]).toEqual([false, false]);
    expect(container.unmap(0x400000, 32 * KiB)).toBe(0);
    container.mapDma(buffer, { iova: 0x400000 });
    container.mapDma(buffer);
    expect(container.unmapAll()).toBe(128 * KiB);
    expect(container.mappings).toEqual([]);
  });

  test("DmaHeap on a container: buffers' IOVAs carry an edu DMA into the heap", () => {
    const { container, edu } = containedEdu();
    using heap = DmaHeap.create(container, { size: 4 * MiB, hugePages: false });
    expect(heap.space).toBe(container);
    expect(container.mappings).toHaveLength(1);
    using source = heap.alloc(4 * KiB);
    using target = heap.alloc(4 * KiB);
    for (let i = 0; i < 1024; i++) source.bytes[i] = (i * 3) & 0xff;
    edu.fromRam(source.iova, 0, 1024);
    edu.toRam(0, target.iova, 1024);
    expect(Buffer.from(target.bytes.subarray(0, 1024)).equals(Buffer.from(source.bytes.subarray(0, 1024)))).toBe(true);
    heap.close();
    expect(container.mappings).toEqual([]);
  });
});

describe("refusals, each with its own error", () => {
  test("no container node: ENOENT saying which kernel option is missing", () => {
    const e = expectIommufdError(() => VfioContainer.open("/dev/vfio/no-such-node"), "ENOENT", "VfioContainer.open");
    expect(e.hint).toContain("CONFIG_VFIO_CONTAINER");
  });

  test("a node that is no VFIO container: ENOTTY from VFIO_GET_API_VERSION, and no fd left open", () => {
    const e = expectIommufdError(() => VfioContainer.open("/dev/null"), "ENOTTY", "VFIO_GET_API_VERSION", "path");
    expect(e.message).toContain("/dev/null is not a VFIO container");
  });

  test("mapping before any group is in: EINVAL saying to open a device first", () => {
    using container = VfioContainer.open();
    using buffer = MemfdBuffer.create(16 * KiB);
    const e = expectIommufdError(() => container.mapDma(buffer), "EINVAL", "VFIO_IOMMU_MAP_DMA");
    expect(e.message).toContain("openDevice");
  });

  test("the group already in another container of this process: EBUSY", () => {
    const { container } = containedEdu();
    using other = VfioContainer.open();
    const e = expectIommufdError(() => other.openDevice(eduAddress), "EBUSY", "VfioContainer.openDevice", "pciAddress");
    expect(e.message).toContain(`IOMMU group ${eduGroup}`);
    expect(container.groups).toHaveLength(1);
  });

  test("the group held by another process's container: EBUSY from the kernel, with the reason", async () => {
    const holder = Bun.spawn(["bun", join(import.meta.dir, "fixtures", "type1-holder.ts"), eduAddress], {
      stdin: "pipe",
      stdout: "pipe",
      stderr: "inherit",
    });
    try {
      const reader = holder.stdout.getReader();
      const { value } = await reader.read();
      expect(new TextDecoder().decode(value)).toContain("held");
      using container = VfioContainer.open();
      const e = expectIommufdError(() => container.openDevice(eduAddress), "EBUSY", "VfioGroup.open");
      expect(e.hint).toContain("already open");
    } finally {
      holder.stdin.end();
      await holder.exited;
    }
    expect(holder.exitCode).toBe(0);
  });

  // A cdev opens whatever the group does; binding it to an iommufd is what claims the device.
  // Registered only where there are cdevs (a skipped test fails the run under CI).
  if (kernelHas().iommufd)
    test("a device bound through its cdev keeps its group out (EBUSY), and a group in a container keeps the cdev from binding", () => {
      {
        using iommufd = Iommufd.open();
        using cdev = VfioDevice.open(eduAddress);
        cdev.bind(iommufd);
        using container = VfioContainer.open();
        const e = expectIommufdError(() => container.openDevice(eduAddress), "EBUSY", "VfioGroup.open");
        expect(e.hint).toContain("cdev");
      }
      const { device } = containedEdu();
      using iommufd = Iommufd.open();
      using cdev = VfioDevice.open(eduAddress);
      const e = expectIommufdError(() => cdev.bind(iommufd), "EBUSY", "VFIO_DEVICE_BIND_IOMMUFD");
      expect(e.message).toContain("VFIO group");
      expect(device.closed).toBe(false);
    });

  test("type1's dma_entry_limit: ENOSPC naming the module parameter", () => {
    const saved = readFileSync(DMA_ENTRY_LIMIT_PATH, "utf8").trim();
    writeFileSync(DMA_ENTRY_LIMIT_PATH, "4");
    let container: VfioContainer;
    try {
      // The kernel reads the limit when the container's IOMMU is set, i.e. at the first device.
      ({ container } = containedEdu());
    } finally {
      writeFileSync(DMA_ENTRY_LIMIT_PATH, saved);
    }
    expect(container.info().dmaAvailable).toBe(4);
    using buffer = MemfdBuffer.create(64 * KiB);
    for (let i = 0; i < 4; i++) container.mapDma(buffer, { offset: i * 4 * KiB, length: 4 * KiB });
    expect(container.info().dmaAvailable).toBe(0);
    const e = expectIommufdError(
      () => container.mapDma(buffer, { offset: 32 * KiB, length: 4 * KiB }),
      "ENOSPC",
      "VFIO_IOMMU_MAP_DMA",
    );
    // The sentence itself names the limit and its value, not only the hint.
    expect(e.message.split(" Hint: ")[0]).toContain("vfio_iommu_type1's dma_entry_limit allows (4)");
    expect(e.hint).toContain("vfio_iommu_type1.dma_entry_limit=");
    // The failed map gave its IOVA back: after one unmap the next map lands there.
    const last = container.mappings.at(-1)!;
    last.unmap();
    expect(container.mapDma(buffer, { offset: 32 * KiB, length: 4 * KiB }).iova).toBe(last.iova);
  });

  test("whole pages only: an unaligned source is EINVAL before the kernel, naming the page size", () => {
    const { container } = containedEdu();
    const bytes = new Uint8Array(8 * KiB + 100).subarray(100);
    const e = expectIommufdError(() => container.mapDma(bytes), "EINVAL", "VFIO_IOMMU_MAP_DMA", "source");
    expect(e.message).toContain("0x1000");
    using buffer = MemfdBuffer.create(16 * KiB);
    expectIommufdError(
      () => container.mapDma(buffer, { iova: 0x100100 }),
      "EINVAL",
      "VFIO_IOMMU_MAP_DMA",
      "options.iova",
    );
  });

  test("overlapping fixed IOVAs: EEXIST; an IOVA in the MSI window: EINVAL naming the usable ranges", () => {
    const { container } = containedEdu();
    using buffer = MemfdBuffer.create(16 * KiB);
    using _first = container.mapDma(buffer, { iova: 0x500000 });
    const e = expectIommufdError(() => container.mapDma(buffer, { iova: 0x502000 }), "EEXIST", "VFIO_IOMMU_MAP_DMA");
    expect(e.message).toContain("0x502000");
    const outside = expectIommufdError(
      () => container.mapDma(buffer, { iova: 0xfee00000 }),
      "EINVAL",
      "VFIO_IOMMU_MAP_DMA",
    );
    expect(outside.message).toContain("outside the usable ranges");
  });

  test("what only iommufd can do is EOPNOTSUPP naming iommufd", () => {
    const { container, device } = containedEdu();
    using buffer = MemfdBuffer.create(16 * KiB);
    const e = expectIommufdError(() => container.mapFile(buffer.fd), "EOPNOTSUPP", "VfioContainer.mapFile", "file");
    expect(e.message).toContain("iommufd");
    // A MemfdBuffer maps by address, as mapDma does.
    using byAddress = container.mapFile(buffer);
    expect(byAddress.mapped).toBe(true);
    for (const [call, op] of [
      [() => device.bind({} as Iommufd), "VFIO_DEVICE_BIND_IOMMUFD"],
      [() => device.attach(1), "VFIO_DEVICE_ATTACH_IOMMUFD_PT"],
      [() => device.detach(), "VFIO_DEVICE_DETACH_IOMMUFD_PT"],
    ] as const) {
      expect(expectIommufdError(call, "EOPNOTSUPP", op).message).toContain("cdev");
    }
    if (existsSync("/dev/iommu")) {
      using iommufd = Iommufd.open();
      const hw = expectIommufdError(() => readHwInfo(iommufd, device), "EOPNOTSUPP", "IOMMU_GET_HW_INFO", "device");
      expect(hw.message).toContain("needs iommufd");
    }
  });
});
