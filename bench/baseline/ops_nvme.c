/*
 * The NVMe suite's C reference (bench/suites/nvme.ts, bench/nvme.ts): the same loop as the bare
 * TypeScript one (bench/nvme-loop.ts), on an I/O queue pair the library created and handed over
 * idle. It writes read or write commands at random 4 KiB-aligned LBAs into the submission ring,
 * keeps up to QD in flight, writes the SQ tail doorbell once per burst and the CQ head doorbell
 * once per batch of completions. One run completes PER_RUN commands and returns with none in
 * flight, so the library may use the controller between runs.
 *
 * fds: the VFIO device (BAR0 is mmapped from it), the DMA heap's memfd (rings and data live there).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#include "bench.h"

#define MAX_LATENCIES (1 << 20)

struct loop {
	volatile uint32_t *bar;
	size_t bar_size, heap_size;
	uint8_t *heap;
	volatile uint32_t *sq, *cq, *sq_doorbell, *cq_doorbell;
	uint32_t depth, qd, per_run, opcode, nsid, lbas_per_io, slots;
	uint64_t data_iova;
	uint32_t sq_tail, cq_head, phase, seed;
	double submitted_at[65536];
	uint32_t *latencies; /* ns, capped at 4.29 s */
	uint32_t recorded;
};

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/*
 * args: BAR0 offset, BAR0 size, heap size, SQ offset, CQ offset (in the heap), entries, queue id,
 * doorbell stride, data IOVA (one 4 KiB slot per command id), opcode (1 write, 2 read), nsid,
 * LBAs per command, 4 KiB slots of the namespace to pick from, QD, commands per run.
 */
static int nvme_loop_setup(struct bench_ctx *c)
{
	struct loop *l = calloc(1, sizeof(*l));
	if (!l) return bench_fail(c, "calloc");
	c->state = l;
	l->bar_size = c->arg[1];
	void *bar = mmap(NULL, l->bar_size, PROT_READ | PROT_WRITE, MAP_SHARED, c->fd[0], (off_t)c->arg[0]);
	if (bar == MAP_FAILED) return bench_fail(c, "mmap of the controller's BAR0");
	l->bar = bar;
	l->heap_size = c->arg[2];
	void *heap = mmap(NULL, l->heap_size, PROT_READ | PROT_WRITE, MAP_SHARED, c->fd[1], 0);
	if (heap == MAP_FAILED) return bench_fail(c, "mmap of the DMA heap");
	l->heap = heap;
	l->sq = (volatile uint32_t *)(l->heap + c->arg[3]);
	l->cq = (volatile uint32_t *)(l->heap + c->arg[4]);
	l->depth = c->arg[5];
	uint32_t qid = c->arg[6], stride = c->arg[7];
	l->sq_doorbell = l->bar + (0x1000 + 2 * qid * stride) / 4;
	l->cq_doorbell = l->bar + (0x1000 + (2 * qid + 1) * stride) / 4;
	l->data_iova = c->arg[8];
	l->opcode = c->arg[9];
	l->nsid = c->arg[10];
	l->lbas_per_io = c->arg[11];
	l->slots = c->arg[12];
	l->qd = c->arg[13];
	l->per_run = c->arg[14];
	l->phase = 1;
	l->seed = 0x2545f491;
	l->latencies = malloc(MAX_LATENCIES * sizeof(uint32_t));
	if (!l->latencies || l->qd < 1 || l->qd >= l->depth || l->depth > 65536) return bench_fail(c, "queue depth");
	return 0;
}

