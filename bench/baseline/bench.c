/*
 * Driver of the C side of `bun bench`. One process per case, spawned by bench/baseline.ts with
 * the library side's descriptors as fds 3, 4, ...:
 *
 *	cbench OP K [ARG...]        (cbench --list names the ops)
 *
 * It sets the op up, prints {"ok":true,"ready":true} (or {"ok":false,"error":...}) and then
 * answers one JSON line per command read from stdin:
 *
 *	warmup PAIRS MS MAX_MS   run the op until PAIRS runs and MS ms are done, or MAX_MS passed
 *	measure MIN_MS           time iterations of K ops with mitata's sampling rule
 *
 * and tears the op down at end of input. Times are per op, in ns, from CLOCK_MONOTONIC.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

/* mitata's constants (src/lib.mjs): the same sampling rule makes the two sides comparable. */
#define MITATA_MIN_SAMPLES 12
#define MITATA_WARMUP_SAMPLES 2
#define MITATA_WARMUP_THRESHOLD_NS 500000.0
#define MITATA_BATCH_THRESHOLD_NS 65536.0
#define MITATA_BATCH_SAMPLES 4096
#define MITATA_SAMPLES_THRESHOLD 12
#define MAX_SAMPLES (1 << 20)

static struct bench_op *ops;

void bench_register(struct bench_op *op)
{
	op->next = ops;
	ops = op;
}

int bench_fail(struct bench_ctx *c, const char *what)
{
	snprintf(c->error, sizeof(c->error), "%s: %s (errno %d)", what, strerror(errno), errno);
	return -1;
}

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static void reply_error(const char *error)
{
	printf("{\"ok\":false,\"error\":\"");
	for (const char *p = error; *p; p++) {
		if (*p == '"' || *p == '\\') putchar('\\');
		putchar(*p == '\n' ? ' ' : *p);
	}
	printf("\"}\n");
	fflush(stdout);
}

static int k = 1;

static inline int iteration(const struct bench_op *op, struct bench_ctx *c)
{
	for (int i = 0; i < k; i++)
		if (op->run(c)) return -1;
	return 0;
}

static void warmup(const struct bench_op *op, struct bench_ctx *c, long pairs, double ms, double max_ms)
{
	long done = 0;
	double start = now_ns();
	for (;;) {
		double elapsed = (now_ns() - start) / 1e6;
		if ((done >= pairs && elapsed >= ms) || elapsed >= max_ms) break;
		if (op->run(c)) {
			bench_fail(c, "warm-up");
			reply_error(c->error);
			return;
		}
		done++;
	}
	printf("{\"ok\":true,\"warmupOps\":%ld}\n", done);
	fflush(stdout);
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static double samples[MAX_SAMPLES];

static void measure(const struct bench_op *op, struct bench_ctx *c, double min_ms)
{
	/* mitata's own warm-up decides between one iteration per sample and batches of 4096. */
	int batch = 0;
	double t0 = now_ns();
	if (iteration(op, c)) goto error;
	double t1 = now_ns();
	if (t1 - t0 <= MITATA_WARMUP_THRESHOLD_NS) {
		for (int i = 0; i < MITATA_WARMUP_SAMPLES; i++) {
			t0 = now_ns();
			if (iteration(op, c)) goto error;
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
			if (iteration(op, c)) goto error;
		t1 = now_ns();
		total += t1 - t0;
		samples[n] = (t1 - t0) / per_sample / k;
	}
	qsort(samples, (size_t)n, sizeof(double), cmp_double);
	/* mitata drops the two lowest and highest samples once it has more than 12. */
	double *s = samples;
	int m = n;
	if (m > MITATA_SAMPLES_THRESHOLD) {
		s += 2;
		m -= 4;
	}
	double sum = 0;
	for (int i = 0; i < m; i++) sum += s[i];
#define AT(q) s[(int)((q) * (m - 1))]
	printf("{\"ok\":true,\"batch\":%d,\"samples\":%d,\"ticks\":%ld,\"avg\":%.3f,\"min\":%.3f,\"p25\":%.3f,"
	       "\"p50\":%.3f,\"p75\":%.3f,\"p99\":%.3f,\"max\":%.3f}\n",
	       per_sample, m, (long)n * per_sample * k, sum / m, s[0], AT(0.25), AT(0.5), AT(0.75), AT(0.99), s[m - 1]);
#undef AT
	fflush(stdout);
	return;
error:
	bench_fail(c, "op");
	reply_error(c->error);
}

int main(int argc, char **argv)
{
	if (argc == 2 && !strcmp(argv[1], "--list")) {
		for (const struct bench_op *op = ops; op; op = op->next) printf("%s fds=%d args=%d\n", op->name, op->nfds, op->nargs);
		return 0;
	}
	if (argc < 3) {
		fprintf(stderr, "usage: cbench OP K [ARG...] (fds 3.. as the op expects), or cbench --list\n");
		return 2;
	}
	const struct bench_op *op = ops;
	while (op && strcmp(op->name, argv[1])) op = op->next;
	struct bench_ctx c;
	memset(&c, 0, sizeof(c));
	char line[256];
	if (!op) {
		snprintf(line, sizeof(line), "no op named %s in this build of cbench", argv[1]);
		reply_error(line);
		return 1;
	}
	k = atoi(argv[2]);
	c.nargs = argc - 3;
	if (k < 1 || c.nargs != op->nargs || op->nfds > BENCH_MAX_FDS) {
		snprintf(line, sizeof(line), "%s wants K >= 1 and %d args, got K %d and %d args", op->name, op->nargs, k, c.nargs);
		reply_error(line);
		return 1;
	}
	for (int i = 0; i < c.nargs; i++) c.arg[i] = strtoull(argv[3 + i], NULL, 0);
	c.nfds = op->nfds;
	for (int i = 0; i < c.nfds; i++) {
		c.fd[i] = 3 + i;
		if (fcntl(c.fd[i], F_GETFD) < 0) {
			snprintf(line, sizeof(line), "fd %d (descriptor %d of %s) was not handed over", c.fd[i], i, op->name);
			reply_error(line);
			return 1;
		}
	}
	if (op->setup && op->setup(&c)) {
		reply_error(c.error);
		return 1;
	}
	printf("{\"ok\":true,\"ready\":true}\n");
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin)) {
		long pairs;
		double a, b;
		if (sscanf(line, "warmup %ld %lf %lf", &pairs, &a, &b) == 3) warmup(op, &c, pairs, a, b);
		else if (sscanf(line, "measure %lf", &a) == 1) measure(op, &c, a);
		else reply_error("unknown command");
	}
	if (op->teardown) op->teardown(&c);
	return 0;
}
