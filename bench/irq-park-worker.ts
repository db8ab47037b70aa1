/**
 * The signalling side of bench/irq-park.ts: waits until the main thread says it is about to park,
 * sleeps the fixed delay (so the main thread is inside epoll_wait, or blocked in read(2), when the
 * count arrives), stamps CLOCK_MONOTONIC into shared memory and adds 1 to the eventfd with
 * write(2), as the kernel's eventfd_signal() does for an interrupt.
 */
import { monotonicNs, PARK } from "./irq-park-shared.ts";
import { libc } from "../src/sys/libc.ts";

declare const self: Worker;

self.onmessage = (event: MessageEvent<SharedArrayBuffer>) => {
  const control = new Int32Array(event.data, 0, PARK.words);
  const stamp = new Float64Array(event.data, PARK.stampOffset, 1);
  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  const one = new BigUint64Array([1n]);
  let seen = 0;
  for (;;) {
    Atomics.wait(control, PARK.sequence, seen);
    seen = Atomics.load(control, PARK.sequence);
    if (seen < 0) break;
    Atomics.wait(sleeper, 0, 0, control[PARK.delayUs]! / 1000);
    stamp[0] = monotonicNs();
    libc().write(control[PARK.fd]!, one, 8);
  }
  self.postMessage("done");
};
