/**
 * An NVMe controller driven from user space through VFIO: bring-up by the spec's
 * register sequence (NVMe Base 2.0 section 3.5.1), Identify, I/O queue pairs, completion by
 * polling the phase bit, fatal-status and timeout handling, reset, and shutdown (CC.SHN) on close.
 *
 * All DMA memory (rings, PRP lists, data buffers) comes from one DmaHeap mapped once into the
 * device's DmaSpace (an iommufd IOAS, or a VFIO type1 container on kernels without iommufd), so
 * reads and writes make no system call.
 *
 * This file is the composition and the public surface: resources.ts, admin.ts, health.ts,
 * queue.ts, peer.ts and data-buffer.ts each hold one part.
 */
import { releaseAll } from "../dma/open-device.ts";
import { type DmaBackend, type DmaSpace, iommufdOnlyError } from "../dma/space.ts";
import type { Iommufd } from "../iommufd/iommufd.ts";
import type { Ioas } from "../iommufd/ioas.ts";
import type { DmaBuffer, DmaHeap } from "../heap/dma-heap.ts";
import { argumentError, closedError, type IommufdError, ioError, stateError } from "../sys/error.ts";
import { VfioDevice } from "../vfio/device.ts";
import type { IrqVector } from "../vfio/irq-vector.ts";
import { AdminCommands } from "./admin.ts";
import { disableController, enableController, shutdownController } from "./bringup.ts";
import type { Command } from "./commands.ts";
import { CompletionPoller } from "./completion.ts";
import { dataIova, type DataBuffer } from "./data-buffer.ts";
import type { WaitStats } from "./interrupt-waits.ts";
import { ControllerHealth } from "./health.ts";
import type { ControllerIdentity } from "./identify.ts";
import { Namespace, type NamespaceOwner } from "./namespace.ts";
import { mapPeerMemory, memoryBufferRegion, type PeerBuffer, peerDevice } from "./peer.ts";
import { MAX_PRP_TRANSFER } from "./prp.ts";
import { QueuePair, type QueueOwner, type QueueStats } from "./queue.ts";
import { type Capabilities, CC, CC_EN, ControllerRegisters, PAGE_SIZE } from "./registers.ts";
import { type ControllerHost, ControllerResources } from "./resources.ts";
import type { CommandOptions, NvmeControllerOptions, QueuePairOptions, ShutdownResult } from "./options.ts";
import { adminQueueDepth, queuePairOptions } from "./options.ts";

export class NvmeController implements QueueOwner, NamespaceOwner {
  /** Where the heap is mapped: the IOAS (iommufd) or the container (type1) the device's DMA goes through. */
  readonly space: DmaSpace;
  readonly backend: DmaBackend;
  /** Why this backend ("forced by BUN_IOMMUFD_BACKEND=type1", "/dev/iommu exists and ... has a VFIO cdev"). */
  readonly backendReason: string;
  readonly heap: DmaHeap;
  readonly registers: ControllerRegisters;
  readonly capabilities: Capabilities;
  readonly doorbellStride: number;
  readonly commandTimeoutMs: number;
  #identity: ControllerIdentity | undefined;
  #maxTransferBytes = MAX_PRP_TRANSFER;
  readonly #resources: ControllerHost;
  readonly #health: ControllerHealth;
  readonly #adminQueue: QueuePair;
  readonly #admin: AdminCommands;
  readonly #ioQueues: QueuePair[] = [];
  /** The admin queue, then the I/O queue pairs. */
  readonly #allQueues: QueuePair[] = [];
  readonly #namespaces = new Map<number, Namespace>();
  readonly #peers = new Set<PeerBuffer>();
  readonly #maxQueuePairs: number;
  #grantedQueuePairs = 0;
  readonly #poller = new CompletionPoller(this);
  #shutdown: ShutdownResult = "not closed";
  #irqs: readonly IrqVector[] | undefined;

