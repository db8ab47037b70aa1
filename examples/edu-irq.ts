#!/usr/bin/env bun
/**
 * Interrupts instead of polling: QEMU's edu copies a buffer by DMA and raises an MSI when the
 * transfer completes; the program awaits that interrupt (the event loop stays free: a timer keeps
 * ticking meanwhile), acknowledges it on the device, and finds the bytes in place. It also
 * listens for REQ, the kernel asking for the device back (unbind, hot-unplug), and releases the
 * device when asked.
 *
 *   bun run vm -- bun examples/edu-irq.ts     (the test guest has an edu behind an emulated IOMMU)
 *   BUN_IOMMUFD_BACKEND=type1 bun run vm -- bun examples/edu-irq.ts     (through the VFIO type1 container)
 *
 * edu's interrupt registers (BAR0): 0x24 status, 0x60 raise, 0x64 acknowledge; a DMA command
 * with bit 2 set raises status bit 0x100 on completion.
 */
import { findPciDevices, IommufdError, MemfdBuffer, openDmaDevice } from "../src/index.ts";
import { Edu, EDU_DEVICE, EDU_IRQ_DMA, EDU_VENDOR } from "./edu.ts";

const IOVA = 0x100000;
const LENGTH = 1024;

async function main(): Promise<number> {
  const address = findPciDevices(EDU_VENDOR, EDU_DEVICE)[0];
  if (!address) {
    console.error("no edu device (1234:11e8) here: run this in the test guest: bun run vm -- bun examples/edu-irq.ts");
    return 1;
  }
  // iommufd where the kernel has it, else the VFIO type1 container; BUN_IOMMUFD_BACKEND forces one.
  using dma = openDmaDevice(address);
  const device = dma.device;
  console.log(`${address}: DMA through ${dma.backend} (${dma.reason})`);
  const edu = new Edu(device.mapRegion(0));

  const msiInfo = device.irqInfo("msi");
  console.log(
    `${address}: ${msiInfo.count} MSI vector(s); INTx, MSI-X, ERR, REQ counts: ${device
      .irqs()
      .map((i) => `${i.kind} ${i.count}`)
      .join(", ")}`,
  );

  // Enabling MSI turns bus mastering on: an MSI is a memory write by the device.
  using msi = device.enableIrq("msi");
  const completion = msi.vectors[0]!;

  // The kernel asks for the device back through REQ; a driver releases it then (closing the
  // device disables its interrupts, which also ends this loop).
  const req = device.enableIrq("req");
  const released = (async () => {
    for await (const _ of req.vectors[0]!) {
      console.log("REQ: the kernel wants the device back; releasing it");
      device.close();
    }
  })();

  using buffer = MemfdBuffer.create(64 * 1024, { name: "edu-irq example" });
  using mapping = dma.space.mapDma(buffer, { iova: IOVA });
  for (let i = 0; i < LENGTH; i++) buffer.bytes[i] = (i * 31 + 7) & 0xff;

  let ticks = 0;
  const ticker = setInterval(() => ticks++, 5);
  try {
    edu.startDma({ toRam: false, iova: IOVA, deviceOffset: 0, count: LENGTH });
    console.log(`DMA RAM -> device started (${LENGTH} bytes from IOVA 0x${IOVA.toString(16)}); awaiting its interrupt`);
    const first = await completion.wait();
    edu.ackInterrupt(EDU_IRQ_DMA);
    edu.startDma({ toRam: true, iova: IOVA + 0x8000, deviceOffset: 0, count: LENGTH });
    const second = await completion.wait();
    edu.ackInterrupt(EDU_IRQ_DMA);
    console.log(`completion interrupts: ${first} + ${second}; the timer ticked ${ticks} times meanwhile`);
  } finally {
    clearInterval(ticker);
  }
  const same = buffer.bytes.subarray(0x8000, 0x8000 + LENGTH).every((b, i) => b === buffer.bytes[i]);
  console.log(same ? `round trip OK: ${LENGTH} bytes back through the IOMMU` : "round trip FAILED: the bytes differ");

  mapping.unmap();
  msi.close();
  device.close(); // disables REQ too; the listener's loop ends
  await released;
  console.log("done");
  return same ? 0 : 1;
}

try {
  process.exitCode = await main();
} catch (error) {
  if (
    error instanceof IommufdError &&
    ["openDmaDevice", "Iommufd.open", "VfioContainer.open"].includes(error.operation)
  ) {
    console.error(`${error.message}\nThis needs VFIO and an edu device: bun run vm -- bun examples/edu-irq.ts`);
    process.exit(1);
  }
  throw error;
}
