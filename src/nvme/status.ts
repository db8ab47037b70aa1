/**
 * A completion's status (Status Code Type and Status Code, NVMe Base 2.0 section 4.6.1.2) decoded,
 * and the NvmeStatusError a command that completed with one is rejected with.
 */
import { ERRNO, type ErrnoCode } from "../sys/errno.ts";
import { IommufdError } from "../sys/error.ts";

const GENERIC = new Map<number, [string, ErrnoCode?]>([
  [0x01, ["Invalid Command Opcode", "EOPNOTSUPP"]],
  [0x02, ["Invalid Field in Command", "EINVAL"]],
  [0x03, ["Command ID Conflict"]],
  [0x04, ["Data Transfer Error"]],
  [0x05, ["Commands Aborted due to Power Loss Notification"]],
  [0x06, ["Internal Error"]],
  [0x07, ["Command Abort Requested"]],
  [0x08, ["Command Aborted due to SQ Deletion"]],
  [0x0b, ["Invalid Namespace or Format", "ENODEV"]],
  [0x0c, ["Command Sequence Error", "EINVAL"]],
  [0x12, ["Invalid Use of Controller Memory Buffer", "EINVAL"]],
  [0x13, ["PRP Offset Invalid", "EINVAL"]],
  [0x15, ["Operation Denied", "EPERM"]],
  [0x20, ["Namespace is Write Protected", "EROFS"]],
  [0x21, ["Command Interrupted", "EAGAIN"]],
  [0x80, ["LBA Out of Range", "ERANGE"]],
  [0x81, ["Capacity Exceeded", "ENOSPC"]],
  [0x82, ["Namespace Not Ready", "EAGAIN"]],
  [0x83, ["Reservation Conflict", "EBUSY"]],
  [0x84, ["Format In Progress", "EBUSY"]],
]);

const COMMAND_SPECIFIC = new Map<number, [string, ErrnoCode?]>([
  [0x00, ["Completion Queue Invalid", "EINVAL"]],
  [0x01, ["Invalid Queue Identifier", "EINVAL"]],
  [0x02, ["Invalid Queue Size", "EINVAL"]],
  [0x05, ["Asynchronous Event Request Limit Exceeded", "EBUSY"]],
  [0x08, ["Invalid Interrupt Vector", "EINVAL"]],
  [0x09, ["Invalid Log Page", "EINVAL"]],
  [0x0c, ["Invalid Queue Deletion", "EINVAL"]],
  [0x0d, ["Feature Identifier Not Saveable", "EINVAL"]],
  [0x0e, ["Feature Not Changeable", "EINVAL"]],
  [0x80, ["Conflicting Attributes", "EINVAL"]],
  [0x82, ["Attempted Write to Read Only Range", "EROFS"]],
]);

const MEDIA = new Map<number, [string, ErrnoCode?]>([
  [0x80, ["Write Fault"]],
  [0x81, ["Unrecovered Read Error"]],
  [0x82, ["End-to-end Guard Check Error"]],
  [0x83, ["End-to-end Application Tag Check Error"]],
  [0x84, ["End-to-end Reference Tag Check Error"]],
  [0x85, ["Compare Failure"]],
  [0x86, ["Access Denied", "EACCES"]],
  [0x87, ["Deallocated or Unwritten Logical Block"]],
]);

const TYPES = [
  "Generic Command Status",
  "Command Specific Status",
  "Media and Data Integrity Errors",
  "Path Related Status",
];

export interface DecodedStatus {
  /** Status Code Type (0 generic, 1 command specific, 2 media, 3 path). */
  type: number;
  /** Status Code. */
  code: number;
  /** The spec's name of the status. */
  name: string;
  /** Do Not Retry. */
  doNotRetry: boolean;
  errno: number;
}

/** Decode the 15-bit status field of a completion (DW3 bits 31:17, shifted down). */
export function decodeStatus(status: number): DecodedStatus {
  const code = status & 0xff;
  const type = (status >>> 8) & 0x7;
  const table = type === 0 ? GENERIC : type === 1 ? COMMAND_SPECIFIC : type === 2 ? MEDIA : undefined;
  const known = table?.get(code);
  const name = known?.[0] ?? `${TYPES[type] ?? `status code type ${type}`} 0x${code.toString(16).padStart(2, "0")}`;
  return { type, code, name, doNotRetry: ((status >>> 14) & 1) === 1, errno: ERRNO[known?.[1] ?? "EIO"] };
}

/**
 * A command the controller completed with a non-zero status. An IommufdError like every other
 * failure (`instanceof IommufdError`, `code`, `operation` keep working), with the decoded status.
 */
export class NvmeStatusError extends IommufdError {
  override readonly name: string = "NvmeStatusError";
  /** SCT, SC, DNR and the spec's name of the status. */
  readonly nvmeStatus: DecodedStatus;

  constructor(command: string, detail: string, status: number) {
    const decoded = decodeStatus(status);
    const code = decoded.code.toString(16).padStart(2, "0");
    super({
      operation: `NVMe ${command}`,
      errno: decoded.errno,
      message: `${detail}: the controller answered ${decoded.name} (SCT ${decoded.type}, SC 0x${code}${decoded.doNotRetry ? ", do not retry" : ""})`,
    });
    this.nvmeStatus = decoded;
  }
}
