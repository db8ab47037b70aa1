/**
 * What the kernel's refusals of the IOAS ioctls mean, one table per ioctl (see src/sys/ioctl.ts).
 * Ioas and PreparedMapping send their commands through the same tables, so a refusal reads the
 * same whichever path issued it. The values come from the command the kernel refused.
 */
import { ptr } from "bun:ffi";
import { type ErrnoTable, type ErrnoText, type IoctlFailure, ioctl, isErrno } from "../sys/ioctl.ts";
import { addIova, hex, type Iova, normaliseIova } from "../sys/validate.ts";
import { getU64, type StructBuffer } from "../uapi/codec.ts";
import {
  IOMMU_IOAS_IOVA_RANGES,
  IOMMU_IOAS_MAP_FIXED_IOVA,
  iommu_ioas_iova_ranges,
  iommu_iova_range,
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

const rangesCmd = iommu_ioas_iova_ranges.create();

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
  const request = (f: IoctlFailure<Context>) => mapRequest(f.cmd!, iovaField, ioasField);
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

export const MAP_ERRORS: ErrnoTable = mapErrors("iova", "ioas_id");

/** A dma-buf explains EOPNOTSUPP and ENODEV in its own terms (the context is the mapped file). */
function fileSays(f: IoctlFailure<unknown>): ErrnoText | undefined {
  const file = f.context as ExplainsMapErrors | number | undefined;
  const special = typeof file === "object" ? file.describeMapError?.(f.errno) : undefined;
  return special === undefined ? undefined : { message: special, argument: "file" };
}

export const MAP_FILE_ERRORS: ErrnoTable<unknown> = {
  ...mapErrors<unknown>("iova", "ioas_id"),
  EOPNOTSUPP: fileSays,
  ENODEV: fileSays,
};

export const COPY_ERRORS: ErrnoTable = {
  ...mapErrors("dst_iova", "dst_ioas_id"),
  ENOENT: ({ cmd }) =>
    `nothing is mapped at ${hex(getU64(cmd!.u32, cmd!.layout.words.src_iova!))}..+${hex(cmd!.get("length"))} ` +
    `in IOAS ${cmd!.get("src_ioas_id")}, or the range does not cover whole mappings`,
};

function unmapRange({ cmd }: IoctlFailure<unknown>): string {
  const words = cmd!.layout.words;
  return `${hex(getU64(cmd!.u32, words.iova!))}..+${hex(getU64(cmd!.u32, words.length!))}`;
}

export const UNMAP_ERRORS: ErrnoTable = {
  ENOENT: (f) => ({
    message: `no mapping covers exactly ${unmapRange(f)} (an unmap must not split a mapping), or the unmap failed`,
    hint: "the kernel also says ENOENT when the unmap itself failed: the range may still be mapped",
  }),
  EBUSY: "a device access to the range is in progress",
  otherwise: (f) => `cannot unmap ${unmapRange(f)}`,
};

export const ALLOW_IOVAS_ERRORS: ErrnoTable = {
  EINVAL: {
    message:
      "the ranges overlap, are unsorted, or exclude IOVAs that are already mapped or required by an attached device",
    argument: "ranges",
  },
  EBUSY: { message: "an existing mapping or reserved range lies outside the new allowed ranges", argument: "ranges" },
  otherwise: { argument: "ranges" },
};
