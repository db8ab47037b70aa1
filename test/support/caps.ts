/**
 * Running a piece of a test without CAP_IPC_LOCK. iommufd charges pinned pages (VmPin, and
 * RLIMIT_MEMLOCK) only to callers without it (pages.c: account mode NONE when capable()), so as
 * root a pin check sees 0 whatever the library does. Capabilities are per thread: dropping the
 * effective bit on the JS thread, which issues the library's ioctls, is enough, and it keeps the
 * permitted bit so it can be raised again.
 */
import { dlopen, FFIType, ptr } from "bun:ffi";

const CAP_IPC_LOCK = 14;
const LINUX_CAPABILITY_VERSION_3 = 0x20080522;

let capsCalls: ReturnType<typeof open> | undefined;
function open() {
  return dlopen("libc.so.6", {
    // int capget(cap_user_header_t hdrp, cap_user_data_t datap);
    capget: { args: [FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
    // int capset(cap_user_header_t hdrp, const cap_user_data_t datap);
    capset: { args: [FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
  }).symbols;
}

/** This thread's effective CAP_IPC_LOCK, set or cleared; returns whether it was set before. */
function setIpcLock(on: boolean): boolean {
  capsCalls ??= open();
  // struct __user_cap_header_struct { u32 version; int pid; }; data: 2 x { effective, permitted, inheritable }.
  const header = new Uint32Array([LINUX_CAPABILITY_VERSION_3, 0]);
  const data = new Uint32Array(6);
  if (capsCalls.capget(ptr(header), ptr(data)) !== 0) throw new Error("capget failed");
  const was = (data[0]! & (1 << CAP_IPC_LOCK)) !== 0;
  data[0] = on ? data[0]! | (1 << CAP_IPC_LOCK) : data[0]! & ~(1 << CAP_IPC_LOCK);
  header[0] = LINUX_CAPABILITY_VERSION_3;
  if (capsCalls.capset(ptr(header), ptr(data)) !== 0)
    throw new Error(`capset (CAP_IPC_LOCK ${on ? "on" : "off"}) failed`);
  return was;
}

/** Runs `fn` with this thread's effective CAP_IPC_LOCK cleared, then restores it. */
export function withoutIpcLock<T>(fn: () => T): T {
  const had = setIpcLock(false);
  try {
    return fn();
  } finally {
    if (had) setIpcLock(true);
  }
}
