/**
 * linux/iommufd.h (kernel 7.2): ioctl numbers, flags and struct layouts. Data only.
 * Every layout is checked against the real header by test/unit/layout.test.ts.
 */
import { IO, struct } from "./codec.ts";

export const IOMMUFD_TYPE = ";";

/** Command numbers, in header order. */
export const IOMMUFD_CMD = {
  DESTROY: 0x80,
  IOAS_ALLOC: 0x81,
  IOAS_ALLOW_IOVAS: 0x82,
  IOAS_COPY: 0x83,
  IOAS_IOVA_RANGES: 0x84,
  IOAS_MAP: 0x85,
  IOAS_UNMAP: 0x86,
  OPTION: 0x87,
  VFIO_IOAS: 0x88,
  HWPT_ALLOC: 0x89,
  GET_HW_INFO: 0x8a,
  HWPT_SET_DIRTY_TRACKING: 0x8b,
  HWPT_GET_DIRTY_BITMAP: 0x8c,
  HWPT_INVALIDATE: 0x8d,
  FAULT_QUEUE_ALLOC: 0x8e,
  IOAS_MAP_FILE: 0x8f,
  VIOMMU_ALLOC: 0x90,
  VDEVICE_ALLOC: 0x91,
  IOAS_CHANGE_PROCESS: 0x92,
  VEVENTQ_ALLOC: 0x93,
  HW_QUEUE_ALLOC: 0x94,
} as const;

/** ioctl request numbers: iommufd uses _IO(';', cmd), the size travels in the struct. */
export const IOMMU_DESTROY = IO(IOMMUFD_TYPE, IOMMUFD_CMD.DESTROY);
export const IOMMU_IOAS_ALLOC = IO(IOMMUFD_TYPE, IOMMUFD_CMD.IOAS_ALLOC);
export const IOMMU_IOAS_ALLOW_IOVAS = IO(IOMMUFD_TYPE, IOMMUFD_CMD.IOAS_ALLOW_IOVAS);
export const IOMMU_IOAS_COPY = IO(IOMMUFD_TYPE, IOMMUFD_CMD.IOAS_COPY);
export const IOMMU_IOAS_IOVA_RANGES = IO(IOMMUFD_TYPE, IOMMUFD_CMD.IOAS_IOVA_RANGES);
export const IOMMU_IOAS_MAP = IO(IOMMUFD_TYPE, IOMMUFD_CMD.IOAS_MAP);
export const IOMMU_IOAS_UNMAP = IO(IOMMUFD_TYPE, IOMMUFD_CMD.IOAS_UNMAP);
export const IOMMU_OPTION = IO(IOMMUFD_TYPE, IOMMUFD_CMD.OPTION);
export const IOMMU_VFIO_IOAS = IO(IOMMUFD_TYPE, IOMMUFD_CMD.VFIO_IOAS);
export const IOMMU_HWPT_ALLOC = IO(IOMMUFD_TYPE, IOMMUFD_CMD.HWPT_ALLOC);
export const IOMMU_GET_HW_INFO = IO(IOMMUFD_TYPE, IOMMUFD_CMD.GET_HW_INFO);
export const IOMMU_HWPT_SET_DIRTY_TRACKING = IO(IOMMUFD_TYPE, IOMMUFD_CMD.HWPT_SET_DIRTY_TRACKING);
export const IOMMU_HWPT_GET_DIRTY_BITMAP = IO(IOMMUFD_TYPE, IOMMUFD_CMD.HWPT_GET_DIRTY_BITMAP);
export const IOMMU_HWPT_INVALIDATE = IO(IOMMUFD_TYPE, IOMMUFD_CMD.HWPT_INVALIDATE);
export const IOMMU_FAULT_QUEUE_ALLOC = IO(IOMMUFD_TYPE, IOMMUFD_CMD.FAULT_QUEUE_ALLOC);
export const IOMMU_IOAS_MAP_FILE = IO(IOMMUFD_TYPE, IOMMUFD_CMD.IOAS_MAP_FILE);
export const IOMMU_VIOMMU_ALLOC = IO(IOMMUFD_TYPE, IOMMUFD_CMD.VIOMMU_ALLOC);
export const IOMMU_VDEVICE_ALLOC = IO(IOMMUFD_TYPE, IOMMUFD_CMD.VDEVICE_ALLOC);
export const IOMMU_IOAS_CHANGE_PROCESS = IO(IOMMUFD_TYPE, IOMMUFD_CMD.IOAS_CHANGE_PROCESS);
export const IOMMU_VEVENTQ_ALLOC = IO(IOMMUFD_TYPE, IOMMUFD_CMD.VEVENTQ_ALLOC);
export const IOMMU_HW_QUEUE_ALLOC = IO(IOMMUFD_TYPE, IOMMUFD_CMD.HW_QUEUE_ALLOC);

