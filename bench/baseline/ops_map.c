/*
 * The map suite's C ops: the ioctls of bench/suites/map.ts, on the library side's iommufd, IOAS
 * and file (fds 3 and 4). Structs are encoded once in setup, as the library's prepared path does.
 */
#define _GNU_SOURCE
#include <linux/iommufd.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include "bench.h"

#define RW (IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE)

struct map_state {
	struct iommu_ioas_map_file map_file;
	struct iommu_ioas_map map;
	struct iommu_ioas_copy copy;
	struct iommu_ioas_unmap unmap;
	void *va;
	size_t length;
};

static struct map_state st;

/* Arguments of every map op: ioas id, length, iova (and the copy's source IOAS). */
static void encode_unmap(struct bench_ctx *c)
{
	st.length = c->arg[1];
	st.unmap = (struct iommu_ioas_unmap){
		.size = sizeof(st.unmap), .ioas_id = (uint32_t)c->arg[0], .iova = c->arg[2], .length = c->arg[1],
	};
	c->state = &st;
}

static int unmap(struct bench_ctx *c)
{
	return ioctl(c->fd[0], IOMMU_IOAS_UNMAP, &st.unmap);
}

/* fds: iommufd, file (memfd or dma-buf). args: ioas, length, iova. */
static int map_file_setup(struct bench_ctx *c)
{
	encode_unmap(c);
	st.map_file = (struct iommu_ioas_map_file){
		.size = sizeof(st.map_file), .flags = RW, .ioas_id = (uint32_t)c->arg[0], .fd = c->fd[1],
		.start = 0, .length = c->arg[1], .iova = c->arg[2],
	};
	return 0;
}

static int map_file_run(struct bench_ctx *c)
{
	if (ioctl(c->fd[0], IOMMU_IOAS_MAP_FILE, &st.map_file)) return -1;
	return unmap(c);
}

BENCH_OP(map_file, .setup = map_file_setup, .run = map_file_run, .nfds = 2, .nargs = 3);

/* fds: iommufd, memfd (mapped here, shared: the same pages by this process's address). */
static int map_va_setup(struct bench_ctx *c)
{
	encode_unmap(c);
	st.va = mmap(NULL, st.length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, c->fd[1], 0);
	if (st.va == MAP_FAILED) {
		st.va = NULL;
		return bench_fail(c, "mmap of the memfd");
	}
	st.map = (struct iommu_ioas_map){
		.size = sizeof(st.map), .flags = RW, .ioas_id = (uint32_t)c->arg[0],
		.user_va = (uintptr_t)st.va, .length = c->arg[1], .iova = c->arg[2],
	};
	return 0;
}

static int map_va_run(struct bench_ctx *c)
{
	if (ioctl(c->fd[0], IOMMU_IOAS_MAP, &st.map)) return -1;
	return unmap(c);
}

static void map_va_teardown(struct bench_ctx *c)
{
	(void)c;
	if (st.va) munmap(st.va, st.length);
}

BENCH_OP(map_va, .setup = map_va_setup, .run = map_va_run, .teardown = map_va_teardown, .nfds = 2, .nargs = 3);

/* fds: iommufd. args: destination ioas, length, iova, source ioas (holding the pages at iova). */
static int copy_setup(struct bench_ctx *c)
{
	encode_unmap(c);
	st.copy = (struct iommu_ioas_copy){
		.size = sizeof(st.copy), .flags = RW, .dst_ioas_id = (uint32_t)c->arg[0], .src_ioas_id = (uint32_t)c->arg[3],
		.length = c->arg[1], .dst_iova = c->arg[2], .src_iova = c->arg[2],
	};
	return 0;
}

static int copy_run(struct bench_ctx *c)
{
	if (ioctl(c->fd[0], IOMMU_IOAS_COPY, &st.copy)) return -1;
	return unmap(c);
}

BENCH_OP(copy, .setup = copy_setup, .run = copy_run, .nfds = 1, .nargs = 4);
