/**
 * An NVMe controller driven from user space through VFIO and iommufd: bring-up by the spec's
 * register sequence (NVMe Base 2.0 section 3.5.1), Identify, I/O queue pairs, completion by
 * polling the phase bit, fatal-status and timeout handling, reset, and shutdown (CC.SHN) on close.
 *
 * All DMA memory (rings, PRP lists, data buffers) comes from one DmaHeap mapped once into the
 * IOAS, so reads and writes make no system call.
 */
import { Iommufd } from "../iommufd/iommufd.ts";
import type { Ioas } from "../iommufd/ioas.ts";
import { DmaBuffer, DmaHeap } from "../heap/dma-heap.ts";
import { ERRNO } from "../sys/errno.ts";
import { argumentError, closedError, IommufdError } from "../sys/error.ts";
import { VfioDevice, type RegionMapping } from "../vfio/device.ts";
import type { IrqSet } from "../vfio/irq.ts";
import { bindToVfioPci, PCI_ADDRESS } from "../vfio/pci.ts";
import {
  createIoCompletionQueue,
  createIoSubmissionQueue,
  deleteIoCompletionQueue,
  deleteIoSubmissionQueue,
  identify,
  IdentifyCns,
  setNumberOfQueues,
  type Command,
} from "./commands.ts";
import {
  parseControllerIdentity,
  parseNamespaceIdentity,
  parseNamespaceList,
  type ControllerIdentity,
} from "./identify.ts";
import { Namespace, type DataBuffer, type NamespaceOwner } from "./namespace.ts";
import { PeerBuffer } from "./peer.ts";
import { MAX_PRP_TRANSFER } from "./prp.ts";
import { QueuePair, type QueueOwner, type QueueStats } from "./queue.ts";
import { disableController, enableController, shutdownController } from "./bringup.ts";
import { CompletionPoller, HEALTH_CHECK_MS } from "./completion.ts";
import {
  type Capabilities,
  CC,
  CC_EN,
  CMBLOC,
  CMBMSC,
  CMBMSC_CRE,
  ControllerRegisters,
  CSTS,
  CSTS_CFS,
  PAGE_SIZE,
} from "./registers.ts";

export interface NvmeControllerOptions {
  /** Use this iommufd (default: open one, owned by the controller). */
  iommufd?: Iommufd;
  /** Attach to this IOAS (default: a new one, owned by the controller). Must belong to `iommufd`. */
  ioas?: Ioas;
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
  /** A command not completed after this long fails the controller. Default 10 000 ms. */
  commandTimeoutMs?: number;
  /** How the first I/O queue pair's completions are found: "poll" (default) or "interrupt" (MSI-X). */
  completion?: Completion;
}

/**
 * "poll": the poller spins on the phase bit (lowest latency, one CPU busy while I/O is pending).
 * "interrupt": the queue raises an MSI-X vector; the poller sleeps in the event loop until it fires.
 */
export type Completion = "poll" | "interrupt";

export interface CommandOptions {
  /** A heap buffer the command transfers (PRPs are built for `length` bytes of it). */
  buffer?: DataBuffer;
  /** Bytes transferred. Default: the buffer's size. */
  length?: number;
  timeoutMs?: number;
}

/** How close() left the controller. */
export type ShutdownResult = "complete" | "timed out" | "skipped: the controller had failed" | "not closed";

type State = "ready" | "failed" | "closed";

export class NvmeController implements QueueOwner, NamespaceOwner {
  readonly device: VfioDevice;
  readonly iommufd: Iommufd;
  readonly ioas: Ioas;
  readonly heap: DmaHeap;
  readonly registers: ControllerRegisters;
  readonly capabilities: Capabilities;
  readonly doorbellStride: number;
  readonly commandTimeoutMs: number;
  #identity: ControllerIdentity | undefined;
  #maxTransferBytes = MAX_PRP_TRANSFER;
  readonly #ownsIommufd: boolean;
  readonly #ownsIoas: boolean;
  readonly #ownsDevice: boolean;
  readonly #admin: QueuePair;
  readonly #ioQueues: QueuePair[] = [];
  readonly #namespaces = new Map<number, Namespace>();
  readonly #peers = new Set<PeerBuffer>();
  readonly #scratch: DmaBuffer;
  readonly #maxQueuePairs: number;
  #grantedQueuePairs = 0;
  #state: State = "ready";
  #failure: IommufdError | undefined;
  readonly #poller = new CompletionPoller(this);
  readonly #allQueues: QueuePair[] = [];
  #lastHealthCheck = 0;
  #shutdown: ShutdownResult = "not closed";
  #irqs: IrqSet | undefined;
  #firstCompletion: Completion = "poll";
  #healthTimer: ReturnType<typeof setInterval> | undefined;

