/**
 * A namespace: Read, Write and Flush of logical blocks (NVM Command Set 1.0, section 3.2), each a
 * Promise. A transfer larger than the controller's limit (MDTS) is split into several commands.
 * submitRead and submitWrite send one command through a caller's reusable request (request.ts)
 * instead: no Promise, nothing allocated per command.
 */
import { argumentError, type IommufdError } from "../sys/error.ts";
import { flush, high32, IoOpcode, readWrite } from "./commands.ts";
import type { DataBuffer } from "./data-buffer.ts";
import type { NamespaceIdentity } from "./identify.ts";
import type { QueuePair } from "./queue.ts";
import { assertIdle, type NvmeRequest, RequestState } from "./request.ts";

export interface IoOptions {
  /** Byte offset into the buffer (a multiple of 4). Default 0. */
  offset?: number;
  /** The I/O queue pair to use. Default: the controller's first. */
  queue?: QueuePair;
}

/** What a namespace needs from its controller. */
export interface NamespaceOwner {
  readonly ioQueue: QueuePair;
  readonly commandTimeoutMs: number;
  /** Largest transfer of one command in bytes (MDTS, capped by one PRP list page). */
  readonly maxTransferBytes: number;
  /** The IOVA of `length` bytes at `offset` of `buffer`, or a thrown EINVAL when the controller cannot reach them. */
  dataIova(buffer: DataBuffer, offset: number, length: number, operation: string): number;
}

export class Namespace {
  readonly nsid: number;
  /** Size in logical blocks. */
  readonly blocks: number;
  readonly blockSize: number;
  /** Most blocks one Read or Write command moves; larger requests are split. */
  readonly maxBlocksPerCommand: number;
  readonly #owner: NamespaceOwner;

  /** @internal Made by NvmeController.namespace. */
  constructor(owner: NamespaceOwner, nsid: number, identity: NamespaceIdentity) {
    this.#owner = owner;
    this.nsid = nsid;
    this.blocks = identity.size;
    this.blockSize = identity.blockSize;
    this.maxBlocksPerCommand = Math.max(1, Math.floor(owner.maxTransferBytes / identity.blockSize));
  }

  /** Size in bytes. */
  get bytes(): number {
    return this.blocks * this.blockSize;
  }

  /** Read `blocks` blocks from `lba` into the buffer. */
  read(lba: number, blocks: number, buffer: DataBuffer, options?: IoOptions): Promise<void> {
    return this.#transfer(IoOpcode.Read, "Namespace.read", lba, blocks, buffer, options);
  }

  /** Write `blocks` blocks at `lba` from the buffer. */
  write(lba: number, blocks: number, buffer: DataBuffer, options?: IoOptions): Promise<void> {
    return this.#transfer(IoOpcode.Write, "Namespace.write", lba, blocks, buffer, options);
  }

  /** Make the controller commit written data to non-volatile media. */
  flush(options?: { queue?: QueuePair }): Promise<void> {
    const owner = this.#owner;
    return (options?.queue ?? owner.ioQueue).submit(
      flush(this.nsid),
      0,
      0,
      owner.commandTimeoutMs,
    ) as Promise<unknown> as Promise<void>;
  }

  /**
   * Read `blocks` blocks from `lba` into `buffer` (at byte `offset`) through `request` (made by
   * QueuePair.request), whose onComplete is called when they are there. One command: at most
   * maxBlocksPerCommand blocks. Bad arguments and a request that is not idle throw, and nothing is sent.
   */
  submitRead(request: NvmeRequest, lba: number, blocks: number, buffer: DataBuffer, offset = 0): void {
    this.#prepare(request, IoOpcode.Read, "Namespace.submitRead", lba, blocks, buffer, offset);
    // request.submit()'s body: one call level fewer (the JIT inlines only a few deep).
    request.queue.issue(request);
  }

  /** Write `blocks` blocks at `lba` from `buffer` (at byte `offset`) through `request`; as submitRead. */
  submitWrite(request: NvmeRequest, lba: number, blocks: number, buffer: DataBuffer, offset = 0): void {
    this.#prepare(request, IoOpcode.Write, "Namespace.submitWrite", lba, blocks, buffer, offset);
    request.queue.issue(request);
  }

