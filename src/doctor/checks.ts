/**
 * Judging the facts: each check turns part of DoctorFacts into one pass/warn/fail verdict with a
 * one-line fix. Pure functions, so every verdict can be tested with hand-made facts. This file
 * judges the kernel and the memory it pins (release, config, /dev/iommu, memlock, huge pages);
 * device-checks.ts judges the IOMMU groups, VFIO devices and dma-buf export.
 */
import type { DoctorFacts } from "./facts.ts";
import { formatBytes, kernelAtLeast, parseKernelRelease } from "./parse.ts";

/** "fail" only for what stops the library working; optional features missing are "warn". */
export type CheckStatus = "pass" | "warn" | "fail";

/** Stable check names, also the keys in the --json output. */
export type CheckId =
  | "kernel"
  | "config"
  | "iommufd"
  | "features"
  | "memlock"
  | "iommu"
  | "vfio"
  | "hugepages"
  | "dmabuf"
  | "backend";

export interface CheckResult {
  id: CheckId;
  /** Short label for the line, e.g. "/dev/iommu". */
  title: string;
  status: CheckStatus;
  /** One line saying what was found. */
  summary: string;
  /** One line saying what to do; present whenever status is not "pass". */
  fix?: string;
  /** Further lines (devices, pools, options), shown indented under the check. */
  details?: string[];
}

/** Kernel releases that brought the features the library uses. */
export const KERNEL_FEATURES = {
  iommufd: { major: 6, minor: 2, what: "iommufd (/dev/iommu)" },
  vfioCdev: { major: 6, minor: 6, what: "VFIO device cdevs (/dev/vfio/devices)" },
  mapFile: { major: 6, minor: 13, what: "IOMMU_IOAS_MAP_FILE (mapping a memfd by fd)" },
  dmabuf: { major: 6, minor: 19, what: "VFIO dma-buf export (and mapping one into an IOAS)" },
} as const;

/** How to try the library without rebuilding the machine's kernel; vm/ ships only in the repository. */
export const GUEST_HINT =
  "or, in a checkout of bun-iommufd, try it in the QEMU test guest: bun run vm -- bun bin/bun-iommufd.ts doctor";

/** uname -r against the releases that brought iommufd, device cdevs, MAP_FILE and dma-bufs. */
export function checkKernel(facts: DoctorFacts): CheckResult {
  const base = { id: "kernel" as const, title: "kernel" };
  const version = parseKernelRelease(facts.kernelRelease);
  if (!version) {
    return {
      ...base,
      status: "warn",
      summary: `cannot read a version from "${facts.kernelRelease}"`,
      fix: "check `uname -r`; iommufd needs Linux 6.2 or newer",
    };
  }
  const label = `Linux ${version.major}.${version.minor} (${version.release})`;
  // Distribution kernels backport and leave out: once iommufd answers, its features are asked of it.
  if (facts.iommufd?.features) {
    return { ...base, status: "pass", summary: `${label}: what its iommufd can do is asked of it (see features)` };
  }
  const features = Object.values(KERNEL_FEATURES);
  const missing = features.filter((f) => !kernelAtLeast(version, f.major, f.minor));
  if (missing.length === 0) {
    return {
      ...base,
      status: "pass",
      summary: `${label}: new enough for iommufd, IOMMU_IOAS_MAP_FILE and VFIO dma-bufs`,
    };
  }
  const lacking = missing.map((f) => `${f.what} needs ${f.major}.${f.minor}`).join("; ");
  if (missing.includes(KERNEL_FEATURES.iommufd)) {
    return {
      ...base,
      status: withoutIommufd(facts),
      summary: `${label} predates iommufd: ${lacking}${type1StillWorks(facts)}`,
      fix: `boot Linux 6.19 or newer built with CONFIG_IOMMUFD=y, ${GUEST_HINT}`,
    };
  }
  const newest = missing[missing.length - 1]!;
  return {
    ...base,
    status: "warn",
    summary: `${label} is recent enough for iommufd, but ${lacking}`,
    fix: `boot Linux ${newest.major}.${newest.minor} or newer to use every feature of the library`,
  };
}

