/**
 * Gathering what the doctor judges: files under /proc and /sys, the kernel config, and real
 * attempts to use /dev/iommu and a VFIO device. Every read tolerates a missing or unreadable file
 * (containers, other kernels, non-root users), because the doctor must report, never crash.
 */
import { lstatSync, readdirSync, readFileSync, readlinkSync, statSync } from "node:fs";
import { machine, release } from "node:os";
import { basename, join } from "node:path";
import { gunzipSync } from "node:zlib";
import { BACKEND_ENV } from "../dma/backend.ts";
import { Iommufd } from "../iommufd/iommufd.ts";
import { IommufdError } from "../sys/error.ts";
import { errnoCode } from "../sys/errno.ts";
import { VfioDevice } from "../vfio/device.ts";
import {
  CAP_IPC_LOCK,
  hasCapability,
  memlockLimit,
  parseCapEff,
  parseHugePageDir,
  parseKernelConfig,
  parseSysfsInt,
  type ProcLimit,
} from "./parse.ts";

/** The kernel options the doctor reports on. */
export const CONFIG_OPTIONS = [
  "CONFIG_IOMMUFD",
  "CONFIG_IOMMUFD_TEST",
  "CONFIG_VFIO",
  "CONFIG_VFIO_PCI",
  "CONFIG_VFIO_DEVICE_CDEV",
  "CONFIG_VFIO_PCI_DMABUF",
  "CONFIG_PCI_P2PDMA",
  "CONFIG_HUGETLBFS",
] as const;

export type ConfigOption = (typeof CONFIG_OPTIONS)[number];

/** Outcome of really opening /dev/iommu and allocating an IOAS. */
export interface IommufdProbe {
  /** Whether both the open and IOMMU_IOAS_ALLOC worked. */
  ok: boolean;
  /** The step that failed. */
  failedAt?: "open" | "ioas";
  ioasId?: number;
  /** Which optional commands the kernel knows (`iommufd.features`), when the open worked. */
  features?: Record<string, boolean>;
  /** Usable IOVA ranges of the new IOAS, as hex `start..last`. */
  iovaRanges?: string[];
  errno?: number;
  code?: string;
  message?: string;
}

/** Outcome of asking a VFIO device whether it can export dma-bufs. */
export interface DmaBufProbe {
  node: string;
  pciAddress?: string;
  /** true: the feature probe succeeded; false: the kernel said no; undefined: could not ask. */
  supported: boolean | undefined;
  /** The step that failed: opening or binding the device, or the feature probe itself. */
  failedAt?: "open" | "bind" | "probe";
  errno?: number;
  code?: string;
  message?: string;
}

export interface PciDevice {
  address: string;
  vendor?: number;
  device?: number;
  class?: number;
  driver?: string;
  iommuGroup?: string;
  /** /dev/vfio/devices/vfioN when the device has a VFIO cdev. */
  vfioNode?: string;
  /** Whether that node exists in /dev (sysfs can list it while devtmpfs is not mounted). */
  vfioNodeExists?: boolean;
}

export interface HugePagePool {
  pageBytes: number;
  total?: number;
  free?: number;
}

/** Everything the checks judge; plain data, so tests can build one by hand. */
export interface DoctorFacts {
  kernelRelease: string;
  arch: string;
  uid: number | undefined;
  /** Set by the QEMU test guest (vm/run.ts). */
  inVm: boolean;
  /** Where the kernel config came from, or undefined when none was readable. */
  configSource?: string;
  /** The options of CONFIG_OPTIONS as found ("y", "m", "n"); absent when not in the file. */
  config: Partial<Record<ConfigOption, string>>;
  iommuPath: string;
  iommuNode: "missing" | "char" | "other";
  iommufd?: IommufdProbe;
  memlock?: ProcLimit;
  capIpcLock?: boolean;
  /** Bytes a mapping is expected to pin (the memlock check compares against it). */
  mapBytes: number;
  /** Entries of /sys/class/iommu (undefined when the directory is missing). */
  iommuUnits?: string[];
  iommuGroups?: number;
  pciDevices?: PciDevice[];
  nrHugepages?: number;
  hugePagePools?: HugePagePool[];
  dmabuf?: DmaBufProbe;
  /** /dev/vfio/vfio is a character device (the legacy VFIO container, type1's way in). */
  vfioContainer?: boolean;
  /** $BUN_IOMMUFD_BACKEND as set (the backend check judges it). */
  backendEnv?: string;
}

/** The file system and kernel calls the doctor uses; tests swap in their own. */
export interface DoctorSystem {
  kernelRelease(): string;
  arch(): string;
  uid(): number | undefined;
  env(name: string): string | undefined;
  readText(path: string): string | undefined;
  readBytes(path: string): Uint8Array | undefined;
  listDir(path: string): string[] | undefined;
  readLink(path: string): string | undefined;
  nodeType(path: string): "missing" | "char" | "dir" | "file" | "other";
  probeIommufd(path: string): IommufdProbe;
  probeDmaBuf(node: string, iommuPath: string): DmaBufProbe;
}