  private constructor(
    device: VfioDevice,
    iommufd: Iommufd,
    ioas: Ioas,
    heap: DmaHeap,
    bar: RegionMapping,
    owns: { iommufd: boolean; ioas: boolean; device: boolean },
    options: NvmeControllerOptions,
  ) {
    this.device = device;
    this.iommufd = iommufd;
    this.ioas = ioas;
    this.heap = heap;
    this.#ownsIommufd = owns.iommufd;
    this.#ownsIoas = owns.ioas;
    this.#ownsDevice = owns.device;
    this.registers = new ControllerRegisters(bar);
    this.capabilities = this.registers.capabilities();
    this.doorbellStride = this.capabilities.doorbellStride;
    this.commandTimeoutMs = options.commandTimeoutMs ?? 10_000;
    this.#maxQueuePairs = options.maxQueuePairs ?? 8;
    const adminDepth = options.adminQueueDepth ?? 32;
    if (!Number.isInteger(adminDepth) || adminDepth < 2 || adminDepth > 4096) {
      throw argumentError("NvmeController.open", "options.adminQueueDepth", `${adminDepth} is outside 2..4096`);
    }
    // The kernel may place the heap at IOVA 0, and a controller reads a zero queue or PRP address
    // as "not set": keep the first page out of use.
    if (heap.iova === 0) heap.alloc(PAGE_SIZE, { align: PAGE_SIZE });
    this.#admin = new QueuePair(this, heap, 0, adminDepth, true);
    this.#allQueues.push(this.#admin);
    this.#scratch = heap.alloc(PAGE_SIZE, { align: PAGE_SIZE });
  }

  /**
   * Open the controller at a PCI address (bound to vfio-pci on the way if needed) or a VFIO cdev
   * path, bring it up, identify it and create one I/O queue pair. A VfioDevice already bound and
   * attached to `options.ioas` may be given instead: the controller then leaves it open on close.
   */
  static open(target: string | VfioDevice, options: NvmeControllerOptions = {}): NvmeController {
    const op = "NvmeController.open";
    const given = target instanceof VfioDevice ? target : undefined;
    if (given === undefined && (typeof target !== "string" || target === "")) {
      throw argumentError(
        op,
        "target",
        "expected a PCI address like 0000:00:04.0, a /dev/vfio/devices path or a VfioDevice",
      );
    }
    if (options.ioas && options.iommufd && options.ioas.iommufd !== options.iommufd) {
      throw argumentError(op, "options.ioas", "the IOAS belongs to another iommufd than options.iommufd");
    }
    if (given && (!options.ioas || given.attachedTo === undefined)) {
      throw argumentError(
        op,
        "target",
        "a VfioDevice must be bound and attached already, with its IOAS given as options.ioas",
      );
    }
    const undo: (() => void)[] = [];
    try {
      const iommufd = options.ioas?.iommufd ?? options.iommufd ?? Iommufd.open();
      const ownsIommufd = options.ioas === undefined && options.iommufd === undefined;
      if (ownsIommufd) undo.push(() => iommufd.close());
      const ioas = options.ioas ?? iommufd.createIoas();
      if (!options.ioas && !ownsIommufd) undo.push(() => ioas.destroy());
      let device = given;
      if (device === undefined) {
        const name = target as string;
        const opened = VfioDevice.open(PCI_ADDRESS.test(name) ? bindToVfioPci(name) : name);
        undo.push(() => opened.close());
        opened.bind(iommufd);
        opened.attach(ioas);
        device = opened;
      }
      const bar = device.mapRegion(0);
      undo.push(() => bar.unmap());
      const heap = DmaHeap.create(ioas, {
        size: options.heapSize ?? 16 << 20,
        hugePages: options.hugePages ?? "auto",
        name: "nvme",
      });
      undo.push(() => heap.close());
      const controller = new NvmeController(
        device,
        iommufd,
        ioas,
        heap,
        bar,
        { iommufd: ownsIommufd, ioas: !options.ioas, device: given === undefined },
        options,
      );
      undo.length = 0;
      try {
        controller.#firstCompletion = options.completion ?? "poll";
        controller.#bringUp(options.queueDepth ?? 64);
      } catch (error) {
        // A controller that never came up gets no shutdown sequence, only its resources back.
        controller.#state = "failed";
        try {
          controller.close();
        } catch {
          // The bring-up error is the one worth reporting.
        }
        throw error;
      }
      return controller;
    } catch (error) {
      for (const step of undo.reverse()) {
        try {
          step();
        } catch {
          // The first error is the one worth reporting.
        }
      }
      throw error;
    }
  }

