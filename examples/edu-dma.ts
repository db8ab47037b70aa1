#!/usr/bin/env bun
/**
 * A DMA round trip through the IOMMU with QEMU's edu device: the device copies bytes out of a
 * MemfdBuffer into its own 4 KiB buffer and back to another place in the same MemfdBuffer, both
 * times through IOVAs that exist only in our IOAS. JavaScript sees the result with no copy.
 *
 *   bun run vm -- bun examples/edu-dma.ts     (the test guest has an edu behind an emulated IOMMU)
 *   BUN_IOMMUFD_BACKEND=type1 bun run vm -- bun examples/edu-dma.ts     (through the VFIO type1 container)
 *
 * edu's registers (BAR0), from QEMU's docs/specs/edu.rst: 0x00 id, 0x04 liveness (reads back the
 * inverse of what was written), 0x80 DMA source, 0x88 DMA destination, 0x90 count, 0x98 command
 * (bit 0 start, cleared when done; bit 1 direction, 0 = RAM to device, 1 = device to RAM).
 */
import { findPciDevices, IommufdError, MemfdBuffer, openDmaDevice } from "../src/index.ts";
import { Edu, EDU_BUFFER, EDU_DEVICE, EDU_ID_VALUE, EDU_VENDOR } from "./edu.ts";

/** edu masks DMA addresses to 28 bits, so every IOVA it uses must sit below 256 MiB. */
const IOVA = 0x100000;
const LENGTH = 2048;

const hex = (n: number | bigint) => `0x${n.toString(16)}`;

function main(): number {
  const address = findPciDevices(EDU_VENDOR, EDU_DEVICE)[0];
  if (!address) {
    console.error("no edu device (1234:11e8) here: run this in the test guest: bun run vm -- bun examples/edu-dma.ts");
    return 1;
  }
  // Binds edu to vfio-pci if needed, then opens it through iommufd where the kernel has it, else
  // through the VFIO type1 container; BUN_IOMMUFD_BACKEND=iommufd|type1 forces one.
  using dma = openDmaDevice(address);
  console.log(`edu at ${address}, bound to vfio-pci`);
  const device = dma.device;
  console.log(`DMA through ${dma.backend}: ${dma.reason}`);
  if (dma.ioas) {
    console.log(
      `bound to iommufd (device id ${device.deviceId}) and attached to IOAS ${dma.ioas.id} (hw page table ${device.attachedTo})`,
    );
  } else {
    console.log(`opened through VFIO group ${device.group!.number} into a type1 container`);
  }

  using bar = device.mapRegion(0);
  const edu = new Edu(bar);
  const id = edu.id();
  console.log(`BAR0 mapped (${hex(bar.size)} bytes): id register ${hex(id)}`);
  if (id !== EDU_ID_VALUE) throw new Error(`unexpected edu id ${hex(id)}, expected ${hex(EDU_ID_VALUE)}`);
  const alive = edu.liveness(0x12345678);
  console.log(`liveness: wrote 0x12345678, read ${hex(alive)} (the inverse)`);

  using buffer = MemfdBuffer.create(64 * 1024, { name: "edu-dma example" });
  const source = buffer.bytes.subarray(0, LENGTH);
  const target = buffer.bytes.subarray(0x8000, 0x8000 + LENGTH);
  for (let i = 0; i < LENGTH; i++) source[i] = (i * 7 + 3) & 0xff;
  using mapping = dma.space.mapDma(buffer, { iova: IOVA });
  console.log(
    `mapped the ${buffer.size}-byte MemfdBuffer at IOVA ${hex(mapping.iova)}..${hex(Number(mapping.iova) + mapping.length)}`,
  );

  device.setBusMaster(true);
  try {
    edu.fromRam(IOVA, 0, LENGTH);
    console.log(`DMA RAM -> device: ${LENGTH} bytes from IOVA ${hex(IOVA)} to device offset ${hex(EDU_BUFFER)}`);
    edu.toRam(0, IOVA + 0x8000, LENGTH);
    console.log(`DMA device -> RAM: ${LENGTH} bytes to IOVA ${hex(IOVA + 0x8000)}`);
  } finally {
    device.setBusMaster(false);
  }

  const same = target.every((byte, i) => byte === source[i]);
  console.log(
    same
      ? `round trip OK: ${LENGTH} bytes came back through the IOMMU unchanged`
      : "round trip FAILED: the bytes differ",
  );
  mapping.unmap();
  console.log(`unmapped IOVA ${hex(IOVA)}`);
  return same ? 0 : 1;
}

try {
  process.exitCode = main();
} catch (error) {
  if (
    error instanceof IommufdError &&
    ["openDmaDevice", "Iommufd.open", "VfioContainer.open"].includes(error.operation)
  ) {
    console.error(`${error.message}\nThis needs VFIO and an edu device: bun run vm -- bun examples/edu-dma.ts`);
    process.exit(1);
  }
  throw error;
}
