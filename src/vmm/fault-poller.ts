/**
 * Worker body for FaultQueue.read(): a fault queue fd reads 0 bytes when empty (no blocking, no
 * EAGAIN), so a stream over it would end at once. Readiness comes from poll(2) instead, which
 * blocks this worker's thread, never the JavaScript thread. Each "wait" message gets one answer
 * when the queue fd is readable or the wake eventfd was written (close).
 */
import { ptr } from "bun:ffi";
import { ERRNO } from "../sys/errno.ts";
import { lastErrno, libc, POLLERR, POLLHUP, POLLIN, POLLNVAL } from "../sys/libc.ts";

declare const self: Worker;

/** Two struct pollfd { int fd; short events; short revents; }. */
const fds = new Uint8Array(16);
const view = new DataView(fds.buffer);
const address = ptr(fds);

export interface WaitRequest {
  fd: number;
  wakeFd: number;
}

export interface WaitAnswer {
  readable: boolean;
  woken: boolean;
  /** poll(2) failed, or the fd is closed or broken: the errno to report. */
  errno: number;
}

self.onmessage = (event: MessageEvent<WaitRequest>) => {
  const { fd, wakeFd } = event.data;
  view.setInt32(0, fd, true);
  view.setInt16(4, POLLIN, true);
  view.setInt32(8, wakeFd, true);
  view.setInt16(12, POLLIN, true);
  for (;;) {
    view.setInt16(6, 0, true);
    view.setInt16(14, 0, true);
    const rc = libc().poll(address, 2, -1);
    if (rc < 0) {
      const errno = lastErrno();
      if (errno === ERRNO.EINTR) continue;
      self.postMessage({ readable: false, woken: false, errno } satisfies WaitAnswer);
      return;
    }
    const queue = view.getInt16(6, true);
    const wake = view.getInt16(14, true);
    // The queue fd closed or broke under poll: report it as the kernel would a read on it.
    const broken = queue & (POLLERR | POLLHUP | POLLNVAL) ? ERRNO.EBADF : 0;
    self.postMessage({ readable: (queue & POLLIN) !== 0, woken: wake !== 0, errno: broken } satisfies WaitAnswer);
    return;
  }
};
