/**
 * The backend choice (src/dma/backend.ts) against the real kernel, and the NVMe driver on the VFIO
 * type1 backend: QEMU's controller A opened through its IOMMU group into a container, bring-up,
 * I/O with the bytes checked here and in the image file on the host (nvme-type1-written.json),
 * MSI-X completion, and every refusal of what only iommufd can do.
 *
 * Runs on every kernel of the matrix that has the container: on those with iommufd and VFIO
 * cdevs "auto" must pick iommufd, elsewhere type1, and type1 forced must work everywhere.
 */
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, mkdirSync, readlinkSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import { BACKEND_ENV, DmaHeap, type IommufdError, openDmaDevice, VfioContainer } from "../../src/index.ts";
import { NvmeController } from "../../src/nvme/index.ts";
import { expectedAutoBackend, expectIommufdError, openFdCount, settledFdCount } from "../support/kernel.ts";
import {
  countQueueInterrupts,
  guestNvmeControllers,
  pattern,
  type GuestNvme,
  TYPE1_PATTERN_EXTENTS,
} from "../support/nvme.ts";

// Emulated (TCG) time: a bring-up or a 1.25 MB transfer takes seconds.
setDefaultTimeout(60_000);

let A: GuestNvme;
let B: GuestNvme;

beforeAll(() => {
  if (!existsSync("/dev/vfio/vfio")) {
    throw new Error("/dev/vfio/vfio is missing: these tests need a kernel with CONFIG_VFIO_CONTAINER");
  }
  const found = guestNvmeControllers();
  const plain = found.find((d) => d.cmb === 0);
  const withCmb = found.find((d) => d.cmb > 0);
  if (!plain || !withCmb) {
    throw new Error(
      `these tests need two NVMe controllers on vfio-pci (found ${found.length}); run them through bun run test`,
    );
  }
  A = plain;
  B = withCmb;
});

// The environment variable is the thing under test in some tests: every test starts without it.
const savedEnv = process.env[BACKEND_ENV];
let fdsAtStart = 0;
const opened: { close(): void }[] = [];
beforeEach(() => {
  delete process.env[BACKEND_ENV];
  fdsAtStart = openFdCount();
});
afterEach(async () => {
  delete process.env[BACKEND_ENV];
  for (const item of opened.splice(0).reverse()) item.close();
  expect(await settledFdCount(fdsAtStart)).toBe(fdsAtStart);
});
afterAll(() => {
  if (savedEnv === undefined) delete process.env[BACKEND_ENV];
  else process.env[BACKEND_ENV] = savedEnv;
});

const iommuGroup = (address: string) => Number(basename(readlinkSync(`/sys/bus/pci/devices/${address}/iommu_group`)));

function keep<T extends { close(): void }>(item: T): T {
  opened.push(item);
  return item;
}

/** Controller A on the type1 backend, forced by the option. */
function type1Controller(options: Parameters<typeof NvmeController.open>[1] = {}): NvmeController {
  return keep(NvmeController.open(A.addr, { backend: "type1", ...options }));
}

// What this file wrote to A's image, for the host-side check after the guest powers off.
const written: { lba: number; blocks: number }[] = [];
let blockSize = 512;
afterAll(() => {
  const out = process.env.IOMMUFD_VM_OUT;
  if (!out || written.length === 0) return;
  mkdirSync(out, { recursive: true });
  writeFileSync(join(out, "nvme-type1-written.json"), JSON.stringify({ disk: A.disk, blockSize, written }));
});

const same = (a: Uint8Array, b: Uint8Array) => a.length === b.length && Buffer.from(a).equals(Buffer.from(b));