function attempt<T>(fn: () => T): T | undefined {
  try {
    return fn();
  } catch {
    return undefined;
  }
}

function errorFields(error: unknown): { errno?: number; code?: string; message: string } {
  if (error instanceof IommufdError) return { errno: error.errno, code: error.code, message: error.message };
  return { message: error instanceof Error ? error.message : String(error) };
}

/** IOMMU_IOAS_ALLOC needs a working iommufd, so a successful open alone proves little. */
export function probeIommufd(path: string): IommufdProbe {
  let iommufd: Iommufd;
  try {
    iommufd = Iommufd.open(path);
  } catch (error) {
    return { ok: false, failedAt: "open", ...errorFields(error) };
  }
  try {
    using ioas = iommufd.createIoas();
    const result: IommufdProbe = { ok: true, ioasId: ioas.id };
    const features = attempt(() => iommufd.features);
    if (features) result.features = { ...features };
    const ranges = attempt(() => ioas.iovaRanges());
    if (ranges) result.iovaRanges = ranges.ranges.map((r) => `0x${r.start.toString(16)}..0x${r.last.toString(16)}`);
    return result;
  } catch (error) {
    return { ok: false, failedAt: "ioas", ...errorFields(error) };
  } finally {
    iommufd.close();
  }
}

/**
 * VFIO answers feature ioctls only once the device is bound to an iommufd (EINVAL before), so
 * the probe binds a throwaway iommufd; closing the device fd undoes the bind.
 */
export function probeDmaBuf(node: string, iommuPath: string): DmaBufProbe {
  const base: DmaBufProbe = { node, supported: undefined };
  let device: VfioDevice;
  try {
    device = VfioDevice.open(node);
  } catch (error) {
    return { ...base, failedAt: "open", ...errorFields(error) };
  }
  try {
    if (device.pciAddress) base.pciAddress = device.pciAddress;
    using iommufd = Iommufd.open(iommuPath);
    try {
      device.bind(iommufd);
    } catch (error) {
      return { ...base, failedAt: "bind", ...errorFields(error) };
    }
    try {
      device.probeDmaBuf();
    } catch (error) {
      if (!(error instanceof IommufdError)) throw error;
      return { ...base, supported: false, failedAt: "probe", errno: error.errno, code: errnoCode(error.errno) };
    }
    return { ...base, supported: true };
  } catch (error) {
    return { ...base, failedAt: "open", ...errorFields(error) };
  } finally {
    device.close();
  }
}

/** The real machine. */
export const realSystem: DoctorSystem = {
  kernelRelease: () => release(),
  arch: () => machine(),
  uid: () => (typeof process.getuid === "function" ? process.getuid() : undefined),
  env: (name) => process.env[name],
  readText: (path) => attempt(() => readFileSync(path, "utf8")),
  readBytes: (path) => attempt(() => new Uint8Array(readFileSync(path))),
  listDir: (path) => attempt(() => readdirSync(path)),
  readLink: (path) => attempt(() => readlinkSync(path)),
  nodeType: (path) => {
    const stat = attempt(() => statSync(path)) ?? attempt(() => lstatSync(path));
    if (!stat) return "missing";
    if (stat.isCharacterDevice()) return "char";
    if (stat.isDirectory()) return "dir";
    if (stat.isFile()) return "file";
    return "other";
  },
  probeIommufd,
  probeDmaBuf,
};

/** Where distributions keep the running kernel's config, best source first. */
export function configCandidates(kernelRelease: string): string[] {
  return ["/proc/config.gz", `/boot/config-${kernelRelease}`, `/lib/modules/${kernelRelease}/config`];
}

function readConfig(system: DoctorSystem, kernelRelease: string): { source: string; text: string } | undefined {
  for (const path of configCandidates(kernelRelease)) {
    if (path.endsWith(".gz")) {
      const bytes = system.readBytes(path);
      const text = bytes && attempt(() => new TextDecoder().decode(gunzipSync(bytes)));
      if (text) return { source: path, text };
    } else {
      const text = system.readText(path);
      if (text) return { source: path, text };
    }
  }
  return undefined;
}

function listPciDevices(system: DoctorSystem): PciDevice[] | undefined {
  const root = "/sys/bus/pci/devices";
  const addresses = system.listDir(root);
  if (!addresses) return undefined;
  return addresses.sort().map((address) => {
    const dir = join(root, address);
    const device: PciDevice = { address };
    const vendor = parseSysfsInt(system.readText(join(dir, "vendor")));
    const id = parseSysfsInt(system.readText(join(dir, "device")));
    const cls = parseSysfsInt(system.readText(join(dir, "class")));
    if (vendor !== undefined) device.vendor = vendor;
    if (id !== undefined) device.device = id;
    if (cls !== undefined) device.class = cls;
    const driver = system.readLink(join(dir, "driver"));
    if (driver) device.driver = basename(driver);
    const group = system.readLink(join(dir, "iommu_group"));
    if (group) device.iommuGroup = basename(group);
    // A cdev has a device number: 6.1 lists vfio-dev/vfioN without one and makes no node.
    const vfio = system
      .listDir(join(dir, "vfio-dev"))
      ?.find((name) => /^vfio\d+$/.test(name) && system.readText(join(dir, "vfio-dev", name, "dev")) !== undefined);
    if (vfio) {
      device.vfioNode = `/dev/vfio/devices/${vfio}`;
      device.vfioNodeExists = system.nodeType(device.vfioNode) === "char";
    }
    return device;
  });
}

