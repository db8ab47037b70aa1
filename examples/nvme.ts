#!/usr/bin/env bun
/**
 * A user-space NVMe driver in a few lines: identify the controller, write a block, flush, read it
 * back, all through bun-iommufd/nvme (VFIO, polled completion, no kernel driver). Its DMA goes
 * through iommufd where the kernel has it, else through the VFIO type1 container;
 * BUN_IOMMUFD_BACKEND=iommufd|type1 forces one.
 *
 *   bun run vm -- --device nvme -- bun examples/nvme.ts
 *   BUN_IOMMUFD_BACKEND=type1 bun run vm -- --device nvme -- bun examples/nvme.ts
 */
import { NvmeController } from "../src/nvme/index.ts";

const address = process.env.IOMMUFD_VM_NVME?.split(",")[0]?.split("=")[0] ?? process.argv[2];
if (!address) {
  console.error("usage: bun examples/nvme.ts <PCI address of an NVMe controller>  (or run it in the test guest)");
  process.exit(1);
}

using controller = NvmeController.open(address);
const { model, serial, firmware } = controller.identity;
const ns = controller.namespace(1);
console.log(`${address}: ${model} (serial ${serial}, firmware ${firmware}), NVMe ${controller.registers.version()}`);
console.log(`DMA through ${controller.backend}: ${controller.backendReason}`);
console.log(
  `namespace 1: ${ns.blocks} blocks of ${ns.blockSize} bytes; ${controller.maxTransferBytes} bytes per command at most`,
);

using buffer = controller.allocBuffer(ns.blockSize);
const text = `hello from Bun at ${new Date().toISOString()}`;
buffer.bytes.fill(0);
buffer.bytes.set(new TextEncoder().encode(text));
await ns.write(0, 1, buffer);
await ns.flush();
buffer.bytes.fill(0);
await ns.read(0, 1, buffer);
const back = new TextDecoder().decode(buffer.bytes.subarray(0, text.length));
console.log(`LBA 0 reads back: "${back}"`);
process.exitCode = back === text ? 0 : 1;
