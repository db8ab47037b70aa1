#!/usr/bin/env bun
/**
 * Map a MemfdBuffer into an I/O address space, print where it landed, unmap it.
 *
 *   bun examples/map-memfd.ts                 (on a machine with /dev/iommu)
 *   bun run vm -- bun examples/map-memfd.ts   (in the QEMU test guest, from a checkout)
 *
 * No device is attached here, so nothing is pinned: this shows the bookkeeping side of iommufd.
 * examples/edu-dma.ts has a device really DMA through such a mapping.
 */
import { Iommufd, IommufdError, MemfdBuffer } from "../src/index.ts";

const hex = (n: number | bigint) => `0x${n.toString(16)}`;

function main(): void {
  using iommufd = Iommufd.open();
  console.log(`opened /dev/iommu (fd ${iommufd.fd})`);

  using ioas = iommufd.createIoas();
  const { ranges, alignment } = ioas.iovaRanges();
  console.log(
    `created IOAS ${ioas.id}: usable IOVAs ${ranges.map((r) => `${hex(r.start)}..${hex(r.last)}`).join(", ")}, alignment ${hex(alignment)}`,
  );

  using buffer = MemfdBuffer.create(1 << 20, { name: "map-memfd example" });
  buffer.bytes.set(new TextEncoder().encode("hello, device"));
  console.log(`created a ${buffer.size}-byte MemfdBuffer (memfd ${buffer.fd}, mapped at ${hex(buffer.address)})`);

  {
    // The kernel picks the IOVA; `using` unmaps at the end of this block.
    using mapping = ioas.mapFile(buffer);
    console.log(`mapped ${mapping.length} bytes at IOVA ${hex(mapping.iova)} (kernel-chosen)`);
  }
  console.log(`unmapped; the IOAS holds ${ioas.mappings.length} mappings`);

  const fixed = ioas.mapFile(buffer, { iova: 0x100000, offset: 0x1000, length: 0x4000, writable: false });
  console.log(
    `mapped ${hex(fixed.length)} bytes from offset 0x1000 read-only at fixed IOVA ${hex(fixed.iova)}..${hex(fixed.end)}`,
  );
  fixed.unmap();
  console.log(`unmapped IOVA ${hex(fixed.iova)}: mapped=${fixed.mapped}`);
  console.log("done");
}

try {
  main();
} catch (error) {
  if (error instanceof IommufdError && error.operation === "Iommufd.open") {
    console.error(
      `${error.message}\nThis needs /dev/iommu: run \`bun run doctor\`, or try it in the test guest: bun run vm -- bun examples/map-memfd.ts`,
    );
    process.exit(1);
  }
  throw error;
}
