/**
 * linux/vfio.h (kernel 7.2): the device ioctls both ways of opening a device share, the cdev
 * (iommufd) binding, and the legacy container/group API with the type1 IOMMU at the end.
 * Data only; checked against the real header by test/unit/layout.test.ts.
 */
import { IO, struct } from "./codec.ts";

export const VFIO_TYPE = ";";
export const VFIO_BASE = 100;

export const VFIO_DEVICE_GET_INFO = IO(VFIO_TYPE, VFIO_BASE + 7);
export const VFIO_DEVICE_GET_REGION_INFO = IO(VFIO_TYPE, VFIO_BASE + 8);
export const VFIO_DEVICE_GET_IRQ_INFO = IO(VFIO_TYPE, VFIO_BASE + 9);
export const VFIO_DEVICE_SET_IRQS = IO(VFIO_TYPE, VFIO_BASE + 10);
export const VFIO_DEVICE_RESET = IO(VFIO_TYPE, VFIO_BASE + 11);
export const VFIO_DEVICE_FEATURE = IO(VFIO_TYPE, VFIO_BASE + 17);
export const VFIO_DEVICE_BIND_IOMMUFD = IO(VFIO_TYPE, VFIO_BASE + 18);
export const VFIO_DEVICE_ATTACH_IOMMUFD_PT = IO(VFIO_TYPE, VFIO_BASE + 19);
export const VFIO_DEVICE_DETACH_IOMMUFD_PT = IO(VFIO_TYPE, VFIO_BASE + 20);

export const VFIO_DEVICE_FLAGS_RESET = 1 << 0;
export const VFIO_DEVICE_FLAGS_PCI = 1 << 1;
export const VFIO_DEVICE_FLAGS_CAPS = 1 << 7;

export const VFIO_REGION_INFO_FLAG_READ = 1 << 0;
export const VFIO_REGION_INFO_FLAG_WRITE = 1 << 1;
export const VFIO_REGION_INFO_FLAG_MMAP = 1 << 2;
export const VFIO_REGION_INFO_FLAG_CAPS = 1 << 3;

/** enum in vfio.h: PCI region indexes. */
export const VFIO_PCI_BAR0_REGION_INDEX = 0;
export const VFIO_PCI_BAR5_REGION_INDEX = 5;
export const VFIO_PCI_ROM_REGION_INDEX = 6;
export const VFIO_PCI_CONFIG_REGION_INDEX = 7;
export const VFIO_PCI_VGA_REGION_INDEX = 8;

export const VFIO_DEVICE_FEATURE_MASK = 0xffff;
export const VFIO_DEVICE_FEATURE_GET = 1 << 16;
export const VFIO_DEVICE_FEATURE_SET = 1 << 17;
export const VFIO_DEVICE_FEATURE_PROBE = 1 << 18;
export const VFIO_DEVICE_FEATURE_BUS_MASTER = 10;
export const VFIO_DEVICE_FEATURE_DMA_BUF = 11;
export const VFIO_DEVICE_FEATURE_CLEAR_MASTER = 0;
export const VFIO_DEVICE_FEATURE_SET_MASTER = 1;

export const VFIO_DEVICE_BIND_FLAG_TOKEN = 1 << 0;
export const VFIO_DEVICE_ATTACH_PASID = 1 << 0;

export const vfio_device_info = struct(
  [
    ["argsz", "u32"],
    ["flags", "u32"],
    ["num_regions", "u32"],
    ["num_irqs", "u32"],
    ["cap_offset", "u32"],
    ["pad", "u32"],
  ],
  { cName: "struct vfio_device_info" },
);

export const vfio_region_info = struct(
  [
    ["argsz", "u32"],
    ["flags", "u32"],
    ["index", "u32"],
    ["cap_offset", "u32"],
    ["size", "u64"],
    ["offset", "u64"],
  ],
  { cName: "struct vfio_region_info" },
);

/** Header of every capability in a vfio info chain. */
export const vfio_info_cap_header = struct(
  [
    ["id", "u16"],
    ["version", "u16"],
    ["next", "u32"],
  ],
  { cName: "struct vfio_info_cap_header" },
);

/** The feature header; its payload (`data[]`) follows at `size`. */
export const vfio_device_feature = struct(
  [
    ["argsz", "u32"],
    ["flags", "u32"],
  ],
  {
    cName: "struct vfio_device_feature",
  },
);

