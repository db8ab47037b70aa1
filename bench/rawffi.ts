/**
 * The floor for bun:ffi: MAP_FILE + UNMAP with structs encoded once and their addresses cached,
 * through a dlopen of its own (not the library's bindings). Library time minus this is what the
 * library's own JS costs; this minus C is what Bun and bun:ffi cost.
 */
import { dlopen, FFIType, ptr, read, type Pointer } from "bun:ffi";
import { IOMMU_IOAS_MAP_FILE, IOMMU_IOAS_UNMAP } from "../src/uapi/iommufd.ts";

const { i32, u64, ptr: pointer } = FFIType;

let lib: ReturnType<typeof open> | undefined;
function open() {
  // The library's signature (request as u64): NOTES.md found the signature makes no difference.
  return dlopen("libc.so.6", {
    ioctl: { args: [i32, u64, pointer], returns: i32 },
    __errno_location: { args: [], returns: pointer },
  }).symbols;
}

function errno(): number {
  const at = lib!.__errno_location();
  return at ? read.i32(at as Pointer, 0) : -1;
}

const MAP_FIXED_RW = 1 | 2 | 4; // FIXED_IOVA | WRITEABLE | READABLE
const pinned: Uint32Array[] = [];

/** Returns a pair function over pre-encoded structs. Throws (with errno) if an ioctl fails. */
export function rawMapFilePair(iommufd: number, ioasId: number, fd: number, length: number, iova: number): () => void {
  lib ??= open();
  const ioctl = lib.ioctl;
  // struct iommu_ioas_map_file: size flags ioas_id fd | start | length | iova
  // Dedicated ArrayBuffers, kept referenced for good: the kernel reads them by address only, so
  // a collected one would hand it whatever reused the memory (EINVAL, at best).
  const mapFile = new Uint32Array(new ArrayBuffer(40));
  mapFile.set([
    40,
    MAP_FIXED_RW,
    ioasId,
    fd,
    0,
    0,
    length % 2 ** 32,
    Math.floor(length / 2 ** 32),
    iova % 2 ** 32,
    Math.floor(iova / 2 ** 32),
  ]);
  // struct iommu_ioas_unmap: size ioas_id | iova | length
  const unmap = new Uint32Array(new ArrayBuffer(24));
  unmap.set([24, ioasId, iova % 2 ** 32, Math.floor(iova / 2 ** 32), length % 2 ** 32, Math.floor(length / 2 ** 32)]);
  const mapFileAddress = ptr(mapFile);
  const unmapAddress = ptr(unmap);
  pinned.push(mapFile, unmap);
  return () => {
    if (ioctl(iommufd, IOMMU_IOAS_MAP_FILE, mapFileAddress) < 0)
      throw new Error(`raw IOMMU_IOAS_MAP_FILE: errno ${errno()}`);
    // The kernel writes back the iova and the unmapped length, equal to what was asked: both
    // structs stay valid for the next pair, as in the C baseline.
    if (ioctl(iommufd, IOMMU_IOAS_UNMAP, unmapAddress) < 0) throw new Error(`raw IOMMU_IOAS_UNMAP: errno ${errno()}`);
  };
}
