/**
 * IOMMU_GET_HW_INFO: what the IOMMU behind a bound device is and can do. The generic part
 * (dirty tracking, PASID) comes as named booleans; the driver-specific blob is decoded for the
 * types the library knows (Intel VT-d's capability registers, the selftest mock) and kept raw.
 */
import { ptr } from "bun:ffi";
import { deviceIdOf, type BoundDevice } from "./device-ref.ts";
import type { Iommufd } from "../iommufd/iommufd.ts";
import type { ErrnoTable } from "../sys/errno-table.ts";
import {
  IOMMU_GET_HW_INFO,
  IOMMU_HW_CAP_DIRTY_TRACKING,
  IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED,
  IOMMU_HW_CAP_PCI_PASID_EXEC,
  IOMMU_HW_CAP_PCI_PASID_PRIV,
  IOMMU_HW_INFO_TYPE_AMD,
  IOMMU_HW_INFO_TYPE_ARM_SMMUV3,
  IOMMU_HW_INFO_TYPE_INTEL_VTD,
  IOMMU_HW_INFO_TYPE_NONE,
  IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV,
  IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17,
  iommu_hw_info,
  iommu_hw_info_vtd,
} from "../uapi/iommufd.ts";
import { IOMMU_HW_INFO_TYPE_SELFTEST, iommu_test_hw_info } from "../uapi/iommufd-test.ts";

export type HwInfoType = "none" | "intel-vtd" | "arm-smmuv3" | "tegra241-cmdqv" | "amd" | "selftest" | "unknown";

const TYPE_NAMES: Record<number, HwInfoType> = {
  [IOMMU_HW_INFO_TYPE_NONE]: "none",
  [IOMMU_HW_INFO_TYPE_INTEL_VTD]: "intel-vtd",
  [IOMMU_HW_INFO_TYPE_ARM_SMMUV3]: "arm-smmuv3",
  [IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV]: "tegra241-cmdqv",
  [IOMMU_HW_INFO_TYPE_AMD]: "amd",
  [IOMMU_HW_INFO_TYPE_SELFTEST]: "selftest",
};

/** out_capabilities, by name. */
export interface HwCapabilities {
  /** The IOMMU can track DMA writes: HWPTs may be allocated with `dirtyTracking`. */
  dirtyTracking: boolean;
  pasidExec: boolean;
  pasidPriv: boolean;
  /** ATS cannot be used for this device. */
  atsNotSupported: boolean;
}

/** Intel VT-d capability register (spec section 11.4.2), field by field. */
export interface VtdCapabilities {
  /** Number of domain ids the unit supports. */
  domains: number;
  advancedFaultLogging: boolean;
  requiredWriteBufferFlushing: boolean;
  protectedLowMemoryRegion: boolean;
  protectedHighMemoryRegion: boolean;
  /** Caching mode: the unit may cache not-present entries (set by emulated IOMMUs). */
  cachingMode: boolean;
  /** Supported second-stage page-table depths, as address widths in bits (39, 48, 57). */
  adjustedGuestAddressWidths: number[];
  maxGuestAddressWidth: number;
  zeroLengthRead: boolean;
  isochrony: boolean;
  faultRecordingOffset: number;
  faultRecordCount: number;
  /** Second-stage large pages: 2 MiB, 1 GiB. */
  secondStageLargePages: { "2M": boolean; "1G": boolean };
  pageSelectiveInvalidation: boolean;
  maxAddressMaskValue: number;
  writeDraining: boolean;
  readDraining: boolean;
  firstStage1GiBPages: boolean;
  postedInterrupts: boolean;
  firstStage5LevelPaging: boolean;
  enhancedCommands: boolean;
  enhancedSetInterruptRemapTablePointer: boolean;
  enhancedSetRootTablePointer: boolean;
}

/** Intel VT-d extended capability register (spec section 11.4.3), field by field. */
export interface VtdExtendedCapabilities {
  pageWalkCoherency: boolean;
  queuedInvalidation: boolean;
  deviceTlb: boolean;
  interruptRemapping: boolean;
  extendedInterruptMode: boolean;
  passThrough: boolean;
  snoopControl: boolean;
  iotlbRegisterOffset: number;
  maxHandleMaskValue: number;
  memoryTypeSupport: boolean;
  /** Nested translation: needed for `nestParent` HWPTs. */
  nestedTranslation: boolean;
  pageRequests: boolean;
  executeRequests: boolean;
  supervisorRequests: boolean;
  noWriteFlag: boolean;
  extendedAccessedFlag: boolean;
  /** PASID width in bits (PSS + 1), meaningful when `pasid` is set. */
  pasidBits: number;
  pasid: boolean;
  deviceTlbInvalidationThrottling: boolean;
  pageRequestDrain: boolean;
  /** Scalable-mode translation: without it there is no dirty tracking and no nesting. */
  scalableMode: boolean;
  /** Second-stage accessed/dirty bits: what dirty tracking needs. */
  secondStageAccessedDirty: boolean;
  secondStageTranslation: boolean;
  firstStageTranslation: boolean;
  scalableModePageWalkCoherency: boolean;
  ridPasid: boolean;
  performanceMonitoring: boolean;
}

