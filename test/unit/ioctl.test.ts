import { type Pointer, toArrayBuffer } from "bun:ffi";
import { describe, expect, test } from "bun:test";
import { Ioas } from "../../src/iommufd/ioas.ts";
import { Iommufd, MemfdBuffer } from "../../src/index.ts";
import { ERRNO } from "../../src/sys/errno.ts";
import { IommufdError } from "../../src/sys/error.ts";
import type { ErrnoTable } from "../../src/sys/errno-table.ts";
import { counters, ioctl, isErrno } from "../../src/sys/ioctl.ts";
import { libc } from "../../src/sys/libc.ts";
import {
  IOMMU_DESTROY,
  IOMMU_IOAS_MAP,
  IOMMU_IOAS_MAP_FILE,
  IOMMU_IOAS_MAP_FIXED_IOVA,
  IOMMU_IOAS_MAP_READABLE,
  IOMMU_IOAS_UNMAP,
  iommu_destroy,
  iommu_ioas_map,
  iommu_ioas_map_file,
  iommu_ioas_unmap,
} from "../../src/uapi/iommufd.ts";

// A memfd is no iommufd: any iommufd ioctl on it fails with ENOTTY, a real kernel answer that
// needs no /dev/iommu.
function withMemfd<T>(body: (fd: number) => T): T {
  using buffer = MemfdBuffer.create(4096);
  return body(buffer.fd);
}

function thrownBy(fn: () => unknown): IommufdError {
  try {
    fn();
  } catch (error) {
    if (error instanceof IommufdError) return error;
    throw error;
  }
  throw new Error("expected an IommufdError, but the call succeeded");
}

describe("the one ioctl path", () => {
  test("a failure throws the one error class, worded by the call's table, and counts the call", () => {
    withMemfd((fd) => {
      const cmd = iommu_destroy.create().fill({ size: iommu_destroy.size, id: 42 });
      const table: ErrnoTable = {
        ENOTTY: ({ cmd }) => ({ message: `object ${cmd!.get("id")} lives on no iommufd`, argument: "id", hint: "h" }),
      };
      const before = counters.ioctls;
      const e = thrownBy(() => ioctl(fd, IOMMU_DESTROY, cmd, "IOMMU_DESTROY", table));
      expect(counters.ioctls).toBe(before + 1);
      expect({ errno: e.errno, code: e.code, operation: e.operation, argument: e.argument, hint: e.hint }).toEqual({
        errno: ERRNO.ENOTTY,
        code: "ENOTTY",
        operation: "IOMMU_DESTROY",
        argument: "id",
        hint: "h",
      });
      expect(e.message).toBe("IOMMU_DESTROY (id): object 42 lives on no iommufd [ENOTTY] Hint: h");
    });
  });

  test("an errno the table does not list takes `otherwise`, then the errno's own meaning", () => {
    withMemfd((fd) => {
      const cmd = iommu_destroy.create();
      const otherwise = thrownBy(() =>
        ioctl(fd, IOMMU_DESTROY, cmd, "op", { EINVAL: "not this one", otherwise: { argument: "id" } }),
      );
      expect(otherwise.message).toBe("op (id): inappropriate ioctl for this file [ENOTTY]");
      // An explanation that has nothing to say falls through as well.
      const bare = thrownBy(() => ioctl(fd, IOMMU_DESTROY, null, "op", { ENOTTY: () => undefined }));
      expect(bare.message).toBe("op: inappropriate ioctl for this file [ENOTTY]");
      expect(isErrno(bare, "ENOTTY")).toBe(true);
      expect(isErrno(bare, "EINVAL")).toBe(false);
    });
  });

  test("the context reaches the explanation only on failure", () => {
    withMemfd((fd) => {
      const table: ErrnoTable<{ name: string }> = { ENOTTY: ({ context, fd: at }) => `${context.name} on fd ${at}` };
      const e = thrownBy(() => ioctl(fd, IOMMU_DESTROY, null, "op", table, { name: "ctx" }));
      expect(e.message).toBe(`op: ctx on fd ${fd} [ENOTTY]`);
    });
  });

  test("a closed fd is EBADF from the kernel, through the same path", () => {
    const e = thrownBy(() => ioctl(1_000_000, IOMMU_DESTROY, null, "IOMMU_DESTROY"));
    expect(e.code).toBe("EBADF");
  });
});

describe("Ioas on a closed MemfdBuffer", () => {
  test("map() names IOMMU_IOAS_MAP (the caller's operation), before any kernel call", () => {
    withMemfd((fd) => {
      using iommufd = Iommufd.fromFd(fd, { takeOwnership: false });
      const ioas = new Ioas(iommufd, 1);
      const buffer = MemfdBuffer.create(4096);
      buffer.close();
      const before = counters.ioctls;
      const e = thrownBy(() => ioas.map(buffer));
      expect({ code: e.code, operation: e.operation }).toEqual({ code: "EBADF", operation: "IOMMU_IOAS_MAP" });
      expect(e.message).toContain('MemfdBuffer "bun-iommufd" is closed');
      const f = thrownBy(() => ioas.mapFile(buffer));
      expect({ code: f.code, operation: f.operation }).toEqual({ code: "EBADF", operation: "IOMMU_IOAS_MAP_FILE" });
      expect(counters.ioctls).toBe(before);
    });
  });
});

