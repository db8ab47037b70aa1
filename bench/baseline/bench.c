/*
 * Driver of the C side of `bun bench`. One process per case, spawned by bench/baseline.ts with
 * the library side's descriptors as fds 3, 4, ...:
 *
 *	cbench OP [ARG...]          (cbench --list names the ops)
 *
 * It sets the op up, prints {"ok":true,"ready":true} (or {"ok":false,"error":...}) and then
 * answers one JSON line per command read from stdin:
 *
 *	warmup OPS MS MAX_MS     run the op until OPS runs and MS ms are done, or MAX_MS passed
 *	slice SAMPLES OPS        one untimed run of OPS ops, then SAMPLES timed samples of OPS ops each
 *	report                   what the op itself recorded (its report hook), e.g. per-command latencies
 *
 * and tears the op down at end of input. Times are per op, in ns, from CLOCK_MONOTONIC.
 *
 * A slice is one side's share of a paired round: the runner alternates short slices of this side
 * and the library's (bench/runner.ts), so both sides meet the same state of the machine; the
 * library's slice is the same loop (bench/runner.ts, slicer).
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

#define MAX_SAMPLES 4096

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

static double samples[MAX_SAMPLES];

static int run_ops(const struct bench_op *op, struct bench_ctx *c, long n)
{
	for (long i = 0; i < n; i++)
		if (op->run(c)) return -1;
	return 0;
}

static void slice(const struct bench_op *op, struct bench_ctx *c, int count, long per_sample)
{
	if (count < 1 || count > MAX_SAMPLES || per_sample < 1) {
		reply_error("slice wants 1..4096 samples of at least 1 op");
		return;
	}
	if (run_ops(op, c, per_sample)) goto error;
	for (int n = 0; n < count; n++) {
		double t0 = now_ns();
		if (run_ops(op, c, per_sample)) goto error;
		samples[n] = (now_ns() - t0) / (double)per_sample;
	}
	printf("{\"ok\":true,\"times\":[");
	for (int n = 0; n < count; n++) printf("%s%.3f", n ? "," : "", samples[n]);
	printf("]}\n");
	fflush(stdout);
	return;
error:
	bench_fail(c, "op");
	reply_error(c->error);
}

static void report(const struct bench_op *op, struct bench_ctx *c)
{
	char json[1024] = "";
	if (op->report && op->report(c, json, sizeof(json))) {
		bench_fail(c, "report");
		reply_error(c->error);
		return;
	}
	printf("{\"ok\":true%s%s}\n", json[0] ? "," : "", json);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	if (argc == 2 && !strcmp(argv[1], "--list")) {
		for (const struct bench_op *op = ops; op; op = op->next) printf("%s fds=%d args=%d\n", op->name, op->nfds, op->nargs);
		return 0;
	}
	if (argc < 2) {
		fprintf(stderr, "usage: cbench OP [ARG...] (fds 3.. as the op expects), or cbench --list\n");
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
	c.nargs = argc - 2;
	if (c.nargs != op->nargs || op->nfds > BENCH_MAX_FDS) {
		snprintf(line, sizeof(line), "%s wants %d args, got %d", op->name, op->nargs, c.nargs);
		reply_error(line);
		return 1;
	}
	for (int i = 0; i < c.nargs; i++) c.arg[i] = strtoull(argv[2 + i], NULL, 0);
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
		long ops_wanted;
		int count;
		double a, b;
		if (sscanf(line, "warmup %ld %lf %lf", &ops_wanted, &a, &b) == 3) warmup(op, &c, ops_wanted, a, b);
		else if (sscanf(line, "slice %d %ld", &count, &ops_wanted) == 2) slice(op, &c, count, ops_wanted);
		else if (!strncmp(line, "report", 6)) report(op, &c);
		else reply_error("unknown command");
	}
	if (op->teardown) op->teardown(&c);
	return 0;
}
