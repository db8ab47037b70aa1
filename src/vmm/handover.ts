/**
 * Live hand-over of DMA to a new process (IOMMU_IOAS_CHANGE_PROCESS), as a VMM does when it
 * upgrades itself without stopping its devices:
 *
 *   1. the old process passes its iommufd, VFIO device and memfd fds to the new one (with
 *      Bun.spawn, as extra stdio entries: they arrive as fds 3, 4, 5...);
 *   2. the new process adopts them (Iommufd.fromFd, VfioDevice.fromFd, MemfdBuffer.fromFd,
 *      adoptIoas) and calls changeProcess(iommufd): every pinned page of every IOAS in that
 *      iommufd is now charged to it, not to the old process;
 *   3. the old process closes its copies and exits. The device never stopped.
 *
 * The kernel moves only file mappings (mapFile); a mapping made by address (map) refers to the old
 * process's memory and makes the call fail with EINVAL.
 */
import { readFileSync } from "node:fs";
import { CAP_IPC_LOCK, hasCapability, parseCapEff } from "../doctor/parse.ts";
import { Ioas } from "../iommufd/ioas.ts";
import type { Iommufd } from "../iommufd/iommufd.ts";
import { argumentError } from "../sys/error.ts";
import type { ErrnoTable } from "../sys/errno-table.ts";
import { IOMMU_IOAS_CHANGE_PROCESS, iommu_ioas_change_process } from "../uapi/iommufd.ts";

const cmd = iommu_ioas_change_process.create();

const CHANGE_PROCESS_ERRORS: ErrnoTable = {
  EINVAL: {
    message:
      "an IOAS in this iommufd holds a mapping made by address (IOMMU_IOAS_MAP, ioas.map()): only file mappings (IOMMU_IOAS_MAP_FILE, ioas.mapFile()) can move to another process",
    hint: "unmap the by-address mappings first, and map memfds or dma-bufs with mapFile() instead",
  },
  EBUSY: "a mapping in this iommufd is being created or torn down right now; try again",
  ENOMEM: {
    message: "this process cannot take over the pinned pages: its locked-memory limit (RLIMIT_MEMLOCK) is too small",
    hint: "raise `ulimit -l` of the new process to at least what the old one had pinned (VmPin in /proc/<pid>/status)",
  },
  ENOTTY: "this kernel's iommufd cannot change process (IOMMU_IOAS_CHANGE_PROCESS is Linux 6.14 or later)",
};

export interface ChangeProcessOptions {
  /**
   * Warn (process.emitWarning) when this process has CAP_IPC_LOCK, whose pinned-page accounting
   * Linux 7.2.13 gets wrong across a hand-over. Default true.
   */
  warnIfPrivileged?: boolean;
}

/** Whether this process holds CAP_IPC_LOCK in its effective set (iommufd then charges no rlimit). */
export function hasIpcLock(): boolean {
  const capEff = parseCapEff(readFileSync("/proc/self/status", "utf8"));
  return capEff !== undefined && hasCapability(capEff, CAP_IPC_LOCK);
}

export const PRIVILEGED_HANDOVER_WARNING =
  "IOMMU_IOAS_CHANGE_PROCESS from a process with CAP_IPC_LOCK: Linux 7.2.13 mis-accounts pinned memory here " +
  "(the old process keeps its VmPin and the new one's pinned_vm underflows after its first unmap). " +
  "Hand over between unprivileged processes; see scripts/repro/change-process-accounting.ts.";

/**
 * IOMMU_IOAS_CHANGE_PROCESS: charge every pinned page of every IOAS in `iommufd` to this
 * process. Call it in the new process after adopting the fds. Nothing changes when it fails.
 */
export function changeProcess(iommufd: Iommufd, options: ChangeProcessOptions = {}): void {
  const op = "IOMMU_IOAS_CHANGE_PROCESS";
  if ((options.warnIfPrivileged ?? true) && hasIpcLock()) {
    process.emitWarning(PRIVILEGED_HANDOVER_WARNING, { code: "IOMMUFD_CHANGE_PROCESS_PRIVILEGED" });
  }
  cmd.fill({ size: iommu_ioas_change_process.size });
  iommufd.ioctl(IOMMU_IOAS_CHANGE_PROCESS, cmd, op, CHANGE_PROCESS_ERRORS);
}

/**
 * An Ioas object for an IOAS that already exists in `iommufd` (made by the process that handed the
 * iommufd over). It knows none of the mappings made before; unmap by range works.
 */
export function adoptIoas(iommufd: Iommufd, id: number): Ioas {
  const op = "adoptIoas";
  iommufd.assertOpen(op);
  if (!Number.isInteger(id) || id <= 0 || id > 0xffffffff) throw argumentError(op, "id", `${id} is not an object id`);
  const ioas = new Ioas(iommufd, id);
  // One cheap query proves the id names an IOAS in this iommufd (ENOENT otherwise).
  ioas.iovaRanges();
  iommufd.track(ioas);
  return ioas;
}
