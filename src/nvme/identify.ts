/** Identify data structures (NVMe Base 2.0 section 5.17.2), the fields a driver needs. */

export interface ControllerIdentity {
  vendorId: number;
  /** Serial number (SN), trailing spaces removed. */
  serial: string;
  /** Model number (MN). */
  model: string;
  /** Firmware revision (FR). */
  firmware: string;
  /** Maximum Data Transfer Size as a power of two in units of the minimum page size; 0: no limit. */
  mdts: number;
  controllerId: number;
  /** Number of namespaces (NN). */
  namespaceCount: number;
  /** A volatile write cache is present (VWC bit 0). */
  volatileWriteCache: boolean;
}

export interface NamespaceIdentity {
  /** Namespace size in logical blocks (NSZE). */
  size: number;
  /** Namespace capacity in logical blocks (NCAP). */
  capacity: number;
  /** Logical block size in bytes, from the LBA format FLBAS selects. */
  blockSize: number;
  /** Metadata bytes per block in that format. */
  metadataSize: number;
}

const text = (bytes: Uint8Array, from: number, to: number) =>
  new TextDecoder("latin1").decode(bytes.subarray(from, to)).replace(/[\s\0]+$/, "");

export function parseControllerIdentity(bytes: Uint8Array): ControllerIdentity {
  const view = new DataView(bytes.buffer, bytes.byteOffset, 4096);
  return {
    vendorId: view.getUint16(0, true),
    serial: text(bytes, 4, 24),
    model: text(bytes, 24, 64),
    firmware: text(bytes, 64, 72),
    mdts: bytes[77]!,
    controllerId: view.getUint16(78, true),
    namespaceCount: view.getUint32(516, true),
    volatileWriteCache: (bytes[525]! & 1) === 1,
  };
}

export function parseNamespaceIdentity(bytes: Uint8Array): NamespaceIdentity {
  const view = new DataView(bytes.buffer, bytes.byteOffset, 4096);
  const u64 = (at: number) => Number(view.getBigUint64(at, true));
  const format = bytes[26]! & 0xf;
  const lbaf = 128 + format * 4;
  return {
    size: u64(0),
    capacity: u64(8),
    blockSize: 2 ** bytes[lbaf + 2]!,
    metadataSize: view.getUint16(lbaf, true),
  };
}

/** Active namespace ids from an Identify CNS 2 list (zero-terminated). */
export function parseNamespaceList(bytes: Uint8Array): number[] {
  const view = new DataView(bytes.buffer, bytes.byteOffset, 4096);
  const ids: number[] = [];
  for (let at = 0; at < 4096; at += 4) {
    const id = view.getUint32(at, true);
    if (id === 0) break;
    ids.push(id);
  }
  return ids;
}
