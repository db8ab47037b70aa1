import { describe, expect, test } from "bun:test";
import { readdirSync, readFileSync } from "node:fs";
import { MemfdBuffer } from "../../src/memory/memfd.ts";
import { IommufdError } from "../../src/sys/error.ts";
import { isCloseOnExec, preadInto, pwriteFrom } from "../../src/sys/fd.ts";
import { F_GET_SEALS, F_SEAL_SHRINK, lastErrno, libc } from "../../src/sys/libc.ts";

const openFds = () => readdirSync("/proc/self/fd").length;
const vmSizeKiB = () => Number(/VmSize:\s+(\d+)/.exec(readFileSync("/proc/self/status", "utf8"))![1]);

function expectError(fn: () => unknown, code: string, operation: string, argument?: string): IommufdError {
  try {
    fn();
  } catch (error) {
    expect(error).toBeInstanceOf(IommufdError);
    const e = error as IommufdError;
    expect(e.code).toBe(code);
    expect(e.operation).toBe(operation);
    if (argument) expect(e.argument).toBe(argument);
    expect(e.message).toContain(operation);
    return e;
  }
  throw new Error(`expected ${code} from ${operation}, but nothing was thrown`);
}

describe("MemfdBuffer is zero-copy", () => {
  test("bytes written through the ArrayBuffer are the file's bytes (pread)", () => {
    using buf = MemfdBuffer.create(64 * 1024);
    for (let i = 0; i < buf.size; i += 4096) buf.bytes[i + 7] = (i / 4096) & 0xff;
    const back = new Uint8Array(buf.size);
    expect(preadInto(buf.fd, back, 0, "pread")).toBe(buf.size);
    expect(Buffer.from(back).equals(Buffer.from(buf.bytes))).toBe(true);
    expect(back[3 * 4096 + 7]).toBe(3);
  });

  test("bytes written to the file (pwrite) appear in the ArrayBuffer without a copy call", () => {
    using buf = MemfdBuffer.create(8192);
    const view = new DataView(buf.buffer);
    pwriteFrom(buf.fd, new TextEncoder().encode("hello from the fd"), 5000, "pwrite");
    expect(new TextDecoder().decode(buf.bytes.subarray(5000, 5017))).toBe("hello from the fd");
    pwriteFrom(buf.fd, new Uint8Array([0x78, 0x56, 0x34, 0x12]), 16, "pwrite");
    expect(view.getUint32(16, true)).toBe(0x12345678);
  });

  test("the ArrayBuffer spans exactly the mapping and starts zeroed", () => {
    using buf = MemfdBuffer.create(12345);
    expect(buf.buffer.byteLength).toBe(12345);
    expect(buf.bytes.every((b) => b === 0)).toBe(true);
    expect(buf.address % 4096).toBe(0);
  });
});

