/**
 * VFIO interrupts with QEMU's edu behind the emulated Intel IOMMU: real MSIs and a real INTx line
 * raised by the device (register 0x60) or by a DMA completing, delivered by the kernel into the
 * vectors' eventfds, and read by the library through Bun's event loop.
 */
import { beforeAll, describe, expect, test } from "bun:test";
import { bindToVfioPci, Iommufd, IommufdError, IrqSet, MemfdBuffer, VfioDevice, type Ioas } from "../../src/index.ts";
import { isCloseOnExec } from "../../src/sys/fd.ts";
import { libc } from "../../src/sys/libc.ts";
import { Edu, EDU_IRQ_DMA, requireEduAddress } from "../support/edu.ts";
import { expectIommufdError, fdCheckedScope, kernelInterrupts, requireIommufd } from "../support/kernel.ts";

const F_DUPFD_CLOEXEC = 1030;
let eduAddress = "";

beforeAll(() => {
  requireIommufd();
  eduAddress = requireEduAddress();
});

const scope = fdCheckedScope();
const keep = scope.keep;

function attachedEdu(): { iommufd: Iommufd; ioas: Ioas; device: VfioDevice; edu: Edu } {
  const iommufd = keep(Iommufd.open());
  const ioas = iommufd.createIoas();
  const device = keep(VfioDevice.open(eduAddress));
  device.bind(iommufd);
  device.attach(ioas);
  const edu = new Edu(device.mapRegion(0));
  return { iommufd, ioas, device, edu };
}

/** Waits up to `ms` for interrupts; resolves with the count or 0 when none came. */
async function countWithin(vector: { wait(o: { signal: AbortSignal }): Promise<number> }, ms: number): Promise<number> {
  try {
    return await vector.wait({ signal: AbortSignal.timeout(ms) });
  } catch (error) {
    if ((error as Error).name === "TimeoutError") return 0;
    throw error;
  }
}

/** A second fd on the same eventfd, to watch it after the library closed its own. */
function dupFd(fd: number): number {
  const copy = libc().fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) throw new Error("dup failed");
  return copy;
}

describe("interrupt info", () => {
  test("every index of edu: INTx maskable and automasked, one MSI vector, no MSI-X, no ERR (not PCIe), REQ", () => {
    const { device } = attachedEdu();
    const infos = device.irqs();
    expect(infos.map((i) => [i.kind, i.count])).toEqual([
      ["intx", 1],
      ["msi", 1],
      ["msix", 0],
      ["err", 0],
      ["req", 1],
    ]);
    expect(infos.filter((i) => i.count > 0).every((i) => i.eventfd)).toBe(true);
    expect(infos[0]).toMatchObject({ maskable: true, automasked: true, noresize: false });
    expect(infos[1]).toMatchObject({ maskable: false, automasked: false, noresize: true });
    expect(device.irqInfo("msi")).toEqual(infos[1]!);
  });

  test("an index past the device's: EINVAL; an unknown kind: EINVAL before the kernel", () => {
    const { device } = attachedEdu();
    expectIommufdError(() => device.irqInfo(5), "EINVAL", "VFIO_DEVICE_GET_IRQ_INFO", "kind");
    // vfio-pci refuses the ERR query itself on a conventional PCI device; irqs() shows count 0.
    const err = expectIommufdError(() => device.irqInfo("err"), "EINVAL", "VFIO_DEVICE_GET_IRQ_INFO", "kind");
    expect(err.message).toContain("PCI Express");
    expectIommufdError(() => device.irqInfo("nmi" as never), "EINVAL", "VFIO_DEVICE_GET_IRQ_INFO", "kind");
  });
});