export const vfio_device_feature_bus_master = struct([["op", "u32"]], {
  cName: "struct vfio_device_feature_bus_master",
});

export const vfio_region_dma_range = struct(
  [
    ["offset", "u64"],
    ["length", "u64"],
  ],
  {
    cName: "struct vfio_region_dma_range",
  },
);

/** Followed by `nr_ranges` vfio_region_dma_range entries. */
export const vfio_device_feature_dma_buf = struct(
  [
    ["region_index", "u32"],
    ["open_flags", "u32"],
    ["flags", "u32"],
    ["nr_ranges", "u32"],
  ],
  { cName: "struct vfio_device_feature_dma_buf" },
);

export const vfio_device_bind_iommufd = struct(
  [
    ["argsz", "u32"],
    ["flags", "u32"],
    ["iommufd", "s32"],
    ["out_devid", "u32"],
    ["token_uuid_ptr", "u64"],
  ],
  { cName: "struct vfio_device_bind_iommufd" },
);

export const vfio_device_attach_iommufd_pt = struct(
  [
    ["argsz", "u32"],
    ["flags", "u32"],
    ["pt_id", "u32"],
    ["pasid", "u32"],
  ],
  { cName: "struct vfio_device_attach_iommufd_pt" },
);

export const vfio_device_detach_iommufd_pt = struct(
  [
    ["argsz", "u32"],
    ["flags", "u32"],
    ["pasid", "u32"],
  ],
  { cName: "struct vfio_device_detach_iommufd_pt" },
);

/** VFIO_DEVICE_GET_IRQ_INFO. */
export const vfio_irq_info = struct(
  [
    ["argsz", "u32"],
    ["flags", "u32"],
    ["index", "u32"],
    ["count", "u32"],
  ],
  { cName: "struct vfio_irq_info" },
);

export const VFIO_IRQ_INFO_EVENTFD = 1 << 0;
export const VFIO_IRQ_INFO_MASKABLE = 1 << 1;
export const VFIO_IRQ_INFO_AUTOMASKED = 1 << 2;
export const VFIO_IRQ_INFO_NORESIZE = 1 << 3;

/** VFIO_DEVICE_SET_IRQS; followed by `count` entries of data (s32 eventfds for DATA_EVENTFD). */
export const vfio_irq_set = struct(
  [
    ["argsz", "u32"],
    ["flags", "u32"],
    ["index", "u32"],
    ["start", "u32"],
    ["count", "u32"],
  ],
  { cName: "struct vfio_irq_set" },
);

export const VFIO_IRQ_SET_DATA_NONE = 1 << 0;
export const VFIO_IRQ_SET_DATA_BOOL = 1 << 1;
export const VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2;
export const VFIO_IRQ_SET_ACTION_MASK = 1 << 3;
export const VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4;
export const VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5;

/** enum in vfio.h: PCI interrupt indexes. */
export const VFIO_PCI_INTX_IRQ_INDEX = 0;
export const VFIO_PCI_MSI_IRQ_INDEX = 1;
export const VFIO_PCI_MSIX_IRQ_INDEX = 2;
export const VFIO_PCI_ERR_IRQ_INDEX = 3;
export const VFIO_PCI_REQ_IRQ_INDEX = 4;
export const VFIO_PCI_NUM_IRQS = 5;

export const VFIO_LAYOUTS = [
  vfio_device_info,
  vfio_region_info,
  vfio_info_cap_header,
  vfio_device_feature,
  vfio_device_feature_bus_master,
  vfio_region_dma_range,
  vfio_device_feature_dma_buf,
  vfio_device_bind_iommufd,
  vfio_device_attach_iommufd_pt,
  vfio_device_detach_iommufd_pt,
  vfio_irq_info,
  vfio_irq_set,
];

export const VFIO_REQUESTS: Record<string, number> = {
  VFIO_DEVICE_GET_INFO,
  VFIO_DEVICE_GET_REGION_INFO,
  VFIO_DEVICE_GET_IRQ_INFO,
  VFIO_DEVICE_SET_IRQS,
  VFIO_DEVICE_RESET,
  VFIO_DEVICE_FEATURE,
  VFIO_DEVICE_BIND_IOMMUFD,
  VFIO_DEVICE_ATTACH_IOMMUFD_PT,
  VFIO_DEVICE_DETACH_IOMMUFD_PT,
};

