/*
 * The irq suite's C op (bench/suites/irq.ts): QEMU's edu raises an MSI through its raise register
 * (BAR0 0x60), the kernel signals the vector's eventfd, this side reads the count, then
 * acknowledges on the device (0x64). It works on the library side's own device fd and the very
 * eventfd of the library's vector (fds 3 and 4).
 *
 * The eventfd is non-blocking (the flag belongs to the open file, which the library shares), so
 * the read blocks the way read(2) on a blocking eventfd does inside the kernel: it takes the
 * count when there is one and sleeps (in poll(2)) only when there is none.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

#include "bench.h"

#define EDU_IRQ_RAISE 0x60
#define EDU_IRQ_ACK 0x64

static volatile uint32_t *bar;
static size_t bar_size;

/* fds: VFIO device (bound, attached, MSI enabled by the library), the vector's eventfd. args: BAR0 offset, size. */
static int edu_msi_setup(struct bench_ctx *c)
{
	bar_size = c->arg[1];
	void *map = mmap(NULL, bar_size, PROT_READ | PROT_WRITE, MAP_SHARED, c->fd[0], (off_t)c->arg[0]);
	if (map == MAP_FAILED) return bench_fail(c, "mmap of edu's BAR0");
	bar = map;
	return 0;
}

/*
 * The library's vector keeps a reader in Bun's event loop for a moment after its own slice (it
 * stops 5 ms after its last wait: READER_IDLE_MS): if that reader takes a count, raise again
 * after 20 ms instead of sleeping forever. It happens at most at the start of a slice; the
 * median ignores it.
 */
static int edu_msi_run(struct bench_ctx *c)
{
	uint64_t count;
	bar[EDU_IRQ_RAISE / 4] = 1;
	while (read(c->fd[1], &count, sizeof(count)) != sizeof(count)) {
		if (errno != EAGAIN) return -1;
		struct pollfd p = { .fd = c->fd[1], .events = POLLIN };
		int ready = poll(&p, 1, 20);
		if (ready < 0 && errno != EINTR) return -1;
		if (ready == 0) bar[EDU_IRQ_RAISE / 4] = 1;
	}
	bar[EDU_IRQ_ACK / 4] = 1;
	return 0;
}

static void edu_msi_teardown(struct bench_ctx *c)
{
	(void)c;
	if (bar) munmap((void *)bar, bar_size);
	bar = NULL;
}

BENCH_OP(edu_msi, .setup = edu_msi_setup, .run = edu_msi_run, .teardown = edu_msi_teardown, .nfds = 2, .nargs = 2);
