/**
 * The type1 IOMMU's ioctls on a container: reading VFIO_IOMMU_GET_INFO with its capability chain,
 * and what the kernel's refusals of SET_IOMMU, MAP_DMA and UNMAP_DMA mean (tables for the one
 * ioctl path, src/sys/ioctl.ts).
 */
import { readFileSync } from "node:fs";
import type { IovaRange } from "../iommufd/ioctls.ts";
import type { CallFailure, ErrnoTable } from "../sys/errno-table.ts";
import { ioctl } from "../sys/ioctl.ts";
import { addIova, hex, type Iova, normaliseIova } from "../sys/validate.ts";
import { getU64, type StructBuffer } from "../uapi/codec.ts";
import {
  VFIO_IOMMU_GET_INFO,
  VFIO_IOMMU_INFO_CAPS,
  VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
  VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL,
  vfio_info_cap_header,
  vfio_iommu_type1_info,
  vfio_iommu_type1_info_cap_iova_range,
  vfio_iommu_type1_info_dma_avail,
  vfio_iova_range,
} from "../uapi/vfio.ts";

/** Where the kernel exposes type1's mapping limit (it reads it when a container's IOMMU is set). */
export const DMA_ENTRY_LIMIT_PATH = "/sys/module/vfio_iommu_type1/parameters/dma_entry_limit";

export interface ContainerInfo {
  /** IOMMU page sizes, one bit each (VFIO_IOMMU_INFO_PGSIZES). */
  pageSizes: bigint;
  /** The smallest IOMMU page: every IOVA, address and length is a multiple of it. */
  alignment: number;
  /** Usable IOVA ranges (the IOVA-range capability); the whole 64-bit space when absent. */
  ranges: IovaRange[];
  /** How many more mappings the container may make (type1's dma_entry_limit); undefined on kernels without the capability. */
  dmaAvailable: number | undefined;
}

/** VFIO_IOMMU_GET_INFO on a container whose IOMMU is set, with its capability chain. */
export function readContainerInfo(fd: number): ContainerInfo {
  const op = "VFIO_IOMMU_GET_INFO";
  let extra = 0;
  for (;;) {
    const cmd = vfio_iommu_type1_info.create(extra).fill({ argsz: vfio_iommu_type1_info.size + extra });
    ioctl(fd, VFIO_IOMMU_GET_INFO, cmd, op);
    // The kernel raises argsz to what the capability chain needs when it did not fit.
    const wanted = cmd.get("argsz");
    if (cmd.get("flags") & VFIO_IOMMU_INFO_CAPS && wanted > vfio_iommu_type1_info.size + extra) {
      extra = wanted - vfio_iommu_type1_info.size;
      continue;
    }
    const pageSizes = cmd.getBig("iova_pgsizes");
    const info: ContainerInfo = {
      pageSizes,
      alignment: pageSizes === 0n ? 4096 : Number(pageSizes & -pageSizes),
      ranges: [{ start: 0, last: normaliseIova((1n << 64n) - 1n) }],
      dmaAvailable: undefined,
    };
    if (cmd.get("flags") & VFIO_IOMMU_INFO_CAPS) readCapabilities(cmd, info);
    return info;
  }
}

function readCapabilities(cmd: StructBuffer, info: ContainerInfo): void {
  const view = cmd.view;
  const limit = cmd.bytes.length;
  let at = cmd.get("cap_offset");
  // A chain longer than the buffer could hold would be a kernel bug; the count bounds the walk.
  for (let seen = 0; at !== 0 && at + vfio_info_cap_header.size <= limit && seen < 64; seen++) {
    const id = view.getUint16(at + vfio_info_cap_header.fields.id.offset, true);
    if (id === VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE) {
      const count = view.getUint32(at + vfio_iommu_type1_info_cap_iova_range.fields.nr_iovas.offset, true);
      const first = at + vfio_iommu_type1_info_cap_iova_range.size;
      const ranges: IovaRange[] = [];
      for (let i = 0; i < count && first + (i + 1) * vfio_iova_range.size <= limit; i++) {
        const entry = first + i * vfio_iova_range.size;
        ranges.push({
          start: normaliseIova(view.getBigUint64(entry + vfio_iova_range.fields.start.offset, true)),
          last: normaliseIova(view.getBigUint64(entry + vfio_iova_range.fields.end.offset, true)),
        });
      }
      info.ranges = ranges;
    } else if (id === VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL) {
      info.dmaAvailable = view.getUint32(at + vfio_iommu_type1_info_dma_avail.fields.avail.offset, true);
    }
    at = view.getUint32(at + vfio_info_cap_header.fields.next.offset, true);
  }
}

