import { describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { ERRNO, errnoCode, errnoMeaning } from "../../src/sys/errno.ts";
import {
  argumentError,
  closedError,
  IommufdError,
  ioError,
  stateError,
  syscallError,
  timeoutError,
} from "../../src/sys/error.ts";
import { openPath } from "../../src/sys/fd.ts";
import { lastErrno, libc, O_RDWR } from "../../src/sys/libc.ts";
import { normaliseIova, positiveLength, u64 } from "../../src/sys/validate.ts";
import { Iommufd } from "../../src/index.ts";

describe("errno table", () => {
  test("numbers are Linux's", () => {
    expect([ERRNO.EPERM, ERRNO.ENOENT, ERRNO.EBADF, ERRNO.ENOMEM, ERRNO.EEXIST, ERRNO.EINVAL]).toEqual([
      1, 2, 9, 12, 17, 22,
    ]);
    expect([ERRNO.EMSGSIZE, ERRNO.EOPNOTSUPP, ERRNO.EADDRINUSE, ERRNO.ENODEV, ERRNO.ENOTTY]).toEqual([
      90, 95, 98, 19, 25,
    ]);
  });

  test("code and meaning lookups, with a fallback for unknown numbers", () => {
    expect(errnoCode(22)).toBe("EINVAL");
    expect(errnoCode(4242)).toBe("E4242");
    expect(errnoMeaning(17)).toBe("already exists");
    expect(errnoMeaning(4242)).toBe("error 4242");
  });

  test("errno read after a real failed libc call", () => {
    expect(libc().close(1_000_000)).toBe(-1);
    expect(lastErrno()).toBe(ERRNO.EBADF);
  });
});

describe("IommufdError", () => {
  test("carries errno, code, operation, argument and hint, all in the message", () => {
    const e = new IommufdError({
      operation: "IOMMU_IOAS_MAP",
      errno: 17,
      message: "IOVA range 0x1000..0x1fff overlaps",
      argument: "options.iova",
      hint: "pick another IOVA",
    });
    expect(e).toBeInstanceOf(Error);
    expect(e.name).toBe("IommufdError");
    expect([e.errno, e.code, e.operation, e.argument, e.hint]).toEqual([
      17,
      "EEXIST",
      "IOMMU_IOAS_MAP",
      "options.iova",
      "pick another IOVA",
    ]);
    expect(e.message).toBe(
      "IOMMU_IOAS_MAP (options.iova): IOVA range 0x1000..0x1fff overlaps [EEXIST] Hint: pick another IOVA",
    );
  });

  test("helpers build the three kinds of failure", () => {
    expect(syscallError("mmap", 12).message).toBe("mmap: out of memory or over the locked-memory limit [ENOMEM]");
    const arg = argumentError("Ioas.map", "length", "length is 0", "EINVAL");
    expect([arg.code, arg.argument]).toEqual(["EINVAL", "length"]);
    expect(closedError("Ioas.map", "IOAS 3").code).toBe("EBADF");
    const gone = closedError("Ioas.map", "IOAS 3", "was destroyed", "ioas");
    expect([gone.message, gone.argument]).toEqual([
      "Ioas.map (ioas): IOAS 3 was destroyed; it cannot be used any more [EBADF]",
      "ioas",
    ]);
    const busy = stateError("IrqVector.wait", "EBUSY", "one waiter per vector", { argument: "kind" });
    expect([busy.code, busy.argument]).toEqual(["EBUSY", "kind"]);
    expect(timeoutError("FaultQueue.read", "no fault").code).toBe("ETIMEDOUT");
    const cause = new Error("short");
    expect([ioError("readConfig", "read 2 of 4", cause).code, ioError("x", "y", cause).cause]).toEqual(["EIO", cause]);
  });

  test("a real open failure: ENOENT with the path, and the hint the caller gave", () => {
    try {
      openPath("/nonexistent/iommu", O_RDWR, "Iommufd.open", { ENOENT: { hint: "needs CONFIG_IOMMUFD" } });
      throw new Error("not thrown");
    } catch (error) {
      const e = error as IommufdError;
      expect(e.code).toBe("ENOENT");
      expect(e.message).toContain("/nonexistent/iommu");
      expect(e.hint).toBe("needs CONFIG_IOMMUFD");
    }
  });

  const hasIommu = existsSync("/dev/iommu");
  test.skipIf(hasIommu)(
    "Iommufd.open on this machine without /dev/iommu explains the kernel option" +
      (hasIommu ? " [skipped: this host has /dev/iommu; the kernel tests cover a real open]" : ""),
    () => {
      try {
        Iommufd.open();
        throw new Error("not thrown");
      } catch (error) {
        expect((error as IommufdError).code).toBe("ENOENT");
        expect((error as IommufdError).hint).toContain("CONFIG_IOMMUFD");
      }
    },
  );
});

describe("argument checks", () => {
  test("u64 accepts exact numbers and bigints, refuses the rest with the argument named", () => {
    expect(u64(4096, "op", "iova")).toBe(4096);
    expect(u64(1n << 63n, "op", "iova")).toBe(1n << 63n);
    for (const bad of [-1, 1.5, Number.NaN, 2 ** 60, "12", null, -1n, 1n << 64n]) {
      expect(() => u64(bad, "op", "iova")).toThrow(IommufdError);
    }
    try {
      u64(2 ** 60, "Ioas.map", "options.iova");
    } catch (error) {
      expect((error as IommufdError).message).toContain("pass a bigint");
    }
  });

  test("positiveLength refuses 0 and normaliseIova keeps precision", () => {
    expect(() => positiveLength(0, "op")).toThrow("length is 0");
    expect(positiveLength(5n, "op")).toBe(5);
    expect(normaliseIova(4096n)).toBe(4096);
    expect(normaliseIova((1n << 60n) + 1n)).toBe((1n << 60n) + 1n);
  });
});
