/**
 * The core iommufd ioctls, one function per ioctl (like the kernel selftests' iommufd_utils.h):
 * each encodes its command, issues it through the one ioctl path (src/sys/ioctl.ts) and words a
 * refusal from its errno table here. Ioas, Iommufd and PreparedMapping all call these, so a
 * command is laid out once and a refusal reads the same whichever path issued it. Arguments
 * arrive validated (Ioas checks them); the tables read the values from the command the kernel saw.
 *
 * MAP, MAP_FILE and UNMAP, the 4 KiB path, are split in two: an encoder writing the words of a
 * command buffer the caller owns (a PreparedMapping encodes once and issues many times), and the
 * errno table the caller hands to the one ioctl path with the request. A wrapper issuing them
 * would be one more JS call per ioctl, and bench/hotpath.ts measured it: a prepared map+unmap
 * pair went from about 5 ns to 25-50 ns of library time.
 */
import { ptr } from "bun:ffi";
import type { ErrnoTable, ErrnoText, CallFailure } from "../sys/errno-table.ts";
import { ioctl, isErrno } from "../sys/ioctl.ts";
import { addIova, hex, type Iova, normaliseIova } from "../sys/validate.ts";
import { getU64, putU64, type StructBuffer } from "../uapi/codec.ts";
import {
  IOMMU_DESTROY,
  IOMMU_IOAS_ALLOC,
  IOMMU_IOAS_ALLOW_IOVAS,
  IOMMU_IOAS_COPY,
  IOMMU_IOAS_IOVA_RANGES,
  IOMMU_IOAS_MAP_FIXED_IOVA,
  IOMMU_OPTION,
  IOMMU_OPTION_RLIMIT_MODE,
  iommu_destroy,
  iommu_ioas_alloc,
  iommu_ioas_allow_iovas,
  iommu_ioas_copy,
  iommu_ioas_iova_ranges,
  iommu_ioas_map,
  iommu_ioas_map_file,
  iommu_ioas_unmap,
  iommu_iova_range,
  iommu_option,
} from "../uapi/iommufd.ts";

export interface IovaRange {
  start: Iova;
  /** Inclusive, as the kernel reports it. */
  last: Iova;
}

export interface IovaRanges {
  ranges: IovaRange[];
  /** Every fixed IOVA and length must be a multiple of this. */
  alignment: number;
}

/** A file the IOAS maps by fd; only the part the error tables use. */
interface ExplainsMapErrors {
  describeMapError?(errno: number): string | undefined;
}

// One command buffer per one-shot ioctl: the library is single-threaded and nothing re-enters
// between encoding and issuing.
const ioasAllocCmd = iommu_ioas_alloc.create();
const destroyCmd = iommu_destroy.create();
const optionCmd = iommu_option.create();
const rangesCmd = iommu_ioas_iova_ranges.create();
const allowCmd = iommu_ioas_allow_iovas.create();
const copyCmd = iommu_ioas_copy.create();

const MAP = iommu_ioas_map.words;
const MAP_FILE = iommu_ioas_map_file.words;
const UNMAP = iommu_ioas_unmap.words;
const COPY = iommu_ioas_copy.words;

// --- IOMMU_IOAS_ALLOC ---------------------------------------------------------------------------

const IOAS_ALLOC_ERRORS: ErrnoTable = { ENOMEM: "the kernel is out of memory for a new IOAS" };

/** IOMMU_IOAS_ALLOC on iommufd `fd`; returns the new IOAS's id. */
export function allocIoas(fd: number, operation: string): number {
  ioasAllocCmd.fill({ size: iommu_ioas_alloc.size });
  ioctl(fd, IOMMU_IOAS_ALLOC, ioasAllocCmd, operation, IOAS_ALLOC_ERRORS);
  return ioasAllocCmd.get("out_ioas_id");
}

// --- IOMMU_DESTROY ------------------------------------------------------------------------------

const DESTROY_ERRORS: ErrnoTable = {
  EBUSY: ({ cmd }) => ({
    message: `object ${cmd!.get("id")} is still in use (a device or hw page table is attached to it; detach first)`,
    argument: "id",
  }),
  ENOENT: ({ cmd }) => ({ message: `no object with id ${cmd!.get("id")} exists in this iommufd`, argument: "id" }),
  otherwise: { argument: "id" },
};

/** IOMMU_DESTROY of any object id (IOAS, hw page table, fault queue). */
export function destroyObject(fd: number, id: number, operation: string): void {
  destroyCmd.fill({ size: iommu_destroy.size, id });
  ioctl(fd, IOMMU_DESTROY, destroyCmd, operation, DESTROY_ERRORS);
}

// --- IOMMU_OPTION -------------------------------------------------------------------------------

