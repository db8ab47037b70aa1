/*
 * The C baseline of `bun bench`: the very ioctl sequences the library's benchmark cases issue,
 * timed the way mitata times them, so that "library / C" isolates what Bun, bun:ffi and the
 * library add on top of the kernel's own cost.
 *
 *   map_bench [--warmup-pairs N] [--warmup-ms MS] [--warmup-max-ms MS] [--min-ms MS]
 *             OP/DOMAIN/SIZE[:K] ...
 *
 *   OP      mapFile | map | copy | mapFileHuge | rawFfi, prepared (same ioctls as mapFile) | vfioDmabuf
 *   DOMAIN  none | mock (selftest mock domain) | edu (QEMU's edu device behind the emulated
 *           Intel IOMMU, attached with VFIO_DEVICE_ATTACH_IOMMUFD_PT)
 *   SIZE    bytes, or with a KiB/MiB/GiB suffix (4KiB, 2MiB)
 *   K       pairs per timed iteration (default 1), as the library side's mitata benches loop
 *
 * One JSON object per case on stdout. Built by bench/baseline.ts with `cc -O2` against the
 * kernel's UAPI headers and, for the mock domain, drivers/iommu/iommufd/iommufd_test.h.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/iommufd.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifdef HAVE_IOMMUFD_TEST_H
#include "iommufd_test.h"
#endif

#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << 26)
#endif

/* mitata's constants (lib.mjs): the same sampling rules make the two sides comparable. */
#define MITATA_MIN_SAMPLES 12
#define MITATA_WARMUP_SAMPLES 2
#define MITATA_WARMUP_THRESHOLD_NS 500000.0
#define MITATA_BATCH_THRESHOLD_NS 65536.0
#define MITATA_BATCH_SAMPLES 4096
#define MITATA_SAMPLES_THRESHOLD 12
#define MAX_SAMPLES (1 << 20)

/* The same fixed IOVA as the library side: inside the mock domain's aperture (1 << 24 ..). */
#define BENCH_IOVA (1ULL << 24)
#define VFIO_PATH "/dev/vfio/devices/vfio0"

enum op { OP_MAP_FILE, OP_MAP, OP_COPY, OP_MAP_FILE_HUGE, OP_RAW_FFI, OP_VFIO_DMABUF };
enum domain { DOMAIN_NONE, DOMAIN_MOCK, DOMAIN_EDU };

struct bench_case {
	char id[96];
	int k;
	enum op op;
	enum domain domain;
	uint64_t size;
	int iommufd;
	uint32_t ioas, src_ioas;
	int memfd, vfio_fd, dmabuf_fd;
	void *va;
	struct iommu_ioas_map_file map_file;
	struct iommu_ioas_map map;
	struct iommu_ioas_copy copy;
	struct iommu_ioas_unmap unmap;
	char error[256];
};

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int fail(struct bench_case *c, const char *what)
{
	snprintf(c->error, sizeof(c->error), "%s: %s (errno %d)", what, strerror(errno), errno);
	return -1;
}

static int ioas_alloc(struct bench_case *c, uint32_t *id)
{
	struct iommu_ioas_alloc cmd = { .size = sizeof(cmd) };
	if (ioctl(c->iommufd, IOMMU_IOAS_ALLOC, &cmd)) return fail(c, "IOMMU_IOAS_ALLOC");
	*id = cmd.out_ioas_id;
	return 0;
}

static int mock_domain(struct bench_case *c, uint32_t ioas)
{
#ifdef HAVE_IOMMUFD_TEST_H
	struct iommu_test_cmd cmd = { .size = sizeof(cmd), .op = IOMMU_TEST_OP_MOCK_DOMAIN, .id = ioas };
	if (ioctl(c->iommufd, IOMMU_TEST_CMD, &cmd)) return fail(c, "IOMMU_TEST_OP_MOCK_DOMAIN");
	return 0;
#else
	(void)ioas;
	snprintf(c->error, sizeof(c->error), "built without iommufd_test.h: no mock domain");
	return -1;
#endif
}

