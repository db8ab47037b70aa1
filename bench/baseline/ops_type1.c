/*
 * The type1 twin of the map suite's C ops (bench/suites/map.ts, domain edu-type1): VFIO_IOMMU_MAP_DMA
 * + VFIO_IOMMU_UNMAP_DMA on the library side's own VFIO container (fd 3, its IOMMU set by the group
 * the library opened edu through) of the same memfd's pages (fd 4). type1 maps by address only, so
 * this process maps the memfd shared and hands the kernel its own address, as the library does.
 * Structs are encoded once in setup.
 */
#define _GNU_SOURCE
#include <linux/vfio.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include "bench.h"

struct type1_state {
	struct vfio_iommu_type1_dma_map map;
	struct vfio_iommu_type1_dma_unmap unmap;
	void *va;
	size_t length;
};

static struct type1_state t1;

/* fds: VFIO container, memfd. args: length, iova. */
static int map_dma_setup(struct bench_ctx *c)
{
	t1.length = c->arg[0];
	t1.va = mmap(NULL, t1.length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, c->fd[1], 0);
	if (t1.va == MAP_FAILED) {
		t1.va = NULL;
		return bench_fail(c, "mmap of the memfd");
	}
	t1.map = (struct vfio_iommu_type1_dma_map){
		.argsz = sizeof(t1.map), .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
		.vaddr = (uintptr_t)t1.va, .iova = c->arg[1], .size = c->arg[0],
	};
	t1.unmap = (struct vfio_iommu_type1_dma_unmap){ .argsz = sizeof(t1.unmap), .iova = c->arg[1] };
	c->state = &t1;
	return 0;
}

static int map_dma_run(struct bench_ctx *c)
{
	if (ioctl(c->fd[0], VFIO_IOMMU_MAP_DMA, &t1.map)) return -1;
	/* The kernel writes the bytes it unmapped back into size: set it again for every call. */
	t1.unmap.size = t1.length;
	return ioctl(c->fd[0], VFIO_IOMMU_UNMAP_DMA, &t1.unmap);
}

static void map_dma_teardown(struct bench_ctx *c)
{
	(void)c;
	if (t1.va) munmap(t1.va, t1.length);
}

BENCH_OP(map_dma, .setup = map_dma_setup, .run = map_dma_run, .teardown = map_dma_teardown, .nfds = 2, .nargs = 2);
