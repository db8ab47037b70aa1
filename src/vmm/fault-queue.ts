/**
 * FaultQueue: an iommufd fault object (IOMMU_FAULT_QUEUE_ALLOC) and its fd. A HwPageTable
 * allocated with `{ faultQueue }` sends the I/O page faults (PRI page requests) of its devices
 * here; the program reads them as decoded records and answers each group with a page response.
 *
 *   using faults = FaultQueue.allocate(iommufd);
 *   using hwpt = HwPageTable.allocate(ioas, device, { faultQueue: faults });
 *   for (const fault of await faults.read()) { ...map the page...; faults.respond(fault, "success"); }
 */
import type { Iommufd } from "../iommufd/iommufd.ts";
import { ERRNO } from "../sys/errno.ts";
import { argumentError, closedError, ioError, stateError, syscallError, timeoutError } from "../sys/error.ts";
import { closeFd, fdFinalizer } from "../sys/fd.ts";
import type { ErrnoTable } from "../sys/errno-table.ts";
import { isErrno } from "../sys/ioctl.ts";
import { EFD_CLOEXEC, EFD_NONBLOCK, lastErrno, libc } from "../sys/libc.ts";
import { getU64 } from "../uapi/codec.ts";
import {
  IOMMU_FAULT_QUEUE_ALLOC,
  IOMMU_PGFAULT_FLAGS_LAST_PAGE,
  IOMMU_PGFAULT_FLAGS_PASID_VALID,
  IOMMU_PGFAULT_PERM_EXEC,
  IOMMU_PGFAULT_PERM_PRIV,
  IOMMU_PGFAULT_PERM_READ,
  IOMMU_PGFAULT_PERM_WRITE,
  IOMMUFD_PAGE_RESP_INVALID,
  IOMMUFD_PAGE_RESP_SUCCESS,
  iommu_fault_alloc,
  iommu_hwpt_page_response,
  iommu_hwpt_pgfault,
} from "../uapi/iommufd.ts";
import type { WaitAnswer } from "./fault-poller.ts";

/** One decoded struct iommu_hwpt_pgfault. */
export interface PageFault {
  /** iommufd id of the device that faulted. */
  deviceId: number;
  /** PASID of the request, or undefined when the request carried none. */
  pasid: number | undefined;
  /** Page Request Group Index. */
  groupId: number;
  /** The last fault of its group: the one to answer. */
  lastPage: boolean;
  /** Access the device asked for. */
  read: boolean;
  write: boolean;
  exec: boolean;
  privileged: boolean;
  /** Faulting address (IOVA or, with a PASID, the address in that space). */
  address: number | bigint;
  /** Hint of how many bytes the device expects to access; 0 when none. */
  length: number;
  /** Kernel cookie of the group: echo it in the response. */
  cookie: number;
  flags: number;
  perm: number;
}

export type PageResponseCode = "success" | "invalid";

const allocCmd = iommu_fault_alloc.create();
const FAULT_ALLOC_ERRORS: ErrnoTable = { ENOTTY: "this kernel's iommufd has no fault queues (it predates Linux 6.11)" };
const RECORD = iommu_hwpt_pgfault.size;
const F = iommu_hwpt_pgfault.fields;

export class FaultQueue {
  readonly iommufd: Iommufd;
  readonly id: number;
  #fd: number;
  #readBuffer = new Uint8Array(64 * RECORD);
  #readView = new DataView(this.#readBuffer.buffer);
  #readWords = new Uint32Array(this.#readBuffer.buffer);
  readonly #response = iommu_hwpt_page_response.create();
  #wakeFd = -1;
  #poller: Worker | undefined;
  #waiting: { resolve(answer: WaitAnswer): void; reject(error: unknown): void } | undefined;
  /** Closed while a hw page table still held the object: destroy it when that table goes. */
  #destroyPending = false;

  private constructor(iommufd: Iommufd, id: number, fd: number) {
    this.iommufd = iommufd;
    this.id = id;
    this.#fd = fd;
    fdFinalizer.register(this, fd, this);
  }

  /** IOMMU_FAULT_QUEUE_ALLOC: a new fault object and its (close-on-exec) fd. */
  static allocate(iommufd: Iommufd): FaultQueue {
    const op = "IOMMU_FAULT_QUEUE_ALLOC";
    allocCmd.fill({ size: iommu_fault_alloc.size });
    iommufd.ioctl(IOMMU_FAULT_QUEUE_ALLOC, allocCmd, op, FAULT_ALLOC_ERRORS);
    const queue = new FaultQueue(iommufd, allocCmd.get("out_fault_id"), allocCmd.get("out_fault_fd"));
    iommufd.track(queue);
    return queue;
  }