const OPTION_ERRORS: ErrnoTable = {
  EPERM: "changing this option needs CAP_SYS_RESOURCE",
  // iommufd_option_rlimit_mode() refuses once the iommufd holds any object, pinned pages or not.
  EBUSY: ({ cmd }) =>
    cmd!.get("option_id") === IOMMU_OPTION_RLIMIT_MODE
      ? "the rlimit mode can change only while this iommufd holds no object (IOAS, device, page table): set it first"
      : "the kernel refuses to change this option while its object is in use",
  ENOENT: ({ cmd }) => `object ${cmd!.get("object_id")} does not exist`,
};

/** IOMMU_OPTION get or set (`op`: IOMMU_OPTION_OP_GET/SET); returns val64 as the kernel left it. */
export function option(fd: number, optionId: number, objectId: number, op: number, value: bigint): bigint {
  optionCmd.fill({ size: iommu_option.size, option_id: optionId, op, object_id: objectId, val64: value });
  ioctl(fd, IOMMU_OPTION, optionCmd, "IOMMU_OPTION", OPTION_ERRORS);
  return optionCmd.getBig("val64");
}

// --- IOMMU_IOAS_IOVA_RANGES ---------------------------------------------------------------------

/** IOMMU_IOAS_IOVA_RANGES of IOAS `ioasId` on iommufd `fd`. */
export function readIovaRanges(fd: number, ioasId: number, operation: string): IovaRanges {
  // The kernel answers EMSGSIZE with the count when the array is too small: ask twice at most.
  let capacity = 8;
  for (;;) {
    const array = new Uint8Array(capacity * iommu_iova_range.size);
    rangesCmd.fill({
      size: iommu_ioas_iova_ranges.size,
      ioas_id: ioasId,
      num_iovas: capacity,
      allowed_iovas: ptr(array),
    });
    try {
      ioctl(fd, IOMMU_IOAS_IOVA_RANGES, rangesCmd, operation);
    } catch (error) {
      if (isErrno(error, "EMSGSIZE") && rangesCmd.get("num_iovas") > capacity) {
        capacity = rangesCmd.get("num_iovas");
        continue;
      }
      throw error;
    }
    const view = new DataView(array.buffer);
    const ranges: IovaRange[] = [];
    for (let i = 0; i < rangesCmd.get("num_iovas"); i++) {
      const at = i * iommu_iova_range.size;
      ranges.push({
        start: normaliseIova(view.getBigUint64(at + iommu_iova_range.fields.start.offset, true)),
        last: normaliseIova(view.getBigUint64(at + iommu_iova_range.fields.last.offset, true)),
      });
    }
    return { ranges, alignment: rangesCmd.get("out_iova_alignment") };
  }
}

// --- IOMMU_IOAS_ALLOW_IOVAS ---------------------------------------------------------------------

const ALLOW_IOVAS_ERRORS: ErrnoTable = {
  EINVAL: {
    message:
      "the ranges overlap, are unsorted, or exclude IOVAs that are already mapped or required by an attached device",
    argument: "ranges",
  },
  EBUSY: { message: "an existing mapping or reserved range lies outside the new allowed ranges", argument: "ranges" },
  otherwise: { argument: "ranges" },
};

/** IOMMU_IOAS_ALLOW_IOVAS with `ranges` (checked: start <= last); an empty list lifts the limit. */
export function allowIovas(
  fd: number,
  ioasId: number,
  ranges: readonly { start: bigint; last: bigint }[],
  operation: string,
): void {
  const array = new Uint8Array(Math.max(1, ranges.length) * iommu_iova_range.size);
  const view = new DataView(array.buffer);
  ranges.forEach(({ start, last }, i) => {
    view.setBigUint64(i * iommu_iova_range.size + iommu_iova_range.fields.start.offset, start, true);
    view.setBigUint64(i * iommu_iova_range.size + iommu_iova_range.fields.last.offset, last, true);
  });
  allowCmd.fill({
    size: iommu_ioas_allow_iovas.size,
    ioas_id: ioasId,
    num_iovas: ranges.length,
    allowed_iovas: ptr(array),
  });
  ioctl(fd, IOMMU_IOAS_ALLOW_IOVAS, allowCmd, operation, ALLOW_IOVAS_ERRORS);
}

// --- what a refused MAP, MAP_FILE or COPY means -------------------------------------------------

/** The IOVA and length of a refused map-like command (MAP, MAP_FILE, COPY). */
interface MapRequest {
  ioasId: number;
  /** undefined when the kernel was to choose the IOVA. */
  iova: Iova | undefined;
  length: number;
  /** How the message names the range. */
  where: string;
}

