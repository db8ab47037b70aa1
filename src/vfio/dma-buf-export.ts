/**
 * dma-buf export of a VFIO device's region slices (VFIO_DEVICE_FEATURE_DMA_BUF): the probe, the
 * argument checks and the command. VfioDevice.exportDmaBuf and probeDmaBuf call these.
 */
import { DmaBuf } from "../memory/dmabuf.ts";
import { argumentError } from "../sys/error.ts";
import type { ErrnoTable } from "../sys/errno-table.ts";
import { O_CLOEXEC, O_RDWR, PAGE_SIZE } from "../sys/libc.ts";
import { hex, u64 } from "../sys/validate.ts";
import type { StructBuffer } from "../uapi/codec.ts";
import {
  VFIO_DEVICE_FEATURE,
  VFIO_DEVICE_FEATURE_DMA_BUF,
  VFIO_DEVICE_FEATURE_GET,
  VFIO_DEVICE_FEATURE_PROBE,
  vfio_device_feature,
  vfio_device_feature_dma_buf,
  vfio_region_dma_range,
} from "../uapi/vfio.ts";
import type { VfioDevice } from "./device.ts";

export interface DmaBufRange {
  offset: number;
  length: number;
}

export interface ExportDmaBufOptions {
  /** Region index (BAR number for PCI). */
  region: number;
  ranges: readonly DmaBufRange[];
}

/** The region index of a VFIO_DEVICE_FEATURE_DMA_BUF command (its payload follows the header). */
function dmaBufRegion(cmd: StructBuffer): number {
  return cmd.view.getUint32(vfio_device_feature.size + vfio_device_feature_dma_buf.fields.region_index.offset, true);
}

const DMA_BUF_UNSUPPORTED =
  "this kernel or device cannot export dma-bufs (needs CONFIG_VFIO_PCI_DMABUF and an mmappable BAR)";

const EXPORT_DMA_BUF_ERRORS: ErrnoTable = {
  ENOTTY: { message: DMA_BUF_UNSUPPORTED, argument: "options" },
  EOPNOTSUPP: { message: DMA_BUF_UNSUPPORTED, argument: "options" },
  EINVAL: ({ cmd }) => ({
    message: `the kernel refused the ranges of region ${dmaBufRegion(cmd!)}`,
    argument: "options",
  }),
  otherwise: { argument: "options" },
};

/** Returns when the kernel can export dma-bufs of `device`; throws the kernel's answer otherwise. */
export function probeDmaBuf(device: VfioDevice): void {
  const cmd = vfio_device_feature.create().fill({
    argsz: vfio_device_feature.size,
    flags: VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_BUF,
  });
  device.ioctl(VFIO_DEVICE_FEATURE, cmd, "VFIO_DEVICE_FEATURE_DMA_BUF");
}

/** Export `options.ranges` of region `options.region` as one dma-buf. */
export function exportDmaBuf(device: VfioDevice, options: ExportDmaBufOptions): DmaBuf {
  const op = "VFIO_DEVICE_FEATURE_DMA_BUF";
  const { region, ranges } = options ?? ({} as ExportDmaBufOptions);
  if (!Array.isArray(ranges) || ranges.length === 0)
    throw argumentError(op, "options.ranges", "give at least one { offset, length } range");
  const info = device.region(region);
  ranges.forEach((range, i) => {
    const offset = u64(range?.offset, op, `options.ranges[${i}].offset`) as number;
    const length = u64(range?.length, op, `options.ranges[${i}].length`) as number;
    if (length === 0) throw argumentError(op, `options.ranges[${i}].length`, "length is 0");
    if (offset % PAGE_SIZE || length % PAGE_SIZE) {
      throw argumentError(
        op,
        `options.ranges[${i}]`,
        `offset ${hex(offset)} and length ${hex(length)} must be multiples of the page size`,
      );
    }
    if (offset + length > info.size) {
      throw argumentError(
        op,
        `options.ranges[${i}]`,
        `${hex(offset)}..+${hex(length)} runs past the end of region ${region} (${hex(info.size)} bytes)`,
      );
    }
  });
  const payload = vfio_device_feature_dma_buf.size + ranges.length * vfio_region_dma_range.size;
  const cmd = vfio_device_feature.create(payload);
  cmd.fill({
    argsz: vfio_device_feature.size + payload,
    flags: VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_BUF,
  });
  const base = vfio_device_feature.size;
  cmd.view.setUint32(base + vfio_device_feature_dma_buf.fields.region_index.offset, region, true);
  cmd.view.setUint32(base + vfio_device_feature_dma_buf.fields.open_flags.offset, O_RDWR | O_CLOEXEC, true);
  cmd.view.setUint32(base + vfio_device_feature_dma_buf.fields.nr_ranges.offset, ranges.length, true);
  ranges.forEach((range, i) => {
    const at = base + vfio_device_feature_dma_buf.size + i * vfio_region_dma_range.size;
    cmd.view.setBigUint64(at + vfio_region_dma_range.fields.offset.offset, BigInt(range.offset), true);
    cmd.view.setBigUint64(at + vfio_region_dma_range.fields.length.offset, BigInt(range.length), true);
  });
  const fd = device.ioctl(VFIO_DEVICE_FEATURE, cmd, op, EXPORT_DMA_BUF_ERRORS);
  const size = ranges.reduce((sum, r) => sum + r.length, 0);
  const where = ranges.map((r) => `[${hex(r.offset)}, +${hex(r.length)})`).join(" ");
  return new DmaBuf(fd, {
    origin: "vfio",
    size,
    description: `dma-buf of ${device.pciAddress ?? device.path} region ${region} ${where}`,
  });
}