export const VFIO_CONSTANTS: Record<string, number> = {
  VFIO_DEVICE_FLAGS_RESET,
  VFIO_DEVICE_FLAGS_PCI,
  VFIO_DEVICE_FLAGS_CAPS,
  VFIO_REGION_INFO_FLAG_READ,
  VFIO_REGION_INFO_FLAG_WRITE,
  VFIO_REGION_INFO_FLAG_MMAP,
  VFIO_REGION_INFO_FLAG_CAPS,
  VFIO_PCI_BAR0_REGION_INDEX,
  VFIO_PCI_BAR5_REGION_INDEX,
  VFIO_PCI_ROM_REGION_INDEX,
  VFIO_PCI_CONFIG_REGION_INDEX,
  VFIO_PCI_VGA_REGION_INDEX,
  VFIO_DEVICE_FEATURE_MASK,
  VFIO_DEVICE_FEATURE_GET,
  VFIO_DEVICE_FEATURE_SET,
  VFIO_DEVICE_FEATURE_PROBE,
  VFIO_DEVICE_FEATURE_BUS_MASTER,
  VFIO_DEVICE_FEATURE_DMA_BUF,
  VFIO_DEVICE_FEATURE_CLEAR_MASTER,
  VFIO_DEVICE_FEATURE_SET_MASTER,
  VFIO_DEVICE_BIND_FLAG_TOKEN,
  VFIO_DEVICE_ATTACH_PASID,
  VFIO_IRQ_INFO_EVENTFD,
  VFIO_IRQ_INFO_MASKABLE,
  VFIO_IRQ_INFO_AUTOMASKED,
  VFIO_IRQ_INFO_NORESIZE,
  VFIO_IRQ_SET_DATA_NONE,
  VFIO_IRQ_SET_DATA_BOOL,
  VFIO_IRQ_SET_DATA_EVENTFD,
  VFIO_IRQ_SET_ACTION_MASK,
  VFIO_IRQ_SET_ACTION_UNMASK,
  VFIO_IRQ_SET_ACTION_TRIGGER,
  VFIO_PCI_INTX_IRQ_INDEX,
  VFIO_PCI_MSI_IRQ_INDEX,
  VFIO_PCI_MSIX_IRQ_INDEX,
  VFIO_PCI_ERR_IRQ_INDEX,
  VFIO_PCI_REQ_IRQ_INDEX,
  VFIO_PCI_NUM_IRQS,
};

// The legacy API: a container (/dev/vfio/vfio) holds groups (/dev/vfio/<group>) and one IOMMU
// model, here type1v2; devices come from their group once the container has its IOMMU.

export const VFIO_API_VERSION = 0;
export const VFIO_TYPE1_IOMMU = 1;
export const VFIO_TYPE1v2_IOMMU = 3;
/** Extension: VFIO_DMA_UNMAP_FLAG_ALL is understood. */
export const VFIO_UNMAP_ALL = 9;

export const VFIO_GET_API_VERSION = IO(VFIO_TYPE, VFIO_BASE + 0);
export const VFIO_CHECK_EXTENSION = IO(VFIO_TYPE, VFIO_BASE + 1);
export const VFIO_SET_IOMMU = IO(VFIO_TYPE, VFIO_BASE + 2);
export const VFIO_GROUP_GET_STATUS = IO(VFIO_TYPE, VFIO_BASE + 3);
export const VFIO_GROUP_SET_CONTAINER = IO(VFIO_TYPE, VFIO_BASE + 4);
export const VFIO_GROUP_UNSET_CONTAINER = IO(VFIO_TYPE, VFIO_BASE + 5);
export const VFIO_GROUP_GET_DEVICE_FD = IO(VFIO_TYPE, VFIO_BASE + 6);
export const VFIO_IOMMU_GET_INFO = IO(VFIO_TYPE, VFIO_BASE + 12);
export const VFIO_IOMMU_MAP_DMA = IO(VFIO_TYPE, VFIO_BASE + 13);
export const VFIO_IOMMU_UNMAP_DMA = IO(VFIO_TYPE, VFIO_BASE + 14);

export const VFIO_GROUP_FLAGS_VIABLE = 1 << 0;
export const VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1;