describe("MSI", () => {
  test("each raise is one event; the eventfds are close-on-exec and non-blocking; bus mastering is turned on", async () => {
    const { device, edu } = attachedEdu();
    device.setBusMaster(false);
    using msi = device.enableIrq("msi");
    expect(device.busMaster).toBe(true);
    expect(msi.vectors).toHaveLength(1);
    const vector = msi.vectors[0]!;
    expect(isCloseOnExec(vector.fd)).toBe(true);
    expect(vector.poll()).toBe(0); // non-blocking: nothing pending, returns at once
    for (let i = 0; i < 5; i++) {
      edu.raiseInterrupt();
      expect(await vector.wait()).toBe(1);
      edu.ackInterrupt(1);
    }
    expect(vector.poll()).toBe(0);
  });

  test("raises in a burst may coalesce; the counts add up to the interrupts the kernel handled", async () => {
    const { device, edu } = attachedEdu();
    using msi = device.enableIrq("msi");
    const vector = msi.vector(0);
    const before = kernelInterrupts(`vfio-msi[0](${eduAddress})`);
    // Back to back, an MSI can arrive while the previous one is still pending in the local APIC:
    // the two become one interrupt. The kernel's own count is the truth to compare with.
    for (let i = 0; i < 8; i++) edu.raiseInterrupt();
    edu.ackInterrupt(1);
    let total = 0;
    for (let n = 1; n > 0; total += n) n = await countWithin(vector, 200);
    const handled = kernelInterrupts(`vfio-msi[0](${eduAddress})`) - before;
    expect(total).toBe(handled);
    expect(total).toBeGreaterThanOrEqual(1);
    expect(total).toBeLessThanOrEqual(8);
  });

  test("the event loop keeps running while a wait is pending (timers fire)", async () => {
    const { device, edu } = attachedEdu();
    using msi = device.enableIrq("msi");
    let ticks = 0;
    const interval = setInterval(() => ticks++, 5);
    const raise = setTimeout(() => edu.raiseInterrupt(), 100);
    try {
      const count = await msi.vectors[0]!.wait();
      expect(count).toBe(1);
      expect(ticks).toBeGreaterThanOrEqual(3);
    } finally {
      clearInterval(interval);
      clearTimeout(raise);
      edu.ackInterrupt(1);
    }
  });

  test("for await yields counts until the set is closed", async () => {
    const { device, edu } = attachedEdu();
    const msi = device.enableIrq("msi");
    const seen: number[] = [];
    const loop = (async () => {
      for await (const count of msi.vectors[0]!) {
        seen.push(count);
        edu.ackInterrupt(1);
        if (seen.length < 3) setTimeout(() => edu.raiseInterrupt(), 5);
      }
    })();
    edu.raiseInterrupt();
    while (seen.length < 3) await Bun.sleep(5);
    msi.close(); // ends the loop
    await loop;
    expect(seen).toEqual([1, 1, 1]);
  });

  test("after close the kernel no longer signals the eventfd: nothing arrives", async () => {
    const { device, edu } = attachedEdu();
    const msi = device.enableIrq("msi");
    const watcher = dupFd(msi.vectors[0]!.fd);
    try {
      edu.raiseInterrupt();
      expect(await msi.vectors[0]!.wait()).toBe(1);
      edu.ackInterrupt(1);
      msi.close();
      edu.raiseInterrupt();
      edu.ackInterrupt(1);
      await Bun.sleep(50);
      const word = new BigUint64Array(1);
      expect(libc().read(watcher, word, 8)).toBe(-1); // EAGAIN: the counter stayed at zero
    } finally {
      libc().close(watcher);
    }
    // And the index can be enabled again afresh.
    using again = device.enableIrq("msi");
    edu.raiseInterrupt();
    expect(await again.vectors[0]!.wait()).toBe(1);
    edu.ackInterrupt(1);
  });

  test("software trigger signals the vector without the device", async () => {
    const { device } = attachedEdu();
    using msi = device.enableIrq("msi");
    msi.vectors[0]!.trigger();
    msi.vectors[0]!.trigger();
    expect(await msi.vectors[0]!.wait()).toBe(2);
  });

  test("a wait can be abandoned with an AbortSignal; the vector keeps working", async () => {
    const { device, edu } = attachedEdu();
    using msi = device.enableIrq("msi");
    const vector = msi.vectors[0]!;
    const controller = new AbortController();
    const pending = vector.wait({ signal: controller.signal });
    controller.abort(new Error("gave up"));
    await expect(pending).rejects.toThrow("gave up");
    edu.raiseInterrupt();
    expect(await vector.wait()).toBe(1);
    edu.ackInterrupt(1);
  });

  test("poll() sees what the event loop already read after a wait", async () => {
    const { device, edu } = attachedEdu();
    using msi = device.enableIrq("msi");
    const vector = msi.vectors[0]!;
    setTimeout(() => edu.raiseInterrupt(), 10);
    expect(await vector.wait()).toBe(1); // the loop's reader is running from here on
    edu.raiseInterrupt();
    await Bun.sleep(20); // one at a time: back to back they may coalesce into one interrupt
    edu.raiseInterrupt();
    await Bun.sleep(30); // let the loop take them in
    expect(vector.poll()).toBe(2);
    edu.ackInterrupt(1);
  });
});

