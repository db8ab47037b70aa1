/**
 * Pure parsers for the text files the doctor reads (/proc, /sys, kernel configs). No I/O here, so
 * each can be tested with real-format text from any machine.
 */

/** A kernel release split into numbers: `6.18.44-fc-v657` gives 6, 18, 44. */
export interface KernelVersion {
  major: number;
  minor: number;
  patch: number;
  /** The release string as given. */
  release: string;
}

/** Parse `uname -r`. Returns undefined for text that does not start with `N.N`. */
export function parseKernelRelease(release: string): KernelVersion | undefined {
  const match = /^(\d+)\.(\d+)(?:\.(\d+))?/.exec(release.trim());
  if (!match) return undefined;
  return {
    major: Number(match[1]),
    minor: Number(match[2]),
    patch: match[3] === undefined ? 0 : Number(match[3]),
    release: release.trim(),
  };
}

/** Whether `version` is at least `major.minor`. */
export function kernelAtLeast(version: KernelVersion, major: number, minor: number): boolean {
  return version.major > major || (version.major === major && version.minor >= minor);
}

/** One row of /proc/<pid>/limits. `undefined` means unlimited. */
export interface ProcLimit {
  soft: number | undefined;
  hard: number | undefined;
  units: string;
}

/**
 * Parse /proc/<pid>/limits. Its columns are padded to fixed widths, and limit names contain
 * spaces, so each row is split on runs of two or more spaces rather than on single spaces.
 */
export function parseProcLimits(text: string): Map<string, ProcLimit> {
  const limits = new Map<string, ProcLimit>();
  for (const line of text.split("\n")) {
    if (!line.trim() || line.startsWith("Limit ")) continue;
    const cells = line.trim().split(/\s{2,}/);
    const [name, soft, hard, units = ""] = cells;
    if (name === undefined || soft === undefined || hard === undefined) continue;
    limits.set(name, { soft: parseLimitValue(soft), hard: parseLimitValue(hard), units });
  }
  return limits;
}

function parseLimitValue(cell: string): number | undefined {
  if (cell === "unlimited") return undefined;
  const n = Number(cell);
  return Number.isFinite(n) ? n : undefined;
}

/** RLIMIT_MEMLOCK from /proc/<pid>/limits text, in bytes; undefined when absent. */
export function memlockLimit(limitsText: string): ProcLimit | undefined {
  return parseProcLimits(limitsText).get("Max locked memory");
}

/**
 * A kernel .config: option name (with the CONFIG_ prefix) to its value. `# CONFIG_X is not set`
 * becomes "n", so "absent from the file" (undefined) stays distinguishable from "switched off".
 */
export function parseKernelConfig(text: string): Map<string, string> {
  const options = new Map<string, string>();
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    const unset = /^# (CONFIG_\w+) is not set$/.exec(line);
    if (unset) {
      options.set(unset[1]!, "n");
      continue;
    }
    const set = /^(CONFIG_\w+)=(.*)$/.exec(line);
    if (set) options.set(set[1]!, set[2]!.replace(/^"(.*)"$/, "$1"));
  }
  return options;
}

/** Whether a config value means built in or a module. */
export function configEnabled(value: string | undefined): boolean {
  return value === "y" || value === "m";
}

/** Effective capabilities from /proc/<pid>/status (the `CapEff:` hex mask). */
export function parseCapEff(statusText: string): bigint | undefined {
  const match = /^CapEff:\s*([0-9a-fA-F]+)\s*$/m.exec(statusText);
  return match ? BigInt(`0x${match[1]}`) : undefined;
}

/** linux/capability.h */
export const CAP_IPC_LOCK = 14;

/** Whether bit `capability` is set in a capability mask. */
export function hasCapability(capEff: bigint, capability: number): boolean {
  return ((capEff >> BigInt(capability)) & 1n) === 1n;
}

/** `hugepages-2048kB` (a /sys/kernel/mm/hugepages entry) to bytes. */
export function parseHugePageDir(name: string): number | undefined {
  const match = /^hugepages-(\d+)kB$/.exec(name);
  return match ? Number(match[1]) * 1024 : undefined;
}

/** A sysfs integer (`0x1234\n`, `42\n`); undefined when the text is not one. */
export function parseSysfsInt(text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  const trimmed = text.trim();
  if (!/^(0x[0-9a-fA-F]+|\d+)$/.test(trimmed)) return undefined;
  return Number(trimmed);
}

/** Byte counts for people: 8388608 gives "8 MiB". */
export function formatBytes(bytes: number): string {
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1 && value % 1024 === 0) {
    value /= 1024;
    unit++;
  }
  if (unit === 0 && value >= 1024) return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
  return `${value} ${units[unit]}`;
}

/** `64M`, `1G`, `4096`, `2MiB` to bytes; undefined for anything else. */
export function parseSize(text: string): number | undefined {
  const match = /^(\d+)\s*([kKmMgGtT]?)(i?[bB])?$/.exec(text.trim());
  if (!match) return undefined;
  const shift = { "": 0, k: 10, m: 20, g: 30, t: 40 }[match[2]!.toLowerCase() as "" | "k" | "m" | "g" | "t"];
  return Number(match[1]) * 2 ** shift;
}
