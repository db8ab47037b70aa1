/**
 * Physical layout of a benchmark buffer, made on purpose and then checked. Whether a memfd's pages
 * happen to be physically contiguous decides whether an IOMMU maps 4 KiB or larger entries, and
 * that moved the C side alone 2-5x between runs. So: "scattered" buffers are faulted in an order
 * that keeps every pair of neighbouring pages apart (all even pages first, then all odd ones), and
 * "huge" buffers are 2 MiB hugetlb pages; /proc/self/pagemap (root only) then says what we got.
 */
import { closeSync, openSync, readSync } from "node:fs";
import { MemfdBuffer } from "../src/index.ts";
import { KiB, MiB, type Layout } from "./suite.ts";

const PAGE = 4 * KiB;
const PFN_MASK = (1n << 55n) - 1n;
const PRESENT = 1n << 63n;

/** Physical frame numbers of the pages at [address, address + length), or a reason why not. */
export function frames(address: number, length: number): BigUint64Array | string {
  const pages = Math.ceil(length / PAGE);
  const out = new BigUint64Array(pages);
  let fd: number;
  try {
    fd = openSync("/proc/self/pagemap", "r");
  } catch (error) {
    return `no /proc/self/pagemap (${(error as Error).message})`;
  }
  try {
    const bytes = new Uint8Array(out.buffer);
    let done = 0;
    while (done < bytes.length) {
      const n = readSync(fd, bytes, done, bytes.length - done, (address / PAGE) * 8 + done);
      if (n <= 0) return "short read of /proc/self/pagemap";
      done += n;
    }
  } finally {
    closeSync(fd);
  }
  for (let i = 0; i < pages; i++) {
    const e = out[i]!;
    if (!(e & PRESENT)) return `page ${i} not present`;
    out[i] = e & PFN_MASK;
  }
  if (pages > 0 && out.every((pfn) => pfn === 0n)) return "frame numbers hidden (not root)";
  return out;
}

/** Counts physically contiguous runs (frame n+1 right after frame n) in address order. */
export function checkLayout(kind: Layout["kind"], address: number, length: number): Layout {
  const pages = Math.ceil(length / PAGE);
  const pfns = frames(address, length);
  if (typeof pfns === "string") return { kind, pages, unchecked: pfns };
  let runs = 0;
  let longest = 0;
  let current = 0;
  for (let i = 0; i < pages; i++) {
    if (i > 0 && pfns[i] === pfns[i - 1]! + 1n) current++;
    else {
      runs++;
      current = 1;
    }
    if (current > longest) longest = current;
  }
  return { kind, pages, runs, longestRun: longest };
}

/**
 * A memfd buffer of `size` with the given layout, every page faulted in. "scattered": even pages
 * first, then odd ones, so that no two neighbours come from consecutive allocations; "huge": 2 MiB
 * hugetlb pages (contiguous by construction).
 */
export function layoutBuffer(
  size: number,
  kind: "scattered" | "huge" | "single-page",
): { buffer: MemfdBuffer; layout: Layout } {
  const buffer = MemfdBuffer.create(size, { name: "bun-iommufd-bench", hugePages: kind === "huge" ? "2MB" : false });
  try {
    const bytes = buffer.bytes;
    const step = kind === "huge" ? 2 * MiB : PAGE;
    const pages = Math.ceil(size / step);
    if (kind === "scattered") {
      for (let i = 0; i < pages; i += 2) bytes[i * PAGE] = 1;
      for (let i = 1; i < pages; i += 2) bytes[i * PAGE] = 1;
    } else {
      for (let i = 0; i < pages; i++) bytes[i * step] = 1;
    }
    return { buffer, layout: checkLayout(kind, buffer.address, size) };
  } catch (error) {
    buffer.close();
    throw error;
  }
}

export function layoutNote(l: Layout | undefined): string {
  if (!l) return "";
  if (l.unchecked) return `${l.kind} (unchecked: ${l.unchecked})`;
  return `${l.kind}: ${l.pages} pages in ${l.runs} physical run(s), longest ${l.longestRun}`;
}