/** enum iommufd_ioas_map_flags */
export const IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0;
export const IOMMU_IOAS_MAP_WRITEABLE = 1 << 1;
export const IOMMU_IOAS_MAP_READABLE = 1 << 2;

/** enum iommufd_option and iommufd_option_ops */
export const IOMMU_OPTION_RLIMIT_MODE = 0;
export const IOMMU_OPTION_HUGE_PAGES = 1;
export const IOMMU_OPTION_OP_SET = 0;
export const IOMMU_OPTION_OP_GET = 1;

/** enum iommufd_hwpt_alloc_flags */
export const IOMMU_HWPT_ALLOC_NEST_PARENT = 1 << 0;
export const IOMMU_HWPT_ALLOC_DIRTY_TRACKING = 1 << 1;
export const IOMMU_HWPT_FAULT_ID_VALID = 1 << 2;
export const IOMMU_HWPT_ALLOC_PASID = 1 << 3;

/** enum iommu_hwpt_data_type */
export const IOMMU_HWPT_DATA_NONE = 0;

/** enum iommufd_hwpt_get_dirty_bitmap_flags */
export const IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR = 1;

/** enum iommufd_hwpt_set_dirty_tracking_flags */
export const IOMMU_HWPT_DIRTY_TRACKING_ENABLE = 1;

/** enum iommu_hw_info_type */
export const IOMMU_HW_INFO_TYPE_NONE = 0;
export const IOMMU_HW_INFO_TYPE_INTEL_VTD = 1;
export const IOMMU_HW_INFO_TYPE_ARM_SMMUV3 = 2;
export const IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV = 3;
export const IOMMU_HW_INFO_TYPE_AMD = 4;

/** enum iommufd_hw_info_flags */
export const IOMMU_HW_INFO_FLAG_INPUT_TYPE = 1 << 0;

/** enum iommu_hw_capabilities */
export const IOMMU_HW_CAP_DIRTY_TRACKING = 1 << 0;
export const IOMMU_HW_CAP_PCI_PASID_EXEC = 1 << 1;
export const IOMMU_HW_CAP_PCI_PASID_PRIV = 1 << 2;
export const IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED = 1 << 3;

/** enum iommu_hw_info_vtd_flags */
export const IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17 = 1 << 0;

/** enum iommu_hwpt_pgfault_flags */
export const IOMMU_PGFAULT_FLAGS_PASID_VALID = 1 << 0;
export const IOMMU_PGFAULT_FLAGS_LAST_PAGE = 1 << 1;

/** enum iommu_hwpt_pgfault_perm */
export const IOMMU_PGFAULT_PERM_READ = 1 << 0;
export const IOMMU_PGFAULT_PERM_WRITE = 1 << 1;
export const IOMMU_PGFAULT_PERM_EXEC = 1 << 2;
export const IOMMU_PGFAULT_PERM_PRIV = 1 << 3;

/** enum iommufd_page_response_code */
export const IOMMUFD_PAGE_RESP_SUCCESS = 0;
export const IOMMUFD_PAGE_RESP_INVALID = 1;

export const iommu_destroy = struct(
  [
    ["size", "u32"],
    ["id", "u32"],
  ],
  { cName: "struct iommu_destroy" },
);

export const iommu_ioas_alloc = struct(
  [
    ["size", "u32"],
    ["flags", "u32"],
    ["out_ioas_id", "u32"],
  ],
  {
    cName: "struct iommu_ioas_alloc",
  },
);

export const iommu_iova_range = struct(
  [
    ["start", "u64"],
    ["last", "u64"],
  ],
  { cName: "struct iommu_iova_range" },
);

export const iommu_ioas_iova_ranges = struct(
  [
    ["size", "u32"],
    ["ioas_id", "u32"],
    ["num_iovas", "u32"],
    ["__reserved", "u32"],
    ["allowed_iovas", "u64"],
    ["out_iova_alignment", "u64"],
  ],
  { cName: "struct iommu_ioas_iova_ranges" },
);

export const iommu_ioas_allow_iovas = struct(
  [
    ["size", "u32"],
    ["ioas_id", "u32"],
    ["num_iovas", "u32"],
    ["__reserved", "u32"],
    ["allowed_iovas", "u64"],
  ],
  { cName: "struct iommu_ioas_allow_iovas" },
);

