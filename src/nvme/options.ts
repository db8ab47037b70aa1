/**
 * What a user chooses when opening an NVMe controller and sending commands, and what close()
 * reports: the public configuration of controller.ts, kept apart so the composition reads alone.
 */
import type { BackendChoice } from "../dma/backend.ts";
import type { Iommufd } from "../iommufd/iommufd.ts";
import type { Ioas } from "../iommufd/ioas.ts";
import type { VfioContainer } from "../type1/container.ts";
import { argumentError } from "../sys/error.ts";
import type { DataBuffer } from "./data-buffer.ts";
import { checkBlockMs, checkHybridSpin, type HybridSpin } from "./interrupt-waits.ts";

export interface NvmeControllerOptions {
  /**
   * Which kernel API carries the controller's DMA: "auto" (default: iommufd where /dev/iommu and
   * the device's cdev exist, else the VFIO type1 container; $BUN_IOMMUFD_BACKEND can force one),
   * "iommufd" or "type1". `controller.backend` and `controller.backendReason` say what was chosen.
   */
  backend?: BackendChoice;
  /** iommufd: use this iommufd (default: open one, owned by the controller). */
  iommufd?: Iommufd;
  /** iommufd: attach to this IOAS (default: a new one, owned by the controller). Must belong to `iommufd`. */
  ioas?: Ioas;
  /** type1: put the device's group in this container (default: open one, owned by the controller). */
  container?: VfioContainer;
  /** Bytes of the DMA heap for queues and data buffers. Default 16 MiB. */
  heapSize?: number;
  /** Huge pages for the heap: as DmaHeap's option. Default "auto". */
  hugePages?: "auto" | "2MB" | false;
  /** Admin queue entries. Default 32. */
  adminQueueDepth?: number;
  /** Entries of the first I/O queue pair. Default 64. */
  queueDepth?: number;
  /** I/O queue pairs to ask the controller for (Set Features, Number of Queues). Default 8. */
  maxQueuePairs?: number;
  /**
   * A command not completed after this long fails the controller. Default 10 000 ms. Deadlines
   * are stamped and checked by the health checks (every 10 ms while polling, 100 ms with
   * interrupts), so a command fails up to one such interval after its timeout.
   */
  commandTimeoutMs?: number;
  /** How the first I/O queue pair's completions are found: "poll" (default), "interrupt" (MSI-X) or "hybrid". */
  completion?: Completion;
  /** "hybrid" only: how long to spin before sleeping (QueuePairOptions.hybridSpin). */
  hybridSpin?: HybridSpin;
  /** "interrupt" and "hybrid": how long the thread may block on the interrupt before it sleeps (QueuePairOptions.blockMs). */
  blockMs?: number;
}

/**
 * "poll": the poller spins on the phase bit (lowest latency, one CPU busy while I/O is pending).
 * "interrupt": the queue raises an MSI-X vector; the poller blocks the thread on it for up to
 * `blockMs` (default 1 ms), then sleeps in the event loop until it fires: a wake in microseconds
 * and no CPU while waiting, and the thread back to the program when a completion takes long.
 * "hybrid": the same after a spin for a window learned from recent completions (interrupt-waits.ts):
 * polling's latency as well while completions come soon.
 */
export type Completion = "poll" | "interrupt" | "hybrid";

export interface QueuePairOptions {
  completion?: Completion;
  /**
   * "hybrid" only. By default the window is learned: twice the median of the last 32 waits for a
   * completion, at least 0.01 ms, and the shortest when that is past 0.05 ms (0.5 ms with
   * `blockMs: 0`): a blocked or parked wake costs less than such a spin (interrupt-waits.ts says
   * why). A number fixes the window (ms, 0..10); a `{ percentile, multiple }` rule learns it from
   * another percentile.
   */
  hybridSpin?: HybridSpin;
  /**
   * "interrupt" and "hybrid": block the thread in poll(2) on the queue's eventfd for up to this
   * many ms (whole, 0..10; default 1; after the spin when hybrid) before sleeping in the event
   * loop. The kernel wakes a blocked thread microseconds after the interrupt and a blocked thread
   * costs no CPU, where a wake through the event loop cost 120-300 us in the TCG guest; but
   * timers and I/O wait meanwhile, as they do during a spin. 0: sleep in the event loop at once.
   */
  blockMs?: number;
}

export interface CommandOptions {
  /** A heap buffer the command transfers (PRPs are built for `length` bytes of it). */
  buffer?: DataBuffer;
  /** Bytes transferred. Default: the buffer's size. */
  length?: number;
  timeoutMs?: number;
}

/** How close() left the controller. */
export type ShutdownResult = "complete" | "timed out" | "skipped: the controller had failed" | "not closed";

/** `options.adminQueueDepth` (default 32), checked: 2..4096. */
export function adminQueueDepth(op: string, options: NvmeControllerOptions): number {
  const depth = options.adminQueueDepth ?? 32;
  if (!Number.isInteger(depth) || depth < 2 || depth > 4096) {
    throw argumentError(op, "options.adminQueueDepth", `${depth} is outside 2..4096`);
  }
  return depth;
}

/** createQueuePair's `depth` (2..CAP.MQES + 1), `completion` (default "poll") and `hybridSpin`, checked. */
export function queuePairOptions(op: string, depth: number, maxEntries: number, options: QueuePairOptions): Completion {
  if (!Number.isInteger(depth) || depth < 2 || depth > maxEntries) {
    throw argumentError(op, "depth", `${depth} is outside 2..${maxEntries} (CAP.MQES + 1)`);
  }
  const chosen = options.completion ?? "poll";
  if (chosen !== "poll" && chosen !== "interrupt" && chosen !== "hybrid") {
    throw argumentError(op, "options.completion", `${String(chosen)} is not "poll", "interrupt" or "hybrid"`);
  }
  const wrong = checkHybridSpin(options.hybridSpin);
  if (wrong !== undefined) throw argumentError(op, "options.hybridSpin", wrong);
  const wrongBlock = checkBlockMs(options.blockMs);
  if (wrongBlock !== undefined) throw argumentError(op, "options.blockMs", wrongBlock);
  return chosen;
}
