/*
 * C side of the vmm suite (bench/suites/vmm.ts): IOMMU_HWPT_GET_DIRTY_BITMAP on the library
 * side's own dirty-tracking hw page table, through its iommufd (fd 3). One operation is what
 * HwPageTable.readDirty() does: zero the bitmap, one ioctl (which reads and clears the bits).
 *
 * args: hwpt id, first IOVA, length, page size.
 */
#include <errno.h>
#include <linux/iommufd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "bench.h"

static struct iommu_hwpt_get_dirty_bitmap dirty_cmd;
static void *dirty_bits;
static size_t dirty_bytes;

static int dirty_bitmap_setup(struct bench_ctx *c)
{
	uint64_t pages = c->arg[2] / c->arg[3];
	dirty_bytes = (size_t)((pages + 63) / 64 * 8);
	dirty_bits = calloc(1, dirty_bytes);
	if (!dirty_bits) return bench_fail(c, "calloc");
	dirty_cmd = (struct iommu_hwpt_get_dirty_bitmap){
		.size = sizeof(dirty_cmd),
		.hwpt_id = (uint32_t)c->arg[0],
		.iova = c->arg[1],
		.length = c->arg[2],
		.page_size = c->arg[3],
		.data = (uintptr_t)dirty_bits,
	};
	/* One untimed read proves the op works on these objects. */
	if (ioctl(c->fd[0], IOMMU_HWPT_GET_DIRTY_BITMAP, &dirty_cmd)) return bench_fail(c, "IOMMU_HWPT_GET_DIRTY_BITMAP");
	return 0;
}

static int dirty_bitmap_run(struct bench_ctx *c)
{
	memset(dirty_bits, 0, dirty_bytes);
	return ioctl(c->fd[0], IOMMU_HWPT_GET_DIRTY_BITMAP, &dirty_cmd) ? -1 : 0;
}

static void dirty_bitmap_teardown(struct bench_ctx *c)
{
	(void)c;
	free(dirty_bits);
}

BENCH_OP(dirty_bitmap, .setup = dirty_bitmap_setup, .run = dirty_bitmap_run, .teardown = dirty_bitmap_teardown, .nfds = 1,
	 .nargs = 4);
