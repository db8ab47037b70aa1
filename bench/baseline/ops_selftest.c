/*
 * An op that needs no device: one getppid(2) per operation. It lets the runner's C side (fd
 * hand-over, warm-up, paired rounds) be tested on any host (test/unit/bench.test.ts).
 */
#define _GNU_SOURCE
#include <sys/syscall.h>
#include <unistd.h>

#include "bench.h"

static int getppid_run(struct bench_ctx *c)
{
	(void)c;
	return syscall(SYS_getppid) > 0 ? 0 : -1;
}

BENCH_OP(syscall_getppid, .run = getppid_run, .nfds = 0, .nargs = 0);