export interface VtdHwInfo {
  /** Erratum 772415 (SPR17): no read-only mappings on a nest-parent HWPT. */
  errata772415: boolean;
  capReg: bigint;
  ecapReg: bigint;
  cap: VtdCapabilities;
  ecap: VtdExtendedCapabilities;
  /** Names of the boolean capabilities that are set, cap then ecap: for logs and reports. */
  names: string[];
}

export interface HwInfo {
  /** The kernel's type number (enum iommu_hw_info_type, or the selftest's). */
  typeId: number;
  type: HwInfoType;
  capabilities: HwCapabilities;
  /** Width of PASIDs; 0 means no PASID support. */
  maxPasidLog2: number;
  /** Driver data exactly as the kernel gave it. */
  data: Uint8Array;
  vtd?: VtdHwInfo;
  selftest?: { flags: number; testReg: number };
}

const cmd = iommu_hw_info.create();
const INITIAL_DATA_BYTES = 64;

const HW_INFO_ERRORS: ErrnoTable<number> = {
  ENOENT: ({ context }) => ({ message: `no device with id ${context} is bound to this iommufd`, argument: "device" }),
  EOPNOTSUPP: { message: "the IOMMU driver cannot report hardware information for this device", argument: "device" },
  otherwise: { argument: "device" },
};

/** IOMMU_GET_HW_INFO for a device bound to `iommufd`. */
export function readHwInfo(iommufd: Iommufd, device: BoundDevice): HwInfo {
  const op = "IOMMU_GET_HW_INFO";
  const devId = deviceIdOf(device, op);
  let data = new Uint8Array(INITIAL_DATA_BYTES);
  for (;;) {
    cmd.fill({ size: iommu_hw_info.size, dev_id: devId, data_len: data.byteLength, data_uptr: ptr(data) });
    iommufd.ioctl(IOMMU_GET_HW_INFO, cmd, op, HW_INFO_ERRORS, devId);
    const kernelLength = cmd.get("data_len");
    // The kernel reports how much it has; ask again when that did not fit.
    if (kernelLength > data.byteLength) {
      data = new Uint8Array(kernelLength);
      continue;
    }
    return decode(
      cmd.get("out_data_type"),
      data.slice(0, kernelLength),
      cmd.getBig("out_capabilities"),
      cmd.get("out_max_pasid_log2"),
    );
  }
}

function decode(typeId: number, data: Uint8Array, caps: bigint, maxPasidLog2: number): HwInfo {
  const bits = Number(caps & 0xffffffffn);
  const info: HwInfo = {
    typeId,
    type: TYPE_NAMES[typeId] ?? "unknown",
    capabilities: {
      dirtyTracking: (bits & IOMMU_HW_CAP_DIRTY_TRACKING) !== 0,
      pasidExec: (bits & IOMMU_HW_CAP_PCI_PASID_EXEC) !== 0,
      pasidPriv: (bits & IOMMU_HW_CAP_PCI_PASID_PRIV) !== 0,
      atsNotSupported: (bits & IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED) !== 0,
    },
    maxPasidLog2,
    data,
  };
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  if (typeId === IOMMU_HW_INFO_TYPE_INTEL_VTD && data.byteLength >= iommu_hw_info_vtd.size) {
    const f = iommu_hw_info_vtd.fields;
    const flags = view.getUint32(f.flags.offset, true);
    info.vtd = decodeVtd(flags, view.getBigUint64(f.cap_reg.offset, true), view.getBigUint64(f.ecap_reg.offset, true));
  } else if (typeId === IOMMU_HW_INFO_TYPE_SELFTEST && data.byteLength >= iommu_test_hw_info.size) {
    const f = iommu_test_hw_info.fields;
    info.selftest = { flags: view.getUint32(f.flags.offset, true), testReg: view.getUint32(f.test_reg.offset, true) };
  }
  return info;
}

/** Bits `shift..shift+width-1` of a 64-bit register. */
function field(reg: bigint, shift: number, width = 1): number {
  return Number((reg >> BigInt(shift)) & ((1n << BigInt(width)) - 1n));
}

