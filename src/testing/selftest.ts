/**
 * The kernel's iommufd selftest hooks (CONFIG_IOMMUFD_TEST): a mock IOMMU domain whose page table
 * can be checked against this process's pages, and a test dma-buf exporter. For tests and
 * benchmarks on kernels built with the option; real systems do not have it.
 */
import { DmaBuf } from "../memory/dmabuf.ts";
import { argumentError, closedError } from "../sys/error.ts";
import type { ErrnoTable } from "../sys/errno-table.ts";
import { isErrno } from "../sys/ioctl.ts";
import { O_CLOEXEC } from "../sys/libc.ts";
import { IOMMU_TEST_CMD, IOMMU_TEST_OP, iommu_test_cmd, MOCK_FLAGS_DEVICE_NO_DIRTY } from "../uapi/iommufd-test.ts";
import type { DirtyBitmap, HwPageTable } from "../vmm/hwpt.ts";
import type { Iommufd } from "../iommufd/iommufd.ts";
import type { Ioas, Iova } from "../iommufd/ioas.ts";

export { MOCK_APERTURE_LAST, MOCK_APERTURE_START, MOCK_HUGE_PAGE_SIZE, MOCK_PAGE_SIZE } from "../uapi/iommufd-test.ts";

const cmd = iommu_test_cmd.create();

const TEST_CMD_ERRORS: ErrnoTable = { ENOTTY: "this kernel was built without CONFIG_IOMMUFD_TEST" };

function testCmd(iommufd: Iommufd, operation: string, values: Parameters<typeof cmd.fill>[0]): number {
  cmd.fill({ size: iommu_test_cmd.size, ...values });
  return iommufd.ioctl(IOMMU_TEST_CMD, cmd, operation, TEST_CMD_ERRORS);
}

/** A mock device attached to an IOAS through a mock IOMMU domain (hw page table). */
export interface MockDeviceOptions {
  /** The mock device's IOMMU cannot track dirty pages (MOCK_FLAGS_DEVICE_NO_DIRTY). */
  noDirtyTracking?: boolean;
}

export class MockDomain {
  readonly iommufd: Iommufd;
  readonly ioas: Ioas;
  readonly stdevId: number;
  #hwptId: number;
  readonly idevId: number;
  #alive = true;

  private constructor(ioas: Ioas, stdevId: number, hwptId: number, idevId: number) {
    this.iommufd = ioas.iommufd;
    this.ioas = ioas;
    this.stdevId = stdevId;
    this.#hwptId = hwptId;
    this.idevId = idevId;
  }

  /** The hw page table the mock device is attached to now. */
  get hwptId(): number {
    return this.#hwptId;
  }

  /** The mock device's iommufd device id (for HwPageTable.allocate and readHwInfo). */
  get deviceId(): number {
    return this.idevId;
  }

  /**
   * IOMMU_TEST_OP_MOCK_DOMAIN: a mock device attached to `target`: an IOAS (the kernel makes a
   * mock domain) or an existing hw page table.
   */
  static attach(target: Ioas | HwPageTable, options: MockDeviceOptions = {}): MockDomain {
    const ioas = "ioas" in target ? target.ioas : target;
    const flags = options.noDirtyTracking ? MOCK_FLAGS_DEVICE_NO_DIRTY : 0;
    const name = flags ? "IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS" : "IOMMU_TEST_OP_MOCK_DOMAIN";
    testCmd(ioas.iommufd, name, {
      op: flags ? IOMMU_TEST_OP.MOCK_DOMAIN_FLAGS : IOMMU_TEST_OP.MOCK_DOMAIN,
      id: target.id,
      mock_dev_flags: flags,
    });
    return new MockDomain(ioas, cmd.get("mock_out_stdev_id"), cmd.get("mock_out_hwpt_id"), cmd.get("mock_out_idev_id"));
  }