describe("edu completion interrupt after a DMA", () => {
  test("await the interrupt instead of polling the status register; the data is in the buffer", async () => {
    const { ioas, edu, device } = attachedEdu();
    using msi = device.enableIrq("msi");
    using buffer = MemfdBuffer.create(16 * 1024);
    using mapping = ioas.mapFile(buffer, { iova: 0x100000 });
    const iova = Number(mapping.iova);
    for (let i = 0; i < 1024; i++) buffer.bytes[i] = (i * 13 + 5) & 0xff;
    edu.startDma({ toRam: false, iova, deviceOffset: 0, count: 1024 });
    expect(await msi.vectors[0]!.wait()).toBe(1);
    expect(edu.interruptStatus() & EDU_IRQ_DMA).toBe(EDU_IRQ_DMA);
    expect(edu.dmaBusy()).toBe(false);
    edu.ackInterrupt(EDU_IRQ_DMA);
    edu.startDma({ toRam: true, iova: iova + 8192, deviceOffset: 0, count: 1024 });
    expect(await msi.vectors[0]!.wait()).toBe(1);
    edu.ackInterrupt(EDU_IRQ_DMA);
    expect(
      Buffer.from(buffer.bytes.subarray(8192, 8192 + 1024)).equals(Buffer.from(buffer.bytes.subarray(0, 1024))),
    ).toBe(true);
  });
});

describe("INTx", () => {
  test("raise, ack on the device, unmask, raise again: two events", async () => {
    const { device, edu } = attachedEdu();
    using intx = device.enableIrq("intx");
    const line = intx.vectors[0]!;
    edu.raiseInterrupt();
    expect(await line.wait()).toBe(1);
    edu.ackInterrupt(1);
    line.unmask();
    edu.raiseInterrupt();
    expect(await line.wait()).toBe(1);
    edu.ackInterrupt(1);
    line.unmask();
  });

  test("without unmask no second event; unmask with the line still asserted delivers it", async () => {
    const { device, edu } = attachedEdu();
    using intx = device.enableIrq("intx");
    const line = intx.vectors[0]!;
    edu.raiseInterrupt();
    expect(await line.wait()).toBe(1);
    edu.ackInterrupt(1);
    edu.raiseInterrupt(); // the line rises again, but the kernel keeps it masked
    expect(await countWithin(line, 200)).toBe(0);
    line.unmask(); // still asserted: fires now
    expect(await line.wait()).toBe(1);
    edu.ackInterrupt(1);
    line.unmask();
  });
});

describe("errors", () => {
  test("enabling an index twice: EBUSY; MSI while INTx is on: EBUSY naming INTx", () => {
    const { device } = attachedEdu();
    using msi = device.enableIrq("msi");
    expectIommufdError(() => device.enableIrq("msi"), "EBUSY", "VfioDevice.enableIrq", "kind");
    msi.close();
    using _intx = device.enableIrq("intx");
    const e = expectIommufdError(() => device.enableIrq("msi"), "EBUSY", "VfioDevice.enableIrq", "kind");
    expect(e.message).toContain("INTx");
  });

  test("more vectors than the index has, or none: EINVAL; an index the device lacks: EINVAL saying so", () => {
    const { device } = attachedEdu();
    const e = expectIommufdError(
      () => device.enableIrq("msi", { vectors: 2 }),
      "EINVAL",
      "VfioDevice.enableIrq",
      "options.vectors",
    );
    expect(e.message).toContain("has 1");
    expectIommufdError(
      () => device.enableIrq("msi", { vectors: 0 }),
      "EINVAL",
      "VfioDevice.enableIrq",
      "options.vectors",
    );
    const lacks = expectIommufdError(() => device.enableIrq("msix"), "EINVAL", "VfioDevice.enableIrq", "kind");
    expect(lacks.message).toContain("no MSI-X");
    expectIommufdError(() => device.enableIrq("err"), "EINVAL", "VfioDevice.enableIrq", "kind");
    expectIommufdError(() => device.enableIrq("bogus" as never), "EINVAL", "VfioDevice.enableIrq", "kind");
  });

  test("before bind: EINVAL telling to bind first", () => {
    using device = VfioDevice.open(eduAddress);
    const e = expectIommufdError(() => device.enableIrq("msi"), "EINVAL", "VFIO_DEVICE_GET_IRQ_INFO");
    expect(e.message).toContain("bind");
  });

  test("unmask on MSI: EINVAL; a second concurrent wait: EBUSY", async () => {
    const { device } = attachedEdu();
    using msi = device.enableIrq("msi");
    const vector = msi.vectors[0]!;
    expectIommufdError(() => vector.unmask(), "EINVAL", "IrqVector.unmask");
    const first = vector.wait();
    await expect(vector.wait()).rejects.toMatchObject({ code: "EBUSY", operation: "IrqVector.wait" });
    vector.trigger();
    expect(await first).toBe(1);
  });

  test("use after close: EBADF from poll, wait, trigger, unmask, fd; close is idempotent", async () => {
    const { device } = attachedEdu();
    const intx = device.enableIrq("intx");
    const line = intx.vectors[0]!;
    intx.close();
    intx.close();
    expect(intx.closed && line.closed).toBe(true);
    expectIommufdError(() => line.poll(), "EBADF", "IrqVector.poll");
    expectIommufdError(() => line.trigger(), "EBADF", "IrqVector.trigger");
    expectIommufdError(() => line.unmask(), "EBADF", "IrqVector.unmask");
    expectIommufdError(() => line.fd, "EBADF", "IrqVector.fd");
    await expect(line.wait()).rejects.toMatchObject({ code: "EBADF", operation: "IrqVector.wait" });
  });

  test("closing the device disables its interrupts first: pending waits reject with EBADF, the sets are closed", async () => {
    const iommufd = keep(Iommufd.open());
    const device = VfioDevice.open(eduAddress);
    device.bind(iommufd);
    device.attach(iommufd.createIoas());
    const msi = device.enableIrq("msi");
    const req = device.enableIrq("req");
    const pending = msi.vectors[0]!.wait();
    device.close();
    await expect(pending).rejects.toBeInstanceOf(IommufdError);
    await expect(pending).rejects.toMatchObject({ code: "EBADF" });
    expect(msi.closed && req.closed).toBe(true);
    expect(msi).toBeInstanceOf(IrqSet);
  });
});