/** CONFIG_IOMMUFD and friends in the kernel's own config, when one is readable. */
export function checkConfig(facts: DoctorFacts): CheckResult {
  const base = { id: "config" as const, title: "kernel config" };
  const usable = facts.iommufd?.ok === true;
  if (!facts.configSource) {
    if (usable)
      return {
        ...base,
        status: "pass",
        summary: "no kernel config readable (/proc/config.gz, /boot/config-*), but /dev/iommu works",
      };
    return {
      ...base,
      status: "warn",
      summary:
        `cannot tell whether the kernel has CONFIG_IOMMUFD: no /proc/config.gz or ` +
        `/boot/config-${facts.kernelRelease}`,
      fix:
        "look for CONFIG_IOMMUFD in the config your kernel was built with (`modprobe configs` provides " +
        "/proc/config.gz where CONFIG_IKCONFIG=m)",
    };
  }
  const value = (name: keyof DoctorFacts["config"]) => facts.config[name] ?? "absent";
  const details = (Object.keys(facts.config) as (keyof DoctorFacts["config"])[]).map(
    (name) => `${name}=${value(name)}`,
  );
  const iommufd = facts.config.CONFIG_IOMMUFD;
  const from = `(from ${facts.configSource})`;
  if (iommufd === "y" || iommufd === "m") {
    const cdev = facts.config.CONFIG_VFIO_DEVICE_CDEV;
    if (cdev !== "y") {
      return {
        ...base,
        status: "warn",
        summary:
          `CONFIG_IOMMUFD=${iommufd}, but CONFIG_VFIO_DEVICE_CDEV=${cdev ?? "absent"} ${from}: no ` +
          `/dev/vfio/devices nodes for VfioDevice`,
        fix: "rebuild the kernel with CONFIG_VFIO_DEVICE_CDEV=y (Linux 6.6+) to drive devices through iommufd",
        details,
      };
    }
    if (iommufd === "m" && facts.iommuNode === "missing") {
      return {
        ...base,
        status: "warn",
        summary: `CONFIG_IOMMUFD=m ${from}, but the module is not loaded`,
        fix: "modprobe iommufd",
        details,
      };
    }
    return {
      ...base,
      status: "pass",
      summary: `CONFIG_IOMMUFD=${iommufd}, CONFIG_VFIO_DEVICE_CDEV=${cdev} ${from}`,
      details,
    };
  }
  const setting = iommufd === "n" ? "not set" : "absent";
  return {
    ...base,
    status: usable ? "warn" : "fail",
    summary: `CONFIG_IOMMUFD is ${setting} ${from}: this kernel was built without iommufd`,
    fix:
      `build and boot a kernel with CONFIG_IOMMUFD=y (and CONFIG_VFIO_DEVICE_CDEV=y, CONFIG_VFIO_PCI=y), ` +
      `${GUEST_HINT}`,
    details,
  };
}

/** No iommufd stops the library only where no VFIO container can stand in for it. */
function withoutIommufd(facts: DoctorFacts): CheckStatus {
  return facts.vfioContainer === true ? "warn" : "fail";
}

function type1StillWorks(facts: DoctorFacts): string {
  return facts.vfioContainer === true ? " (the VFIO type1 backend works without it: see DMA backend)" : "";
}

