/*
 * C baseline of the dirty-bitmap benchmark: IOMMU_HWPT_GET_DIRTY_BITMAP of 1 GiB of IOVA at
 * 4 KiB granularity on a dirty-tracking hw page table of the selftest mock domain, exactly the
 * ioctl sequence of the library side (bench/dirty.ts): zero the 32 KiB bitmap, one ioctl.
 *
 *   dirty_bench [--warmup N] [--min-ms MS] [--rounds R]
 *
 * Setup as the library side does it: IOAS with huge pages off, a mock device, a 64 MiB memfd
 * mapped 16 times back to back from IOVA 1 << 24 (1 GiB of IOVA over 64 MiB of memory), a
 * dirty-tracking HWPT allocated for the mock device, tracking enabled, every 7th page marked
 * dirty once (IOMMU_TEST_OP_DIRTY). Reads clear as they go, so after the first read the walk
 * finds clean PTEs, as in a steady-state migration pass.
 *
 * Prints one JSON object: per-round medians in ns, and the best of them.
 * Built with cc -O2 against the UAPI headers and iommufd_test.h (bench/dirty.ts builds it).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/iommufd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include "iommufd_test.h"

#define IOVA_BASE (1ULL << 24)
#define CHUNK (64ULL << 20)
#define CHUNKS 16
#define RANGE (CHUNK * CHUNKS)
#define PAGE 4096ULL
#define BITMAP_BYTES (RANGE / PAGE / 8)

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static void die(const char *what)
{
	printf("{\"error\":\"%s: %s (errno %d)\"}\n", what, strerror(errno), errno);
	exit(1);
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	long warmup = 200, rounds = 3;
	double min_ms = 642;
	for (int i = 1; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--warmup")) warmup = atol(argv[i + 1]);
		else if (!strcmp(argv[i], "--min-ms")) min_ms = atof(argv[i + 1]);
		else if (!strcmp(argv[i], "--rounds")) rounds = atol(argv[i + 1]);
	}
	int fd = open("/dev/iommu", O_RDWR | O_CLOEXEC);
	if (fd < 0) die("open /dev/iommu");
	struct iommu_ioas_alloc alloc = { .size = sizeof(alloc) };
	if (ioctl(fd, IOMMU_IOAS_ALLOC, &alloc)) die("IOMMU_IOAS_ALLOC");
	struct iommu_option huge = { .size = sizeof(huge), .option_id = IOMMU_OPTION_HUGE_PAGES,
				     .op = IOMMU_OPTION_OP_SET, .object_id = alloc.out_ioas_id, .val64 = 0 };
	if (ioctl(fd, IOMMU_OPTION, &huge)) die("IOMMU_OPTION(HUGE_PAGES)");
	struct iommu_test_cmd mock = { .size = sizeof(mock), .op = IOMMU_TEST_OP_MOCK_DOMAIN, .id = alloc.out_ioas_id };
	if (ioctl(fd, IOMMU_TEST_CMD, &mock)) die("IOMMU_TEST_OP_MOCK_DOMAIN");
	int memfd = memfd_create("dirty-bench", MFD_CLOEXEC);
	if (memfd < 0 || ftruncate(memfd, CHUNK)) die("memfd");
	for (int i = 0; i < CHUNKS; i++) {
		struct iommu_ioas_map_file map = {
			.size = sizeof(map),
			.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE,
			.ioas_id = alloc.out_ioas_id, .fd = memfd, .start = 0, .length = CHUNK,
			.iova = IOVA_BASE + (uint64_t)i * CHUNK,
		};
		if (ioctl(fd, IOMMU_IOAS_MAP_FILE, &map)) die("IOMMU_IOAS_MAP_FILE");
	}
	struct iommu_hwpt_alloc hwpt = { .size = sizeof(hwpt), .flags = IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
					 .dev_id = mock.mock_domain.out_idev_id, .pt_id = alloc.out_ioas_id,
					 .data_type = IOMMU_HWPT_DATA_NONE };
	if (ioctl(fd, IOMMU_HWPT_ALLOC, &hwpt)) die("IOMMU_HWPT_ALLOC");
	struct iommu_hwpt_set_dirty_tracking track = { .size = sizeof(track), .flags = IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
						       .hwpt_id = hwpt.out_hwpt_id };
	if (ioctl(fd, IOMMU_HWPT_SET_DIRTY_TRACKING, &track)) die("IOMMU_HWPT_SET_DIRTY_TRACKING");
	uint8_t *bitmap = calloc(1, BITMAP_BYTES);
	for (uint64_t page = 0; page < RANGE / PAGE; page += 7) bitmap[page / 8] |= 1 << (page % 8);
	struct iommu_test_cmd dirty = { .size = sizeof(dirty), .op = IOMMU_TEST_OP_DIRTY, .id = hwpt.out_hwpt_id,
					.dirty = { .iova = IOVA_BASE, .length = RANGE, .page_size = PAGE, .uptr = (uintptr_t)bitmap } };
	if (ioctl(fd, IOMMU_TEST_CMD, &dirty)) die("IOMMU_TEST_OP_DIRTY");
	struct iommu_hwpt_get_dirty_bitmap get = { .size = sizeof(get), .hwpt_id = hwpt.out_hwpt_id, .iova = IOVA_BASE,
						   .length = RANGE, .page_size = PAGE, .data = (uintptr_t)bitmap };
	unsigned long first_dirty = 0;
	for (long i = 0; i < warmup; i++) {
		memset(bitmap, 0, BITMAP_BYTES);
		if (ioctl(fd, IOMMU_HWPT_GET_DIRTY_BITMAP, &get)) die("IOMMU_HWPT_GET_DIRTY_BITMAP");
		if (i == 0)
			for (uint64_t b = 0; b < BITMAP_BYTES; b++) first_dirty += __builtin_popcount(bitmap[b]);
	}
	printf("{\"id\":\"dirtyBitmap/mock/1GiB@4KiB\",\"firstReadDirtyPages\":%lu,\"roundMediansNs\":[", first_dirty);
	static double samples[1 << 16];
	double best = 0;
	for (long r = 0; r < rounds; r++) {
		long n = 0;
		double start = now_ns();
		while (n < (long)(sizeof(samples) / sizeof(samples[0])) && (n < 12 || now_ns() - start < min_ms * 1e6)) {
			double t0 = now_ns();
			memset(bitmap, 0, BITMAP_BYTES);
			if (ioctl(fd, IOMMU_HWPT_GET_DIRTY_BITMAP, &get)) die("IOMMU_HWPT_GET_DIRTY_BITMAP");
			samples[n++] = now_ns() - t0;
		}
		qsort(samples, n, sizeof(double), cmp);
		double median = samples[n / 2];
		if (r == 0 || median < best) best = median;
		printf("%s%.0f", r ? "," : "", median);
	}
	printf("],\"bestMedianNs\":%.0f}\n", best);
	return 0;
}
