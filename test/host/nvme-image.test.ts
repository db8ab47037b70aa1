/**
 * On the host, after the guest has powered off: the bytes the NVMe tests wrote through the
 * user-space driver are in the controller's disk image file, at the same offsets.
 *
 * Each guest NVMe suite leaves a manifest (image path, block size, extents) in $IOMMUFD_VM_OUT:
 * test/kernel/nvme.test.ts nvme-written.json (iommufd, with its peer-to-peer extent),
 * test/kernel/nvme-type1.test.ts nvme-type1-written.json (the VFIO type1 backend). The runner
 * copies them to the directory named by IOMMUFD_VM_RESULTS here.
 */
import { describe, expect, test } from "bun:test";
import { closeSync, existsSync, openSync, readdirSync, readFileSync, readSync } from "node:fs";
import { join } from "node:path";
import { P2P_EXTENT, P2P_SOURCE_LBA, pattern } from "../support/nvme.ts";

interface Manifest {
  disk: string;
  blockSize: number;
  written: { lba: number; blocks: number }[];
  p2p?: { lba: number; blocks: number; sourceLba: number };
  /** false where the guest's kernel had no VFIO dma-buf export (absent in older manifests: true). */
  peerToPeer?: boolean;
}

/** The iommufd suite's manifest: it also records the extent written from a peer's memory. */
const IOMMUFD_MANIFEST = "nvme-written.json";

const results = process.env.IOMMUFD_VM_RESULTS;
const manifests =
  results && existsSync(results) ? readdirSync(results).filter((n) => /^nvme.*-written\.json$/.test(n)) : [];
const why = results
  ? `no nvme*-written.json in ${results}: the guest's NVMe tests did not run or did not finish`
  : "IOMMUFD_VM_RESULTS is not set: this check runs after a guest run of the kernel tests";

function readAt(path: string, offset: number, length: number): Uint8Array {
  const fd = openSync(path, "r");
  try {
    const out = new Uint8Array(length);
    const n = readSync(fd, out, 0, length, offset);
    expect(n).toBe(length);
    return out;
  } finally {
    closeSync(fd);
  }
}

describe("NVMe image on the host after the guest powered off", () => {
  if (manifests.length === 0) {
    // The runner names a results directory only after a guest run: then a missing manifest is a failure.
    if (results) test("the guest left its NVMe manifests", () => expect(why).toBe(""));
    else test.skip(`image check (${why})`, () => {});
    return;
  }
  for (const name of manifests) {
    const manifest = JSON.parse(readFileSync(join(results!, name), "utf8")) as Manifest;

    test(`${name}: every extent the guest wrote is in the image file, byte for byte`, () => {
      expect(existsSync(manifest.disk)).toBe(true);
      expect(manifest.written.length).toBeGreaterThanOrEqual(4);
      for (const { lba, blocks } of manifest.written) {
        const bytes = readAt(manifest.disk, lba * manifest.blockSize, blocks * manifest.blockSize);
        expect(Buffer.from(bytes).equals(Buffer.from(pattern(lba, blocks, manifest.blockSize)))).toBe(true);
      }
    });

    // A kernel without VFIO dma-buf export (6.12) asserted its ENOTTY in the guest instead.
    if (name !== IOMMUFD_MANIFEST || manifest.peerToPeer === false) continue;
    test(`${name}: the extent written from the peer controller's memory buffer is there too`, () => {
      if (!manifest.p2p) throw new Error("the guest did not record its peer-to-peer write");
      expect(manifest.p2p).toEqual({ lba: P2P_EXTENT.lba, blocks: P2P_EXTENT.blocks, sourceLba: P2P_SOURCE_LBA });
      const { lba, blocks, sourceLba } = manifest.p2p;
      const bytes = Buffer.from(readAt(manifest.disk, lba * manifest.blockSize, blocks * manifest.blockSize));
      // The guest put its own LBA's pattern in the peer's memory through the BAR before the write;
      // the source extent's pattern here would mean the data came from host memory instead.
      expect(bytes.equals(Buffer.from(pattern(sourceLba, blocks, manifest.blockSize)))).toBe(false);
      expect(bytes.equals(Buffer.from(pattern(lba, blocks, manifest.blockSize)))).toBe(true);
    });
  }
});