/** /dev/iommu opened and an IOAS allocated: with the DMA backend check, what sets the exit code. */
export function checkIommufd(facts: DoctorFacts): CheckResult {
  const base = { id: "iommufd" as const, title: facts.iommuPath };
  const path = facts.iommuPath;
  if (facts.iommuNode === "missing") {
    const config = facts.config.CONFIG_IOMMUFD;
    const why =
      config === "n" || (facts.configSource && config === undefined)
        ? "this kernel has no iommufd (CONFIG_IOMMUFD is not set)"
        : config === "m"
          ? "the iommufd module is not loaded"
          : "this kernel has no iommufd, or the node was not created";
    const fix =
      config === "m"
        ? "modprobe iommufd (and check that udev or devtmpfs created /dev/iommu)"
        : config === "y"
          ? "mount devtmpfs on /dev, or let udev create the node (its major:minor is in /sys/class/misc/iommu/dev)"
          : `boot a kernel built with CONFIG_IOMMUFD=y (Linux 6.2+), ${GUEST_HINT}`;
    return {
      ...base,
      status: withoutIommufd(facts),
      summary: `${path} does not exist: ${why}${type1StillWorks(facts)}`,
      fix,
    };
  }
  if (facts.iommuNode === "other") {
    return {
      ...base,
      status: "fail",
      summary: `${path} exists but is not a character device`,
      fix: `remove ${path} and let devtmpfs/udev create the real node (misc device "iommu")`,
    };
  }
  const probe = facts.iommufd;
  if (!probe) return { ...base, status: "fail", summary: `${path} was not tried`, fix: "run the doctor again" };
  if (probe.ok) {
    const ranges = probe.iovaRanges?.length ? `; usable IOVAs ${probe.iovaRanges.join(", ")}` : "";
    return { ...base, status: "pass", summary: `opened ${path} and created IOAS ${probe.ioasId}${ranges}` };
  }
  const code = probe.code ? ` [${probe.code}]` : "";
  if (probe.failedAt === "open") {
    const fix = IOMMU_OPEN_FIXES[probe.code ?? ""]?.(path) ?? `check ${path} and the kernel log (dmesg)`;
    return { ...base, status: "fail", summary: `cannot open ${path}${code}: ${probe.message ?? "unknown error"}`, fix };
  }
  return {
    ...base,
    status: "fail",
    summary: `opened ${path}, but IOMMU_IOAS_ALLOC failed${code}: ${probe.message ?? "unknown error"}`,
    fix:
      probe.code === "ENOMEM"
        ? "free memory, or raise the memory cgroup limit"
        : "check the kernel log (dmesg) for iommufd errors",
  };
}

/** What to do when opening /dev/iommu fails, by errno code. */
const IOMMU_OPEN_FIXES: Partial<Record<string, (path: string) => string>> = {
  EACCES: (path) => noAccessFix(path),
  EPERM: (path) => noAccessFix(path),
  ENODEV: () => DRIVER_GONE_FIX,
  ENXIO: () => DRIVER_GONE_FIX,
};

const DRIVER_GONE_FIX = "the iommufd driver behind the node is gone: reboot into a kernel with CONFIG_IOMMUFD=y";

function noAccessFix(path: string): string {
  return (
    `run as root, or give this user read-write access to ${path} ` +
    `(e.g. a udev rule: KERNEL=="iommu", GROUP="<group>", MODE="0660")`
  );
}

/** What each missing optional command costs the user, by IommufdFeature name. */
const MISSING_FEATURE_COST: Record<string, string> = {
  mapFile: "mapFile maps a MemfdBuffer by address instead; dma-bufs (peer-to-peer) cannot be mapped",
  hwpt: "no HwPageTable (explicit page tables, nesting parents)",
  hwInfo: "no readHwInfo",
  dirtyTracking: "no dirty tracking",
  faultQueue: "no FaultQueue (I/O page faults)",
  changeProcess: "no changeProcess (hand-over of pinned memory to another process)",
};

/** The optional iommufd commands, as the kernel itself answered (iommufd.features). */
export function checkFeatures(facts: DoctorFacts): CheckResult {
  const base = { id: "features" as const, title: "iommufd features" };
  const features = facts.iommufd?.features;
  if (!features) {
    return {
      ...base,
      status: "warn",
      summary: "not asked: iommufd could not be opened",
      fix: "see the /dev/iommu line above",
    };
  }
  const names = Object.keys(features);
  const missing = names.filter((name) => !features[name]);
  const details = names.map((name) => `${name}: ${features[name] ? "yes" : "no"}`);
  if (missing.length === 0) {
    return {
      ...base,
      status: "pass",
      summary: `the kernel knows every optional command (${names.join(", ")})`,
      details,
    };
  }
  return {
    ...base,
    status: "warn",
    summary: `the kernel lacks ${missing.join(", ")}: ${missing.map((m) => MISSING_FEATURE_COST[m] ?? m).join("; ")}`,
    fix: "boot a newer kernel (MAP_FILE and change-process came in Linux 6.13) to use every feature",
    details,
  };
}

