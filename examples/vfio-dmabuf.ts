#!/usr/bin/env bun
/**
 * Export a slice of a device BAR as a dma-buf (VFIO_DEVICE_FEATURE_DMA_BUF) and map it into an
 * IOAS: the way to let one device reach another's memory (peer to peer) through iommufd.
 * Here the device is QEMU's edu and the slice is the first page of its BAR0.
 *
 *   bun run vm -- bun examples/vfio-dmabuf.ts
 *
 * Needs Linux 6.19+ with CONFIG_VFIO_PCI_DMABUF (the test guest's kernel has it).
 */
import { bindToVfioPci, findPciDevices, Iommufd, IommufdError, VfioDevice } from "../src/index.ts";

const hex = (n: number | bigint) => `0x${n.toString(16)}`;

function main(): number {
  const address = findPciDevices(0x1234, 0x11e8)[0];
  if (!address) {
    console.error("no edu device (1234:11e8) here: run this in the test guest: bun run vm -- bun examples/vfio-dmabuf.ts");
    return 1;
  }
  const node = bindToVfioPci(address);
  console.log(`edu at ${address}: ${node}`);

  using iommufd = Iommufd.open();
  using ioas = iommufd.createIoas();
  using device = VfioDevice.open(node);
  // VFIO answers feature requests (dma-buf export included) only once the device is bound.
  device.bind(iommufd);
  console.log(`bound ${node} to iommufd; dma-buf export supported: ${device.supportsDmaBuf()}`);

  const bar0 = device.region(0);
  console.log(`BAR0: ${hex(bar0.size)} bytes, mmappable=${bar0.mmappable}`);

  using dmabuf = device.exportDmaBuf({ region: 0, ranges: [{ offset: 0, length: 0x1000 }] });
  console.log(`exported ${dmabuf.description} as dma-buf fd ${dmabuf.fd} (${dmabuf.size} bytes)`);

  {
    using mapping = ioas.mapFile(dmabuf);
    console.log(`mapped the dma-buf into IOAS ${ioas.id} at IOVA ${hex(mapping.iova)}..${hex(mapping.end)}`);
  }
  console.log("unmapped the dma-buf");

  // iommufd maps single-range VFIO dma-bufs only; a two-range export is refused at map time.
  using twoRanges = device.exportDmaBuf({ region: 0, ranges: [{ offset: 0, length: 0x1000 }, { offset: 0x2000, length: 0x1000 }] });
  try {
    ioas.mapFile(twoRanges).unmap();
    console.log("a two-range dma-buf mapped (this kernel lifted the one-range limit)");
  } catch (error) {
    if (!(error instanceof IommufdError)) throw error;
    console.log(`a two-range dma-buf is refused as expected: ${error.code}`);
  }
  console.log("done");
  return 0;
}

try {
  process.exitCode = main();
} catch (error) {
  if (error instanceof IommufdError && error.operation === "Iommufd.open") {
    console.error(`${error.message}\nThis needs /dev/iommu and an edu device: bun run vm -- bun examples/vfio-dmabuf.ts`);
    process.exit(1);
  }
  throw error;
}