describe("MemfdBuffer ownership", () => {
  test("its fd is close-on-exec and sealed against shrinking", () => {
    using buf = MemfdBuffer.create(4096 * 4);
    expect(isCloseOnExec(buf.fd)).toBe(true);
    const seals = libc().fcntl(buf.fd, F_GET_SEALS, 0);
    expect(seals & F_SEAL_SHRINK).toBe(F_SEAL_SHRINK);
    expect(libc().ftruncate(buf.fd, 4096)).toBe(-1);
    expect(lastErrno()).toBe(1); // EPERM: the seal holds
    expect(libc().ftruncate(buf.fd, 4096 * 8)).toBe(0); // growing is still allowed
  });

  test("seal options: grow and final are added on request and hold", () => {
    using plain = MemfdBuffer.create(8192);
    expect(plain.seals).toEqual({ shrink: true, grow: false, write: false, final: false });
    using sealed = MemfdBuffer.create(8192, { seal: { grow: true, final: true } });
    expect(sealed.seals).toEqual({ shrink: true, grow: true, write: false, final: true });
    expect(libc().ftruncate(sealed.fd, 16384)).toBe(-1);
    expect(lastErrno()).toBe(1); // EPERM: cannot grow
    expect(libc().fcntl(sealed.fd, 1033, 0x8)).toBe(-1); // F_ADD_SEALS after F_SEAL_SEAL
    expect(lastErrno()).toBe(1);
    sealed.bytes[8191] = 1; // the mapping still works
    expect(sealed.bytes[8191]).toBe(1);
  });

  test("close() releases the fd and the mapping; old views become empty, not a crash", () => {
    const fdsBefore = openFds();
    const vmBefore = vmSizeKiB();
    const buf = MemfdBuffer.create(64 << 20);
    const view = buf.bytes;
    view[100] = 42;
    expect(openFds()).toBe(fdsBefore + 1);
    expect(vmSizeKiB()).toBeGreaterThanOrEqual(vmBefore + 64 * 1024);
    buf.close();
    expect(openFds()).toBe(fdsBefore);
    expect(vmSizeKiB()).toBeLessThan(vmBefore + 64 * 1024);
    expect(view.length).toBe(0);
    expect(view[100]).toBeUndefined();
    expect(buf.buffer.byteLength).toBe(0);
    expect(buf.closed).toBe(true);
    buf.close(); // idempotent
    expectError(() => buf.fd, "EBADF", "MemfdBuffer.fd");
  });

  test("`using` closes at the end of the scope", () => {
    const fdsBefore = openFds();
    let escaped: MemfdBuffer;
    {
      using buf = MemfdBuffer.create(4096);
      escaped = buf;
      expect(openFds()).toBe(fdsBefore + 1);
    }
    expect(escaped.closed).toBe(true);
    expect(openFds()).toBe(fdsBefore);
  });

  test("1,000 create/close cycles leave no fd and no mapping behind", () => {
    const fdsBefore = openFds();
    const vmBefore = vmSizeKiB();
    for (let i = 0; i < 1000; i++) MemfdBuffer.create(1 << 20).close();
    expect(openFds()).toBe(fdsBefore);
    expect(vmSizeKiB()).toBeLessThan(vmBefore + 16 * 1024);
  });
});

describe("MemfdBuffer rejects bad sizes with a typed error", () => {
  const cases: [string, unknown][] = [
    ["zero", 0],
    ["negative", -4096],
    ["fractional", 4096.5],
    ["NaN", Number.NaN],
    ["infinite", Number.POSITIVE_INFINITY],
    ["a string", "4096"],
    ["beyond the address space", 2 ** 50],
  ];
  for (const [what, size] of cases) {
    test(`${what}: EINVAL naming the size`, () => {
      const fdsBefore = openFds();
      const e = expectError(() => MemfdBuffer.create(size as number), "EINVAL", "MemfdBuffer.create", "size");
      expect(e.errno).toBe(22);
      expect(openFds()).toBe(fdsBefore);
    });
  }

  test("huge pages: a size that is not a multiple of the huge page is EINVAL", () => {
    expectError(() => MemfdBuffer.create(4096, { hugePages: "2MB" }), "EINVAL", "MemfdBuffer.create", "size");
  });

  test("huge pages: an unknown page size is EINVAL", () => {
    expectError(
      () => MemfdBuffer.create(4096, { hugePages: "4MB" as "2MB" }),
      "EINVAL",
      "MemfdBuffer.create",
      "options.hugePages",
    );
  });

  const reserved = Number(readFileSync("/proc/sys/vm/nr_hugepages", "utf8"));
  test.skipIf(reserved > 0)(
    "huge pages with none reserved: ENOMEM from mmap with a hint about nr_hugepages, no fd leaked" +
      (reserved > 0 ? ` [skipped: this system has ${reserved} huge pages reserved]` : ""),
    () => {
      const fdsBefore = openFds();
      const e = expectError(() => MemfdBuffer.create(2 << 20, { hugePages: "2MB" }), "ENOMEM", "mmap");
      expect(e.hint).toContain("nr_hugepages");
      expect(openFds()).toBe(fdsBefore);
    },
  );
});