  // ---- bring-up -------------------------------------------------------------------------------

  #bringUp(queueDepth: number): void {
    this.device.setBusMaster(true);
    enableController(this.registers, this.capabilities, this.#admin);
    this.#identity = parseControllerIdentity(this.#adminWithScratch(identify(IdentifyCns.Controller)));
    const mdts = this.#identity.mdts;
    this.#maxTransferBytes =
      mdts === 0 ? MAX_PRP_TRANSFER : Math.min(MAX_PRP_TRANSFER, 2 ** mdts * this.capabilities.minPageSize);
    this.#requestQueues();
    this.createQueuePair(queueDepth, { completion: this.#firstCompletion });
  }

  #requestQueues(): void {
    const granted = this.#admin.submitAndWait(
      setNumberOfQueues(this.#maxQueuePairs),
      0,
      0,
      this.commandTimeoutMs,
      this.#pollAdmin,
    );
    this.#grantedQueuePairs = Math.min(granted & 0xffff, granted >>> 16) + 1;
  }

  #adminWithScratch(command: Command): Uint8Array {
    const scratch = this.#scratch;
    scratch.bytes.fill(0);
    this.#admin.submitAndWait(command, scratch.iova, PAGE_SIZE, this.commandTimeoutMs, this.#pollAdmin);
    return scratch.bytes;
  }

  #pollAdmin = (): void => {
    if (this.#admin.reap() > 0) return;
    const now = performance.now();
    if (now - this.#lastHealthCheck >= HEALTH_CHECK_MS) this.checkHealth(now);
  };

  // ---- public surface -------------------------------------------------------------------------

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
    return this.#state === "closed";
  }

  /** Why the controller stopped taking commands (fatal status, timeout), until reset(). */
  get failure(): IommufdError | undefined {
    return this.#failure;
  }

  /** How close() left the controller: "complete" when CSTS.SHST reported the shutdown done. */
  get shutdown(): ShutdownResult {
    return this.#shutdown;
  }

