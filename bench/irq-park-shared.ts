/** What bench/irq-park.ts and its signalling Worker share: the control words and one clock. */
import { dlopen, FFIType } from "bun:ffi";

/** Int32 words of the shared control block, then the write's timestamp (a float64 in ns). */
export const PARK = { sequence: 0, fd: 1, delayUs: 2, words: 4, stampOffset: 16, bytes: 24 } as const;

const CLOCK_MONOTONIC = 1;
const { symbols } = dlopen("libc.so.6", {
  // int clock_gettime(clockid_t clockid, struct timespec *tp);
  clock_gettime: { args: [FFIType.i32, FFIType.ptr], returns: FFIType.i32 },
});
const timespec = new BigInt64Array(2);

/**
 * CLOCK_MONOTONIC in ns, the same clock on every thread of the process (performance.now() and
 * Bun.nanoseconds() count from each thread's own start). Exact below 2^53 ns (104 days of uptime).
 */
export function monotonicNs(): number {
  symbols.clock_gettime(CLOCK_MONOTONIC, timespec);
  return Number(timespec[0]!) * 1e9 + Number(timespec[1]!);
}