describe("the backend choice", () => {
  test("auto: iommufd where the kernel has iommufd and VFIO cdevs, type1 elsewhere; the reason says why", () => {
    using dma = openDmaDevice(A.addr);
    if (expectedAutoBackend(A.addr) === "iommufd") {
      expect(dma.backend).toBe("iommufd");
      expect(dma.reason).toMatch(
        new RegExp(`^/dev/iommu exists and ${A.addr} has a VFIO cdev \\(/dev/vfio/devices/vfio\\d+\\)$`),
      );
      expect(dma.device.deviceId).toBeGreaterThan(0);
      expect(dma.device.attachedTo).toBeGreaterThan(0);
      expect(dma.space).toBe(dma.ioas!);
    } else {
      expect(dma.backend).toBe("type1");
      expect(dma.reason).toContain("/dev/vfio/vfio exists");
      expect(dma.space).toBe(dma.container!);
      expect(dma.container!.groups).toEqual([dma.device.group as never]);
    }
    expect(dma.space.backend).toBe(dma.backend);
    expect(dma.device.backend).toBe(dma.backend);
  });

  test(`${BACKEND_ENV}=type1 forces type1; the option forces either way and wins over the variable`, () => {
    process.env[BACKEND_ENV] = "type1";
    const byEnv = keep(openDmaDevice(A.addr));
    expect([byEnv.backend, byEnv.reason]).toEqual(["type1", `forced by ${BACKEND_ENV}=type1`]);
    expect(byEnv.container).toBeInstanceOf(VfioContainer);
    expect(byEnv.device.group?.number).toBe(iommuGroup(A.addr));
    byEnv.close();
    expect([byEnv.closed, byEnv.container!.closed]).toEqual([true, true]);
    process.env[BACKEND_ENV] = "iommufd";
    const byOption = keep(openDmaDevice(A.addr, { backend: "type1" }));
    expect([byOption.backend, byOption.reason]).toEqual(["type1", "forced by options.backend"]);
  });

  test(`a bad ${BACKEND_ENV} is EINVAL naming the variable before anything is opened`, () => {
    process.env[BACKEND_ENV] = "vfio";
    const e = expectIommufdError(() => keep(NvmeController.open(A.addr)), "EINVAL", "openDmaDevice", BACKEND_ENV);
    expect(e.message).toContain(`${BACKEND_ENV}="vfio"`);
    expectIommufdError(() => keep(openDmaDevice(A.addr)), "EINVAL", "openDmaDevice", BACKEND_ENV);
    expect(openFdCount()).toBe(fdsAtStart);
  });

  test("an object of another backend than the forced one is EINVAL naming the option; nothing joins it", () => {
    using container = VfioContainer.open();
    const e = expectIommufdError(
      () => keep(openDmaDevice(A.addr, { backend: "iommufd", container })),
      "EINVAL",
      "openDmaDevice",
      "options.container",
    );
    expect(e.message).toContain("forced by options.backend");
    expect(container.groups).toEqual([]);
  });

  test("a given container is used and left open; the device's group joins it", () => {
    using container = VfioContainer.open();
    const dma = keep(openDmaDevice(A.addr, { container }));
    expect([dma.backend, dma.reason]).toEqual(["type1", "options.container is a VFIO type1 container"]);
    expect(dma.space).toBe(container);
    dma.close();
    expect(container.closed).toBe(false);
    expect(container.groups.map((g) => g.devices.length)).toEqual([0]);
  });
});

