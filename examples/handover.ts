#!/usr/bin/env bun
/**
 * Live hand-over of a device's DMA to a new process (IOMMU_IOAS_CHANGE_PROCESS), the way a VMM
 * upgrades itself: this process maps guest memory (a memfd) for edu, proves DMA works, then starts
 * a new Bun process and passes it the iommufd, the VFIO device and the memfd as extra stdio fds.
 * The new process adopts them, takes over the pinned memory, and keeps DMAing after this one has
 * closed everything. A by-address mapping would block the hand-over: that is shown first.
 *
 *   bun run vm -- bun examples/handover.ts   (run it as an unprivileged user: see the note on CAP_IPC_LOCK)
 */
import { readFileSync } from "node:fs";
import {
  adoptIoas,
  bindToVfioPci,
  changeProcess,
  findPciDevices,
  hasIpcLock,
  Iommufd,
  IommufdError,
  MemfdBuffer,
  VfioDevice,
} from "../src/index.ts";
import { Edu, EDU_DEVICE, EDU_VENDOR } from "./edu.ts";

const IOVA = 0x100000;
const SIZE = 64 * 1024;

function vmPinKiB(): number {
  return Number(/^VmPin:\s+(\d+)/m.exec(readFileSync("/proc/self/status", "utf8"))?.[1] ?? -1);
}

/** edu copies `count` bytes IOVA -> device -> IOVA + 0x8000; true when they arrived. */
function dmaRoundTrip(edu: Edu, buffer: MemfdBuffer, seed: number): boolean {
  const count = 1024;
  for (let i = 0; i < count; i++) buffer.bytes[i] = (i * seed + 11) & 0xff;
  buffer.bytes.fill(0, 0x8000, 0x8000 + count);
  edu.fromRam(IOVA, 0, count);
  edu.toRam(0, IOVA + 0x8000, count);
  return buffer.bytes.subarray(0x8000, 0x8000 + count).every((b, i) => b === buffer.bytes[i]);
}

/** Lines of a stream, one next() at a time (a for-await loop would close the stream on break). */
function lineReader(stream: ReadableStream<Uint8Array>): { next(): Promise<string | undefined> } {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let pending = "";
  return {
    async next() {
      for (;;) {
        const cut = pending.indexOf("\n");
        if (cut >= 0) {
          const line = pending.slice(0, cut);
          pending = pending.slice(cut + 1);
          return line;
        }
        const { value, done } = await reader.read();
        if (done) {
          const rest = pending;
          pending = "";
          return rest || undefined;
        }
        pending += decoder.decode(value);
      }
    },
  };
}

interface Handed {
  ioasId: number;
  deviceId: number;
  hwptId: number;
}

async function oldProcess(): Promise<number> {
  const address = findPciDevices(EDU_VENDOR, EDU_DEVICE)[0];
  if (!address) {
    console.error("no edu device (1234:11e8) here: run it in the test guest: bun run vm -- bun examples/handover.ts");
    return 1;
  }
  if (hasIpcLock())
    console.log(
      "note: this process has CAP_IPC_LOCK; Linux 7.2.13 mis-accounts pinned memory across a hand-over from it",
    );
  const iommufd = Iommufd.open();
  const ioas = iommufd.createIoas();
  const device = VfioDevice.open(bindToVfioPci(address));
  const deviceId = device.bind(iommufd);
  const hwptId = device.attach(ioas);
  const buffer = MemfdBuffer.create(SIZE, { name: "guest memory" });
  ioas.mapFile(buffer, { iova: IOVA });
  const bar = device.mapRegion(0);
  device.setBusMaster(true);
  console.log(
    `old process ${process.pid}: DMA round trip ${dmaRoundTrip(new Edu(bar), buffer, 3) ? "OK" : "FAILED"}, VmPin ${vmPinKiB()} kB`,
  );

  // A mapping by address ties the IOAS to this process's memory: the kernel refuses to move it.
  const byAddress = MemfdBuffer.create(4096, { name: "by-address" });
  const blocker = ioas.map(byAddress, { iova: IOVA + SIZE });
  try {
    changeProcess(iommufd, { warnIfPrivileged: false });
    console.log("change-process with a by-address mapping unexpectedly succeeded");
  } catch (error) {
    if (!(error instanceof IommufdError)) throw error;
    console.log(`with a by-address mapping: ${error.code}: ${error.message}`);
  }
  blocker.unmap();
  byAddress.close();

  const handed: Handed = { ioasId: ioas.id, deviceId, hwptId };
  const child = Bun.spawn([process.execPath, import.meta.path, "--adopt", JSON.stringify(handed)], {
    stdio: ["pipe", "pipe", "inherit", iommufd.fd, device.fd, buffer.fd],
  });
  const lines = lineReader(child.stdout);
  for (let line = await lines.next(); line !== undefined; line = await lines.next()) {
    console.log(line);
    if (line.startsWith("new process") && line.includes("took over")) break;
  }
  console.log(`old process after the hand-over: VmPin ${vmPinKiB()} kB; closing its fds`);
  bar.unmap();
  buffer.close();
  device.close();
  iommufd.close();
  child.stdin.write("closed\n");
  await child.stdin.end();
  for (let line = await lines.next(); line !== undefined; line = await lines.next()) console.log(line);
  const code = await child.exited;
  console.log(code === 0 ? "done" : `new process exited with ${code}`);
  return code;
}

async function newProcess(handed: Handed): Promise<number> {
  const iommufd = Iommufd.fromFd(3);
  const device = VfioDevice.fromFd(4, { iommufd, deviceId: handed.deviceId, attachedTo: handed.hwptId });
  const buffer = MemfdBuffer.fromFd(5, { name: "guest memory" });
  const ioas = adoptIoas(iommufd, handed.ioasId);
  const before = vmPinKiB();
  changeProcess(iommufd);
  console.log(
    `new process ${process.pid}: adopted iommufd, ${device.path} (device ${device.deviceId}), IOAS ${ioas.id}; VmPin ${before} -> ${vmPinKiB()} kB: took over`,
  );
  // Wait until the old process has closed everything it had.
  for await (const chunk of Bun.stdin.stream()) if (new TextDecoder().decode(chunk).includes("closed")) break;
  const bar = device.mapRegion(0);
  const ok = dmaRoundTrip(new Edu(bar), buffer, 5);
  console.log(
    `new process after the old one closed its fds: DMA round trip ${ok ? "OK" : "FAILED"}, VmPin ${vmPinKiB()} kB`,
  );
  device.setBusMaster(false);
  ioas.unmap(IOVA, SIZE);
  console.log(`new process unmapped the guest memory: VmPin ${vmPinKiB()} kB`);
  bar.unmap();
  buffer.close();
  device.close();
  iommufd.close();
  return ok ? 0 : 1;
}

const adopt = process.argv.indexOf("--adopt");
process.exitCode = adopt > 0 ? await newProcess(JSON.parse(process.argv[adopt + 1]!)) : await oldProcess();
