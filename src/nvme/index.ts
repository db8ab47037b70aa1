/**
 * bun-iommufd/nvme: a user-space NVMe driver over VFIO and iommufd.
 *
 * @example
 * ```ts
 * import { NvmeController } from "bun-iommufd/nvme";
 * using controller = NvmeController.open("0000:00:04.0");
 * const ns = controller.namespace(1);
 * using buffer = controller.allocBuffer(4096);
 * buffer.bytes.fill(0xab);
 * await ns.write(0, 4096 / ns.blockSize, buffer);
 * await ns.read(0, 4096 / ns.blockSize, buffer);
 * ```
 */
export { NvmeController } from "./controller.ts";
export type { CommandOptions, Completion, NvmeControllerOptions, QueuePairOptions, ShutdownResult } from "./options.ts";
export type { HybridSpin, WaitStats, SpinRule } from "./interrupt-waits.ts";
export { Namespace, type IoOptions } from "./namespace.ts";
export type { DataBuffer } from "./data-buffer.ts";
export { QueuePair, type QueueStats } from "./queue.ts";
export { NvmeRequest, type RequestCallback } from "./request.ts";
export { PeerBuffer } from "./peer.ts";
export { decodeStatus, NvmeStatusError, type DecodedStatus } from "./status.ts";
export { AdminOpcode, IoOpcode, IdentifyCns, type Command } from "./commands.ts";
export type { ControllerIdentity, NamespaceIdentity } from "./identify.ts";
export type { Capabilities } from "./registers.ts";
