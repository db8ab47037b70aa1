/**
 * The kernel's iommufd selftest interface (drivers/iommu/iommufd/iommufd_test.h, present when the
 * kernel has CONFIG_IOMMUFD_TEST). Not exported UAPI: tests use it to create a mock domain whose
 * page table they can inspect, and a test dma-buf exporter. Checked against the header kept with
 * the test kernel.
 */
import { IO, struct } from "./codec.ts";
import { IOMMUFD_TYPE } from "./iommufd.ts";

export const IOMMU_TEST_CMD = IO(IOMMUFD_TYPE, 0x80 + 32);

export const IOMMU_TEST_OP = {
  ADD_RESERVED: 1,
  MOCK_DOMAIN: 2,
  MD_CHECK_MAP: 3,
  MD_CHECK_REFS: 4,
  SET_TEMP_MEMORY_LIMIT: 9,
  MOCK_DOMAIN_REPLACE: 10,
  MOCK_DOMAIN_FLAGS: 12,
  DIRTY: 13,
  TRIGGER_IOPF: 15,
  DMABUF_GET: 22,
  DMABUF_REVOKE: 23,
} as const;

/** The mock domain's IOVA aperture and page size. */
export const MOCK_APERTURE_START = 1 << 24;
export const MOCK_APERTURE_LAST = 2 ** 31 - 1;
export const MOCK_PAGE_SIZE = 2048;
export const MOCK_HUGE_PAGE_SIZE = 512 * MOCK_PAGE_SIZE;

/** Mock device flags for MOCK_DOMAIN_FLAGS: a device whose IOMMU cannot track dirty pages. */
export const MOCK_FLAGS_DEVICE_NO_DIRTY = 1 << 0;

/** What IOMMU_GET_HW_INFO reports for a mock device. */
export const IOMMU_HW_INFO_TYPE_SELFTEST = 0xfeedbeef;
export const IOMMU_HW_INFO_SELFTEST_REGVAL = 0xdeadbeef;

/**
 * struct iommu_test_cmd: a header, a union of per-op payloads starting at offset 16, and `last`.
 * The table names each union member by the op that uses it.
 */
export const iommu_test_cmd = struct(
  [
    ["size", "u32"],
    ["op", "u32"],
    ["id", "u32"],
    ["__reserved", "u32"],
    // add_reserved / check_map / check_refs share the first u64s of the union.
    ["start", "u64"],
    ["length", "u64"],
    ["uptr", "u64"],
    ["mock_out_stdev_id", "u32"],
    ["mock_out_hwpt_id", "u32"],
    ["mock_out_idev_id", "u32"],
    ["dmabuf_length", "u32"],
    ["dmabuf_open_flags", "u32"],
    ["dmabuf_fd", "s32"],
    ["dmabuf_revoked", "u32"],
    ["memory_limit", "u32"],
    ["mock_dev_flags", "u32"],
    ["replace_pt_id", "u32"],
    ["dirty_flags", "u32"],
    ["dirty_iova", "u64"],
    ["dirty_length", "u64"],
    ["dirty_page_size", "u64"],
    ["dirty_uptr", "u64"],
    ["dirty_out_nr_dirty", "u64"],
    ["iopf_dev_id", "u32"],
    ["iopf_pasid", "u32"],
    ["iopf_grpid", "u32"],
    ["iopf_perm", "u32"],
    ["iopf_addr", "u64"],
    ["last", "u32"],
  ],
  {
    cName: "struct iommu_test_cmd",
    at: {
      start: 16,
      length: 24,
      uptr: 32,
      mock_out_stdev_id: 16,
      mock_out_hwpt_id: 20,
      mock_out_idev_id: 24,
      dmabuf_length: 16,
      dmabuf_open_flags: 20,
      dmabuf_fd: 16,
      dmabuf_revoked: 20,
      memory_limit: 16,
      mock_dev_flags: 28,
      replace_pt_id: 16,
      dirty_flags: 16,
      dirty_iova: 24,
      dirty_length: 32,
      dirty_page_size: 40,
      dirty_uptr: 48,
      dirty_out_nr_dirty: 56,
      iopf_dev_id: 16,
      iopf_pasid: 20,
      iopf_grpid: 24,
      iopf_perm: 28,
      iopf_addr: 32,
      last: 64,
    },
    size: 72,
    cPath: {
      start: "check_map.iova",
      length: "check_map.length",
      uptr: "check_map.uptr",
      mock_out_stdev_id: "mock_domain.out_stdev_id",
      mock_out_hwpt_id: "mock_domain.out_hwpt_id",
      mock_out_idev_id: "mock_domain.out_idev_id",
      dmabuf_length: "dmabuf_get.length",
      dmabuf_open_flags: "dmabuf_get.open_flags",
      dmabuf_fd: "dmabuf_revoke.dmabuf_fd",
      dmabuf_revoked: "dmabuf_revoke.revoked",
      memory_limit: "memory_limit.limit",
      mock_dev_flags: "mock_domain_flags.dev_flags",
      replace_pt_id: "mock_domain_replace.pt_id",
      dirty_flags: "dirty.flags",
      dirty_iova: "dirty.iova",
      dirty_length: "dirty.length",
      dirty_page_size: "dirty.page_size",
      dirty_uptr: "dirty.uptr",
      dirty_out_nr_dirty: "dirty.out_nr_dirty",
      iopf_dev_id: "trigger_iopf.dev_id",
      iopf_pasid: "trigger_iopf.pasid",
      iopf_grpid: "trigger_iopf.grpid",
      iopf_perm: "trigger_iopf.perm",
      iopf_addr: "trigger_iopf.addr",
    },
  },
);

