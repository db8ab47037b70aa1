/**
 * Device regions (BARs, config space): what VFIO_DEVICE_GET_REGION_INFO says of one, and
 * RegionMapping, a region mmapped for register access, owned by its VfioDevice.
 */
import { type Pointer, toArrayBuffer } from "bun:ffi";
import type { ErrnoTable } from "../sys/errno-table.ts";
import { argumentError, closedError, syscallError } from "../sys/error.ts";
import { lastErrno, libc, MAP_SHARED, PROT_READ, PROT_WRITE } from "../sys/libc.ts";
import {
  VFIO_DEVICE_GET_REGION_INFO,
  VFIO_REGION_INFO_FLAG_CAPS,
  VFIO_REGION_INFO_FLAG_MMAP,
  VFIO_REGION_INFO_FLAG_READ,
  VFIO_REGION_INFO_FLAG_WRITE,
  vfio_info_cap_header,
  vfio_region_info,
} from "../uapi/vfio.ts";
import { hex } from "../sys/validate.ts";
import type { VfioDevice } from "./device.ts";

export interface RegionCapability {
  id: number;
  version: number;
  /** Offset of the capability inside the region-info reply. */
  offset: number;
}

export interface RegionInfo {
  index: number;
  size: number;
  /** Offset of the region in the device fd (for pread/pwrite/mmap). */
  offset: number;
  flags: number;
  readable: boolean;
  writable: boolean;
  mmappable: boolean;
  capabilities: RegionCapability[];
}

const REGION_INFO_ERRORS: ErrnoTable = {
  EINVAL: ({ cmd }) => ({ message: `the device has no region ${cmd!.get("index")}`, argument: "index" }),
  otherwise: { argument: "index" },
};

/** VFIO_DEVICE_GET_REGION_INFO of region `index`, with its capability chain. */
export function readRegionInfo(device: VfioDevice, index: number): RegionInfo {
  const op = "VFIO_DEVICE_GET_REGION_INFO";
  if (!Number.isInteger(index) || index < 0) throw argumentError(op, "index", `${index} is not a region index`);
  let extra = 0;
  for (;;) {
    const cmd = vfio_region_info.create(extra).fill({ argsz: vfio_region_info.size + extra, index });
    device.ioctl(VFIO_DEVICE_GET_REGION_INFO, cmd, op, REGION_INFO_ERRORS);
    const flags = cmd.get("flags");
    const wanted = cmd.get("argsz");
    // The kernel asks for a larger buffer (argsz) when the capability chain does not fit.
    if (flags & VFIO_REGION_INFO_FLAG_CAPS && wanted > vfio_region_info.size + extra) {
      extra = wanted - vfio_region_info.size;
      continue;
    }
    const capabilities: RegionCapability[] = [];
    let at = flags & VFIO_REGION_INFO_FLAG_CAPS ? cmd.get("cap_offset") : 0;
    while (at && at + vfio_info_cap_header.size <= cmd.bytes.length && capabilities.length < 64) {
      const id = cmd.view.getUint16(at, true);
      const version = cmd.view.getUint16(at + 2, true);
      capabilities.push({ id, version, offset: at });
      at = cmd.view.getUint32(at + 4, true);
    }
    return {
      index,
      size: cmd.get("size"),
      offset: cmd.get("offset"),
      flags,
      readable: (flags & VFIO_REGION_INFO_FLAG_READ) !== 0,
      writable: (flags & VFIO_REGION_INFO_FLAG_WRITE) !== 0,
      mmappable: (flags & VFIO_REGION_INFO_FLAG_MMAP) !== 0,
      capabilities,
    };
  }
}

/** mmap a region (a BAR) for register access. */
export function mapRegion(device: VfioDevice, index: number): RegionMapping {
  const op = "VfioDevice.mapRegion";
  const info = readRegionInfo(device, index);
  if (!info.mmappable) throw argumentError(op, "index", `region ${index} cannot be mmapped`);
  if (info.size === 0) throw argumentError(op, "index", `region ${index} is empty`);
  const prot = (info.readable ? PROT_READ : 0) | (info.writable ? PROT_WRITE : 0);
  const address = Number(libc().mmap(null, info.size, prot, MAP_SHARED, device.assertOpen(op), info.offset) ?? -1);
  if (address === -1 || address === 0 || address >= 2 ** 64 - 1) {
    throw syscallError("mmap", lastErrno(), `cannot map region ${index} (${info.size} bytes) of ${device.path}`);
  }
  return new RegionMapping(device, index, address, info.size);
}

/**
 * A mmapped device region. MMIO needs exactly one aligned access per register, so reads and
 * writes go through 32/64-bit typed-array elements (a DataView may split them into bytes).
 */
export class RegionMapping {
  readonly device: VfioDevice;
  readonly index: number;
  readonly size: number;
  #address: number;
  #u32: Uint32Array;
  #u64: BigUint64Array;

  /** @internal */
  constructor(device: VfioDevice, index: number, address: number, size: number) {
    this.device = device;
    this.index = index;
    this.size = size;
    this.#address = address;
    const buffer = toArrayBuffer(address as unknown as Pointer, 0, size);
    this.#u32 = new Uint32Array(buffer);
    this.#u64 = new BigUint64Array(buffer);
  }

  get mapped(): boolean {
    return this.#address !== 0;
  }

  #index(offset: number, width: 4 | 8, operation: string): number {
    if (this.#address === 0) throw closedError(operation, `region ${this.index} mapping`);
    if (!Number.isInteger(offset) || offset < 0 || offset + width > this.size) {
      throw argumentError(operation, "offset", `${offset} is outside region ${this.index} (${hex(this.size)} bytes)`);
    }
    if (offset % width) throw argumentError(operation, "offset", `${hex(offset)} is not ${width}-byte aligned`);
    return offset / width;
  }

  read32(offset: number): number {
    return this.#u32[this.#index(offset, 4, "RegionMapping.read32")]!;
  }

  write32(offset: number, value: number): void {
    this.#u32[this.#index(offset, 4, "RegionMapping.write32")] = value >>> 0;
  }

  read64(offset: number): bigint {
    return this.#u64[this.#index(offset, 8, "RegionMapping.read64")]!;
  }

  write64(offset: number, value: bigint | number): void {
    this.#u64[this.#index(offset, 8, "RegionMapping.write64")] = BigInt.asUintN(64, BigInt(value));
  }

  /** Unmap. Later accesses throw EBADF instead of faulting. Idempotent. */
  unmap(): void {
    if (this.#address === 0) return;
    const address = this.#address;
    this.#address = 0;
    // Drop the views first so nothing can reach the pages once they are gone.
    this.#u32 = new Uint32Array(0);
    this.#u64 = new BigUint64Array(0);
    libc().munmap(address as unknown as Pointer, this.size);
    this.device.forgetRegion(this);
  }

  [Symbol.dispose](): void {
    this.unmap();
  }
}