export const iommu_ioas_map = struct(
  [
    ["size", "u32"],
    ["flags", "u32"],
    ["ioas_id", "u32"],
    ["__reserved", "u32"],
    ["user_va", "u64"],
    ["length", "u64"],
    ["iova", "u64"],
  ],
  { cName: "struct iommu_ioas_map" },
);

export const iommu_ioas_map_file = struct(
  [
    ["size", "u32"],
    ["flags", "u32"],
    ["ioas_id", "u32"],
    ["fd", "s32"],
    ["start", "u64"],
    ["length", "u64"],
    ["iova", "u64"],
  ],
  { cName: "struct iommu_ioas_map_file" },
);

export const iommu_ioas_copy = struct(
  [
    ["size", "u32"],
    ["flags", "u32"],
    ["dst_ioas_id", "u32"],
    ["src_ioas_id", "u32"],
    ["length", "u64"],
    ["dst_iova", "u64"],
    ["src_iova", "u64"],
  ],
  { cName: "struct iommu_ioas_copy" },
);

export const iommu_ioas_unmap = struct(
  [
    ["size", "u32"],
    ["ioas_id", "u32"],
    ["iova", "u64"],
    ["length", "u64"],
  ],
  { cName: "struct iommu_ioas_unmap" },
);

export const iommu_option = struct(
  [
    ["size", "u32"],
    ["option_id", "u32"],
    ["op", "u16"],
    ["__reserved", "u16"],
    ["object_id", "u32"],
    ["val64", "u64"],
  ],
  { cName: "struct iommu_option" },
);

export const iommu_vfio_ioas = struct(
  [
    ["size", "u32"],
    ["ioas_id", "u32"],
    ["op", "u16"],
    ["__reserved", "u16"],
  ],
  { cName: "struct iommu_vfio_ioas" },
);

export const iommu_hwpt_alloc = struct(
  [
    ["size", "u32"],
    ["flags", "u32"],
    ["dev_id", "u32"],
    ["pt_id", "u32"],
    ["out_hwpt_id", "u32"],
    ["__reserved", "u32"],
    ["data_type", "u32"],
    ["data_len", "u32"],
    ["data_uptr", "u64"],
    ["fault_id", "u32"],
    ["__reserved2", "u32"],
  ],
  { cName: "struct iommu_hwpt_alloc" },
);

export const iommu_hw_info = struct(
  [
    ["size", "u32"],
    ["flags", "u32"],
    ["dev_id", "u32"],
    ["data_len", "u32"],
    ["data_uptr", "u64"],
    ["out_data_type", "u32"],
    ["out_max_pasid_log2", "u8"],
    ["__reserved", "u8", 3],
    ["out_capabilities", "u64"],
  ],
  { cName: "struct iommu_hw_info" },
);

export const iommu_hwpt_set_dirty_tracking = struct(
  [
    ["size", "u32"],
    ["flags", "u32"],
    ["hwpt_id", "u32"],
    ["__reserved", "u32"],
  ],
  { cName: "struct iommu_hwpt_set_dirty_tracking" },
);

export const iommu_hwpt_get_dirty_bitmap = struct(
  [
    ["size", "u32"],
    ["hwpt_id", "u32"],
    ["flags", "u32"],
    ["__reserved", "u32"],
    ["iova", "u64"],
    ["length", "u64"],
    ["page_size", "u64"],
    ["data", "u64"],
  ],
  { cName: "struct iommu_hwpt_get_dirty_bitmap" },
);

export const iommu_hwpt_invalidate = struct(
  [
    ["size", "u32"],
    ["hwpt_id", "u32"],
    ["data_uptr", "u64"],
    ["data_type", "u32"],
    ["entry_len", "u32"],
    ["entry_num", "u32"],
    ["__reserved", "u32"],
  ],
  { cName: "struct iommu_hwpt_invalidate" },
);

export const iommu_fault_alloc = struct(
  [
    ["size", "u32"],
    ["flags", "u32"],
    ["out_fault_id", "u32"],
    ["out_fault_fd", "u32"],
  ],
  { cName: "struct iommu_fault_alloc" },
);

export const iommu_ioas_change_process = struct(
  [
    ["size", "u32"],
    ["__reserved", "u32"],
  ],
  {
    cName: "struct iommu_ioas_change_process",
  },
);

export const iommu_hw_info_vtd = struct(
  [
    ["flags", "u32"],
    ["__reserved", "u32"],
    ["cap_reg", "u64"],
    ["ecap_reg", "u64"],
  ],
  { cName: "struct iommu_hw_info_vtd" },
);