function hugePages(system: DoctorSystem): { nr?: number; pools?: HugePagePool[] } {
  const nr = parseSysfsInt(system.readText("/proc/sys/vm/nr_hugepages"));
  const root = "/sys/kernel/mm/hugepages";
  const pools = system
    .listDir(root)
    ?.map((name) => ({ name, pageBytes: parseHugePageDir(name) }))
    .filter((p): p is { name: string; pageBytes: number } => p.pageBytes !== undefined)
    .sort((a, b) => a.pageBytes - b.pageBytes)
    .map(({ name, pageBytes }) => {
      const pool: HugePagePool = { pageBytes };
      const total = parseSysfsInt(system.readText(join(root, name, "nr_hugepages")));
      const free = parseSysfsInt(system.readText(join(root, name, "free_hugepages")));
      if (total !== undefined) pool.total = total;
      if (free !== undefined) pool.free = free;
      return pool;
    });
  return { ...(nr !== undefined && { nr }), ...(pools && { pools }) };
}

export interface GatherOptions {
  /** The iommufd device node. Default /dev/iommu. */
  iommuPath?: string;
  /** Bytes a mapping is expected to pin; the memlock check compares the limit with it. Default 64 MiB. */
  mapBytes?: number;
  /** Skip opening VFIO devices (the dma-buf probe binds one briefly). Default false. */
  noDeviceProbe?: boolean;
}

export const DEFAULT_MAP_BYTES = 64 << 20;

/** Read everything the checks need. Never throws for a missing file or a failing kernel call. */
export function gatherFacts(system: DoctorSystem = realSystem, options: GatherOptions = {}): DoctorFacts {
  const kernelRelease = attempt(() => system.kernelRelease()) ?? "unknown";
  const iommuPath = options.iommuPath ?? "/dev/iommu";
  const facts: DoctorFacts = {
    kernelRelease,
    arch: attempt(() => system.arch()) ?? "unknown",
    uid: attempt(() => system.uid()),
    inVm: system.env("IOMMUFD_IN_VM") === "1",
    config: {},
    iommuPath,
    iommuNode: "missing",
    mapBytes: options.mapBytes ?? DEFAULT_MAP_BYTES,
  };

  const config = readConfig(system, kernelRelease);
  if (config) {
    facts.configSource = config.source;
    const options = parseKernelConfig(config.text);
    for (const name of CONFIG_OPTIONS) {
      const value = options.get(name);
      if (value !== undefined) facts.config[name] = value;
    }
  }

  const node = system.nodeType(iommuPath);
  facts.iommuNode = node === "missing" ? "missing" : node === "char" ? "char" : "other";
  if (facts.iommuNode === "char") facts.iommufd = system.probeIommufd(iommuPath);

  facts.vfioContainer = system.nodeType("/dev/vfio/vfio") === "char";
  const backendEnv = system.env(BACKEND_ENV);
  if (backendEnv !== undefined) facts.backendEnv = backendEnv;

  const limits = system.readText("/proc/self/limits");
  const memlock = limits === undefined ? undefined : memlockLimit(limits);
  if (memlock) facts.memlock = memlock;
  const capEff = attempt(() => parseCapEff(system.readText("/proc/self/status") ?? ""));
  if (capEff !== undefined) facts.capIpcLock = hasCapability(capEff, CAP_IPC_LOCK);

  const units = system.listDir("/sys/class/iommu");
  if (units) facts.iommuUnits = units.sort();
  const groups = system.listDir("/sys/kernel/iommu_groups");
  if (groups) facts.iommuGroups = groups.length;

  const devices = listPciDevices(system);
  if (devices) facts.pciDevices = devices;

  const huge = hugePages(system);
  if (huge.nr !== undefined) facts.nrHugepages = huge.nr;
  if (huge.pools) facts.hugePagePools = huge.pools;

  // Binding a device needs a working iommufd; without one the dma-buf check falls back to the
  // kernel version and config.
  const candidate = devices?.find((d) => d.vfioNodeExists);
  if (!options.noDeviceProbe && facts.iommufd?.ok && candidate?.vfioNode) {
    facts.dmabuf = system.probeDmaBuf(candidate.vfioNode, iommuPath);
    if (!facts.dmabuf.pciAddress) facts.dmabuf.pciAddress = candidate.address;
  }
  return facts;
}