  /**
   * IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE: move the mock device to another IOAS or hw page table in
   * one step (iommufd_device_replace). Returns the hw page table id now in use.
   */
  replace(target: Ioas | HwPageTable): number {
    if (!this.#alive) throw closedError("MockDomain.replace", "the mock domain");
    testCmd(this.iommufd, "IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE", {
      op: IOMMU_TEST_OP.MOCK_DOMAIN_REPLACE,
      id: this.stdevId,
      replace_pt_id: target.id,
    });
    this.#hwptId = cmd.get("replace_pt_id");
    return this.#hwptId;
  }

  /** IOMMU_TEST_OP_TRIGGER_IOPF: the mock device reports an I/O page fault at `address`. */
  triggerPageFault(fault: {
    address: number | bigint;
    pasid?: number;
    groupId?: number;
    read?: boolean;
    write?: boolean;
  }): void {
    if (!this.#alive) throw closedError("MockDomain.triggerPageFault", "the mock domain");
    testCmd(this.iommufd, "IOMMU_TEST_OP_TRIGGER_IOPF", {
      op: IOMMU_TEST_OP.TRIGGER_IOPF,
      iopf_dev_id: this.idevId,
      iopf_pasid: fault.pasid ?? 0,
      iopf_grpid: fault.groupId ?? 0,
      iopf_perm: (fault.read === false ? 0 : 1) | (fault.write ? 2 : 0),
      iopf_addr: fault.address,
    });
  }

  /**
   * IOMMU_TEST_OP_MD_CHECK_MAP: true when the domain maps `iova..+length` onto the very pages
   * behind `address..+length` in this process. Both must be aligned to the mock page size.
   */
  checkMap(iova: Iova, length: number, address: number): boolean {
    if (!this.#alive) throw closedError("MockDomain.checkMap", "the mock domain");
    try {
      testCmd(this.iommufd, "IOMMU_TEST_OP_MD_CHECK_MAP", {
        op: IOMMU_TEST_OP.MD_CHECK_MAP,
        id: this.#hwptId,
        start: iova,
        length,
        uptr: address,
      });
      return true;
    } catch (error) {
      if (isErrno(error, "EINVAL")) return false;
      throw error;
    }
  }

  /** Destroy the mock device, detaching its domain from the IOAS. */
  destroy(): void {
    if (!this.#alive) return;
    this.#alive = false;
    if (!this.iommufd.closed) this.iommufd.destroyObject(this.stdevId, "MockDomain.destroy");
  }

  [Symbol.dispose](): void {
    this.destroy();
  }
}

/** IOMMU_TEST_OP_DMABUF_GET: a dma-buf from the selftest exporter (at most 2 MiB). */
export function selftestDmaBuf(iommufd: Iommufd, length: number): DmaBuf {
  const fd = testCmd(iommufd, "IOMMU_TEST_OP_DMABUF_GET", {
    op: IOMMU_TEST_OP.DMABUF_GET,
    dmabuf_length: length,
    dmabuf_open_flags: O_CLOEXEC,
  });
  return new DmaBuf(fd, { origin: "selftest", description: `selftest dma-buf (${length} bytes)` });
}

/** IOMMU_TEST_OP_DMABUF_REVOKE: revoke (or restore) a selftest dma-buf. */
export function revokeSelftestDmaBuf(iommufd: Iommufd, dmabuf: DmaBuf, revoked = true): void {
  testCmd(iommufd, "IOMMU_TEST_OP_DMABUF_REVOKE", {
    op: IOMMU_TEST_OP.DMABUF_REVOKE,
    dmabuf_fd: dmabuf.fd,
    dmabuf_revoked: revoked ? 1 : 0,
  });
}

/**
 * IOMMU_TEST_OP_DIRTY: mark pages of a mock hw page table dirty, as if a device had written them.
 * `marks` uses the layout of `bitmap` (iova, length, page size); every set bit marks its page.
 * Returns how many pages the kernel marked.
 */
export function markMockDirty(hwpt: HwPageTable | number, iommufd: Iommufd, marks: DirtyBitmap): number {
  const op = "IOMMU_TEST_OP_DIRTY";
  const id = typeof hwpt === "number" ? hwpt : hwpt.id;
  if (!Number.isInteger(id) || id <= 0) throw argumentError(op, "hwpt", `${id} is not an object id`);
  testCmd(iommufd, op, {
    op: IOMMU_TEST_OP.DIRTY,
    id,
    dirty_iova: marks.iova,
    dirty_length: marks.length,
    dirty_page_size: marks.pageSize,
    dirty_uptr: marks.address,
  });
  return cmd.get("dirty_out_nr_dirty");
}