/** One record read from a fault queue fd. */
export const iommu_hwpt_pgfault = struct(
  [
    ["flags", "u32"],
    ["dev_id", "u32"],
    ["pasid", "u32"],
    ["grpid", "u32"],
    ["perm", "u32"],
    ["__reserved", "u32"],
    ["addr", "u64"],
    ["length", "u32"],
    ["cookie", "u32"],
  ],
  { cName: "struct iommu_hwpt_pgfault" },
);

/** One response written to a fault queue fd. */
export const iommu_hwpt_page_response = struct(
  [
    ["cookie", "u32"],
    ["code", "u32"],
  ],
  {
    cName: "struct iommu_hwpt_page_response",
  },
);

/** Every layout of this header, for the layout test. */
export const IOMMUFD_LAYOUTS = [
  iommu_destroy,
  iommu_ioas_alloc,
  iommu_iova_range,
  iommu_ioas_iova_ranges,
  iommu_ioas_allow_iovas,
  iommu_ioas_map,
  iommu_ioas_map_file,
  iommu_ioas_copy,
  iommu_ioas_unmap,
  iommu_option,
  iommu_vfio_ioas,
  iommu_hwpt_alloc,
  iommu_hw_info,
  iommu_hwpt_set_dirty_tracking,
  iommu_hwpt_get_dirty_bitmap,
  iommu_hwpt_invalidate,
  iommu_fault_alloc,
  iommu_ioas_change_process,
  iommu_hw_info_vtd,
  iommu_hwpt_pgfault,
  iommu_hwpt_page_response,
];

/** Every request number of this header, by its C name, for the layout test. */
export const IOMMUFD_REQUESTS: Record<string, number> = {
  IOMMU_DESTROY,
  IOMMU_IOAS_ALLOC,
  IOMMU_IOAS_ALLOW_IOVAS,
  IOMMU_IOAS_COPY,
  IOMMU_IOAS_IOVA_RANGES,
  IOMMU_IOAS_MAP,
  IOMMU_IOAS_UNMAP,
  IOMMU_OPTION,
  IOMMU_VFIO_IOAS,
  IOMMU_HWPT_ALLOC,
  IOMMU_GET_HW_INFO,
  IOMMU_HWPT_SET_DIRTY_TRACKING,
  IOMMU_HWPT_GET_DIRTY_BITMAP,
  IOMMU_HWPT_INVALIDATE,
  IOMMU_FAULT_QUEUE_ALLOC,
  IOMMU_IOAS_MAP_FILE,
  IOMMU_VIOMMU_ALLOC,
  IOMMU_VDEVICE_ALLOC,
  IOMMU_IOAS_CHANGE_PROCESS,
  IOMMU_VEVENTQ_ALLOC,
  IOMMU_HW_QUEUE_ALLOC,
};

/** Flag and enum constants, by C name, for the layout test. */
export const IOMMUFD_CONSTANTS: Record<string, number> = {
  IOMMU_IOAS_MAP_FIXED_IOVA,
  IOMMU_IOAS_MAP_WRITEABLE,
  IOMMU_IOAS_MAP_READABLE,
  IOMMU_OPTION_RLIMIT_MODE,
  IOMMU_OPTION_HUGE_PAGES,
  IOMMU_OPTION_OP_SET,
  IOMMU_OPTION_OP_GET,
  IOMMU_HWPT_ALLOC_NEST_PARENT,
  IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
  IOMMU_HWPT_FAULT_ID_VALID,
  IOMMU_HWPT_ALLOC_PASID,
  IOMMU_HWPT_DATA_NONE,
  IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
  IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
  IOMMU_HW_INFO_TYPE_NONE,
  IOMMU_HW_INFO_TYPE_INTEL_VTD,
  IOMMU_HW_INFO_TYPE_ARM_SMMUV3,
  IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV,
  IOMMU_HW_INFO_TYPE_AMD,
  IOMMU_HW_INFO_FLAG_INPUT_TYPE,
  IOMMU_HW_CAP_DIRTY_TRACKING,
  IOMMU_HW_CAP_PCI_PASID_EXEC,
  IOMMU_HW_CAP_PCI_PASID_PRIV,
  IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED,
  IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17,
  IOMMU_PGFAULT_FLAGS_PASID_VALID,
  IOMMU_PGFAULT_FLAGS_LAST_PAGE,
  IOMMU_PGFAULT_PERM_READ,
  IOMMU_PGFAULT_PERM_WRITE,
  IOMMU_PGFAULT_PERM_EXEC,
  IOMMU_PGFAULT_PERM_PRIV,
  IOMMUFD_PAGE_RESP_SUCCESS,
  IOMMUFD_PAGE_RESP_INVALID,
};