/* As MemfdBuffer.create: memfd, size, seal against shrinking, map shared, touch every page. */
static int make_memfd(struct bench_case *c, int huge)
{
	unsigned flags = MFD_CLOEXEC | MFD_ALLOW_SEALING | (huge ? MFD_HUGETLB | MFD_HUGE_2MB : 0);
	c->memfd = memfd_create("bun-iommufd-bench", flags);
	if (c->memfd < 0) return fail(c, "memfd_create");
	if (ftruncate(c->memfd, (off_t)c->size)) return fail(c, "ftruncate");
	if (fcntl(c->memfd, F_ADD_SEALS, F_SEAL_SHRINK)) return fail(c, "fcntl(F_ADD_SEALS)");
	c->va = mmap(NULL, c->size, PROT_READ | PROT_WRITE, MAP_SHARED, c->memfd, 0);
	if (c->va == MAP_FAILED) {
		c->va = NULL;
		return fail(c, "mmap");
	}
	memset(c->va, 1, c->size);
	return 0;
}

/* VfioDevice.open + bind: the device is opened once per case, for the domain or the dma-buf. */
static int open_vfio(struct bench_case *c)
{
	if (c->vfio_fd >= 0) return 0;
	c->vfio_fd = open(VFIO_PATH, O_RDWR | O_CLOEXEC);
	if (c->vfio_fd < 0) return fail(c, "open " VFIO_PATH);
	struct vfio_device_bind_iommufd bind = { .argsz = sizeof(bind), .iommufd = c->iommufd };
	if (ioctl(c->vfio_fd, VFIO_DEVICE_BIND_IOMMUFD, &bind)) return fail(c, "VFIO_DEVICE_BIND_IOMMUFD");
	return 0;
}

static int edu_domain(struct bench_case *c, uint32_t ioas)
{
	if (open_vfio(c)) return -1;
	struct vfio_device_attach_iommufd_pt attach = { .argsz = sizeof(attach), .pt_id = ioas };
	if (ioctl(c->vfio_fd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach)) return fail(c, "VFIO_DEVICE_ATTACH_IOMMUFD_PT");
	return 0;
}

/* A dma-buf over the first `size` bytes of BAR0, as VfioDevice.exportDmaBuf makes it. */
static int make_vfio_dmabuf(struct bench_case *c)
{
	if (open_vfio(c)) return -1;
	struct {
		struct vfio_device_feature feature;
		struct vfio_device_feature_dma_buf dma_buf;
		struct vfio_region_dma_range range;
	} req;
	memset(&req, 0, sizeof(req));
	req.feature.argsz = sizeof(req);
	req.feature.flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_BUF;
	req.dma_buf.region_index = VFIO_PCI_BAR0_REGION_INDEX;
	req.dma_buf.open_flags = O_RDWR | O_CLOEXEC;
	req.dma_buf.nr_ranges = 1;
	req.range.offset = 0;
	req.range.length = c->size;
	c->dmabuf_fd = ioctl(c->vfio_fd, VFIO_DEVICE_FEATURE, &req);
	if (c->dmabuf_fd < 0) return fail(c, "VFIO_DEVICE_FEATURE(DMA_BUF)");
	return 0;
}

static int setup(struct bench_case *c)
{
	c->iommufd = open("/dev/iommu", O_RDWR | O_CLOEXEC);
	if (c->iommufd < 0) return fail(c, "open /dev/iommu");
	if (ioas_alloc(c, &c->ioas)) return -1;
	if (c->domain == DOMAIN_MOCK && mock_domain(c, c->ioas)) return -1;
	if (c->domain == DOMAIN_EDU && edu_domain(c, c->ioas)) return -1;

	const uint32_t rw = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE;
	int fd;
	switch (c->op) {
	case OP_VFIO_DMABUF:
		if (make_vfio_dmabuf(c)) return -1;
		fd = c->dmabuf_fd;
		break;
	default:
		if (make_memfd(c, c->op == OP_MAP_FILE_HUGE)) return -1;
		fd = c->memfd;
	}
	c->map_file = (struct iommu_ioas_map_file){
		.size = sizeof(c->map_file), .flags = rw, .ioas_id = c->ioas, .fd = fd,
		.start = 0, .length = c->size, .iova = BENCH_IOVA,
	};
	c->map = (struct iommu_ioas_map){
		.size = sizeof(c->map), .flags = rw, .ioas_id = c->ioas,
		.user_va = (uintptr_t)c->va, .length = c->size, .iova = BENCH_IOVA,
	};
	c->unmap = (struct iommu_ioas_unmap){
		.size = sizeof(c->unmap), .ioas_id = c->ioas, .iova = BENCH_IOVA, .length = c->size,
	};
	if (c->op == OP_COPY) {
		/* The source IOAS holds the buffer (with its own mock domain, so the pages are pinned
		 * once); each pair maps the same pages into the destination and takes them out again.
		 * edu is one device, attachable to one IOAS: the library side has no edu copy case. */
		if (ioas_alloc(c, &c->src_ioas)) return -1;
		if (c->domain == DOMAIN_MOCK && mock_domain(c, c->src_ioas)) return -1;
		struct iommu_ioas_map_file src = c->map_file;
		src.ioas_id = c->src_ioas;
		if (ioctl(c->iommufd, IOMMU_IOAS_MAP_FILE, &src)) return fail(c, "IOMMU_IOAS_MAP_FILE (copy source)");
		c->copy = (struct iommu_ioas_copy){
			.size = sizeof(c->copy), .flags = rw, .dst_ioas_id = c->ioas, .src_ioas_id = c->src_ioas,
			.length = c->size, .dst_iova = BENCH_IOVA, .src_iova = BENCH_IOVA,
		};
	}
	return 0;
}

