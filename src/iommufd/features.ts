/**
 * What this kernel's iommufd can do, asked of the kernel itself rather than read from a version
 * number: distribution kernels backport and leave out features whatever `uname -r` says.
 *
 * The probe: iommufd dispatches on the command number, rejects a number it does not know with
 * ENOTTY, and for a known one reads the leading `size` word first and answers EINVAL when it is
 * smaller than the command's struct. A command whose size is 0 therefore tells "known" (EINVAL)
 * from "unknown" (ENOTTY) without the kernel doing anything else.
 */
import { ERRNO } from "../sys/errno.ts";
import { type IommufdError, syscallError } from "../sys/error.ts";
import { isErrno, ioctl } from "../sys/ioctl.ts";
import {
  IOMMU_FAULT_QUEUE_ALLOC,
  IOMMU_GET_HW_INFO,
  IOMMU_HWPT_ALLOC,
  IOMMU_HWPT_GET_DIRTY_BITMAP,
  IOMMU_IOAS_CHANGE_PROCESS,
  IOMMU_IOAS_MAP_FILE,
  iommu_destroy,
} from "../uapi/iommufd.ts";

/** Each optional iommufd command the library uses, with the release that brought it upstream. */
export const FEATURE_COMMANDS = {
  mapFile: { request: IOMMU_IOAS_MAP_FILE, name: "IOMMU_IOAS_MAP_FILE", since: "Linux 6.13" },
  hwpt: { request: IOMMU_HWPT_ALLOC, name: "IOMMU_HWPT_ALLOC", since: "Linux 6.7" },
  hwInfo: { request: IOMMU_GET_HW_INFO, name: "IOMMU_GET_HW_INFO", since: "Linux 6.7" },
  dirtyTracking: { request: IOMMU_HWPT_GET_DIRTY_BITMAP, name: "IOMMU_HWPT_GET_DIRTY_BITMAP", since: "Linux 6.7" },
  faultQueue: { request: IOMMU_FAULT_QUEUE_ALLOC, name: "IOMMU_FAULT_QUEUE_ALLOC", since: "Linux 6.11" },
  changeProcess: { request: IOMMU_IOAS_CHANGE_PROCESS, name: "IOMMU_IOAS_CHANGE_PROCESS", since: "Linux 6.13" },
} as const;

export type IommufdFeature = keyof typeof FEATURE_COMMANDS;

/** Which optional commands the kernel knows: true for each it accepts. */
export type IommufdFeatures = Readonly<Record<IommufdFeature, boolean>>;

/** Any command struct begins with its u32 size; one with size 0 is refused before any work. */
const sizeZeroCmd = iommu_destroy.create();

/** Asks the kernel behind `fd` (an open iommufd) which optional commands it knows. */
export function probeFeatures(fd: number): IommufdFeatures {
  const features = {} as Record<IommufdFeature, boolean>;
  for (const [feature, command] of Object.entries(FEATURE_COMMANDS) as [
    IommufdFeature,
    (typeof FEATURE_COMMANDS)[IommufdFeature],
  ][]) {
    features[feature] = knowsCommand(fd, command.request, command.name);
  }
  return Object.freeze(features);
}

/** @internal Whether the kernel behind `fd` knows the iommufd command `request` (exported for its test). */
export function knowsCommand(fd: number, request: number, name: string): boolean {
  sizeZeroCmd.set("size", 0);
  try {
    ioctl(fd, request, sizeZeroCmd, `${name} (feature probe)`);
    return true;
  } catch (error) {
    if (isErrno(error, "EINVAL")) return true;
    if (isErrno(error, "ENOTTY")) return false;
    throw error;
  }
}

/** The sentence for an operation this kernel cannot do: which command is missing, since when. */
export function missingFeatureText(feature: IommufdFeature): string {
  const command = FEATURE_COMMANDS[feature];
  return `the running kernel's iommufd does not know ${command.name} (added in ${command.since}; the kernel answers ENOTTY)`;
}

/**
 * The error for an operation that needs a command this kernel lacks: ENOTTY, as the kernel itself
 * answers, with the command, the release that brought it, and `why` no fallback applies.
 */
export function missingFeatureError(operation: string, feature: IommufdFeature, why: string): IommufdError {
  return syscallError(operation, ERRNO.ENOTTY, `${missingFeatureText(feature)}; ${why}`, {
    hint: "run `bunx bun-iommufd doctor` to see what this kernel has",
  });
}