describe("one encoder per map ioctl", () => {
  type Symbols = { ioctl: (fd: number, request: number, arg: Pointer) => number };

  /** The commands `body` hands the kernel, each copied at the call (libc's ioctl swapped for a recorder). */
  function commandsOf(body: () => void): { request: number; bytes: number[] }[] {
    const symbols = libc() as unknown as Symbols;
    const real = symbols.ioctl;
    const seen: { request: number; bytes: number[] }[] = [];
    symbols.ioctl = (_fd, request, arg) => {
      const size = request === IOMMU_IOAS_UNMAP ? iommu_ioas_unmap.size : iommu_ioas_map_file.size;
      seen.push({ request, bytes: [...new Uint8Array(toArrayBuffer(arg, 0, size))] });
      return 0;
    };
    try {
      body();
    } finally {
      symbols.ioctl = real;
    }
    return seen;
  }

  test("Ioas.mapFile and PreparedMapping hand the kernel the same MAP_FILE and UNMAP, field for field", () => {
    using buffer = MemfdBuffer.create(3 * 4096);
    using iommufd = Iommufd.fromFd(buffer.fd, { takeOwnership: false });
    const ioas = new Ioas(iommufd, 7);
    // The recorder answers every feature probe with success: a kernel that knows MAP_FILE.
    expect(commandsOf(() => iommufd.features).length).toBeGreaterThan(0);
    expect(iommufd.features.mapFile).toBe(true);
    const options = { iova: 0x40_0000, offset: 4096, length: 8192, writable: false };
    const direct = commandsOf(() => ioas.mapFile(buffer, options).unmap());
    const prepared = ioas.prepareMapFile(buffer, options);
    const viaPrepared = commandsOf(() => {
      prepared.map();
      prepared.unmap();
    });
    expect(viaPrepared).toEqual(direct);
    expect(direct.map((c) => c.request)).toEqual([IOMMU_IOAS_MAP_FILE, IOMMU_IOAS_UNMAP]);
    const mapFile = iommu_ioas_map_file.create();
    mapFile.bytes.set(direct[0]!.bytes);
    const fields = Object.fromEntries(
      (["size", "flags", "ioas_id", "fd", "start", "length", "iova"] as const).map((f) => [f, mapFile.get(f)]),
    );
    expect(fields).toEqual({
      size: iommu_ioas_map_file.size,
      flags: IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_FIXED_IOVA,
      ioas_id: 7,
      fd: buffer.fd,
      start: 4096,
      length: 8192,
      iova: 0x40_0000,
    });
    const unmap = iommu_ioas_unmap.create();
    unmap.bytes.set(direct[1]!.bytes);
    expect([unmap.get("size"), unmap.get("ioas_id"), unmap.get("iova"), unmap.get("length")]).toEqual([
      iommu_ioas_unmap.size,
      7,
      0x40_0000,
      8192,
    ]);
  });

  test("without MAP_FILE, mapFile and PreparedMapping map the MemfdBuffer's own address with MAP instead", () => {
    using buffer = MemfdBuffer.create(3 * 4096);
    // A memfd answers every iommufd command with ENOTTY, as a kernel before 6.13 does MAP_FILE.
    using iommufd = Iommufd.fromFd(buffer.fd, { takeOwnership: false });
    expect(iommufd.features.mapFile).toBe(false);
    const ioas = new Ioas(iommufd, 7);
    const options = { iova: 0x40_0000, offset: 4096, length: 8192, writable: false };
    const direct = commandsOf(() => ioas.mapFile(buffer, options).unmap());
    const prepared = ioas.prepareMapFile(buffer, options);
    const viaPrepared = commandsOf(() => {
      prepared.map();
      prepared.unmap();
    });
    expect(direct.map((c) => c.request)).toEqual([IOMMU_IOAS_MAP, IOMMU_IOAS_UNMAP]);
    expect(viaPrepared).toEqual(direct);
    const map = iommu_ioas_map.create();
    map.bytes.set(direct[0]!.bytes.slice(0, iommu_ioas_map.size));
    expect([map.get("ioas_id"), map.get("user_va"), map.get("length"), map.get("iova")]).toEqual([
      7,
      buffer.address + 4096,
      8192,
      0x40_0000,
    ]);
  });

  test("without MAP_FILE, a dma-buf or a bare fd is ENOTTY naming the missing command, before any MAP", () => {
    using buffer = MemfdBuffer.create(4096);
    using iommufd = Iommufd.fromFd(buffer.fd, { takeOwnership: false });
    const ioas = new Ioas(iommufd, 7);
    iommufd.features;
    const before = counters.ioctls;
    const e = thrownBy(() => ioas.mapFile(buffer.fd, { length: 4096 }));
    expect({ code: e.code, operation: e.operation }).toEqual({ code: "ENOTTY", operation: "IOMMU_IOAS_MAP_FILE" });
    expect(e.message).toContain("does not know IOMMU_IOAS_MAP_FILE (added in Linux 6.13");
    expect(e.message).toContain("a bare fd has no address in this process");
    expect(counters.ioctls).toBe(before);
  });
});