  #prepare(
    request: NvmeRequest,
    opcode: number,
    op: string,
    lba: number,
    blocks: number,
    buffer: DataBuffer,
    offset: number,
  ): void {
    // The common case is decided by integer comparisons, and anything else goes to a separate
    // function that finds and throws the error: the JIT inlines only small functions, and in the
    // TCG guest this path's checks cost about 130 ns a command when they lived here in full.
    if (
      lba >>> 0 !== lba ||
      blocks >>> 0 !== blocks ||
      blocks === 0 ||
      blocks > this.maxBlocksPerCommand ||
      request.state !== RequestState.Idle
    )
      this.#check(request, op, lba, blocks);
    const bytes = blocks * this.blockSize;
    request.iova = this.#owner.dataIova(buffer, offset, bytes, op);
    request.length = bytes;
    request.opcode = opcode;
    request.nsid = this.nsid;
    request.cdw10 = lba >>> 0;
    request.cdw11 = high32(lba);
    request.cdw12 = blocks - 1;
    request.cdw13 = 0;
    request.cdw14 = 0;
    request.cdw15 = 0;
  }

  /** The full checks of #prepare's arguments (cold path): throws the first error; returns when all pass. */
  #check(request: NvmeRequest, op: string, lba: number, blocks: number): void {
    const invalid = invalidRange(op, lba, blocks);
    if (invalid !== undefined) throw invalid;
    if (blocks > this.maxBlocksPerCommand) {
      throw argumentError(
        op,
        "blocks",
        `${blocks} blocks do not fit in one command (at most ${this.maxBlocksPerCommand}, the controller's MDTS)`,
        "EINVAL",
        "a request carries one command: use read()/write(), which split, or several requests",
      );
    }
    // Checked before anything changes: a request in flight keeps the command it carries.
    assertIdle(request, op);
  }

  #transfer(
    opcode: number,
    op: string,
    lba: number,
    blocks: number,
    buffer: DataBuffer,
    options: IoOptions | undefined,
  ): Promise<void> {
    // As #prepare: integer comparisons decide the common case, the full checks are a cold call.
    if (lba >>> 0 !== lba || blocks >>> 0 !== blocks || blocks === 0) {
      const invalid = invalidRange(op, lba, blocks);
      if (invalid !== undefined) return Promise.reject(invalid);
    }
    const owner = this.#owner;
    const offset = options?.offset ?? 0;
    const bytes = blocks * this.blockSize;
    let iova: number;
    try {
      iova = owner.dataIova(buffer, offset, bytes, op);
    } catch (error) {
      return Promise.reject(error);
    }
    const queue = options?.queue ?? owner.ioQueue;
    const max = this.maxBlocksPerCommand;
    if (blocks <= max) {
      return queue.submit(
        readWrite(opcode, this.nsid, lba, blocks),
        iova,
        bytes,
        owner.commandTimeoutMs,
      ) as Promise<unknown> as Promise<void>;
    }
    const parts: Promise<number>[] = [];
    for (let done = 0; done < blocks; done += max) {
      const count = Math.min(max, blocks - done);
      parts.push(
        queue.submit(
          readWrite(opcode, this.nsid, lba + done, count),
          iova + done * this.blockSize,
          count * this.blockSize,
          owner.commandTimeoutMs,
        ),
      );
    }
    return Promise.all(parts).then(() => undefined);
  }
}

/** What is wrong with a starting LBA and a block count, or undefined when both are whole numbers in range. */
function invalidRange(op: string, lba: number, blocks: number): IommufdError | undefined {
  if (!Number.isSafeInteger(lba) || lba < 0)
    return argumentError(op, "lba", `${lba} is not a non-negative whole number`);
  if (!Number.isSafeInteger(blocks) || blocks <= 0)
    return argumentError(op, "blocks", `${blocks} is not a positive whole number`);
  return undefined;
}