export const iommu_test_hw_info = struct(
  [
    ["flags", "u32"],
    ["test_reg", "u32"],
  ],
  { cName: "struct iommu_test_hw_info" },
);

export const IOMMUFD_TEST_LAYOUTS = [iommu_test_cmd, iommu_test_hw_info];
export const IOMMUFD_TEST_REQUESTS: Record<string, number> = { IOMMU_TEST_CMD };

export const IOMMUFD_TEST_CONSTANTS: Record<string, number> = {
  IOMMU_TEST_OP_ADD_RESERVED: IOMMU_TEST_OP.ADD_RESERVED,
  IOMMU_TEST_OP_MOCK_DOMAIN: IOMMU_TEST_OP.MOCK_DOMAIN,
  IOMMU_TEST_OP_MD_CHECK_MAP: IOMMU_TEST_OP.MD_CHECK_MAP,
  IOMMU_TEST_OP_MD_CHECK_REFS: IOMMU_TEST_OP.MD_CHECK_REFS,
  IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT: IOMMU_TEST_OP.SET_TEMP_MEMORY_LIMIT,
  IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE: IOMMU_TEST_OP.MOCK_DOMAIN_REPLACE,
  IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS: IOMMU_TEST_OP.MOCK_DOMAIN_FLAGS,
  IOMMU_TEST_OP_DIRTY: IOMMU_TEST_OP.DIRTY,
  IOMMU_TEST_OP_TRIGGER_IOPF: IOMMU_TEST_OP.TRIGGER_IOPF,
  IOMMU_TEST_OP_DMABUF_GET: IOMMU_TEST_OP.DMABUF_GET,
  IOMMU_TEST_OP_DMABUF_REVOKE: IOMMU_TEST_OP.DMABUF_REVOKE,
  MOCK_APERTURE_START,
  MOCK_APERTURE_LAST,
  MOCK_PAGE_SIZE,
  MOCK_HUGE_PAGE_SIZE,
  MOCK_FLAGS_DEVICE_NO_DIRTY,
  IOMMU_HW_INFO_TYPE_SELFTEST,
  IOMMU_HW_INFO_SELFTEST_REGVAL,
};
