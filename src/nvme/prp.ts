/**
 * Physical Region Page entries (NVMe Base 2.0 section 4.1.1), with IOVAs in place of physical
 * addresses: PRP1 is the data's first byte; PRP2 is the second page, or, for a transfer over two
 * pages, the IOVA of a list of the remaining pages. One list page (512 entries) per command slot
 * is enough because the driver caps a command at MAX_PRP_TRANSFER bytes.
 */
import { PAGE_SIZE } from "./registers.ts";

export const PRP_LIST_ENTRIES = PAGE_SIZE / 8;
/** The largest transfer one list page can describe, whatever the first page's offset. */
export const MAX_PRP_TRANSFER = PRP_LIST_ENTRIES * PAGE_SIZE;

/**
 * PRP2 for `length` bytes at `iova`; writes the list into `list` (the slot's list page viewed as
 * dwords, at IOVA `listIova`) when one is needed.
 */
export function prp2For(iova: number, length: number, list: Uint32Array, listOffset: number, listIova: number): number {
  const firstPage = PAGE_SIZE - (iova % PAGE_SIZE);
  if (length <= firstPage) return 0;
  const next = iova + firstPage;
  const rest = length - firstPage;
  if (rest <= PAGE_SIZE) return next;
  const entries = Math.ceil(rest / PAGE_SIZE);
  for (let i = 0, page = next; i < entries; i++, page += PAGE_SIZE) {
    list[listOffset + 2 * i] = page % 2 ** 32;
    list[listOffset + 2 * i + 1] = Math.floor(page / 2 ** 32);
  }
  return listIova;
}