/** type1's dma_entry_limit as the kernel has it now, when readable. */
export function dmaEntryLimit(): number | undefined {
  try {
    const value = Number(readFileSync(DMA_ENTRY_LIMIT_PATH, "utf8").trim());
    return Number.isInteger(value) ? value : undefined;
  } catch {
    return undefined;
  }
}

export const SET_IOMMU_ERRORS: ErrnoTable = {
  ENODEV: "no type1v2 IOMMU driver can take this group (is the IOMMU on?)",
  EINVAL: "the container refused the type1v2 IOMMU (already set to another model, or no group in it)",
  EPERM: {
    message: "the type1 IOMMU refused the group: its platform cannot isolate the group's MSIs",
    hint: "boot with intremap on, or vfio_iommu_type1.allow_unsafe_interrupts=1 if you accept the risk",
  },
};

function mapRange(cmd: StructBuffer): { iova: Iova; length: number; where: string } {
  const words = cmd.layout.words;
  const iova = getU64(cmd.u32, words.iova!);
  const length = cmd.get("size");
  return { iova, length, where: `IOVA range ${hex(iova)}..${hex(addIova(iova, length - 1))}` };
}

/** EINVAL from MAP_DMA: name the rule the request broke, from the ranges the container reported. */
function explainInvalid({ cmd, context }: CallFailure<unknown>): string {
  const { iova, length, where } = mapRange(cmd!);
  const container = context as { iovaRanges(): { ranges: IovaRange[] } };
  let ranges: IovaRange[];
  try {
    ranges = container.iovaRanges().ranges;
  } catch {
    return `the kernel refused ${where}`;
  }
  const last = BigInt(iova) + BigInt(length) - 1n;
  const inside = ranges.some((r) => BigInt(r.start) <= BigInt(iova) && last <= BigInt(r.last));
  if (!inside) {
    const usable = ranges.map((r) => `${hex(r.start)}..${hex(r.last)}`).join(", ");
    return `${where} is outside the usable ranges (${usable || "none"})`;
  }
  return `the kernel refused ${where}: check the alignment and the source`;
}

export const MAP_DMA_ERRORS: ErrnoTable<unknown> = {
  ENOSPC: ({ context }) => {
    const limit = (context as { dmaLimit?: number }).dmaLimit ?? dmaEntryLimit();
    return {
      message:
        `the container holds as many mappings as vfio_iommu_type1's dma_entry_limit allows` +
        `${limit === undefined ? "" : ` (${limit})`}`,
      hint:
        "map fewer, larger buffers (a DmaHeap maps one region for many buffers), or raise the module parameter: " +
        "vfio_iommu_type1.dma_entry_limit=<n> on the kernel command line, or write " +
        `${DMA_ENTRY_LIMIT_PATH} before the container's first device is opened`,
    };
  },
  EEXIST: ({ cmd }) => ({ message: `${mapRange(cmd!).where} overlaps an existing mapping`, argument: "options.iova" }),
  EINVAL: explainInvalid,
  ENOMEM: ({ cmd }) => ({
    message: `cannot pin ${hex(mapRange(cmd!).length)} bytes: out of memory or over the locked-memory limit`,
    hint: "type1 charges pinned pages to RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK: raise ulimit -l or map less",
  }),
  EFAULT: { message: "the source memory is not mapped in this process", argument: "source" },
  otherwise: ({ cmd }) => `cannot map ${mapRange(cmd!).where}`,
};

export const UNMAP_DMA_ERRORS: ErrnoTable = {
  EINVAL: ({ cmd }) => {
    const { where } = mapRange(cmd!);
    return `${where} would split a mapping (type1v2 unmaps whole mappings only), or is not page-aligned`;
  },
  otherwise: ({ cmd }) => `cannot unmap ${mapRange(cmd!).where}`,
};
