/**
 * The NVMe controllers the test guest provides (vm/run.ts lists them in IOMMUFD_VM_DEVICES), and
 * the data patterns the NVMe tests write: a pure function of (LBA, byte), so the host can check
 * the image file after the guest is gone without being told the bytes.
 */
import type { QueuePair } from "../../src/nvme/index.ts";
import { kernelInterrupts } from "./kernel.ts";
import { countVectorDeliveries } from "./vector-waits.ts";

export interface GuestNvme {
  name: string;
  addr: string;
  vfio: string;
  /** Namespace size in bytes. */
  size: number;
  /** Controller memory buffer in bytes (0: none). */
  cmb: number;
  /** Host path of the disk image. */
  disk: string;
}

/** NVMe controllers on vfio-pci in this guest, in command-line order. */
export function guestNvmeControllers(): GuestNvme[] {
  const json = process.env.IOMMUFD_VM_DEVICES;
  if (!json) return [];
  const devices = JSON.parse(json) as Partial<GuestNvme & { kind: string; driver: string }>[];
  return (
    devices
      // A kernel without VFIO cdevs names no `vfio`: such a controller is reached by address and group.
      .filter((d) => d.kind === "nvme" && d.driver === "vfio-pci" && d.addr)
      .map((d) => ({
        name: d.name ?? "",
        addr: d.addr ?? "",
        vfio: d.vfio ?? "",
        size: d.size ?? 0,
        cmb: d.cmb ?? 0,
        disk: d.disk ?? "",
      }))
  );
}

/** The bytes the tests write at one logical block: "LBA <n>" then a stream seeded by n. */
export function patternBlock(
  lba: number,
  blockSize: number,
  out: Uint8Array = new Uint8Array(blockSize),
  at = 0,
): Uint8Array {
  const label = `LBA ${lba} `;
  let x = (lba * 2654435761 + 0x9e3779b9) >>> 0 || 1;
  for (let i = 0; i < blockSize; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[at + i] = i < label.length ? label.charCodeAt(i) : x & 0xff;
  }
  return out;
}

/** The pattern of `blocks` blocks from `lba`. */
export function pattern(lba: number, blocks: number, blockSize: number): Uint8Array {
  const out = new Uint8Array(blocks * blockSize);
  for (let i = 0; i < blocks; i++) patternBlock(lba + i, blockSize, out, i * blockSize);
  return out;
}

/** Where the guest tests write patterns, for the host-side check of the image file. */
export const PATTERN_EXTENTS = [
  { lba: 3, blocks: 1, why: "one block" },
  { lba: 100, blocks: 16, why: "two pages: PRP2 is the second page" },
  { lba: 1000, blocks: 72, why: "nine pages: a PRP list" },
  { lba: 20_000, blocks: 2500, why: "1.25 MB: past MDTS, split into three commands" },
] as const;

/** Where test/kernel/nvme-type1.test.ts writes the same kinds of extent, through the type1 backend. */
export const TYPE1_PATTERN_EXTENTS = [
  { lba: 100_003, blocks: 1, why: "one block" },
  { lba: 100_100, blocks: 16, why: "two pages: PRP2 is the second page" },
  { lba: 101_000, blocks: 72, why: "nine pages: a PRP list" },
  { lba: 110_000, blocks: 2500, why: "1.25 MB: past MDTS, split into three commands" },
] as const;

/**
 * Written by the P2P test from the peer controller's memory buffer, which held this extent's own
 * pattern (put there through the peer's BAR), not the source's.
 */
export const P2P_EXTENT = { lba: 60_000, blocks: 128 } as const;
/** Read from storage into the peer's memory by the P2P test. */
export const P2P_SOURCE_LBA = 50_000;

/**
 * Counts the MSI-X interrupts of an interrupt-driven queue pair from now on: what its own eventfd
 * delivered (what the poller slept for, drained, or left unread) and what the kernel handled on
 * the device's vector <queue id> (/proc/interrupts). Under TCG the poller often finds a completion
 * before it sleeps, and a health check can wake it too, so completing proves little: these counts
 * prove that the controller raised the queue's own vector and that the queue listened to it.
 * `waited` is what the poller's own sleeps returned (in the event loop or blocked in poll(2)): a
 * poller that spins instead of sleeping still leaves every interrupt on the eventfd (counted by
 * `eventfd`), but waits for none. Each call reads what is left on the eventfd, so the counts add
 * up however often it is called (while the queue is idle).
 */
export function countQueueInterrupts(
  queue: QueuePair,
  pciAddress: string,
): () => { eventfd: number; kernel: number; waited: number } {
  const vector = queue.vector;
  if (!vector) throw new Error(`queue ${queue.id} is polled: it has no interrupt vector`);
  const name = `vfio-msix[${queue.id}](${pciAddress})`;
  // The queue is idle here: nothing arrives between the two readings.
  vector.poll();
  const before = kernelInterrupts(name);
  const counts = countVectorDeliveries(vector);
  return () => {
    vector.poll(); // what is left on the eventfd: delivered now
    const { slept, delivered } = counts();
    return { eventfd: delivered, kernel: kernelInterrupts(name) - before, waited: slept };
  };
}
