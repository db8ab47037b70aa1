/**
 * Physical Region Page entries (NVMe Base 2.0 section 4.1.1), with IOVAs in place of physical
 * addresses: PRP1 is the data's first byte; PRP2 is the second page, or, for a transfer over two
 * pages, the IOVA of a list of the remaining pages. One list page (512 entries) per command slot
 * is enough because the driver caps a command at MAX_PRP_TRANSFER bytes.
 */
import { high32 } from "./commands.ts";
import { PAGE_SIZE } from "./registers.ts";

/** log2(PAGE_SIZE). */
const PAGE_SHIFT = 12;
export const PRP_LIST_ENTRIES = PAGE_SIZE / 8;
/** The largest transfer one list page can describe, whatever the first page's offset. */
export const MAX_PRP_TRANSFER = PRP_LIST_ENTRIES * PAGE_SIZE;

/**
 * PRP2 for `length` bytes (at most MAX_PRP_TRANSFER) at `iova`; writes the list into `list` (the
 * slot's list page viewed as dwords, at IOVA `listIova`) when one is needed.
 *
 * Integer operations only while the pages lie below 2^31 (no `%`, Math.ceil or division by 2^32
 * per entry): in the TCG guest each floating-point instruction is a soft-float helper call.
 */
export function prp2For(iova: number, length: number, list: Uint32Array, listOffset: number, listIova: number): number {
  // The low 12 bits survive ToInt32 exactly for any integer below 2^53.
  const firstPage = PAGE_SIZE - (iova & (PAGE_SIZE - 1));
  if (length <= firstPage) return 0;
  const next = iova + firstPage;
  const rest = length - firstPage;
  if (rest <= PAGE_SIZE) return next;
  const entries = (rest + PAGE_SIZE - 1) >>> PAGE_SHIFT;
  for (let i = 0, at = listOffset, page = next; i < entries; i++, at += 2, page += PAGE_SIZE) {
    // A Uint32Array store keeps the low 32 bits by itself.
    list[at] = page;
    list[at + 1] = high32(page);
  }
  return listIova;
}