/** RLIMIT_MEMLOCK against facts.mapBytes; CAP_IPC_LOCK makes the limit moot. */
export function checkMemlock(facts: DoctorFacts): CheckResult {
  const base = { id: "memlock" as const, title: "locked memory" };
  const need = formatBytes(facts.mapBytes);
  // Pinned pages count only while a domain (a device, or the selftest mock) is attached; a map
  // with nothing attached pins nothing. Say so, or a low limit looks worse than it is.
  const when = "pinned pages are charged to RLIMIT_MEMLOCK once a device is attached";
  if (facts.memlock && facts.memlock.soft === undefined)
    return { ...base, status: "pass", summary: "RLIMIT_MEMLOCK is unlimited" };
  if (facts.capIpcLock) {
    const limit = facts.memlock ? `RLIMIT_MEMLOCK ${describeLimit(facts.memlock.soft)}, but ` : "";
    return {
      ...base,
      status: "pass",
      summary:
        `${limit}this process has CAP_IPC_LOCK${facts.uid === 0 ? " (root)" : ""}: iommufd does not charge ` +
        `its pinned pages`,
    };
  }
  if (!facts.memlock) {
    return {
      ...base,
      status: "warn",
      summary: "cannot read RLIMIT_MEMLOCK from /proc/self/limits",
      fix: `check \`ulimit -l\`: ${when}, and a ${need} mapping needs at least that much`,
    };
  }
  const { soft, hard } = facts.memlock;
  if (soft === undefined) return { ...base, status: "pass", summary: "RLIMIT_MEMLOCK is unlimited" };
  if (soft >= facts.mapBytes) {
    return {
      ...base,
      status: "pass",
      summary: `RLIMIT_MEMLOCK ${formatBytes(soft)} covers a ${need} mapping (${when})`,
    };
  }
  const raise =
    hard === undefined || hard >= facts.mapBytes
      ? `raise the soft limit: ulimit -l ${hard === undefined ? "unlimited" : Math.floor(hard / 1024)}`
      : `raise the hard limit (${formatBytes(hard)}) as root: memlock in /etc/security/limits.conf, LimitMEMLOCK= ` +
        `in a systemd unit, or grant CAP_IPC_LOCK`;
  return {
    ...base,
    status: "warn",
    summary: `RLIMIT_MEMLOCK is ${formatBytes(soft)}: a ${need} mapping will fail with ENOMEM (${when})`,
    fix: raise,
  };
}

function describeLimit(limit: number | undefined): string {
  return limit === undefined ? "is unlimited" : `is ${formatBytes(limit)}`;
}

/** Free huge pages, which MemfdBuffer's hugePages option draws from. */
export function checkHugePages(facts: DoctorFacts): CheckResult {
  const base = { id: "hugepages" as const, title: "huge pages" };
  const pools = facts.hugePagePools;
  if (!pools || pools.length === 0) {
    return {
      ...base,
      status: "warn",
      summary: "no huge page pools (/sys/kernel/mm/hugepages is missing)",
      fix: "boot a kernel with CONFIG_HUGETLBFS=y to use MemfdBuffer's hugePages option",
    };
  }
  const details = pools.map(
    (p) => `${formatBytes(p.pageBytes)} pages: ${p.total ?? "?"} reserved, ${p.free ?? "?"} free`,
  );
  const free = pools.filter((p) => (p.free ?? 0) > 0);
  if (free.length > 0) {
    const text = free.map((p) => `${p.free} free of ${formatBytes(p.pageBytes)}`).join(", ");
    return { ...base, status: "pass", summary: `${text} (for MemfdBuffer.create(size, { hugePages }))`, details };
  }
  const reserved = pools.some((p) => (p.total ?? 0) > 0);
  return {
    ...base,
    status: "warn",
    summary: reserved
      ? "huge pages are reserved but none is free: huge-page MemfdBuffers will fail with ENOMEM"
      : `no huge pages reserved (nr_hugepages ${facts.nrHugepages ?? 0}): huge-page MemfdBuffers will fail`,
    fix:
      "reserve some as root: echo 64 > /proc/sys/vm/nr_hugepages (64 x 2 MiB), or hugepages=64 on the kernel " +
      "command line",
    details,
  };
}