static void teardown(struct bench_case *c)
{
	if (c->dmabuf_fd >= 0) close(c->dmabuf_fd);
	if (c->vfio_fd >= 0) close(c->vfio_fd);
	if (c->va) munmap(c->va, c->size);
	if (c->memfd >= 0) close(c->memfd);
	/* Closing the iommufd destroys the IOASes, domains and whatever is still mapped. */
	if (c->iommufd >= 0) close(c->iommufd);
}

/* One map+unmap pair. Returns 0, or -1 with errno set. */
static inline int pair(struct bench_case *c)
{
	int rc;
	switch (c->op) {
	case OP_MAP:
		rc = ioctl(c->iommufd, IOMMU_IOAS_MAP, &c->map);
		break;
	case OP_COPY:
		rc = ioctl(c->iommufd, IOMMU_IOAS_COPY, &c->copy);
		break;
	default:
		rc = ioctl(c->iommufd, IOMMU_IOAS_MAP_FILE, &c->map_file);
	}
	if (rc) return -1;
	return ioctl(c->iommufd, IOMMU_IOAS_UNMAP, &c->unmap) ? -1 : 0;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static double samples[MAX_SAMPLES];

/* One timed iteration: k pairs, as the library side's bench function loops them. */
static inline int iteration(struct bench_case *c)
{
	for (int i = 0; i < c->k; i++)
		if (pair(c)) return -1;
	return 0;
}

struct warmup {
	long pairs;
	double ms, max_ms;
};

static void run_case(struct bench_case *c, const struct warmup *w, double min_ms)
{
	if (setup(c)) goto out_error;

	/* The library side's warm-up rule (bench/library.ts warmUp): at least w->pairs pairs and
	 * w->ms, or w->max_ms at most. */
	long warmed = 0;
	double start = now_ns();
	for (;;) {
		double elapsed = (now_ns() - start) / 1e6;
		if ((warmed >= w->pairs && elapsed >= w->ms) || elapsed >= w->max_ms) break;
		if (pair(c)) {
			fail(c, "warm-up pair");
			goto out_error;
		}
		warmed++;
	}

	/* mitata's own warm-up decides between one iteration per sample and batches of 4096. */
	int batch = 0;
	double t0 = now_ns();
	if (iteration(c)) goto out_pair_error;
	double t1 = now_ns();
	if (t1 - t0 <= MITATA_WARMUP_THRESHOLD_NS) {
		for (int i = 0; i < MITATA_WARMUP_SAMPLES; i++) {
			t0 = now_ns();
			if (iteration(c)) goto out_pair_error;
			t1 = now_ns();
			if ((batch = (t1 - t0 <= MITATA_BATCH_THRESHOLD_NS))) break;
		}
	}

	const int per_sample = batch ? MITATA_BATCH_SAMPLES : 1;
	int n = 0;
	double total = 0;
	for (; n < MAX_SAMPLES; n++) {
		if (n >= MITATA_MIN_SAMPLES && total >= min_ms * 1e6) break;
		t0 = now_ns();
		for (int i = 0; i < per_sample; i++)
			if (iteration(c)) goto out_pair_error;
		t1 = now_ns();
		total += t1 - t0;
		/* Per pair, as the library side divides mitata's per-iteration figures by k. */
		samples[n] = (t1 - t0) / per_sample / c->k;
	}

	qsort(samples, (size_t)n, sizeof(double), cmp_double);
	double *s = samples;
	int m = n;
	if (m > MITATA_SAMPLES_THRESHOLD) {
		s += 2;
		m -= 4;
	}
	double sum = 0;
	for (int i = 0; i < m; i++) sum += s[i];
#define AT(q) s[(int)((q) * (m - 1))]
	printf("{\"id\":\"%s\",\"ok\":true,\"warmupPairs\":%ld,\"k\":%d,\"batch\":%d,\"samples\":%d,\"ticks\":%ld,"
	       "\"avg\":%.3f,\"min\":%.3f,\"p25\":%.3f,\"p50\":%.3f,\"p75\":%.3f,\"p99\":%.3f,\"max\":%.3f}\n",
	       c->id, warmed, c->k, per_sample, m, (long)n * per_sample * c->k, sum / m, s[0], AT(0.25), AT(0.5), AT(0.75),
	       AT(0.99), s[m - 1]);
#undef AT
	fflush(stdout);
	teardown(c);
	return;

out_pair_error:
	fail(c, "map/unmap pair");
out_error:
	printf("{\"id\":\"%s\",\"ok\":false,\"error\":\"%s\"}\n", c->id, c->error);
	fflush(stdout);
	teardown(c);
}

static int parse_case(const char *spec, struct bench_case *c)
{
	char op[32], domain[16], size[32];
	int k = 1;
	if (sscanf(spec, "%31[^/]/%15[^/]/%31[^:]:%d", op, domain, size, &k) < 3) return -1;
	memset(c, 0, sizeof(*c));
	snprintf(c->id, sizeof(c->id), "%s/%s/%s", op, domain, size);
	if (k < 1) return -1;
	c->k = k;
	c->iommufd = c->memfd = c->vfio_fd = c->dmabuf_fd = -1;
	if (!strcmp(op, "mapFile")) c->op = OP_MAP_FILE;
	else if (!strcmp(op, "map")) c->op = OP_MAP;
	else if (!strcmp(op, "copy")) c->op = OP_COPY;
	else if (!strcmp(op, "mapFileHuge")) c->op = OP_MAP_FILE_HUGE;
	else if (!strcmp(op, "rawFfi")) c->op = OP_RAW_FFI;
	else if (!strcmp(op, "prepared")) c->op = OP_RAW_FFI; /* the same ioctls as mapFile */
	else if (!strcmp(op, "vfioDmabuf")) c->op = OP_VFIO_DMABUF;
	else return -1;
	if (!strcmp(domain, "none")) c->domain = DOMAIN_NONE;
	else if (!strcmp(domain, "mock")) c->domain = DOMAIN_MOCK;
	else if (!strcmp(domain, "edu")) c->domain = DOMAIN_EDU;
	else return -1;
	char *end;
	c->size = strtoull(size, &end, 10);
	if (!strcmp(end, "KiB")) c->size <<= 10;
	else if (!strcmp(end, "MiB")) c->size <<= 20;
	else if (!strcmp(end, "GiB")) c->size <<= 30;
	else if (*end) return -1;
	return c->size ? 0 : -1;
}

int main(int argc, char **argv)
{
	struct warmup w = { .pairs = 40000, .ms = 2000, .max_ms = 4000 };
	double min_ms = 642; /* mitata's k_min_cpu_time */
	int i = 1;
	for (; i < argc && !strncmp(argv[i], "--", 2); i += 2) {
		if (i + 1 >= argc) break;
		if (!strcmp(argv[i], "--warmup-pairs")) w.pairs = atol(argv[i + 1]);
		else if (!strcmp(argv[i], "--warmup-ms")) w.ms = atof(argv[i + 1]);
		else if (!strcmp(argv[i], "--warmup-max-ms")) w.max_ms = atof(argv[i + 1]);
		else if (!strcmp(argv[i], "--min-ms")) min_ms = atof(argv[i + 1]);
		else {
			fprintf(stderr, "map_bench: unknown option %s\n", argv[i]);
			return 2;
		}
	}
	for (; i < argc; i++) {
		struct bench_case c;
		if (parse_case(argv[i], &c)) {
			fprintf(stderr, "map_bench: bad case %s (want OP/DOMAIN/SIZE)\n", argv[i]);
			return 2;
		}
		run_case(&c, &w, min_ms);
	}
	return 0;
}