  private constructor(resources: ControllerHost, options: NvmeControllerOptions, adminDepth: number) {
    this.#resources = resources;
    this.heap = resources.heap;
    this.space = resources.heap.space;
    this.backend = resources.dma?.backend ?? this.space.backend;
    this.backendReason = resources.dma?.reason ?? "no VFIO device: the controller is a model (NvmeController.openOn)";
    this.registers = new ControllerRegisters(resources.bar);
    this.capabilities = this.registers.capabilities();
    this.doorbellStride = this.capabilities.doorbellStride;
    this.commandTimeoutMs = options.commandTimeoutMs ?? 10_000;
    this.#maxQueuePairs = options.maxQueuePairs ?? 8;
    this.#health = new ControllerHealth(this.registers, this.#allQueues);
    const heap = this.heap;
    // The kernel may place the heap at IOVA 0, and a controller reads a zero queue or PRP address
    // as "not set": keep the first page out of use.
    if (heap.iova === 0) heap.alloc(PAGE_SIZE, { align: PAGE_SIZE });
    this.#adminQueue = new QueuePair(this, heap, 0, adminDepth, true);
    this.#allQueues.push(this.#adminQueue);
    const scratch = heap.alloc(PAGE_SIZE, { align: PAGE_SIZE });
    this.#admin = new AdminCommands(this.#adminQueue, scratch, this.commandTimeoutMs, this.#pollAdmin);
  }

  /**
   * Open the controller at a PCI address (bound to vfio-pci on the way if needed) or a VFIO cdev
   * path, on the backend `options.backend` or $BUN_IOMMUFD_BACKEND forces, else iommufd where the
   * host has it and type1 otherwise; bring it up, identify it and create one I/O queue pair. A
   * VfioDevice already bound and attached to `options.ioas`, or opened through a VfioContainer,
   * may be given instead: the controller then leaves it open on close.
   */
  static open(target: string | VfioDevice, options: NvmeControllerOptions = {}): NvmeController {
    const op = "NvmeController.open";
    const expected = "expected a PCI address like 0000:00:04.0, a /dev/vfio/devices path or a VfioDevice";
    if (!(target instanceof VfioDevice) && (typeof target !== "string" || target === ""))
      throw argumentError(op, "target", expected);
    const adminDepth = adminQueueDepth(op, options);
    return NvmeController.#start(ControllerResources.acquire(target, options), options, adminDepth, op);
  }

  /**
   * @internal Bring up a controller on `host` (released on close) instead of a VFIO device: the seam
   * through which test/support/nvme-sim.ts tests the driver against a controller that misbehaves.
   */
  static openOn(host: ControllerHost, options: NvmeControllerOptions = {}): NvmeController {
    const op = "NvmeController.openOn";
    return NvmeController.#start(host, options, adminQueueDepth(op, options), op);
  }