describe("REQ: the kernel asks for the device back", () => {
  test("unbinding edu from vfio-pci while it is held: the event arrives, the test releases, the unbind completes", async () => {
    const iommufd = keep(Iommufd.open());
    const device = keep(VfioDevice.open(eduAddress));
    const node = device.path;
    device.bind(iommufd);
    device.attach(iommufd.createIoas());
    const req = device.enableIrq("req");
    // The unbind blocks in the kernel until the device is released: run it in another process.
    const unbind = Bun.spawn(["sh", "-c", `echo ${eduAddress} > /sys/bus/pci/drivers/vfio-pci/unbind`], {
      stdio: ["ignore", "ignore", "inherit"],
    });
    try {
      const count = await req.vectors[0]!.wait({ signal: AbortSignal.timeout(20_000) });
      expect(count).toBeGreaterThanOrEqual(1);
      expect(unbind.exitCode).toBeNull(); // still blocked, waiting for us
      device.close();
      const code = await Promise.race([unbind.exited, Bun.sleep(20_000).then(() => "hung")]);
      expect(code).toBe(0);
      expect(req.closed).toBe(true);
    } finally {
      if (unbind.exitCode === null) unbind.kill();
      bindToVfioPci(eduAddress);
    }
    // Back on vfio-pci and usable, under the same node (later tests and the bench open it by path).
    const again = keep(VfioDevice.open(eduAddress));
    expect(again.path).toBe(node);
    again.bind(keep(Iommufd.open()));
    expect(again.irqInfo("req").count).toBe(1);
  }, 60_000);

  test("software trigger on REQ is an event a driver can react to", async () => {
    const { device } = attachedEdu();
    using req = device.enableIrq("req");
    setTimeout(() => req.vectors[0]!.trigger(), 10);
    expect(await req.vectors[0]!.wait()).toBe(1);
  });
});

// QEMU's NVMe is a PCIe device with MSI-X: the ERR index and multi-vector MSI-X exist there.
const nvmeAddress = (process.env.IOMMUFD_VM_NVME ?? "").split(",").filter(Boolean)[0]?.split("=")[0];

describe("MSI-X and ERR on QEMU's NVMe (PCIe)", () => {
  test.skipIf(!nvmeAddress)(
    `four MSI-X vectors, each its own eventfd; ERR enables and signals${nvmeAddress ? "" : " [skipped: no NVMe on vfio-pci in this VM (IOMMUFD_VM_NVME is empty)]"}`,
    async () => {
      const iommufd = keep(Iommufd.open());
      const device = keep(VfioDevice.open(nvmeAddress!));
      device.bind(iommufd);
      device.attach(iommufd.createIoas());
      expect(device.irqInfo("msix").count).toBeGreaterThanOrEqual(4);
      expect(device.irqInfo("err").count).toBe(1);
      using msix = device.enableIrq("msix", { vectors: 4 });
      expect(new Set(msix.vectors.map((v) => v.fd)).size).toBe(4);
      msix.vectors[2]!.trigger();
      msix.vectors[2]!.trigger();
      msix.vectors[0]!.trigger();
      expect(msix.vectors.map((v) => v.poll())).toEqual([1, 0, 2, 0]);
      using err = device.enableIrq("err");
      setTimeout(() => err.vectors[0]!.trigger(), 5);
      expect(await err.vectors[0]!.wait()).toBe(1);
    },
  );
});
