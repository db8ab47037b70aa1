#!/usr/bin/env bun
/**
 * Export a slice of a device BAR as a dma-buf (VFIO_DEVICE_FEATURE_DMA_BUF) and map it into an
 * IOAS: the way to let a device reach another device's memory (peer to peer) through iommufd.
 *
 * With only one device at hand (QEMU's edu), edu plays both parts: the first page of its BAR0 is
 * exported, mapped at an IOVA in the IOAS edu itself is attached to, and edu's DMA engine then
 * reads its own id register through the IOMMU, by IOVA, into a MemfdBuffer.
 *
 *   bun run vm -- bun examples/vfio-dmabuf.ts
 *
 * Needs Linux 6.19+ with CONFIG_VFIO_PCI_DMABUF (the test guest's kernel has it).
 */
import { bindToVfioPci, findPciDevices, Iommufd, IommufdError, MemfdBuffer, VfioDevice } from "../src/index.ts";
import { Edu, EDU_DEVICE, EDU_VENDOR } from "./edu.ts";

/** Both IOVAs stay below 256 MiB: edu masks DMA addresses to 28 bits. */
const BAR_IOVA = 0x200000;
const RAM_IOVA = 0x100000;
/** edu's identification register, at the start of BAR0. */
const REG_ID = 0x00;

const hex = (n: number | bigint) => `0x${n.toString(16)}`;

function main(): number {
  const address = findPciDevices(EDU_VENDOR, EDU_DEVICE)[0];
  if (!address) {
    console.error(
      "no edu device (1234:11e8) here: run this in the test guest: bun run vm -- bun examples/vfio-dmabuf.ts",
    );
    return 1;
  }
  // iommufd first: a kernel without it has no VFIO cdev to bind either, and this says why.
  using iommufd = Iommufd.open();
  const node = bindToVfioPci(address);
  console.log(`edu at ${address}: ${node}`);

  using ioas = iommufd.createIoas();
  using device = VfioDevice.open(node);
  // VFIO answers feature requests (dma-buf export included) only once the device is bound.
  device.bind(iommufd);
  device.attach(ioas);
  console.log(
    `bound ${node} to iommufd, attached to IOAS ${ioas.id}; dma-buf export supported: ${device.supportsDmaBuf()}`,
  );

  const bar0 = device.region(0);
  console.log(`BAR0: ${hex(bar0.size)} bytes, mmappable=${bar0.mmappable}`);

  using dmabuf = device.exportDmaBuf({ region: 0, ranges: [{ offset: 0, length: 0x1000 }] });
  console.log(`exported ${dmabuf.description} as dma-buf fd ${dmabuf.fd} (${dmabuf.size} bytes)`);

  {
    using anywhere = ioas.mapFile(dmabuf);
    console.log(
      `mapped the dma-buf into IOAS ${ioas.id} at IOVA ${hex(anywhere.iova)}..${hex(anywhere.end)} (kernel-chosen)`,
    );
  }
  console.log("unmapped the dma-buf");

  using barMapping = ioas.mapFile(dmabuf, { iova: BAR_IOVA });
  using ram = MemfdBuffer.create(0x10000, { name: "vfio-dmabuf example" });
  using ramMapping = ioas.mapFile(ram, { iova: RAM_IOVA });
  console.log(`mapped the dma-buf at IOVA ${hex(barMapping.iova)} and a MemfdBuffer at IOVA ${hex(ramMapping.iova)}`);

  using bar = device.mapRegion(0);
  const edu = new Edu(bar);
  const expected = edu.id();
  device.setBusMaster(true);
  try {
    // edu answers register reads of exactly 4 bytes, so the DMA reads one register.
    edu.fromRam(BAR_IOVA + REG_ID, 0, 4);
    edu.toRam(0, RAM_IOVA, 4);
  } finally {
    device.setBusMaster(false);
  }
  const seen = new Uint32Array(ram.buffer, 0, 1)[0]!;
  const ok = seen === expected;
  console.log(
    `edu DMA read its id register through the IOMMU at IOVA ${hex(BAR_IOVA)}: ${hex(seen)} (${ok ? "matches" : "differs from"} ${hex(expected)} read through the mmapped BAR)`,
  );

  // iommufd maps single-range VFIO dma-bufs only; a two-range export is refused at map time.
  using twoRanges = device.exportDmaBuf({
    region: 0,
    ranges: [
      { offset: 0, length: 0x1000 },
      { offset: 0x2000, length: 0x1000 },
    ],
  });
  try {
    ioas.mapFile(twoRanges).unmap();
    console.log("a two-range dma-buf mapped (this kernel lifted the one-range limit)");
  } catch (error) {
    if (!(error instanceof IommufdError)) throw error;
    console.log(`a two-range dma-buf is refused as expected: ${error.code}`);
  }
  console.log("done");
  return ok ? 0 : 1;
}

try {
  process.exitCode = main();
} catch (error) {
  if (error instanceof IommufdError && error.operation === "Iommufd.open") {
    console.error(
      `${error.message}\nThis needs /dev/iommu and an edu device: bun run vm -- bun examples/vfio-dmabuf.ts`,
    );
    process.exit(1);
  }
  throw error;
}