  get fd(): number {
    if (this.#fd < 0) throw closedError("FaultQueue.fd", `fault queue ${this.id}`);
    return this.#fd;
  }

  get closed(): boolean {
    return this.#fd < 0;
  }

  /** @internal The object id, checked open, for IOMMU_HWPT_ALLOC. */
  requireId(operation: string): number {
    if (this.#fd < 0) throw closedError(operation, `fault queue ${this.id}`);
    return this.id;
  }

  /**
   * The faults waiting now, decoded; an empty array when there are none (never blocks). Faults of
   * one group are returned together, as the kernel hands them out.
   */
  tryRead(): PageFault[] {
    const op = "FaultQueue.read";
    const fd = this.#requireFd(op);
    for (;;) {
      const n = Number(libc().read(fd, this.#readBuffer, this.#readBuffer.byteLength));
      if (n >= 0) return this.#decode(n);
      const errno = lastErrno();
      // EINVAL with nothing read: the next group is larger than the buffer. Grow and retry.
      if (errno === ERRNO.EINVAL && this.#readBuffer.byteLength < 1 << 20) {
        this.#readBuffer = new Uint8Array(this.#readBuffer.byteLength * 4);
        this.#readView = new DataView(this.#readBuffer.buffer);
        this.#readWords = new Uint32Array(this.#readBuffer.buffer);
        continue;
      }
      throw syscallError(op, errno, `reading fault queue ${this.id} failed`);
    }
  }

  /**
   * Wait until at least one fault is queued, then return every fault waiting (see tryRead).
   * Rejects with EBADF when the queue is closed meanwhile, ETIMEDOUT after `timeoutMs`.
   */
  async read(options: { timeoutMs?: number } = {}): Promise<PageFault[]> {
    const op = "FaultQueue.read";
    if (options.timeoutMs !== undefined && (!Number.isFinite(options.timeoutMs) || options.timeoutMs < 0)) {
      throw argumentError(op, "options.timeoutMs", `${options.timeoutMs} is not a duration in milliseconds`);
    }
    const deadline = options.timeoutMs === undefined ? Infinity : Date.now() + options.timeoutMs;
    for (;;) {
      const faults = this.tryRead();
      if (faults.length) return faults;
      const answer = await this.#waitReadable(op, deadline);
      if (answer.errno) throw syscallError(op, answer.errno, `waiting on fault queue ${this.id} failed`);
    }
  }

  #waitReadable(op: string, deadline: number): Promise<WaitAnswer> {
    if (this.#waiting) {
      return Promise.reject(stateError(op, "EBUSY", `another read() of fault queue ${this.id} is already waiting`));
    }
    const poller = this.#startPoller(op);
    return new Promise<WaitAnswer>((resolve, reject) => {
      let timer: Timer | undefined;
      const settle = () => {
        if (timer) clearTimeout(timer);
        this.#waiting = undefined;
        poller.unref();
      };
      this.#waiting = {
        resolve: (answer) => {
          settle();
          if (this.#fd < 0) reject(closedError(op, `fault queue ${this.id}`));
          else resolve(answer);
        },
        reject: (error) => {
          settle();
          reject(error);
        },
      };
      if (deadline !== Infinity) {
        timer = setTimeout(
          () => {
            // Wake the poller so it is free for the next read; this wait ends now.
            this.#wake();
            const waiting = this.#waiting;
            waiting?.reject(timeoutError(op, `no fault arrived on queue ${this.id} in time`));
          },
          Math.max(0, deadline - Date.now()),
        );
      }
      poller.ref();
      poller.postMessage({ fd: this.#fd, wakeFd: this.#wakeFd });
    });
  }

  #startPoller(op: string): Worker {
    if (this.#poller) return this.#poller;
    const wakeFd = libc().eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wakeFd < 0) throw syscallError(op, lastErrno(), "cannot create the eventfd that wakes the fault-queue poller");
    this.#wakeFd = wakeFd;
    const poller = new Worker(new URL("./fault-poller.ts", import.meta.url).href);
    poller.onmessage = (event: MessageEvent<WaitAnswer>) => {
      if (event.data.woken) this.#drainWake();
      this.#waiting?.resolve(event.data);
    };
    poller.onerror = (event) => {
      this.#waiting?.reject(ioError(op, `the fault-queue poller failed: ${event.message}`));
    };
    poller.unref();
    this.#poller = poller;
    return poller;
  }

  #wake(): void {
    if (this.#wakeFd < 0) return;
    const one = new BigUint64Array([1n]);
    libc().write(this.#wakeFd, one, 8);
  }

  #drainWake(): void {
    if (this.#wakeFd < 0) return;
    const sink = new BigUint64Array(1);
    libc().read(this.#wakeFd, sink, 8);
  }

  /**
   * Answer a fault group: `fault` is the group's last fault (or its cookie). "success" tells the
   * device to retry the access, "invalid" that it will not be served.
   */
  respond(fault: PageFault | number, code: PageResponseCode = "success"): void {
    const op = "FaultQueue.respond";
    const fd = this.#requireFd(op);
    const cookie = typeof fault === "number" ? fault : fault?.cookie;
    if (!Number.isInteger(cookie) || cookie! < 0 || cookie! > 0xffffffff)
      throw argumentError(op, "fault", "expected a PageFault or its cookie");
    if (code !== "success" && code !== "invalid")
      throw argumentError(op, "code", `"${String(code)}" is not "success" or "invalid"`);
    this.#response.fill({
      cookie: cookie!,
      code: code === "success" ? IOMMUFD_PAGE_RESP_SUCCESS : IOMMUFD_PAGE_RESP_INVALID,
    });
    const n = Number(libc().write(fd, this.#response.bytes, iommu_hwpt_page_response.size));
    if (n !== iommu_hwpt_page_response.size) {
      const errno = n < 0 ? lastErrno() : ERRNO.EIO;
      throw syscallError(
        op,
        errno,
        errno === ERRNO.EINVAL
          ? `no fault group with cookie ${cookie} is waiting for an answer (already answered, or never read)`
          : undefined,
        {
          argument: "fault",
        },
      );
    }
  }

  #requireFd(operation: string): number {
    if (this.#fd < 0) throw closedError(operation, `fault queue ${this.id}`);
    return this.#fd;
  }

  #decode(bytes: number): PageFault[] {
    const faults: PageFault[] = [];
    const v = this.#readView;
    for (let at = 0; at + RECORD <= bytes; at += RECORD) {
      const flags = v.getUint32(at + F.flags.offset, true);
      const perm = v.getUint32(at + F.perm.offset, true);
      faults.push({
        deviceId: v.getUint32(at + F.dev_id.offset, true),
        pasid: flags & IOMMU_PGFAULT_FLAGS_PASID_VALID ? v.getUint32(at + F.pasid.offset, true) : undefined,
        groupId: v.getUint32(at + F.grpid.offset, true),
        lastPage: (flags & IOMMU_PGFAULT_FLAGS_LAST_PAGE) !== 0,
        read: (perm & IOMMU_PGFAULT_PERM_READ) !== 0,
        write: (perm & IOMMU_PGFAULT_PERM_WRITE) !== 0,
        exec: (perm & IOMMU_PGFAULT_PERM_EXEC) !== 0,
        privileged: (perm & IOMMU_PGFAULT_PERM_PRIV) !== 0,
        address: getU64(this.#readWords, (at + F.addr.offset) / 4),
        length: v.getUint32(at + F.length.offset, true),
        cookie: v.getUint32(at + F.cookie.offset, true),
        flags,
        perm,
      });
    }
    return faults;
  }

  /**
   * Close the fd and destroy the fault object. The kernel answers every unanswered fault
   * "invalid". A HwPageTable using the queue keeps the object alive until it is destroyed.
   */
  close(): void {
    if (this.#fd < 0) return;
    const fd = this.#fd;
    this.#fd = -1;
    fdFinalizer.unregister(this);
    this.#shutdownPoller();
    this.iommufd.untrack(this);
    closeFd(fd, "FaultQueue.close");
    if (!this.iommufd.closed) {
      try {
        this.iommufd.destroyObject(this.id, "FaultQueue.close");
      } catch (error) {
        // EBUSY: a hw page table still refers to it; HwPageTable.destroy() finishes the job.
        if (!isErrno(error, "EBUSY")) throw error;
        this.#destroyPending = true;
      }
    }
  }

  /** @internal A hw page table that used this queue was destroyed. */
  releaseUser(): void {
    if (!this.#destroyPending || this.iommufd.closed) return;
    this.#destroyPending = false;
    this.iommufd.destroyObject(this.id, "FaultQueue.close");
  }

  #shutdownPoller(): void {
    if (this.#poller) {
      this.#wake();
      this.#poller.terminate();
      this.#poller = undefined;
    }
    this.#waiting?.reject(closedError("FaultQueue.read", `fault queue ${this.id}`));
    if (this.#wakeFd >= 0) {
      libc().close(this.#wakeFd);
      this.#wakeFd = -1;
    }
  }

  /** @internal The Iommufd closed: the kernel destroyed the object; the fd stays ours to close. */
  markGone(): void {
    if (this.#fd < 0) return;
    const fd = this.#fd;
    this.#fd = -1;
    fdFinalizer.unregister(this);
    this.#shutdownPoller();
    libc().close(fd);
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
