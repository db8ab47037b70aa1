/*
 * The C baseline of the interrupt benchmark (bench/irq.ts): QEMU's edu raises an MSI through its
 * raise register (BAR0 0x60); the kernel signals the vector's eventfd; this program blocks in
 * read(2) on it, then acknowledges on the device (0x64). The library side does the same with
 * `await vector.wait()` or `vector.poll()` on the same vector of the same device.
 *
 *   irq_bench CDEV WARMUP ITERATIONS BURST
 *
 * Prints one JSON object: per-interrupt round trip (raise -> read returns) in ns (mean, min,
 * median, p99) and the burst rate (BURST raises back to back, read until all are counted).
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
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define EDU_IRQ_RAISE 0x60
#define EDU_IRQ_ACK 0x64
#define PCI_COMMAND 0x04
#define PCI_COMMAND_MASTER 0x4

static void die(const char *what)
{
	fprintf(stderr, "irq_bench: %s: %s\n", what, strerror(errno));
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int compare(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static void region(int device, unsigned int index, struct vfio_region_info *info)
{
	memset(info, 0, sizeof(*info));
	info->argsz = sizeof(*info);
	info->index = index;
	if (ioctl(device, VFIO_DEVICE_GET_REGION_INFO, info))
		die("VFIO_DEVICE_GET_REGION_INFO");
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: irq_bench CDEV WARMUP ITERATIONS BURST\n");
		return 2;
	}
	const char *cdev = argv[1];
	long warmup = atol(argv[2]), iterations = atol(argv[3]), burst = atol(argv[4]);

	int iommufd = open("/dev/iommu", O_RDWR | O_CLOEXEC);
	if (iommufd < 0)
		die("open /dev/iommu");
	int device = open(cdev, O_RDWR | O_CLOEXEC);
	if (device < 0)
		die("open VFIO cdev");
	struct vfio_device_bind_iommufd bind = { .argsz = sizeof(bind), .iommufd = iommufd };
	if (ioctl(device, VFIO_DEVICE_BIND_IOMMUFD, &bind))
		die("VFIO_DEVICE_BIND_IOMMUFD");
	struct iommu_ioas_alloc alloc = { .size = sizeof(alloc) };
	if (ioctl(iommufd, IOMMU_IOAS_ALLOC, &alloc))
		die("IOMMU_IOAS_ALLOC");
	struct vfio_device_attach_iommufd_pt attach = { .argsz = sizeof(attach), .pt_id = alloc.out_ioas_id };
	if (ioctl(device, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach))
		die("VFIO_DEVICE_ATTACH_IOMMUFD_PT");

	/* An MSI is a memory write by the device: bus mastering must be on. */
	struct vfio_region_info config;
	region(device, VFIO_PCI_CONFIG_REGION_INDEX, &config);
	uint16_t command;
	if (pread(device, &command, 2, config.offset + PCI_COMMAND) != 2)
		die("read PCI command");
	command |= PCI_COMMAND_MASTER;
	if (pwrite(device, &command, 2, config.offset + PCI_COMMAND) != 2)
		die("write PCI command");

	struct vfio_region_info bar0;
	region(device, VFIO_PCI_BAR0_REGION_INDEX, &bar0);
	volatile uint32_t *bar = mmap(NULL, bar0.size, PROT_READ | PROT_WRITE, MAP_SHARED, device, bar0.offset);
	if (bar == MAP_FAILED)
		die("mmap BAR0");

	int efd = eventfd(0, EFD_CLOEXEC); /* blocking: read(2) sleeps until the interrupt */
	if (efd < 0)
		die("eventfd");
	char buffer[sizeof(struct vfio_irq_set) + sizeof(int32_t)];
	struct vfio_irq_set *set = (struct vfio_irq_set *)buffer;
	set->argsz = sizeof(buffer);
	set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
	set->index = VFIO_PCI_MSI_IRQ_INDEX;
	set->start = 0;
	set->count = 1;
	memcpy(set->data, &efd, sizeof(efd));
	if (ioctl(device, VFIO_DEVICE_SET_IRQS, set))
		die("VFIO_DEVICE_SET_IRQS");

	uint64_t *samples = calloc((size_t)iterations, sizeof(uint64_t));
	if (!samples)
		die("calloc");
	uint64_t count, total = 0, events = 0;
	for (long i = 0; i < warmup + iterations; i++) {
		uint64_t start = now_ns();
		bar[EDU_IRQ_RAISE / 4] = 1;
		if (read(efd, &count, 8) != 8)
			die("read eventfd");
		uint64_t end = now_ns();
		bar[EDU_IRQ_ACK / 4] = 1;
		events += count;
		if (i >= warmup) {
			samples[i - warmup] = end - start;
			total += end - start;
		}
	}
	qsort(samples, (size_t)iterations, sizeof(uint64_t), compare);

	/* Burst: BURST raises back to back; the eventfd counts them, read until all are in. */
	long rounds = iterations / burst > 0 ? iterations / burst : 1;
	uint64_t burst_start = now_ns(), burst_events = 0;
	for (long r = 0; r < rounds; r++) {
		uint64_t seen = 0;
		for (long i = 0; i < burst; i++)
			bar[EDU_IRQ_RAISE / 4] = 1;
		while (seen < (uint64_t)burst) {
			if (read(efd, &count, 8) != 8)
				die("read eventfd");
			seen += count;
		}
		bar[EDU_IRQ_ACK / 4] = 1;
		burst_events += seen;
	}
	uint64_t burst_ns = now_ns() - burst_start;

	printf("{\"side\":\"c\",\"iterations\":%ld,\"events\":%llu,\"meanNs\":%.1f,\"minNs\":%llu,\"medianNs\":%llu,"
	       "\"p99Ns\":%llu,\"burst\":%ld,\"burstEvents\":%llu,\"burstEventsPerSecond\":%.0f}\n",
	       iterations, (unsigned long long)events, (double)total / (double)iterations,
	       (unsigned long long)samples[0], (unsigned long long)samples[iterations / 2],
	       (unsigned long long)samples[iterations * 99 / 100], burst, (unsigned long long)burst_events,
	       (double)burst_events * 1e9 / (double)burst_ns);

	struct vfio_irq_set off = { .argsz = sizeof(off),
				    .flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
				    .index = VFIO_PCI_MSI_IRQ_INDEX };
	if (ioctl(device, VFIO_DEVICE_SET_IRQS, &off))
		die("VFIO_DEVICE_SET_IRQS (disable)");
	close(efd);
	munmap((void *)bar, bar0.size);
	close(device);
	close(iommufd);
	return 0;
}