function mapRequest(cmd: StructBuffer, iovaField: string, ioasField: string): MapRequest {
  const iova = cmd.get("flags") & IOMMU_IOAS_MAP_FIXED_IOVA ? getU64(cmd.u32, cmd.layout.words[iovaField]!) : undefined;
  const length = cmd.get("length");
  const where =
    iova === undefined ? `${hex(length)} bytes` : `IOVA range ${hex(iova)}..${hex(addIova(iova, length - 1))}`;
  return { ioasId: cmd.get(ioasField), iova, length, where };
}

/** EINVAL from a map: ask the kernel which rule the request broke, so the message can say it. */
function explainInvalid(fd: number, { ioasId, iova, length }: MapRequest): string {
  if (iova === undefined) {
    return `the kernel refused to map ${hex(length)} bytes (bad source, or a file type it cannot map)`;
  }
  let info: IovaRanges;
  try {
    info = readIovaRanges(fd, ioasId, "IOMMU_IOAS_IOVA_RANGES");
  } catch {
    return `the kernel refused IOVA ${hex(iova)}`;
  }
  if (BigInt(iova) % BigInt(info.alignment) !== 0n) {
    return `IOVA ${hex(iova)} is not aligned to this IOAS's IOVA alignment ${hex(info.alignment)}`;
  }
  const last = BigInt(iova) + BigInt(length) - 1n;
  const inside = info.ranges.some((r) => BigInt(r.start) <= BigInt(iova) && last <= BigInt(r.last));
  if (!inside) {
    const usable = info.ranges.map((r) => `${hex(r.start)}..${hex(r.last)}`).join(", ");
    return `IOVA range ${hex(iova)}..${hex(last)} is outside the usable ranges (${usable || "none"})`;
  }
  return `the kernel refused IOVA ${hex(iova)} (length ${hex(length)}): check alignment and the source`;
}

/** The table shared by MAP, MAP_FILE and COPY; `iovaField`/`ioasField` name the destination. */
function mapErrors<Context>(iovaField: string, ioasField: string): ErrnoTable<Context> {
  const request = (f: CallFailure<Context>) => mapRequest(f.cmd!, iovaField, ioasField);
  return {
    EEXIST: (f) => ({ message: `${request(f).where} overlaps an existing mapping`, argument: "options.iova" }),
    ENOSPC: (f) => {
      const { length, ioasId } = request(f);
      return `no free IOVA range of ${hex(length)} bytes is left in IOAS ${ioasId}`;
    },
    ENOMEM: (f) => ({
      message: `cannot pin ${hex(request(f).length)} bytes: out of memory or over the locked-memory limit`,
      hint: "raise RLIMIT_MEMLOCK (ulimit -l) or map less",
    }),
    EFAULT: "the source memory is not mapped in this process",
    EBADF: { message: "the file descriptor is not open", argument: "file" },
    ENOENT: (f) => `IOAS ${request(f).ioasId} does not exist in this iommufd`,
    EOVERFLOW: (f) => ({
      message: `${request(f).where} wraps past the end of the 64-bit IOVA space`,
      argument: "options.iova",
    }),
    EINVAL: (f) => explainInvalid(f.fd, request(f)),
    otherwise: (f) => `cannot map ${request(f).where}`,
  };
}

// --- IOMMU_IOAS_MAP -----------------------------------------------------------------------------

/** Issue with `ioctl(fd, IOMMU_IOAS_MAP, cmd, operation, MAP_ERRORS)`; the IOVA is then in word `iova`. */
export const MAP_ERRORS: ErrnoTable = mapErrors("iova", "ioas_id");

/** Encode IOMMU_IOAS_MAP of `length` bytes at address `userVa` into `cmd` (iova: fixed, or the kernel's choice). */
export function encodeMap(
  cmd: StructBuffer,
  flags: number,
  ioasId: number,
  userVa: number,
  length: number,
  iova: Iova | undefined,
): void {
  const w = cmd.u32;
  w[MAP.size] = iommu_ioas_map.size;
  w[MAP.flags] = flags;
  w[MAP.ioas_id] = ioasId;
  w[MAP.__reserved] = 0;
  putU64(w, MAP.user_va, userVa);
  putU64(w, MAP.length, length);
  putU64(w, MAP.iova, iova ?? 0);
}

// --- IOMMU_IOAS_MAP_FILE ------------------------------------------------------------------------

/** A dma-buf explains EOPNOTSUPP and ENODEV in its own terms (the context is the mapped file). */
function fileSays(f: CallFailure<unknown>): ErrnoText | undefined {
  const file = f.context as ExplainsMapErrors | number | undefined;
  const special = typeof file === "object" ? file.describeMapError?.(f.errno) : undefined;
  return special === undefined ? undefined : { message: special, argument: "file" };
}

