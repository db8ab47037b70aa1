/**
 * Another device's memory as a DMA target: a slice of its BAR (an NVMe controller memory buffer,
 * say) exported as a VFIO dma-buf and mapped into this controller's IOAS with IOMMU_IOAS_MAP_FILE.
 * The controller then reads from storage straight into that memory and writes from it, with no
 * copy through host RAM: the same calls as for a heap buffer.
 *
 * The bytes are reached from the CPU through the owning device's BAR mapping, one aligned 32-bit
 * access at a time (wider or narrower loads of device memory are not guaranteed to work).
 *
 * An NVMe controller offers such memory as its Controller Memory Buffer (CMB, NVMe Base 2.0
 * section 8.2.1), located by CMBLOC.
 */
import type { DmaBuf } from "../memory/dmabuf.ts";
import type { Ioas, Mapping } from "../iommufd/ioas.ts";
import { argumentError, closedError } from "../sys/error.ts";
import { type RegionMapping, VfioDevice } from "../vfio/device.ts";
import { type Capabilities, CMBLOC, CMBMSC, CMBMSC_CRE, type ControllerRegisters } from "./registers.ts";

/**
 * The BAR holding a controller's memory buffer (CMBLOC.BIR), or undefined when it has none.
 * Sets CMBMSC.CRE first: controllers of NVMe 1.4 and later report CMBLOC only then.
 */
export function memoryBufferRegion(registers: ControllerRegisters, capabilities: Capabilities): number | undefined {
  if (!capabilities.controllerMemoryBuffer) return undefined;
  registers.write32(CMBMSC, CMBMSC_CRE);
  return registers.read32(CMBLOC) & 0x7;
}

/** The peer's device, checked: a VfioDevice (an NvmeController gives its own) other than `own`. */
export function peerDevice(operation: string, own: VfioDevice, device: unknown): VfioDevice {
  if (!(device instanceof VfioDevice))
    throw argumentError(operation, "source", "expected an NvmeController or a VfioDevice");
  if (device === own) {
    throw argumentError(
      operation,
      "source",
      "a controller cannot DMA into its own memory buffer (the device would access itself; QEMU drops it and still reports success)",
    );
  }
  return device;
}

/**
 * Export `length` bytes at `offset` of region `region` of `device` as a dma-buf and map it into
 * `ioas` for the controller `owner`. On failure nothing stays mapped or open.
 */
export function mapPeerMemory(
  owner: object,
  ioas: Ioas,
  device: VfioDevice,
  region: number | undefined,
  offset: number,
  length: number | undefined,
): PeerBuffer {
  if (region === undefined)
    throw argumentError(
      "NvmeController.mapPeerMemory",
      "options.region",
      "give the region (BAR) index of the peer memory",
    );
  const info = device.region(region);
  const size = length ?? info.size - offset;
  const dmabuf = device.exportDmaBuf({ region, ranges: [{ offset, length: size }] });
  let mapping: Mapping | undefined;
  try {
    mapping = ioas.mapFile(dmabuf);
    const bar = device.mapRegion(region);
    return new PeerBuffer(owner, dmabuf, mapping, bar, offset, size);
  } catch (error) {
    if (mapping?.mapped) mapping.unmap();
    dmabuf.close();
    throw error;
  }
}

export class PeerBuffer {
  /** The controller whose commands may use this buffer. */
  readonly owner: object;
  /** Bytes of device memory. */
  readonly size: number;
  /** Where the memory lies in its device's region. */
  readonly regionOffset: number;
  readonly description: string;
  #mapping: Mapping | undefined;
  #dmabuf: DmaBuf | undefined;
  #region: RegionMapping | undefined;
  readonly #iova: number;

  /** @internal Made by NvmeController.mapPeerMemory. */
  constructor(
    owner: object,
    dmabuf: DmaBuf,
    mapping: Mapping,
    region: RegionMapping,
    regionOffset: number,
    size: number,
  ) {
    this.owner = owner;
    this.#dmabuf = dmabuf;
    this.#mapping = mapping;
    this.#region = region;
    this.regionOffset = regionOffset;
    this.size = size;
    this.#iova = Number(mapping.iova);
    this.description = dmabuf.description;
  }

  get mapped(): boolean {
    return this.#mapping !== undefined;
  }

  /** The IOVA the controller uses for byte 0. */
  get iova(): number {
    if (this.#mapping === undefined) throw closedError("PeerBuffer.iova", "the peer buffer");
    return this.#iova;
  }

  #check(op: string, offset: number, length: number): RegionMapping {
    const region = this.#region;
    if (region === undefined || !region.mapped) throw closedError(op, "the peer buffer");
    if (!Number.isInteger(offset) || offset < 0 || offset % 4)
      throw argumentError(op, "offset", `${offset} is not a non-negative multiple of 4`);
    if (!Number.isInteger(length) || length < 0 || length % 4 || offset + length > this.size) {
      throw argumentError(
        op,
        "length",
        `${length} bytes at offset ${offset} do not fit in the ${this.size}-byte peer buffer in whole 32-bit words`,
      );
    }
    return region;
  }

  /** Copy `length` bytes out of device memory. */
  read(offset: number, length: number): Uint8Array {
    const region = this.#check("PeerBuffer.read", offset, length);
    const out = new Uint32Array(length / 4);
    const base = this.regionOffset + offset;
    for (let i = 0; i < out.length; i++) out[i] = region.read32(base + i * 4);
    return new Uint8Array(out.buffer);
  }

  /** Copy bytes into device memory. */
  write(offset: number, bytes: Uint8Array): void {
    const region = this.#check("PeerBuffer.write", offset, bytes.length);
    const words = new Uint32Array(bytes.slice().buffer);
    const base = this.regionOffset + offset;
    for (let i = 0; i < words.length; i++) region.write32(base + i * 4, words[i]!);
  }

  /** Fill device memory with one byte value. */
  fill(value: number, offset = 0, length = this.size - offset): void {
    const region = this.#check("PeerBuffer.fill", offset, length);
    const byte = value & 0xff;
    const word = (byte | (byte << 8) | (byte << 16) | (byte << 24)) >>> 0;
    for (let at = 0; at < length; at += 4) region.write32(this.regionOffset + offset + at, word);
  }

  /** Unmap from the IOAS, close the dma-buf and the BAR mapping. Idempotent. */
  close(): void {
    const mapping = this.#mapping;
    if (mapping === undefined) return;
    // Unmap first: if the kernel refuses, the buffer stays whole and close() can be retried.
    if (mapping.mapped) mapping.unmap();
    this.#mapping = undefined;
    this.#dmabuf?.close();
    this.#dmabuf = undefined;
    this.#region?.unmap();
    this.#region = undefined;
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