export const VFIO_IOMMU_INFO_PGSIZES = 1 << 0;
export const VFIO_IOMMU_INFO_CAPS = 1 << 1;
export const VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1;
export const VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3;

export const VFIO_DMA_MAP_FLAG_READ = 1 << 0;
export const VFIO_DMA_MAP_FLAG_WRITE = 1 << 1;
export const VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1;

export const vfio_group_status = struct(
  [
    ["argsz", "u32"],
    ["flags", "u32"],
  ],
  { cName: "struct vfio_group_status" },
);

/** Followed by the capability chain when `flags` has VFIO_IOMMU_INFO_CAPS and argsz left room. */
export const vfio_iommu_type1_info = struct(
  [
    ["argsz", "u32"],
    ["flags", "u32"],
    ["iova_pgsizes", "u64"],
    ["cap_offset", "u32"],
    ["pad", "u32"],
  ],
  { cName: "struct vfio_iommu_type1_info" },
);

/** Followed by `nr_iovas` vfio_iova_range entries. */
export const vfio_iommu_type1_info_cap_iova_range = struct(
  [
    ["header_id", "u16"],
    ["header_version", "u16"],
    ["header_next", "u32"],
    ["nr_iovas", "u32"],
    ["reserved", "u32"],
  ],
  {
    cName: "struct vfio_iommu_type1_info_cap_iova_range",
    cPath: { header_id: "header.id", header_version: "header.version", header_next: "header.next" },
  },
);

/** One usable IOVA range; `end` is inclusive. */
export const vfio_iova_range = struct(
  [
    ["start", "u64"],
    ["end", "u64"],
  ],
  { cName: "struct vfio_iova_range" },
);

export const vfio_iommu_type1_info_dma_avail = struct(
  [
    ["header_id", "u16"],
    ["header_version", "u16"],
    ["header_next", "u32"],
    ["avail", "u32"],
  ],
  {
    cName: "struct vfio_iommu_type1_info_dma_avail",
    cPath: { header_id: "header.id", header_version: "header.version", header_next: "header.next" },
  },
);

export const vfio_iommu_type1_dma_map = struct(
  [
    ["argsz", "u32"],
    ["flags", "u32"],
    ["vaddr", "u64"],
    ["iova", "u64"],
    ["size", "u64"],
  ],
  { cName: "struct vfio_iommu_type1_dma_map" },
);

export const vfio_iommu_type1_dma_unmap = struct(
  [
    ["argsz", "u32"],
    ["flags", "u32"],
    ["iova", "u64"],
    ["size", "u64"],
  ],
  { cName: "struct vfio_iommu_type1_dma_unmap" },
);

export const VFIO_TYPE1_LAYOUTS = [
  vfio_group_status,
  vfio_iommu_type1_info,
  vfio_iommu_type1_info_cap_iova_range,
  vfio_iova_range,
  vfio_iommu_type1_info_dma_avail,
  vfio_iommu_type1_dma_map,
  vfio_iommu_type1_dma_unmap,
];

export const VFIO_TYPE1_REQUESTS: Record<string, number> = {
  VFIO_GET_API_VERSION,
  VFIO_CHECK_EXTENSION,
  VFIO_SET_IOMMU,
  VFIO_GROUP_GET_STATUS,
  VFIO_GROUP_SET_CONTAINER,
  VFIO_GROUP_UNSET_CONTAINER,
  VFIO_GROUP_GET_DEVICE_FD,
  VFIO_IOMMU_GET_INFO,
  VFIO_IOMMU_MAP_DMA,
  VFIO_IOMMU_UNMAP_DMA,
};

export const VFIO_TYPE1_CONSTANTS: Record<string, number> = {
  VFIO_API_VERSION,
  VFIO_TYPE1_IOMMU,
  VFIO_TYPE1v2_IOMMU,
  VFIO_UNMAP_ALL,
  VFIO_GROUP_FLAGS_VIABLE,
  VFIO_GROUP_FLAGS_CONTAINER_SET,
  VFIO_IOMMU_INFO_PGSIZES,
  VFIO_IOMMU_INFO_CAPS,
  VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
  VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL,
  VFIO_DMA_MAP_FLAG_READ,
  VFIO_DMA_MAP_FLAG_WRITE,
  VFIO_DMA_UNMAP_FLAG_ALL,
};
