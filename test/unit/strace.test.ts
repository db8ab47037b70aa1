/** The strace log reader behind the heap's "no syscall per alloc/free" proof, on a real log's shape. */
import { expect, test } from "bun:test";
import { straceSummary, syscallsBetween } from "../support/strace.ts";

// Trimmed from `strace -f -C -qq -o log bun script.ts` on the host (bun 1.4.5).
const log = `23925 futex(0x69018c8, FUTEX_WAKE_PRIVATE, 2147483647) = 0
23925 access("/nonexistent-t-pairs-begin", F_OK) = -1 ENOENT (No such file or directory)
23925 mmap(NULL, 528384, PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_STACK, -1, 0) = 0x7f1a12efe000
23925 rt_sigprocmask(SIG_BLOCK, ~[], [], 8) = 0
23927 rseq(0x7f1a12f7efe0, 0x20, 0, 0x53053053) = 0
23925 rt_sigprocmask(SIG_SETMASK, [],  <unfinished ...>
23927 set_robust_list(0x7f1a12f7e9a0, 24 <unfinished ...>
23925 <... rt_sigprocmask resumed>NULL, 8) = 0
23927 <... set_robust_list resumed>)    = 0
23927 --- SIGURG {si_signo=SIGURG, si_code=SI_TKILL, si_pid=23925, si_uid=0} ---
23925 access("/nonexistent-t-pairs-end", F_OK <unfinished ...>
23927 prctl(PR_SET_NAME, "JITWorker")   = 0
23925 <... access resumed>)             = -1 ENOENT (No such file or directory)
23925 access("/nonexistent-t-control-begin", F_OK) = -1 ENOENT (No such file or directory)
23925 ioctl(3, _IOC(_IOC_NONE, 0x3b, 0x84, 0), 0x7f1a00001000) = -1 EMSGSIZE (Message too long)
23925 ioctl(3, _IOC(_IOC_NONE, 0x3b, 0x84, 0), 0x7f1a00001000) = 0
23925 access("/nonexistent-t-control-end", F_OK) = -1 ENOENT (No such file or directory)
23927 +++ exited with 0 +++
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ------------------
 40.00    0.000600           3       200           mmap
  0.00    0.000000           0         3         3 ioctl
  0.00    0.000000           0         1           execve
------ ----------- ----------- --------- --------- ------------------
100.00    0.001498           5       278        14 total
`;

test("counts each call once across threads, not its resumption, signals or exits", () => {
  expect(syscallsBetween(log, "t-pairs-begin", "t-pairs-end")).toEqual({
    all: { mmap: 1, rt_sigprocmask: 2, rseq: 1, set_robust_list: 1 },
    markerThread: { mmap: 1, rt_sigprocmask: 2 },
  });
  expect(syscallsBetween(log, "t-control-begin", "t-control-end")).toEqual({
    all: { ioctl: 2 },
    markerThread: { ioctl: 2 },
  });
});

test("a missing marker is an error, not an empty count", () => {
  expect(() => syscallsBetween(log, "t-nope-begin", "t-pairs-end")).toThrow(/no line with the marker/);
  expect(() => syscallsBetween(log, "t-control-end", "t-pairs-end")).toThrow(/after/);
});

test("reads the -c summary table", () => {
  expect(straceSummary(log)).toEqual({ mmap: 200, ioctl: 3, execve: 1, total: 278 });
});
