/**
 * Kernel fault injection from the test's own thread: /proc/self/task/<tid>/fail-nth makes the N-th
 * fault point (slab or page allocation, with ignore-gfp-wait off) of this thread fail.
 *
 * Arming, the call and the read-back sit back to back, with preallocated buffers, so nothing else
 * on this thread consumes the armed fault.
 */
import { ptr } from "bun:ffi";
import { existsSync } from "node:fs";
import { closeFd, openPath } from "../../src/sys/fd.ts";
import { libc, O_RDWR } from "../../src/sys/libc.ts";

export class FailNth {
  readonly #fd: number;
  readonly #out = new Uint8Array(16);
  readonly #outAddress = ptr(this.#out);
  readonly #in = new Uint8Array(16);
  readonly #inAddress = ptr(this.#in);

  static available(): boolean {
    return existsSync(`/proc/self/task/${libc().gettid()}/fail-nth`);
  }

  constructor() {
    this.#fd = openPath(`/proc/self/task/${libc().gettid()}/fail-nth`, O_RDWR, "fail-nth");
  }

  /** Make the n-th fault point from now fail (n >= 1); 0 disarms. */
  arm(n: number): void {
    const text = String(n);
    for (let i = 0; i < text.length; i++) this.#out[i] = text.charCodeAt(i);
    libc().pwrite(this.#fd, this.#outAddress as never, text.length, 0);
  }

  /** True when the armed fault was injected; otherwise disarms and returns false. */
  hit(): boolean {
    const n = Number(libc().pread(this.#fd, this.#inAddress as never, this.#in.length, 0));
    const hit = n > 0 && this.#in[0] === 0x30 && (n === 1 || this.#in[1] === 0x0a);
    if (!hit) this.arm(0);
    return hit;
  }

  close(): void {
    this.arm(0);
    closeFd(this.#fd, "fail-nth");
  }
}