describe("NVMe on the type1 backend", () => {
  test("bring-up and Identify; the heap is mapped in the container; ioas and peer memory are iommufd's", () => {
    const c = type1Controller();
    expect([c.backend, c.backendReason]).toEqual(["type1", "forced by options.backend"]);
    expect(c.space).toBeInstanceOf(VfioContainer);
    expect(c.heap.space).toBe(c.space);
    expect(c.device.group).toBeDefined();
    const container = c.space as VfioContainer;
    expect(container.mappings.some((m) => m.iova === c.heap.iova && m.length >= 16 << 20)).toBe(true);
    expect(c.identity.model).toBe("QEMU NVMe Ctrl");
    expect(c.namespaceIds()).toEqual([1]);
    expect(c.namespace(1).bytes).toBe(A.size);
    const ioas = expectIommufdError(() => c.ioas, "EOPNOTSUPP", "NvmeController.ioas");
    expect(ioas.message).toContain("VFIO type1 container");
    expectIommufdError(() => c.iommufd, "EOPNOTSUPP", "NvmeController.iommufd");
    const peer = expectIommufdError(() => c.mapPeerMemory(c.device), "EOPNOTSUPP", "NvmeController.mapPeerMemory");
    expect(peer.message).toContain("needs iommufd");
  });

  test("patterns (one block, two pages, a PRP list, past MDTS) written and read back equal", async () => {
    const c = type1Controller();
    const ns = c.namespace(1);
    blockSize = ns.blockSize;
    for (const { lba, blocks } of TYPE1_PATTERN_EXTENTS) {
      using out = c.allocBuffer(blocks * ns.blockSize);
      using back = c.allocBuffer(blocks * ns.blockSize);
      out.bytes.set(pattern(lba, blocks, ns.blockSize));
      back.bytes.fill(0);
      await ns.write(lba, blocks, out);
      await ns.flush();
      await ns.read(lba, blocks, back);
      expect(same(back.bytes, out.bytes)).toBe(true);
      written.push({ lba, blocks });
    }
  });

  test("MSI-X on a device opened through its group: the queue's vector fires, the reads land", async () => {
    const c = type1Controller({ completion: "interrupt" });
    const ns = c.namespace(1);
    expect(c.ioQueue.vectorNumber).toBe(c.ioQueue.id);
    expect(c.ioQueue.vector!.vector).toBe(c.ioQueue.id);
    const interrupts = countQueueInterrupts(c.ioQueue, A.addr);
    const { lba, blocks } = TYPE1_PATTERN_EXTENTS[2];
    using buffer = c.allocBuffer(32 * 4096);
    buffer.bytes.set(pattern(lba, blocks, 512));
    await ns.write(lba, blocks, buffer);
    buffer.bytes.fill(0);
    await ns.read(lba, blocks, buffer);
    expect(same(buffer.bytes.subarray(0, blocks * 512), pattern(lba, blocks, 512))).toBe(true);
    const reads = Array.from({ length: 32 }, (_, i) => ns.read(lba + (i % blocks), 1, buffer, { offset: i * 4096 }));
    await Promise.all(reads);
    for (let i = 0; i < 32; i++) {
      expect(same(buffer.bytes.subarray(i * 4096, i * 4096 + 512), pattern(lba + (i % blocks), 1, 512))).toBe(true);
    }
    expect(c.ioQueue.stats().completed).toBe(34);
    // The poller slept on the vector and an interrupt woke it: read until it has had to (see the
    // same check in nvme.test.ts); a poller that spins instead of sleeping never does. Four reads
    // at once: a single one was seen to complete, 200 times in a row on 6.12, during the read(2)
    // that drains the eventfd before a wait, and then the look after it rightly finds it.
    using big = c.allocBuffer(4 * 128 * 1024);
    const burst = () => Promise.all([0, 1, 2, 3].map((i) => ns.read(i * 256, 256, big, { offset: i * 128 * 1024 })));
    for (let reads = 0; interrupts().waited === 0 && reads < 200; reads++) await burst();
    // The queue's own vector fired (the kernel handled it) and every one reached its eventfd.
    await Bun.sleep(100);
    const { eventfd, kernel, waited } = interrupts();
    expect(waited).toBeGreaterThan(0);
    expect(eventfd).toBeGreaterThan(0);
    expect(eventfd).toBe(kernel);
  });

  test("a controller given as a group-opened device: used as it is, left open on close", async () => {
    using container = VfioContainer.open();
    const device = container.openDevice(A.addr);
    const c = NvmeController.open(device, { heapSize: 1 << 20, hugePages: false });
    expect(c.backend).toBe("type1");
    expect(c.space).toBe(container);
    const { lba } = TYPE1_PATTERN_EXTENTS[0];
    using buffer = c.allocBuffer(512);
    buffer.bytes.set(pattern(lba, 1, 512));
    await c.namespace(1).write(lba, 1, buffer);
    buffer.bytes.fill(0);
    await c.namespace(1).read(lba, 1, buffer);
    expect(same(buffer.bytes, pattern(lba, 1, 512))).toBe(true);
    c.close();
    expect([device.closed, container.mappings.length]).toEqual([false, 0]);
    // iommufd forced on a group-opened device is refused, naming both.
    const e = expectIommufdError(
      () => keep(NvmeController.open(device, { backend: "iommufd" })),
      "EINVAL",
      "adoptDmaDevice",
    );
    expect(e.message).toContain(`VFIO group ${device.group!.number}`);
  });

  test("a failed open on type1 releases the container, group, device and BAR: the group opens again", () => {
    // The heap refuses its size after the container, the group, the device and BAR0 are in hand.
    expectIommufdError(
      () => keep(NvmeController.open(A.addr, { backend: "type1", heapSize: -1 })),
      "EINVAL",
      "DmaHeap.create",
    );
    expect(openFdCount()).toBe(fdsAtStart);
    const c = type1Controller({ heapSize: 1 << 20, hugePages: false });
    expect(c.identity.model).toBe("QEMU NVMe Ctrl");
  });

  test("two controllers, two containers; a heap from elsewhere is refused as on iommufd", async () => {
    const a = type1Controller({ heapSize: 1 << 20, hugePages: false });
    const b = keep(NvmeController.open(B.addr, { backend: "type1", heapSize: 1 << 20, hugePages: false }));
    expect(a.space).not.toBe(b.space);
    using other = DmaHeap.create(b.space, { size: 1 << 20, hugePages: false });
    using foreign = other.alloc(4096);
    let thrown: unknown;
    await a
      .namespace(1)
      .read(0, 1, foreign)
      .catch((error) => {
        thrown = error;
      });
    expect((thrown as IommufdError).code).toBe("EINVAL");
    expect((thrown as IommufdError).message).toContain("another DmaHeap");
  });
});