  /** Active namespace ids (Identify CNS 2). */
  namespaceIds(): number[] {
    this.assertUsable("Identify");
    return parseNamespaceList(this.#adminWithScratch(identify(IdentifyCns.ActiveNamespaces)));
  }

  /** A namespace (Identify CNS 0), identified once and kept. */
  namespace(nsid = 1): Namespace {
    const known = this.#namespaces.get(nsid);
    if (known) return known;
    if (!Number.isInteger(nsid) || nsid < 1 || nsid >= 0xffffffff)
      throw argumentError("NvmeController.namespace", "nsid", `${nsid} is not a namespace id`);
    this.assertUsable("Identify");
    const identity = parseNamespaceIdentity(this.#adminWithScratch(identify(IdentifyCns.Namespace, nsid)));
    if (identity.size === 0) {
      throw new IommufdError({
        operation: "NvmeController.namespace",
        errno: ERRNO.ENODEV,
        argument: "nsid",
        message: `namespace ${nsid} is not active on this controller`,
      });
    }
    const namespace = new Namespace(this, nsid, identity);
    this.#namespaces.set(nsid, namespace);
    return namespace;
  }

  /** A data buffer in the controller's heap, page-aligned. No system call. */
  allocBuffer(size: number): DmaBuffer {
    if (this.#state === "closed") throw closedError("NvmeController.allocBuffer", "the NVMe controller");
    return this.heap.alloc(size, { align: PAGE_SIZE });
  }

  /**
   * Create an I/O queue pair of `depth` entries (Create I/O Completion Queue, then Submission
   * Queue). With `completion: "interrupt"` its completion queue raises MSI-X vector <queue id>.
   */
  createQueuePair(depth: number, options: { completion?: Completion } = {}): QueuePair {
    const op = "NvmeController.createQueuePair";
    if (!Number.isInteger(depth) || depth < 2 || depth > this.capabilities.maxQueueEntries) {
      throw argumentError(op, "depth", `${depth} is outside 2..${this.capabilities.maxQueueEntries} (CAP.MQES + 1)`);
    }
    const completion = options.completion ?? "poll";
    if (completion !== "poll" && completion !== "interrupt") {
      throw argumentError(op, "options.completion", `${String(completion)} is not "poll" or "interrupt"`);
    }
    this.assertUsable("Create I/O Completion Queue");
    const used = new Set(this.#ioQueues.map((q) => q.id));
    let id = 1;
    while (used.has(id)) id++;
    if (id > this.#grantedQueuePairs) {
      throw new IommufdError({
        operation: op,
        errno: ERRNO.ENOSPC,
        message: `the controller granted ${this.#grantedQueuePairs} I/O queue pairs and all are in use`,
      });
    }
    const vector = completion === "interrupt" ? this.#interruptVector(id, op) : undefined;
    const queue = new QueuePair(this, this.heap, id, depth, false, vector);
    try {
      this.#createOnController(queue);
    } catch (error) {
      queue.release();
      throw error;
    }
    this.#ioQueues.push(queue);
    this.#allQueues.push(queue);
    return queue;
  }

  /** MSI-X vector `id`, enabling MSI-X (one vector per possible queue pair, 0 for admin) on first use. */
  #interruptVector(id: number, op: string) {
    if (this.#irqs === undefined) {
      const info = this.device.irqInfo("msix");
      const vectors = Math.min(info.count, this.#grantedQueuePairs + 1);
      if (vectors < 2) {
        throw new IommufdError({
          operation: op,
          errno: ERRNO.EOPNOTSUPP,
          message: "the controller has no MSI-X vectors for I/O queues",
        });
      }
      this.#irqs = this.device.enableIrq("msix", { vectors });
      // Interrupts never tell of a fatal status or a lost command: look now and then.
      this.#healthTimer = setInterval(() => {
        if (this.#poller.pending() > 0) this.checkHealth(performance.now());
      }, 100);
      this.#healthTimer.unref?.();
    }
    if (id >= this.#irqs.vectors.length) {
      throw new IommufdError({
        operation: op,
        errno: ERRNO.ENOSPC,
        message: `MSI-X vector ${id} is beyond the ${this.#irqs.vectors.length} enabled`,
      });
    }
    return this.#irqs.vector(id);
  }

  #createOnController(queue: QueuePair): void {
    this.#admin.submitAndWait(
      createIoCompletionQueue(queue.id, queue.depth, queue.vectorNumber),
      queue.cqIova,
      0,
      this.commandTimeoutMs,
      this.#pollAdmin,
    );
    try {
      this.#admin.submitAndWait(
        createIoSubmissionQueue(queue.id, queue.depth, queue.id),
        queue.sqIova,
        0,
        this.commandTimeoutMs,
        this.#pollAdmin,
      );
    } catch (error) {
      if (this.#state === "ready")
        this.#admin.submitAndWait(deleteIoCompletionQueue(queue.id), 0, 0, this.commandTimeoutMs, this.#pollAdmin);
      throw error;
    }
  }

  /** Delete an I/O queue pair (its pending commands are aborted by the controller). */
  deleteQueuePair(queue: QueuePair): void {
    const index = this.#ioQueues.indexOf(queue);
    if (index < 0)
      throw argumentError("NvmeController.deleteQueuePair", "queue", "not an I/O queue pair of this controller");
    this.assertUsable("Delete I/O Submission Queue");
    this.#admin.submitAndWait(deleteIoSubmissionQueue(queue.id), 0, 0, this.commandTimeoutMs, this.#pollAdmin);
    this.#admin.submitAndWait(deleteIoCompletionQueue(queue.id), 0, 0, this.commandTimeoutMs, this.#pollAdmin);
    queue.reap();
    queue.failAll(
      (name, detail) =>
        new IommufdError({ operation: `NVMe ${name}`, errno: ERRNO.EIO, message: `${detail}: its queue was deleted` }),
    );
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
    return this.#admin.submit(command, iova, length, options.timeoutMs ?? this.commandTimeoutMs);
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
    if (this.#state === "closed") throw closedError(op, "the NVMe controller");
    const device = source instanceof NvmeController ? source.device : source;
    if (!(device instanceof VfioDevice))
      throw argumentError(op, "source", "expected an NvmeController or a VfioDevice");
    if (device === this.device) {
      throw argumentError(
        op,
        "source",
        "a controller cannot DMA into its own memory buffer (the device would access itself; QEMU drops it and still reports success)",
      );
    }
    const region = options.region ?? (source instanceof NvmeController ? source.memoryBufferRegion() : undefined);
    if (region === undefined)
      throw argumentError(op, "options.region", "give the region (BAR) index of the peer memory");
    const info = device.region(region);
    const offset = options.offset ?? 0;
    const length = options.length ?? info.size - offset;
    const dmabuf = device.exportDmaBuf({ region, ranges: [{ offset, length }] });
    let mapping: ReturnType<Ioas["mapFile"]> | undefined;
    try {
      mapping = this.ioas.mapFile(dmabuf);
      const bar = device.mapRegion(region);
      const peer = new PeerBuffer(this, dmabuf, mapping, bar, offset, length);
      this.#peers.add(peer);
      return peer;
    } catch (error) {
      if (mapping?.mapped) mapping.unmap();
      dmabuf.close();
      throw error;
    }
  }

  /**
   * The BAR holding the controller memory buffer (CMBLOC.BIR), or undefined when there is none.
   * Sets CMBMSC.CRE first: controllers of NVMe 1.4 and later report CMBLOC only then.
   */
  memoryBufferRegion(): number | undefined {
    if (!this.capabilities.controllerMemoryBuffer) return undefined;
    this.registers.write32(CMBMSC, CMBMSC_CRE);
    return this.registers.read32(CMBLOC) & 0x7;
  }

  /** @internal The IOVA of `length` bytes at `offset` of `buffer`; EINVAL when the controller cannot reach them. */
  dataIova(buffer: DataBuffer, offset: number, length: number, operation: string): number {
    if (this.#state === "closed") throw closedError(operation, "the NVMe controller");
    if (buffer instanceof DmaBuffer) {
      if (buffer.heap !== this.heap) {
        throw argumentError(
          operation,
          "buffer",
          "the buffer comes from another DmaHeap, which this controller's IOMMU domain does not map",
          "EINVAL",
          "allocate data buffers with controller.allocBuffer()",
        );
      }
      if (buffer.freed) throw argumentError(operation, "buffer", "the buffer was freed");
    } else if (buffer instanceof PeerBuffer) {
      if (buffer.owner !== this)
        throw argumentError(operation, "buffer", "the peer buffer was mapped for another controller");
      if (!buffer.mapped) throw closedError(operation, "the peer buffer");
    } else {
      throw argumentError(
        operation,
        "buffer",
        "expected a buffer from controller.allocBuffer() or controller.mapPeerMemory(): other memory is not mapped for the device",
      );
    }
    if (!Number.isInteger(offset) || offset < 0 || offset % 4)
      throw argumentError(
        operation,
        "options.offset",
        `${offset} is not a non-negative multiple of 4 (PRP entries are dword aligned)`,
      );
    if (offset + length > buffer.size) {
      throw argumentError(
        operation,
        "buffer",
        `${length} bytes at offset ${offset} do not fit in the ${buffer.size}-byte buffer`,
      );
    }
    return buffer.iova + offset;
  }

  /** Counters of the admin queue and each I/O queue pair. */
  stats(): { admin: QueueStats; io: QueueStats[] } {
    return { admin: this.#admin.stats(), io: this.#ioQueues.map((q) => q.stats()) };
  }

  // ---- completion -----------------------------------------------------------------------------

  /** @internal */
  get usable(): boolean {
    return this.#state === "ready";
  }

  /** @internal */
  assertUsable(command: string): void {
    if (this.#state === "ready") return;
    if (this.#state === "closed") throw closedError(`NVMe ${command}`, "the NVMe controller");
    throw new IommufdError({
      operation: `NVMe ${command}`,
      errno: this.#failure?.errno ?? ERRNO.EIO,
      message: `the controller stopped taking commands: ${this.#failure?.message ?? "it failed"}`,
      hint: "controller.reset() brings it back",
    });
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
    return this.#lastHealthCheck;
  }

  /** Fatal status or a command past its deadline fails the controller and everything pending. */
  /** @internal */
  checkHealth(now: number): void {
    this.#lastHealthCheck = now;
    if (this.#state !== "ready") return;
    const csts = this.registers.read32(CSTS);
    if (csts === 0xffffffff) {
      this.#fail(ERRNO.ENODEV, "CSTS reads all ones: the controller is gone from the bus");
      return;
    }
    if (csts & CSTS_CFS) {
      this.#fail(ERRNO.EIO, "the controller reported fatal status (CSTS.CFS)");
      return;
    }
    for (const queue of this.#allQueues) {
      const late = queue.overdue(now);
      if (late) {
        this.#fail(ERRNO.ETIMEDOUT, `${late.name} (${late.detail}) on queue ${queue.id} did not complete in time`);
        return;
      }
    }
  }

  #fail(errno: number, reason: string): void {
    this.#state = "failed";
    this.#failure = new IommufdError({
      operation: "NvmeController",
      errno,
      message: reason,
      hint: "controller.reset() brings it back",
    });
    this.#failAll(
      (name, detail) =>
        new IommufdError({
          operation: `NVMe ${name}`,
          errno,
          message: `${detail}: not completed: ${reason}`,
          hint: "controller.reset() brings the controller back",
        }),
    );
  }

  #failAll(why: (name: string, detail: string) => IommufdError): void {
    this.#admin.failAll(why);
    for (const queue of this.#ioQueues) queue.failAll(why);
  }

  // ---- reset and close ------------------------------------------------------------------------

  /**
   * Disable and re-enable the controller (after a fatal status or a timeout, or at will): pending
   * commands are rejected, the queues are created again on the controller with the same memory,
   * namespaces and buffers stay valid.
   */
  reset(): void {
    const op = "NvmeController.reset";
    if (this.#state === "closed") throw closedError(op, "the NVMe controller");
    const regs = this.registers;
    regs.write32(CC, regs.read32(CC) & ~CC_EN);
    this.#failAll(
      (name, detail) =>
        new IommufdError({
          operation: `NVMe ${name}`,
          errno: ERRNO.EIO,
          message: `${detail}: the controller was reset before the command completed`,
        }),
    );
    disableController(this.registers, this.capabilities);
    this.#admin.clear();
    for (const queue of this.#ioQueues) queue.clear();
    this.#state = "ready";
    this.#failure = undefined;
    try {
      enableController(this.registers, this.capabilities, this.#admin);
      this.#requestQueues();
      for (const queue of this.#ioQueues) this.#createOnController(queue);
    } catch (error) {
      this.#state = "failed";
      this.#failure =
        error instanceof IommufdError
          ? error
          : new IommufdError({ operation: op, errno: ERRNO.EIO, message: String(error) });
      throw error;
    }
  }

  /**
   * Delete the I/O queues, shut the controller down (CC.SHN, wait for CSTS.SHST), turn bus
   * mastering off, and release the heap, the BAR and the device (and the iommufd or IOAS the
   * controller opened itself). Pending commands are rejected with EBADF. Idempotent.
   */
  close(): void {
    if (this.#state === "closed") return;
    const wasReady = this.#state === "ready";
    this.#failAll((name, detail) => closedError(`NVMe ${name}`, `the NVMe controller (${detail})`));
    this.#shutdown = wasReady ? this.#orderlyShutdown() : "skipped: the controller had failed";
    this.#state = "closed";
    for (const peer of this.#peers) {
      try {
        peer.close();
      } catch {
        // Released with the IOAS below at the latest.
      }
    }
    this.#peers.clear();
    if (this.#healthTimer !== undefined) clearInterval(this.#healthTimer);
    const steps: (() => void)[] = [
      () => this.#irqs?.close(),
      () => this.device.setBusMaster(false),
      () => this.heap.close(),
      () => (this.#ownsDevice ? this.device.close() : this.registers.bar.unmap()),
      () => (this.#ownsIommufd ? this.iommufd.close() : this.#ownsIoas ? this.ioas.destroy() : undefined),
    ];
    let first: unknown;
    for (const step of steps) {
      try {
        step();
      } catch (error) {
        first ??= error;
      }
    }
    if (first) throw first;
  }

  #orderlyShutdown(): ShutdownResult {
    try {
      for (const queue of [...this.#ioQueues].reverse()) {
        this.#admin.submitAndWait(deleteIoSubmissionQueue(queue.id), 0, 0, 1000, this.#pollAdmin);
        this.#admin.submitAndWait(deleteIoCompletionQueue(queue.id), 0, 0, 1000, this.#pollAdmin);
      }
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
