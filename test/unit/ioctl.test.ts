import { describe, expect, test } from "bun:test";
import { Ioas } from "../../src/iommufd/ioas.ts";
import { Iommufd, MemfdBuffer } from "../../src/index.ts";
import { ERRNO } from "../../src/sys/errno.ts";
import { IommufdError } from "../../src/sys/error.ts";
import { counters, type ErrnoTable, ioctl, isErrno } from "../../src/sys/ioctl.ts";
import { IOMMU_DESTROY, iommu_destroy, iommu_ioas_map, iommu_ioas_map_file } from "../../src/uapi/iommufd.ts";

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

describe("one encoder for MAP and MAP_FILE", () => {
  test("the two commands have one layout, field for field", () => {
    const pairs = [
      ["size", "size"],
      ["flags", "flags"],
      ["ioas_id", "ioas_id"],
      ["__reserved", "fd"],
      ["user_va", "start"],
      ["length", "length"],
      ["iova", "iova"],
    ] as const;
    expect(iommu_ioas_map.size).toBe(iommu_ioas_map_file.size);
    for (const [map, mapFile] of pairs) {
      expect([map, iommu_ioas_map.fields[map].offset, iommu_ioas_map.fields[map].size]).toEqual([
        map,
        iommu_ioas_map_file.fields[mapFile].offset,
        iommu_ioas_map_file.fields[mapFile].size,
      ]);
    }
  });
});
