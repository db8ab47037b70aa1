/**
 * Submission queue entries (NVMe Base 2.0 section 4.2): the opcodes this driver sends, builders
 * for their command dwords, and the one encoder that writes a 64-byte entry into a queue.
 */

export const AdminOpcode = {
  DeleteIoSubmissionQueue: 0x00,
  CreateIoSubmissionQueue: 0x01,
  GetLogPage: 0x02,
  DeleteIoCompletionQueue: 0x04,
  CreateIoCompletionQueue: 0x05,
  Identify: 0x06,
  Abort: 0x08,
  SetFeatures: 0x09,
  GetFeatures: 0x0a,
  AsynchronousEventRequest: 0x0c,
} as const;

export const IoOpcode = { Flush: 0x00, Write: 0x01, Read: 0x02 } as const;

/** Identify's Controller or Namespace Structure values (CDW10.CNS). */
export const IdentifyCns = { Namespace: 0x00, Controller: 0x01, ActiveNamespaces: 0x02 } as const;

export const FeatureId = { NumberOfQueues: 0x07 } as const;

/** The fields of one command; PRPs are filled in by the queue from the data buffer. */
export interface Command {
  opcode: number;
  nsid?: number;
  cdw10?: number;
  cdw11?: number;
  cdw12?: number;
  cdw13?: number;
  cdw14?: number;
  cdw15?: number;
}

const ADMIN_NAMES = new Map<number, string>(
  Object.entries(AdminOpcode).map(([name, opcode]) => [opcode, spaced(name)]),
);
const IO_NAMES = new Map<number, string>(Object.entries(IoOpcode).map(([name, opcode]) => [opcode, name]));

function spaced(name: string): string {
  return name.replace(/([a-z])([A-Z])/g, "$1 $2").replace("Io ", "I/O ");
}

/** The spec's name of a command: "Read", "Create I/O Completion Queue". */
export function commandName(admin: boolean, opcode: number): string {
  return (admin ? ADMIN_NAMES : IO_NAMES).get(opcode) ?? `${admin ? "admin" : "I/O"} opcode 0x${opcode.toString(16)}`;
}

/** What a person needs to recognise the command in an error message. */
export function describeCommand(admin: boolean, command: Command): string {
  const nsid = command.nsid ? `namespace ${command.nsid}` : "";
  if (!admin && (command.opcode === IoOpcode.Read || command.opcode === IoOpcode.Write)) {
    const lba = (command.cdw10 ?? 0) + (command.cdw11 ?? 0) * 2 ** 32;
    return `${nsid}, LBA ${lba}, ${((command.cdw12 ?? 0) & 0xffff) + 1} block(s)`;
  }
  if (
    admin &&
    (command.opcode === AdminOpcode.CreateIoCompletionQueue || command.opcode === AdminOpcode.CreateIoSubmissionQueue)
  ) {
    return `queue ${(command.cdw10 ?? 0) & 0xffff}, ${((command.cdw10 ?? 0) >>> 16) + 1} entries`;
  }
  if (admin && command.opcode === AdminOpcode.Identify)
    return `CNS ${(command.cdw10 ?? 0) & 0xff}${nsid ? `, ${nsid}` : ""}`;
  return nsid || "no namespace";
}

/**
 * The high 32 bits of a non-negative integer below 2^53 (a u64 field's upper dword). Below 2^31
 * the answer is 0 from one integer compare: against an int32 constant the JIT compares an int32
 * as an integer, where `> 0xffffffff` (a double constant) converts it and compares doubles, and in
 * the TCG guest every floating-point instruction is a soft-float helper call (a loop of such
 * compares in the 1-vCPU guest: 12.7 ns each against 4.7; three run per command).
 */
export function high32(value: number): number {
  return value <= 0x7fffffff ? 0 : (value - (value >>> 0)) / 4294967296;
}

/** Write one 64-byte entry (16 dwords) at `index` of a submission queue viewed as dwords. */
export function encodeCommand(
  sq: Uint32Array,
  index: number,
  cid: number,
  command: Command,
  prp1: number,
  prp2: number,
): void {
  const at = index * 16;
  sq[at] = (command.opcode & 0xff) | (cid << 16); // FUSE 0, PSDT 0: PRPs
  sq[at + 1] = command.nsid ?? 0;
  sq[at + 2] = 0;
  sq[at + 3] = 0;
  sq[at + 4] = 0; // MPTR: no metadata
  sq[at + 5] = 0;
  // A Uint32Array store keeps the low 32 bits by itself.
  sq[at + 6] = prp1;
  sq[at + 7] = high32(prp1);
  sq[at + 8] = prp2;
  sq[at + 9] = high32(prp2);
  sq[at + 10] = command.cdw10 ?? 0;
  sq[at + 11] = command.cdw11 ?? 0;
  sq[at + 12] = command.cdw12 ?? 0;
  sq[at + 13] = command.cdw13 ?? 0;
  sq[at + 14] = command.cdw14 ?? 0;
  sq[at + 15] = command.cdw15 ?? 0;
}

export function identify(cns: number, nsid = 0): Command {
  return { opcode: AdminOpcode.Identify, nsid, cdw10: cns };
}

export function createIoCompletionQueue(qid: number, entries: number, vector?: number): Command {
  const interrupts = vector === undefined ? 0 : 0b10 | (vector << 16);
  return { opcode: AdminOpcode.CreateIoCompletionQueue, cdw10: qid | ((entries - 1) << 16), cdw11: 1 | interrupts };
}

export function createIoSubmissionQueue(qid: number, entries: number, cqid: number): Command {
  return { opcode: AdminOpcode.CreateIoSubmissionQueue, cdw10: qid | ((entries - 1) << 16), cdw11: 1 | (cqid << 16) };
}

export function deleteIoSubmissionQueue(qid: number): Command {
  return { opcode: AdminOpcode.DeleteIoSubmissionQueue, cdw10: qid };
}

export function deleteIoCompletionQueue(qid: number): Command {
  return { opcode: AdminOpcode.DeleteIoCompletionQueue, cdw10: qid };
}

/** Set Features, Number of Queues: ask for `count` I/O submission and completion queues. */
export function setNumberOfQueues(count: number): Command {
  return { opcode: AdminOpcode.SetFeatures, cdw10: FeatureId.NumberOfQueues, cdw11: (count - 1) | ((count - 1) << 16) };
}

/** Read or Write of `blocks` logical blocks from `lba` (NLB is zero-based). */
export function readWrite(opcode: number, nsid: number, lba: number, blocks: number): Command {
  // Integer halves (exact below 2^53), with no floating-point operation below 2^31: this runs per command.
  return { opcode, nsid, cdw10: lba >>> 0, cdw11: high32(lba), cdw12: blocks - 1 };
}

export function flush(nsid: number): Command {
  return { opcode: IoOpcode.Flush, nsid };
}