/**
 * Issue with `ioctl(fd, IOMMU_IOAS_MAP_FILE, cmd, operation, MAP_FILE_ERRORS, file)`: `file` (a
 * MappableFile or the raw fd) lets a dma-buf word its own refusals.
 */
export const MAP_FILE_ERRORS: ErrnoTable<unknown> = {
  ...mapErrors<unknown>("iova", "ioas_id"),
  EOPNOTSUPP: fileSays,
  ENODEV: fileSays,
};

/** Encode IOMMU_IOAS_MAP_FILE of `length` bytes at `start` in file `fileFd` into `cmd`. */
export function encodeMapFile(
  cmd: StructBuffer,
  flags: number,
  ioasId: number,
  fileFd: number,
  start: number,
  length: number,
  iova: Iova | undefined,
): void {
  const w = cmd.u32;
  w[MAP_FILE.size] = iommu_ioas_map_file.size;
  w[MAP_FILE.flags] = flags;
  w[MAP_FILE.ioas_id] = ioasId;
  w[MAP_FILE.fd] = fileFd;
  putU64(w, MAP_FILE.start, start);
  putU64(w, MAP_FILE.length, length);
  putU64(w, MAP_FILE.iova, iova ?? 0);
}

/** The IOVA a MAP or MAP_FILE command holds: the kernel's choice once it succeeded. */
export function mappedIova(cmd: StructBuffer): Iova {
  return getU64(cmd.u32, cmd.layout === iommu_ioas_map ? MAP.iova : MAP_FILE.iova);
}

// --- IOMMU_IOAS_COPY ----------------------------------------------------------------------------

const COPY_ERRORS: ErrnoTable = {
  ...mapErrors("dst_iova", "dst_ioas_id"),
  ENOENT: ({ cmd }) =>
    `nothing is mapped at ${hex(getU64(cmd!.u32, COPY.src_iova))}..+${hex(cmd!.get("length"))} ` +
    `in IOAS ${cmd!.get("src_ioas_id")}, or the range does not cover whole mappings`,
};

/** IOMMU_IOAS_COPY of `srcIova..+length` in IOAS `srcIoasId` to IOAS `dstIoasId`; returns the IOVA there. */
export function ioasCopy(
  fd: number,
  flags: number,
  dstIoasId: number,
  srcIoasId: number,
  length: number,
  dstIova: Iova | undefined,
  srcIova: Iova,
  operation: string,
): Iova {
  const w = copyCmd.u32;
  w[COPY.size] = iommu_ioas_copy.size;
  w[COPY.flags] = flags;
  w[COPY.dst_ioas_id] = dstIoasId;
  w[COPY.src_ioas_id] = srcIoasId;
  putU64(w, COPY.length, length);
  putU64(w, COPY.dst_iova, dstIova ?? 0);
  putU64(w, COPY.src_iova, srcIova);
  ioctl(fd, IOMMU_IOAS_COPY, copyCmd, operation, COPY_ERRORS);
  return getU64(w, COPY.dst_iova);
}

// --- IOMMU_IOAS_UNMAP ---------------------------------------------------------------------------

function unmapRange({ cmd }: CallFailure<unknown>): string {
  return `${hex(getU64(cmd!.u32, UNMAP.iova))}..+${hex(getU64(cmd!.u32, UNMAP.length))}`;
}

/**
 * Issue with `ioctl(fd, IOMMU_IOAS_UNMAP, cmd, operation, UNMAP_ERRORS)`. The kernel writes the
 * bytes unmapped back into the length (after an exact unmap, the value it was given).
 */
export const UNMAP_ERRORS: ErrnoTable = {
  ENOENT: (f) => ({
    message: `no mapping covers exactly ${unmapRange(f)} (an unmap must not split a mapping), or the unmap failed`,
    hint: "the kernel also says ENOENT when the unmap itself failed: the range may still be mapped",
  }),
  EBUSY: "a device access to the range is in progress",
  otherwise: (f) => `cannot unmap ${unmapRange(f)}`,
};

/** Encode IOMMU_IOAS_UNMAP of `iova..+length` into `cmd` (0..U64_MAX unmaps everything). */
export function encodeUnmap(cmd: StructBuffer, ioasId: number, iova: Iova, length: number | bigint): void {
  const w = cmd.u32;
  w[UNMAP.size] = iommu_ioas_unmap.size;
  w[UNMAP.ioas_id] = ioasId;
  putU64(w, UNMAP.iova, iova);
  putU64(w, UNMAP.length, length);
}

/** The bytes an issued UNMAP command unmapped. */
export function unmappedBytes(cmd: StructBuffer): number {
  return Number(getU64(cmd.u32, UNMAP.length));
}
