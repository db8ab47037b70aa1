/*
 * The C side of `bun bench`: ops registered here run on the library side's own objects (their
 * file descriptors arrive as fds 3, 4, ...), timed with mitata's sampling rule by bench.c.
 *
 * Adding an op: a new ops_<suite>.c in this directory (every .c here is compiled in) with
 *
 *	static int my_setup(struct bench_ctx *c) { ... read c->fd[i], c->arg[i]; 0 or bench_fail() }
 *	static int my_run(struct bench_ctx *c) { ... one operation; 0, or -1 with errno set }
 *	BENCH_OP(my_op, .setup = my_setup, .run = my_run, .nfds = 2, .nargs = 4);
 *
 * and a case on the TypeScript side naming it ({ op: "my_op", fds, args } in bench/suites/).
 */
#ifndef BUN_IOMMUFD_BENCH_H
#define BUN_IOMMUFD_BENCH_H

#include <stddef.h>
#include <stdint.h>

#define BENCH_MAX_FDS 8
#define BENCH_MAX_ARGS 16

struct bench_ctx {
	/* The descriptors handed over by the library side, in the case's order (fd[0] is fd 3). */
	int fd[BENCH_MAX_FDS];
	int nfds;
	uint64_t arg[BENCH_MAX_ARGS];
	int nargs;
	/* The op's own state, set by its setup. */
	void *state;
	char error[256];
};

struct bench_op {
	const char *name;
	int nfds, nargs;
	/* Encodes structs, maps what it needs; not timed. 0, or -1 after bench_fail(). */
	int (*setup)(struct bench_ctx *c);
	/* One operation (what the library side's lib() does once). 0, or -1 with errno set. */
	int (*run)(struct bench_ctx *c);
	void (*teardown)(struct bench_ctx *c);
	/* Optional: JSON members (no braces) the op adds to the reply of a "report" command. */
	int (*report)(struct bench_ctx *c, char *json, size_t size);
	struct bench_op *next;
};

void bench_register(struct bench_op *op);
/* Records "what: strerror(errno)" in c->error and returns -1. */
int bench_fail(struct bench_ctx *c, const char *what);

#define BENCH_OP(var, ...)                                                   \
	static struct bench_op var = { .name = #var, __VA_ARGS__ };           \
	__attribute__((constructor)) static void register_##var(void)        \
	{                                                                    \
		bench_register(&var);                                        \
	}

#endif