  static #start(host: ControllerHost, options: NvmeControllerOptions, adminDepth: number, op: string) {
    let controller: NvmeController;
    try {
      controller = new NvmeController(host, options, adminDepth);
    } catch (error) {
      releaseAll([() => host.release()]); // the first error is the one worth reporting
      throw error;
    }
    try {
      controller.#bringUp(options.queueDepth ?? 64, options);
    } catch (error) {
      // A controller that never came up gets no shutdown sequence, only its resources back.
      controller.#health.markFailed(error, op);
      releaseAll([() => controller.close()]); // the bring-up error is the one worth reporting
      throw error;
    }
    return controller;
  }

  #bringUp(queueDepth: number, { completion, hybridSpin, blockMs }: NvmeControllerOptions): void {
    this.#resources.enableBusMaster();
    enableController(this.registers, this.capabilities, this.#adminQueue);
    this.#identity = this.#admin.identifyController();
    const mdts = this.#identity.mdts;
    this.#maxTransferBytes =
      mdts === 0 ? MAX_PRP_TRANSFER : Math.min(MAX_PRP_TRANSFER, 2 ** mdts * this.capabilities.minPageSize);
    this.#grantedQueuePairs = this.#admin.setNumberOfQueues(this.#maxQueuePairs);
    this.createQueuePair(queueDepth, { completion, hybridSpin, blockMs });
  }

  /** The VFIO device; ENODEV for a controller opened on a model (openOn), which has none. */
  get device(): VfioDevice {
    return this.#dma("NvmeController.device").device;
  }

  /** The iommufd the controller's IOAS is in; EOPNOTSUPP on the type1 backend, which has none. */
  get iommufd(): Iommufd {
    return this.#dma("NvmeController.iommufd").requireIoas("NvmeController.iommufd").iommufd;
  }

  /** The IOAS the controller's DMA goes through; EOPNOTSUPP on the type1 backend (see `space`). */
  get ioas(): Ioas {
    return this.#dma("NvmeController.ioas").requireIoas("NvmeController.ioas");
  }

  #dma(operation: string) {
    const dma = this.#resources.dma;
    if (dma === undefined) throw stateError(operation, "ENODEV", this.backendReason);
    return dma;
  }

  #pollAdmin = (): void => {
    if (this.#adminQueue.reap() > 0) return;
    this.#health.checkIfDue(performance.now());
  };

  /** Identify Controller data (model, serial, MDTS...). */
  get identity(): ControllerIdentity {
    if (this.#identity === undefined) throw closedError("NvmeController.identity", "the NVMe controller");
    return this.#identity;
  }

  /** The largest transfer one command moves (MDTS, capped by one PRP list page). */
  get maxTransferBytes(): number {
    return this.#maxTransferBytes;
  }

  /** The first I/O queue pair (the default of every I/O call). */
  get ioQueue(): QueuePair {
    const queue = this.#ioQueues[0];
    if (queue === undefined) throw closedError("NvmeController.ioQueue", "the NVMe controller");
    return queue;
  }

  get queuePairs(): readonly QueuePair[] {
    return this.#ioQueues;
  }

  get closed(): boolean {
    return this.#health.closed;
  }

  /** Why the controller stopped taking commands (fatal status, timeout), until reset(). */
  get failure(): IommufdError | undefined {
    return this.#health.failure;
  }

  /** How close() left the controller: "complete" when CSTS.SHST reported the shutdown done. */
  get shutdown(): ShutdownResult {
    return this.#shutdown;
  }

  /** Active namespace ids (Identify CNS 2). */
  namespaceIds(): number[] {
    this.assertUsable("Identify");
    return this.#admin.activeNamespaces();
  }

  /** A namespace (Identify CNS 0), identified once and kept. */
  namespace(nsid = 1): Namespace {
    const op = "NvmeController.namespace";
    const known = this.#namespaces.get(nsid);
    if (known) return known;
    if (!Number.isInteger(nsid) || nsid < 1 || nsid >= 0xffffffff)
      throw argumentError(op, "nsid", `${nsid} is not a namespace id`);
    this.assertUsable("Identify");
    const identity = this.#admin.identifyNamespace(nsid);
    if (identity.size === 0)
      throw argumentError(op, "nsid", `namespace ${nsid} is not active on this controller`, "ENODEV");
    const namespace = new Namespace(this, nsid, identity);
    this.#namespaces.set(nsid, namespace);
    return namespace;
  }

  /** A data buffer in the controller's heap, page-aligned. No system call. */
  allocBuffer(size: number): DmaBuffer {
    if (this.#health.closed) throw closedError("NvmeController.allocBuffer", "the NVMe controller");
    return this.heap.alloc(size, { align: PAGE_SIZE });
  }

  /**
   * Create an I/O queue pair of `depth` entries (Create I/O Completion Queue, then Submission
   * Queue). With `completion: "interrupt"` or "hybrid" its completion queue raises MSI-X vector <queue id>
   * (an interrupt queue waits for it as a hybrid one that does not spin: options.ts).
   */
  createQueuePair(depth: number, options: QueuePairOptions = {}): QueuePair {
    const op = "NvmeController.createQueuePair";
    const completion = queuePairOptions(op, depth, this.capabilities.maxQueueEntries, options);
    this.assertUsable("Create I/O Completion Queue");
    const used = new Set(this.#ioQueues.map((q) => q.id));
    let id = 1;
    while (used.has(id)) id++;
    if (id > this.#grantedQueuePairs) {
      const granted = this.#grantedQueuePairs;
      throw stateError(op, "ENOSPC", `the controller granted ${granted} I/O queue pairs and all are in use`);
    }
    const vector = completion === "poll" ? undefined : this.#interruptVector(id, op);
    const queue = new QueuePair(this, this.heap, id, depth, false, vector);
    try {
      this.#admin.createIoQueuePair(queue);
    } catch (error) {
      queue.release();
      throw error;
    }
    const spin = completion === "hybrid" ? options.hybridSpin : 0;
    if (completion !== "poll") this.#poller.sleepOn(queue, spin, options.blockMs);
    this.#ioQueues.push(queue);
    this.#allQueues.push(queue);
    return queue;
  }

  /** MSI-X vector `id`, enabling MSI-X (one vector per possible queue pair, 0 for admin) on first use. */
  #interruptVector(id: number, op: string) {
    if (this.#irqs === undefined) {
      const vectors = Math.min(this.#resources.msixVectorCount(), this.#grantedQueuePairs + 1);
      if (vectors < 2) throw stateError(op, "EOPNOTSUPP", "the controller has no MSI-X vectors for I/O queues");
      this.#irqs = this.#resources.enableMsix(vectors);
    }
    const vector = this.#irqs[id];
    if (vector === undefined) {
      throw stateError(op, "ENOSPC", `MSI-X vector ${id} is beyond the ${this.#irqs.length} enabled`);
    }
    return vector;
  }

  /** Delete an I/O queue pair (its pending commands are aborted by the controller). */
  deleteQueuePair(queue: QueuePair): void {
    const index = this.#ioQueues.indexOf(queue);
    if (index < 0)
      throw argumentError("NvmeController.deleteQueuePair", "queue", "not an I/O queue pair of this controller");
    this.assertUsable("Delete I/O Submission Queue");
    this.#admin.deleteIoQueuePair(queue);
    queue.reap();
    queue.failAll((name, detail) => ioError(`NVMe ${name}`, `${detail}: its queue was deleted`));
    this.#ioQueues.splice(index, 1);
    this.#allQueues.splice(this.#allQueues.indexOf(queue), 1);
    queue.release();
  }

  /**
   * Send any admin command (Identify, Get Log Page, Asynchronous Event Request...). Resolves with
   * the completion's DW0.
   */
  adminCommand(command: Command, options: CommandOptions = {}): Promise<number> {
    const op = "NvmeController.adminCommand";
    let iova = 0;
    let length = 0;
    if (options.buffer !== undefined) {
      length = options.length ?? options.buffer.size;
      try {
        iova = this.dataIova(options.buffer, 0, length, op);
      } catch (error) {
        return Promise.reject(error);
      }
    }
    return this.#adminQueue.submit(command, iova, length, options.timeoutMs ?? this.commandTimeoutMs);
  }

  /**
   * Map `length` bytes at `offset` of a region of another device (default: its controller memory
   * buffer) into this controller's IOAS, as a VFIO dma-buf. The result is used like a heap buffer.
   * The source must be another device: a controller cannot DMA into its own memory buffer.
   */
  mapPeerMemory(
    source: NvmeController | VfioDevice,
    options: { region?: number; offset?: number; length?: number } = {},
  ): PeerBuffer {
    const op = "NvmeController.mapPeerMemory";
    if (this.#health.closed) throw closedError(op, "the NVMe controller");
    const ioas = this.#resources.dma?.ioas;
    if (ioas === undefined) throw iommufdOnlyError(op, "DMA into another device's memory (a VFIO dma-buf)", "source");
    const controller = source instanceof NvmeController ? source : undefined;
    const device = peerDevice(op, this.device, controller?.device ?? source);
    const region = options.region ?? controller?.memoryBufferRegion();
    const peer = mapPeerMemory(this, ioas, device, region, options.offset ?? 0, options.length);
    this.#peers.add(peer);
    return peer;
  }

  /**
   * The BAR holding the controller memory buffer (CMBLOC.BIR), or undefined when there is none.
   * Sets CMBMSC.CRE first: controllers of NVMe 1.4 and later report CMBLOC only then.
   */
  memoryBufferRegion(): number | undefined {
    return memoryBufferRegion(this.registers, this.capabilities);
  }

  /** @internal The IOVA of `length` bytes at `offset` of `buffer`; EINVAL when the controller cannot reach them. */
  dataIova(buffer: DataBuffer, offset: number, length: number, operation: string): number {
    if (this.#health.closed) throw closedError(operation, "the NVMe controller");
    return dataIova(buffer, offset, length, operation, this, this.heap);
  }

  /** Counters of the admin queue and each I/O queue pair (with what its waits did, when it has a vector). */
  stats(): { admin: QueueStats; io: (QueueStats & { waits?: WaitStats })[] } {
    const io = this.#ioQueues.map((q) => ({ ...q.stats(), waits: this.#poller.waitStats(q) }));
    return { admin: this.#adminQueue.stats(), io };
  }

  /** @internal */
  get usable(): boolean {
    return this.#health.usable;
  }

  /** @internal */
  assertUsable(command: string): void {
    this.#health.assertUsable(command);
  }

  /** @internal Start the poller if it is not running. */
  kick(): void {
    this.#poller.kick();
  }

  /** @internal The admin queue, then the I/O queue pairs. */
  get queues(): readonly QueuePair[] {
    return this.#allQueues;
  }

  /** @internal */
  get lastHealthCheck(): number {
    return this.#health.lastCheck;
  }

  /** @internal Fatal status (read when `readStatus`) or a late command fails the controller and everything pending. */
  checkHealth(now: number, readStatus: boolean): void {
    this.#health.check(now, readStatus);
  }

  /** @internal A completion no correct controller posts fails the controller (EPROTO). */
  protocolError(queue: number, what: string): void {
    this.#health.protocolError(queue, what);
  }

  /**
   * Disable and re-enable the controller (after a fatal status or a timeout, or at will): pending
   * commands are rejected, the queues are created again on the controller with the same memory,
   * namespaces and buffers stay valid.
   */
  reset(): void {
    const op = "NvmeController.reset";
    const health = this.#health;
    if (health.closed) throw closedError(op, "the NVMe controller");
    const regs = this.registers;
    regs.write32(CC, regs.read32(CC) & ~CC_EN);
    health.failAll((name, detail) =>
      ioError(`NVMe ${name}`, `${detail}: the controller was reset before the command completed`),
    );
    disableController(regs, this.capabilities);
    for (const queue of this.#allQueues) queue.clear();
    health.markReady();
    try {
      enableController(regs, this.capabilities, this.#adminQueue);
      this.#grantedQueuePairs = this.#admin.setNumberOfQueues(this.#maxQueuePairs);
      for (const queue of this.#ioQueues) this.#admin.createIoQueuePair(queue);
    } catch (error) {
      health.markFailed(error, op);
      throw error;
    }
  }

  /**
   * Delete the I/O queues, shut the controller down (CC.SHN, wait for CSTS.SHST), turn bus
   * mastering off, and release the heap, the BAR and the device (and the iommufd or IOAS the
   * controller opened itself). Pending commands are rejected with EBADF. Idempotent.
   */
  close(): void {
    const health = this.#health;
    if (health.closed) return;
    const wasReady = health.usable;
    health.failAll((name, detail) => closedError(`NVMe ${name}`, `the NVMe controller (${detail})`));
    this.#shutdown = wasReady ? this.#orderlyShutdown() : "skipped: the controller had failed";
    health.markClosed();
    for (const peer of this.#peers) {
      try {
        peer.close();
      } catch {
        // Released with the IOAS below at the latest.
      }
    }
    this.#peers.clear();
    this.#resources.release();
  }

  #orderlyShutdown(): ShutdownResult {
    try {
      for (const queue of [...this.#ioQueues].reverse()) this.#admin.deleteIoQueuePair(queue, 1000);
      shutdownController(this.registers, this.capabilities);
      return "complete";
    } catch {
      return "timed out";
    }
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