/** Decode VT-d cap_reg/ecap_reg (positions from the VT-d specification, sections 11.4.2-11.4.3). */
export function decodeVtd(flags: number, capReg: bigint, ecapReg: bigint): VtdHwInfo {
  const c = (shift: number) => field(capReg, shift) === 1;
  const e = (shift: number) => field(ecapReg, shift) === 1;
  const sagaw = field(capReg, 8, 5);
  const sllps = field(capReg, 34, 4);
  const cap: VtdCapabilities = {
    domains: 2 ** (4 + 2 * field(capReg, 0, 3)),
    advancedFaultLogging: c(3),
    requiredWriteBufferFlushing: c(4),
    protectedLowMemoryRegion: c(5),
    protectedHighMemoryRegion: c(6),
    cachingMode: c(7),
    adjustedGuestAddressWidths: [
      [1, 39],
      [2, 48],
      [3, 57],
    ]
      .filter(([bit]) => (sagaw >> bit!) & 1)
      .map(([, width]) => width!),
    maxGuestAddressWidth: field(capReg, 16, 6) + 1,
    zeroLengthRead: c(22),
    isochrony: c(23),
    faultRecordingOffset: field(capReg, 24, 10) * 16,
    faultRecordCount: field(capReg, 40, 8) + 1,
    secondStageLargePages: { "2M": (sllps & 1) !== 0, "1G": (sllps & 2) !== 0 },
    pageSelectiveInvalidation: c(39),
    maxAddressMaskValue: field(capReg, 48, 6),
    writeDraining: c(54),
    readDraining: c(55),
    firstStage1GiBPages: c(56),
    postedInterrupts: c(59),
    firstStage5LevelPaging: c(60),
    enhancedCommands: c(61),
    enhancedSetInterruptRemapTablePointer: c(62),
    enhancedSetRootTablePointer: c(63),
  };
  const ecap: VtdExtendedCapabilities = {
    pageWalkCoherency: e(0),
    queuedInvalidation: e(1),
    deviceTlb: e(2),
    interruptRemapping: e(3),
    extendedInterruptMode: e(4),
    passThrough: e(6),
    snoopControl: e(7),
    iotlbRegisterOffset: field(ecapReg, 8, 10) * 16,
    maxHandleMaskValue: field(ecapReg, 20, 4),
    memoryTypeSupport: e(25),
    nestedTranslation: e(26),
    pageRequests: e(29),
    executeRequests: e(30),
    supervisorRequests: e(31),
    noWriteFlag: e(33),
    extendedAccessedFlag: e(34),
    pasidBits: field(ecapReg, 35, 5) + 1,
    pasid: e(40),
    deviceTlbInvalidationThrottling: e(41),
    pageRequestDrain: e(42),
    scalableMode: e(43),
    secondStageAccessedDirty: e(45),
    secondStageTranslation: e(46),
    firstStageTranslation: e(47),
    scalableModePageWalkCoherency: e(48),
    ridPasid: e(49),
    performanceMonitoring: e(51),
  };
  const names = [
    ...Object.entries(cap)
      .filter(([, v]) => v === true)
      .map(([k]) => `cap.${k}`),
    ...Object.entries(ecap)
      .filter(([, v]) => v === true)
      .map(([k]) => `ecap.${k}`),
  ];
  return { errata772415: (flags & IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17) !== 0, capReg, ecapReg, cap, ecap, names };
}

/**
 * Why this IOMMU cannot track dirty pages, in words, or undefined when it can. For VT-d the
 * kernel needs scalable mode plus second-stage accessed/dirty bits and page-walk coherency.
 */
export function explainNoDirtyTracking(info: HwInfo): string | undefined {
  if (info.capabilities.dirtyTracking) return undefined;
  if (info.vtd) {
    const missing: string[] = [];
    if (!info.vtd.ecap.scalableMode) missing.push("scalable-mode translation (ecap SMTS)");
    if (!info.vtd.ecap.secondStageAccessedDirty) missing.push("second-stage accessed/dirty bits (ecap SLADS)");
    if (!info.vtd.ecap.scalableModePageWalkCoherency) missing.push("scalable-mode page-walk coherency (ecap SMPWC)");
    return missing.length
      ? `this Intel VT-d unit lacks ${missing.join(", ")}`
      : "this Intel VT-d unit reports the bits, but the kernel runs it without scalable mode (intel_iommu=sm_on)";
  }
  return `the ${info.type} IOMMU does not report dirty tracking for this device`;
}
