/**
 * RegionMapping: a device region (a BAR) mmapped for register access, owned by its VfioDevice.
 */
import { type Pointer, toArrayBuffer } from "bun:ffi";
import { argumentError, closedError } from "../sys/error.ts";
import { libc } from "../sys/libc.ts";
import { hex } from "../sys/validate.ts";
import type { VfioDevice } from "./device.ts";

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