static void post(struct loop *l, uint16_t cid)
{
	l->seed ^= l->seed << 13;
	l->seed ^= l->seed >> 17;
	l->seed ^= l->seed << 5;
	uint64_t lba = (uint64_t)(l->seed % l->slots) * l->lbas_per_io;
	uint64_t prp1 = l->data_iova + (uint64_t)cid * 4096;
	volatile uint32_t *e = l->sq + l->sq_tail * 16;
	e[0] = l->opcode | ((uint32_t)cid << 16);
	e[1] = l->nsid;
	for (int i = 2; i < 6; i++) e[i] = 0;
	e[6] = (uint32_t)prp1;
	e[7] = (uint32_t)(prp1 >> 32);
	e[8] = e[9] = 0;
	e[10] = (uint32_t)lba;
	e[11] = (uint32_t)(lba >> 32);
	e[12] = l->lbas_per_io - 1;
	e[13] = e[14] = e[15] = 0;
	l->submitted_at[cid] = now_ns();
	if (++l->sq_tail == l->depth) l->sq_tail = 0;
}

static int nvme_loop_run(struct bench_ctx *c)
{
	struct loop *l = c->state;
	uint32_t issued = 0, done = 0, in_flight = 0;
	/* Command ids of the free slots: a stack. */
	uint16_t free_ids[65536];
	uint32_t free_top = 0;
	for (uint32_t i = 0; i < l->qd; i++) free_ids[free_top++] = (uint16_t)(l->qd - 1 - i);
	while (done < l->per_run) {
		uint32_t before = l->sq_tail;
		while (in_flight < l->qd && issued < l->per_run) {
			post(l, free_ids[--free_top]);
			in_flight++;
			issued++;
		}
		if (l->sq_tail != before) *l->sq_doorbell = l->sq_tail;
		uint32_t reaped = 0, spins = 0;
		double since = 0;
		for (;;) {
			volatile uint32_t *e = l->cq + l->cq_head * 4;
			uint32_t dw3 = e[3];
			if (((dw3 >> 16) & 1) != l->phase) {
				if (reaped) break;
				/* A controller that stopped answering ends the run rather than spinning forever. */
				if (++spins % 65536 == 0) {
					double t = now_ns();
					if (!since) since = t;
					else if (t - since > 10e9) {
						fprintf(stderr, "no completion for 10 s\n");
						return -1;
					}
				}
				continue;
			}
			uint16_t cid = dw3 & 0xffff;
			if ((dw3 >> 17) & 0x7fff) {
				fprintf(stderr, "command %u failed with status 0x%x\n", cid, (dw3 >> 17) & 0x7fff);
				return -1;
			}
			double latency = now_ns() - l->submitted_at[cid];
			if (l->recorded < MAX_LATENCIES) l->latencies[l->recorded++] = latency > 4e9 ? 4000000000u : (uint32_t)latency;
			free_ids[free_top++] = cid;
			if (++l->cq_head == l->depth) {
				l->cq_head = 0;
				l->phase ^= 1;
			}
			reaped++;
		}
		*l->cq_doorbell = l->cq_head;
		in_flight -= reaped;
		done += reaped;
	}
	return 0;
}

static int by_value(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return x < y ? -1 : x > y;
}

/* The latencies recorded since the last report: count, p50, p99 (ns); then starts afresh. */
static int nvme_loop_report(struct bench_ctx *c, char *json, size_t size)
{
	struct loop *l = c->state;
	uint32_t n = l->recorded;
	qsort(l->latencies, n, sizeof(uint32_t), by_value);
	snprintf(json, size, "\"count\":%u,\"p50\":%u,\"p99\":%u", n, n ? l->latencies[n / 2] : 0,
		 n ? l->latencies[(uint64_t)n * 99 / 100] : 0);
	l->recorded = 0;
	return 0;
}

static void nvme_loop_teardown(struct bench_ctx *c)
{
	struct loop *l = c->state;
	if (!l) return;
	if (l->bar) munmap((void *)l->bar, l->bar_size);
	if (l->heap) munmap(l->heap, l->heap_size);
	free(l->latencies);
	free(l);
	c->state = NULL;
}

BENCH_OP(nvme_loop, .setup = nvme_loop_setup, .run = nvme_loop_run, .report = nvme_loop_report,
	 .teardown = nvme_loop_teardown, .nfds = 2, .nargs = 15);
