// The parts of the VMM objects that need no kernel: VT-d register decoding and DirtyBitmap's
// arithmetic and argument checks.
import { expect, test } from "bun:test";
import { decodeVtd, DirtyBitmap, explainNoDirtyTracking, IommufdError, type HwInfo } from "../../src/index.ts";

function bits(...positions: number[]): bigint {
  return positions.reduce((reg, p) => reg | (1n << BigInt(p)), 0n);
}

test("decodeVtd reads each cap field at its position", () => {
  // ND=2 (256 domains), CM, SAGAW bits 1 and 2 (39/48-bit), MGAW field 47 (48 bits), SLLPS 2M+1G, PSI, NFR field 7 (8 records).
  const cap = 2n | bits(7, 9, 10) | (47n << 16n) | (3n << 34n) | bits(39) | (7n << 40n) | (0x22n << 24n);
  const info = decodeVtd(1, cap, 0n);
  expect(info.cap.domains).toBe(256);
  expect(info.cap.cachingMode).toBe(true);
  expect(info.cap.adjustedGuestAddressWidths).toEqual([39, 48]);
  expect(info.cap.maxGuestAddressWidth).toBe(48);
  expect(info.cap.secondStageLargePages).toEqual({ "2M": true, "1G": true });
  expect(info.cap.pageSelectiveInvalidation).toBe(true);
  expect(info.cap.faultRecordCount).toBe(8);
  expect(info.cap.faultRecordingOffset).toBe(0x220);
  expect(info.cap.postedInterrupts).toBe(false);
  expect(info.errata772415).toBe(true);
  expect(info.names).toContain("cap.cachingMode");
  expect(info.names).not.toContain("cap.postedInterrupts");
});

test("decodeVtd reads each ecap field at its position", () => {
  const ecap = bits(1, 3, 4, 26, 40, 43, 45, 46, 47, 48) | (19n << 35n) | (0x50n << 8n);
  const { ecap: e, names } = decodeVtd(0, 0n, ecap);
  expect(e.queuedInvalidation).toBe(true);
  expect(e.interruptRemapping).toBe(true);
  expect(e.extendedInterruptMode).toBe(true);
  expect(e.nestedTranslation).toBe(true);
  expect(e.pasid).toBe(true);
  expect(e.pasidBits).toBe(20);
  expect(e.scalableMode).toBe(true);
  expect(e.secondStageAccessedDirty).toBe(true);
  expect(e.secondStageTranslation).toBe(true);
  expect(e.firstStageTranslation).toBe(true);
  expect(e.scalableModePageWalkCoherency).toBe(true);
  expect(e.iotlbRegisterOffset).toBe(0x500);
  expect(e.passThrough).toBe(false);
  expect(names).toContain("ecap.secondStageAccessedDirty");
});

test("explainNoDirtyTracking names the missing VT-d bits", () => {
  const base = { typeId: 1, type: "intel-vtd", maxPasidLog2: 0, data: new Uint8Array(24) } as const;
  const caps = { dirtyTracking: false, pasidExec: false, pasidPriv: false, atsNotSupported: true };
  const legacy: HwInfo = { ...base, capabilities: caps, vtd: decodeVtd(0, 0n, bits(1, 3)) };
  expect(explainNoDirtyTracking(legacy)).toContain("SMTS");
  expect(explainNoDirtyTracking(legacy)).toContain("SLADS");
  const capable: HwInfo = { ...base, capabilities: { ...caps, dirtyTracking: true } };
  expect(explainNoDirtyTracking(capable)).toBeUndefined();
});

test("DirtyBitmap sizes whole 64-bit words and maps IOVAs to bits", () => {
  expect(DirtyBitmap.bytesFor(1 << 30, 4096)).toBe(32768);
  expect(DirtyBitmap.bytesFor(3 * 4096, 4096)).toBe(8);
  expect(DirtyBitmap.bytesFor(65 * 4096, 4096)).toBe(16);
  const bitmap = new DirtyBitmap({ iova: 0x10000, length: 130 * 4096 });
  expect(bitmap.pages).toBe(130);
  expect(bitmap.bytes.byteLength).toBe(24);
  bitmap.bytes[0] = 0b101;
  bitmap.bytes[16] = 0b11; // pages 128 and 129
  expect(bitmap.isDirty(0x10000)).toBe(true);
  expect(bitmap.isDirty(0x10000 + 4096)).toBe(false);
  expect(bitmap.isDirty(0x10000 + 2 * 4096 + 17)).toBe(true);
  expect(bitmap.countDirty()).toBe(4);
  expect(bitmap.dirtyRanges()).toEqual([
    { iova: 0x10000, length: 4096 },
    { iova: 0x10000 + 2 * 4096, length: 4096 },
    { iova: 0x10000 + 128 * 4096, length: 2 * 4096 },
  ]);
  expect(() => bitmap.isDirty(0x10000 + 130 * 4096)).toThrow(IommufdError);
});

test("DirtyBitmap checks its arguments with typed errors", () => {
  const cases: [() => unknown, string, string][] = [
    [() => new DirtyBitmap({ iova: 0, length: 4096, pageSize: 0 }), "EINVAL", "options.pageSize"],
    [() => new DirtyBitmap({ iova: 0, length: 4096, pageSize: 6144 }), "EINVAL", "options.pageSize"],
    [() => new DirtyBitmap({ iova: -4096, length: 4096 }), "EINVAL", "options.iova"],
    [() => new DirtyBitmap({ iova: 2048, length: 4096 }), "EINVAL", "options.iova"],
    [() => new DirtyBitmap({ iova: 0, length: 6144 }), "EINVAL", "options.length"],
    [() => new DirtyBitmap({ iova: (1n << 64n) - 4096n, length: 8192 }), "EOVERFLOW", "options.length"],
    [() => new DirtyBitmap({ iova: 0, length: 2 ** 50, pageSize: 1 }), "E2BIG", "options.length"],
    [() => new DirtyBitmap({ iova: 0, length: 65 * 4096, storage: new ArrayBuffer(8) }), "EMSGSIZE", "options.storage"],
  ];
  for (const [fn, code, argument] of cases) {
    let error: unknown;
    try {
      fn();
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(IommufdError);
    expect({ code: (error as IommufdError).code, argument: (error as IommufdError).argument }).toEqual({
      code,
      argument,
    });
  }
});
