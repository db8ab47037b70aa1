/**
 * The kernel's iommufd selftest hooks (CONFIG_IOMMUFD_TEST): a mock IOMMU domain whose page table
 * can be checked against this process's pages, and a test dma-buf exporter. For tests and
 * benchmarks on kernels built with the option; real systems do not have it.
 */
import { DmaBuf } from "./dmabuf.ts";
import { closedError } from "./sys/error.ts";
import { type ErrnoTable, isErrno } from "./sys/ioctl.ts";
import { O_CLOEXEC } from "./sys/libc.ts";
import { IOMMU_TEST_CMD, IOMMU_TEST_OP, iommu_test_cmd } from "./uapi/iommufd-test.ts";
import type { Iommufd } from "./iommufd.ts";
import type { Ioas, Iova } from "./ioas.ts";

export { MOCK_APERTURE_LAST, MOCK_APERTURE_START, MOCK_PAGE_SIZE } from "./uapi/iommufd-test.ts";

const cmd = iommu_test_cmd.create();

const TEST_CMD_ERRORS: ErrnoTable = { ENOTTY: "this kernel was built without CONFIG_IOMMUFD_TEST" };

function testCmd(iommufd: Iommufd, operation: string, values: Parameters<typeof cmd.fill>[0]): number {
  cmd.fill({ size: iommu_test_cmd.size, ...values });
  return iommufd.ioctl(IOMMU_TEST_CMD, cmd, operation, TEST_CMD_ERRORS);
}

/** A mock device attached to an IOAS through a mock IOMMU domain (hw page table). */
export class MockDomain {
  readonly iommufd: Iommufd;
  readonly ioas: Ioas;
  readonly stdevId: number;
  readonly hwptId: number;
  readonly idevId: number;
  #alive = true;

  private constructor(ioas: Ioas, stdevId: number, hwptId: number, idevId: number) {
    this.iommufd = ioas.iommufd;
    this.ioas = ioas;
    this.stdevId = stdevId;
    this.hwptId = hwptId;
    this.idevId = idevId;
  }

  /** IOMMU_TEST_OP_MOCK_DOMAIN: attach a mock device (and domain) to `ioas`. */
  static attach(ioas: Ioas): MockDomain {
    testCmd(ioas.iommufd, "IOMMU_TEST_OP_MOCK_DOMAIN", { op: IOMMU_TEST_OP.MOCK_DOMAIN, id: ioas.id });
    return new MockDomain(ioas, cmd.get("mock_out_stdev_id"), cmd.get("mock_out_hwpt_id"), cmd.get("mock_out_idev_id"));
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
        id: this.hwptId,
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
