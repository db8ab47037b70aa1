// The doctor on the host: its parsers with real-format text, its checks with hand-made facts, and
// the real run (functions and CLI) against this machine's actual state.
import { describe, expect, test } from "bun:test";
import { existsSync, readFileSync } from "node:fs";
import { release } from "node:os";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import {
  CAP_IPC_LOCK,
  checkDmaBuf,
  checkIommufd,
  checkFeatures,
  checkKernel,
  checkMemlock,
  checkVfio,
  checkBackend,
  formatBytes,
  formatReport,
  gatherFacts,
  hasCapability,
  kernelAtLeast,
  memlockLimit,
  parseCapEff,
  parseHugePageDir,
  parseKernelConfig,
  parseKernelRelease,
  parseProcLimits,
  parseSize,
  parseSysfsInt,
  reportFrom,
  runDoctor,
  type DoctorFacts,
  type DoctorReport,
  type DoctorSystem,
} from "../../src/doctor/index.ts";

const root = join(import.meta.dir, "../..");
const cli = join(root, "bin/bun-iommufd.ts");

// Verbatim from a Debian 12 machine (the columns are padded with spaces, names contain spaces).
const LIMITS = `Limit                     Soft Limit           Hard Limit           Units     
Max cpu time              unlimited            unlimited            seconds   
Max file size             unlimited            unlimited            bytes     
Max data size             unlimited            unlimited            bytes     
Max stack size            8388608              unlimited            bytes     
Max core file size        0                    unlimited            bytes     
Max resident set          unlimited            unlimited            bytes     
Max processes             96365                96365                processes 
Max open files            20000                20000                files     
Max locked memory         8388608              8388608              bytes     
Max address space         unlimited            unlimited            bytes     
Max file locks            unlimited            unlimited            locks     
Max pending signals       96365                96365                signals   
Max msgqueue size         819200               819200               bytes     
Max nice priority         0                    0                    
Max realtime priority     0                    0                    
Max realtime timeout      unlimited            unlimited            us        
`;

// Shaped like a real .config: comments, section markers, strings, "is not set" lines.
const CONFIG = `#
# Automatically generated file; DO NOT EDIT.
# Linux/x86 7.2.13 Kernel Configuration
#
CONFIG_CC_VERSION_TEXT="gcc (Debian 12.2.0-14) 12.2.0"
CONFIG_IOMMU_SUPPORT=y
CONFIG_IOMMUFD_DRIVER_CORE=y
CONFIG_IOMMUFD=y
CONFIG_IOMMUFD_TEST=y
# CONFIG_IOMMUFD_VFIO_CONTAINER is not set
CONFIG_VFIO=m
CONFIG_VFIO_DEVICE_CDEV=y
# CONFIG_VFIO_PCI_DMABUF is not set
# end of DMABUF options
CONFIG_HZ=250
`;

const STATUS_ROOT = "Name:\tbun\nCapInh:\t0000000000000000\nCapPrm:\t000001fffeffffff\nCapEff:\t000001fffeffffff\n";
const STATUS_USER = "Name:\tbun\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n";

describe("parsers", () => {
  test("/proc/self/limits: names with spaces, unlimited, empty units", () => {
    const limits = parseProcLimits(LIMITS);
    expect(limits.size).toBe(16);
    expect(limits.get("Max locked memory")).toEqual({ soft: 8388608, hard: 8388608, units: "bytes" });
    expect(limits.get("Max cpu time")).toEqual({ soft: undefined, hard: undefined, units: "seconds" });
    expect(limits.get("Max stack size")).toEqual({ soft: 8388608, hard: undefined, units: "bytes" });
    expect(limits.get("Max nice priority")).toEqual({ soft: 0, hard: 0, units: "" });
    expect(memlockLimit(LIMITS)?.soft).toBe(8 << 20);
    expect(memlockLimit("Limit  Soft Limit  Hard Limit  Units\n")).toBeUndefined();
  });

  test("this process's own /proc/self/limits parses", () => {
    const memlock = memlockLimit(readFileSync("/proc/self/limits", "utf8"));
    expect(memlock).toBeDefined();
    expect(memlock!.units).toBe("bytes");
  });

  test("kernel config: y, m, not set, strings, absent", () => {
    const config = parseKernelConfig(CONFIG);
    expect(config.get("CONFIG_IOMMUFD")).toBe("y");
    expect(config.get("CONFIG_VFIO")).toBe("m");
    expect(config.get("CONFIG_IOMMUFD_VFIO_CONTAINER")).toBe("n");
    expect(config.get("CONFIG_VFIO_PCI_DMABUF")).toBe("n");
    expect(config.get("CONFIG_CC_VERSION_TEXT")).toBe("gcc (Debian 12.2.0-14) 12.2.0");
    expect(config.get("CONFIG_HZ")).toBe("250");
    expect(config.has("CONFIG_PCI_P2PDMA")).toBe(false);
  });

  test("kernel releases", () => {
    expect(parseKernelRelease("6.18.44-fc-v657")).toEqual({
      major: 6,
      minor: 18,
      patch: 44,
      release: "6.18.44-fc-v657",
    });
    expect(parseKernelRelease("6.1.0-28-amd64")).toMatchObject({ major: 6, minor: 1, patch: 0 });
    expect(parseKernelRelease("7.2.13\n")).toMatchObject({ major: 7, minor: 2, patch: 13, release: "7.2.13" });
    expect(parseKernelRelease("6.19-rc1")).toMatchObject({ major: 6, minor: 19, patch: 0 });
    expect(parseKernelRelease("unknown")).toBeUndefined();
    const v = parseKernelRelease("6.13.0")!;
    expect([kernelAtLeast(v, 6, 2), kernelAtLeast(v, 6, 13), kernelAtLeast(v, 6, 19), kernelAtLeast(v, 7, 0)]).toEqual([
      true,
      true,
      false,
      false,
    ]);
    expect(kernelAtLeast(parseKernelRelease("7.0.1")!, 6, 19)).toBe(true);
  });

  test("capabilities, sysfs numbers, huge page dirs, sizes", () => {
    expect(hasCapability(parseCapEff(STATUS_ROOT)!, CAP_IPC_LOCK)).toBe(true);
    expect(hasCapability(parseCapEff(STATUS_USER)!, CAP_IPC_LOCK)).toBe(false);
    expect(hasCapability(1n << 14n, CAP_IPC_LOCK)).toBe(true);
    expect(parseCapEff("Name:\tx\n")).toBeUndefined();
    expect(parseSysfsInt("0x1234\n")).toBe(0x1234);
    expect(parseSysfsInt("256\n")).toBe(256);
    expect(parseSysfsInt("")).toBeUndefined();
    expect(parseSysfsInt(undefined)).toBeUndefined();
    expect(parseHugePageDir("hugepages-2048kB")).toBe(2 << 20);
    expect(parseHugePageDir("hugepages-1048576kB")).toBe(1 << 30);
    expect(parseHugePageDir("README")).toBeUndefined();
    expect([parseSize("64M"), parseSize("1G"), parseSize("4096"), parseSize("2MiB"), parseSize("lots")]).toEqual([
      64 << 20,
      1 << 30,
      4096,
      2 << 20,
      undefined,
    ]);
    expect([formatBytes(8388608), formatBytes(1 << 30), formatBytes(4096), formatBytes(100)]).toEqual([
      "8 MiB",
      "1 GiB",
      "4 KiB",
      "100 bytes",
    ]);
  });
});

/** Facts of a machine where everything works, like the test guest. */
/** Debian 12's stock 6.1: no /dev/iommu, no cdev, the VFIO container is there. */
function debianFacts(): DoctorFacts {
  return {
    ...goodFacts(),
    iommuNode: "missing",
    iommufd: undefined,
    vfioContainer: true,
    pciDevices: [{ address: "0000:00:03.0", driver: "vfio-pci", iommuGroup: "3" }],
  };
}

function goodFacts(): DoctorFacts {
  return {
    kernelRelease: "7.2.13",
    arch: "x86_64",
    uid: 0,
    inVm: true,
    config: {},
    iommuPath: "/dev/iommu",
    iommuNode: "char",
    iommufd: {
      ok: true,
      ioasId: 1,
      iovaRanges: ["0x0..0xffffffffffffffff"],
      features: { mapFile: true, hwpt: true, hwInfo: true, dirtyTracking: true, faultQueue: true, changeProcess: true },
    },
    memlock: { soft: undefined, hard: undefined, units: "bytes" },
    capIpcLock: true,
    mapBytes: 64 << 20,
    iommuUnits: ["dmar0"],
    iommuGroups: 7,
    pciDevices: [
      { address: "0000:00:00.0", vendor: 0x8086, device: 0x29c0, driver: undefined, iommuGroup: "0" },
      {
        address: "0000:00:03.0",
        vendor: 0x1234,
        device: 0x11e8,
        driver: "vfio-pci",
        iommuGroup: "3",
        vfioNode: "/dev/vfio/devices/vfio0",
        vfioNodeExists: true,
      },
    ],
    nrHugepages: 256,
    hugePagePools: [{ pageBytes: 2 << 20, total: 256, free: 256 }],
    dmabuf: { node: "/dev/vfio/devices/vfio0", pciAddress: "0000:00:03.0", supported: true },
  };
}

describe("checks on hand-made facts", () => {
  test("a machine where everything works: all pass, exit 0", () => {
    const report = reportFrom(goodFacts());
    expect(report.checks.map((c) => [c.id, c.status])).toEqual([
      ["kernel", "pass"],
      ["config", "pass"],
      ["iommufd", "pass"],
      ["features", "pass"],
      ["memlock", "pass"],
      ["iommu", "pass"],
      ["vfio", "pass"],
      ["backend", "pass"],
      ["hugepages", "pass"],
      ["dmabuf", "pass"],
    ]);
    expect(report.exitCode).toBe(0);
    expect(report.usable).toBe(true);
    expect(report.checks.every((c) => c.fix === undefined)).toBe(true);
    const text = formatReport(report);
    expect(text).toContain(
      "0000:00:03.0  1234:11e8 (QEMU edu)  driver vfio-pci, IOMMU group 3, /dev/vfio/devices/vfio0",
    );
    expect(text).toMatch(/^PASS {2}\/dev\/iommu +opened \/dev\/iommu and created IOAS 1/m);
  });

  test("iommufd that opens but cannot allocate an IOAS is not usable", () => {
    const facts = {
      ...goodFacts(),
      iommufd: { ok: false, failedAt: "ioas" as const, errno: 12, code: "ENOMEM", message: "out of memory" },
    };
    const report = reportFrom(facts);
    expect(report.exitCode).toBe(1);
    expect(checkIommufd(facts)).toMatchObject({
      status: "fail",
      summary: expect.stringContaining("IOMMU_IOAS_ALLOC failed [ENOMEM]"),
    });
  });

  test("EACCES on /dev/iommu: fail with a permission fix", () => {
    const facts = {
      ...goodFacts(),
      iommufd: { ok: false, failedAt: "open" as const, errno: 13, code: "EACCES", message: "permission denied" },
    };
    const check = checkIommufd(facts);
    expect(check.status).toBe("fail");
    expect(check.fix).toContain("udev rule");
  });

  test("CONFIG_IOMMUFD=m with no node: load the module", () => {
    const facts: DoctorFacts = {
      ...goodFacts(),
      iommuNode: "missing",
      iommufd: undefined,
      configSource: "/boot/config-6.8.0",
      config: { CONFIG_IOMMUFD: "m" },
    };
    expect(checkIommufd(facts).fix).toContain("modprobe iommufd");
  });

  test("memlock: a non-root user with a small limit is warned, with ulimit in the fix", () => {
    const facts: DoctorFacts = {
      ...goodFacts(),
      uid: 1000,
      capIpcLock: false,
      memlock: { soft: 8 << 20, hard: undefined, units: "bytes" },
    };
    const check = checkMemlock(facts);
    expect(check.status).toBe("warn");
    expect(check.summary).toContain("8 MiB");
    expect(check.fix).toContain("ulimit -l unlimited");
    const hardCapped = checkMemlock({ ...facts, memlock: { soft: 8 << 20, hard: 8 << 20, units: "bytes" } });
    expect(hardCapped.fix).toContain("hard limit");
    expect(checkMemlock({ ...facts, mapBytes: 1 << 20 }).status).toBe("pass");
    expect(checkMemlock({ ...facts, memlock: { soft: undefined, hard: undefined, units: "bytes" } }).status).toBe(
      "pass",
    );
  });

  test("kernel versions, when iommufd could not be asked: too old fails, pre-6.19 warns about dma-bufs", () => {
    const unasked = { ...goodFacts(), iommufd: { ok: false, failedAt: "open" as const } };
    expect(checkKernel({ ...unasked, kernelRelease: "6.1.0-28-amd64" }).status).toBe("fail");
    const k = checkKernel({ ...unasked, kernelRelease: "6.8.0-45-generic" });
    expect(k.status).toBe("warn");
    expect(k.summary).toContain("IOMMU_IOAS_MAP_FILE (mapping a memfd by fd) needs 6.13");
    expect(checkKernel({ ...unasked, kernelRelease: "garbage" }).status).toBe("warn");
  });

  test("features: once iommufd answers, the version decides nothing; what it lacks is a warning that says the cost", () => {
    const old = { ...goodFacts(), kernelRelease: "6.8.0-45-generic" };
    expect(checkKernel(old).status).toBe("pass");
    const facts = goodFacts();
    facts.iommufd!.features = { ...facts.iommufd!.features!, mapFile: false, changeProcess: false };
    const check = checkFeatures(facts);
    expect(check.status).toBe("warn");
    expect(check.summary).toContain("lacks mapFile, changeProcess");
    expect(check.summary).toContain("maps a MemfdBuffer by address instead");
    expect(check.details).toContain("mapFile: no");
    expect(checkFeatures(goodFacts()).status).toBe("pass");
    expect(checkFeatures({ ...goodFacts(), iommufd: { ok: false, failedAt: "open" } }).status).toBe("warn");
  });

  test("vfio: a device on vfio-pci without a cdev asks for CONFIG_VFIO_DEVICE_CDEV", () => {
    const facts: DoctorFacts = {
      ...goodFacts(),
      pciDevices: [{ address: "0000:00:03.0", vendor: 0x1234, device: 0x11e8, driver: "vfio-pci" }],
    };
    expect(checkVfio(facts)).toMatchObject({ status: "warn", fix: expect.stringContaining("CONFIG_VFIO_DEVICE_CDEV") });
    const unbound: DoctorFacts = {
      ...goodFacts(),
      pciDevices: [{ address: "0000:00:03.0", vendor: 0x1234, device: 0x11e8, driver: "edu" }],
    };
    expect(checkVfio(unbound).fix).toContain('bindToVfioPci("0000:00:03.0")');
  });

  test("backend: the decision openDmaDevice makes, per device on vfio-pci, with its reason", () => {
    const good = checkBackend(goodFacts());
    expect(good.status).toBe("pass");
    expect(good.summary).toBe(
      "0000:00:03.0: iommufd, /dev/iommu exists and 0000:00:03.0 has a VFIO cdev (/dev/vfio/devices/vfio0)",
    );
    const debian = debianFacts();
    expect(checkBackend(debian)).toMatchObject({
      status: "pass",
      summary: expect.stringContaining("0000:00:03.0: type1, no /dev/iommu"),
    });
    const forced = checkBackend({ ...goodFacts(), vfioContainer: true, backendEnv: "type1" });
    expect(forced.summary).toBe("0000:00:03.0: type1, forced by BUN_IOMMUFD_BACKEND=type1");
    const bad = checkBackend({ ...goodFacts(), backendEnv: "legacy" });
    expect(bad).toMatchObject({ status: "fail", summary: expect.stringContaining('BUN_IOMMUFD_BACKEND="legacy"') });
    const stranded = checkBackend({ ...debian, vfioContainer: false });
    expect(stranded).toMatchObject({ status: "warn", fix: expect.stringContaining("modprobe vfio-pci") });
    const none = checkBackend({ ...goodFacts(), vfioContainer: true, pciDevices: [] });
    expect(none.summary).toBe(
      "no device on vfio-pci yet; one would get iommufd (/dev/iommu) for devices with a VFIO cdev, else type1 (/dev/vfio/vfio)",
    );
  });

  test("a host without iommufd but with a VFIO container is usable through type1: exit 0, the verdict says so", () => {
    const debian = debianFacts();
    const report = reportFrom(debian);
    expect({ usable: report.usable, backend: report.backend, exitCode: report.exitCode }).toEqual({
      usable: true,
      backend: "type1",
      exitCode: 0,
    });
    expect(report.verdict).toContain("usable here through the VFIO type1 backend");
    // Lacking iommufd is then a warning, not a failure, in the kernel and /dev/iommu lines too.
    const old = reportFrom({ ...debian, kernelRelease: "6.1.0-57-amd64" });
    const status = (r: typeof report, id: string) => r.checks.find((c) => c.id === id)?.status;
    expect([status(old, "kernel"), status(old, "iommufd")]).toEqual(["warn", "warn"]);
    expect(old.checks.find((c) => c.id === "iommufd")?.summary).toContain("the VFIO type1 backend works without it");
    const stranded = reportFrom({ ...debian, kernelRelease: "6.1.0-57-amd64", vfioContainer: false });
    expect([status(stranded, "kernel"), status(stranded, "iommufd")]).toEqual(["fail", "fail"]);
    const neither = reportFrom({ ...debian, vfioContainer: false });
    expect({ usable: neither.usable, backend: neither.backend, exitCode: neither.exitCode }).toEqual({
      usable: false,
      backend: undefined,
      exitCode: 1,
    });
    expect(reportFrom(goodFacts()).backend).toBe("iommufd");
  });

  test("dma-buf: ENOTTY from the probe means an older kernel; no probe falls back to the config", () => {
    const notty: DoctorFacts = {
      ...goodFacts(),
      dmabuf: { node: "/dev/vfio/devices/vfio0", supported: false, failedAt: "probe", errno: 25, code: "ENOTTY" },
    };
    expect(checkDmaBuf(notty)).toMatchObject({
      status: "warn",
      fix: expect.stringContaining("CONFIG_VFIO_PCI_DMABUF"),
    });
    const byConfig: DoctorFacts = {
      ...goodFacts(),
      dmabuf: undefined,
      configSource: "/proc/config.gz",
      config: { CONFIG_IOMMUFD: "y", CONFIG_VFIO_PCI_DMABUF: "y" },
    };
    expect(checkDmaBuf(byConfig).status).toBe("pass");
    const old: DoctorFacts = { ...byConfig, kernelRelease: "6.18.3" };
    expect(checkDmaBuf(old)).toMatchObject({ status: "warn", summary: expect.stringContaining("6.18 < 6.19") });
  });
});

describe("gathering never crashes", () => {
  const empty: DoctorSystem = {
    kernelRelease: () => {
      throw new Error("no uname");
    },
    arch: () => "x86_64",
    uid: () => 1000,
    env: () => undefined,
    readText: () => undefined,
    readBytes: () => undefined,
    listDir: () => undefined,
    readLink: () => undefined,
    nodeType: () => "missing",
    probeIommufd: () => {
      throw new Error("must not be called without a node");
    },
    probeDmaBuf: () => {
      throw new Error("must not be called without iommufd");
    },
  };

  test("a system with no files at all gives a report with fails and warnings, not an exception", () => {
    const report = runDoctor({ system: empty });
    expect(report.exitCode).toBe(1);
    expect(report.kernel).toBe("unknown");
    expect(report.checks).toHaveLength(10);
    for (const check of report.checks) {
      expect(check.summary.length).toBeGreaterThan(10);
      if (check.status !== "pass") expect(check.fix?.length ?? 0).toBeGreaterThan(10);
    }
  });

  test("a gzipped /proc/config.gz is read and decides the verdict", () => {
    const gz = gzipSync(Buffer.from("CONFIG_IOMMUFD=y\nCONFIG_VFIO_DEVICE_CDEV=y\nCONFIG_VFIO_PCI_DMABUF=y\n"));
    const system: DoctorSystem = {
      ...empty,
      kernelRelease: () => "7.2.13",
      readBytes: (path) => (path === "/proc/config.gz" ? new Uint8Array(gz) : undefined),
    };
    const facts = gatherFacts(system);
    expect(facts.configSource).toBe("/proc/config.gz");
    expect(facts.config).toEqual({ CONFIG_IOMMUFD: "y", CONFIG_VFIO_DEVICE_CDEV: "y", CONFIG_VFIO_PCI_DMABUF: "y" });
    // Config says yes but no node: the node check names devtmpfs/udev, not the config.
    expect(checkIommufd(facts)).toMatchObject({ status: "fail", fix: expect.stringContaining("devtmpfs") });
  });
});

describe("this machine", () => {
  const hasIommu = existsSync("/dev/iommu");
  const report: DoctorReport = runDoctor();

  test("the report describes this kernel and process", () => {
    expect(report.kernel).toBe(release());
    expect(report.uid).toBe(process.getuid!());
    expect(report.checks.map((c) => c.id)).toEqual([
      "kernel",
      "config",
      "iommufd",
      "features",
      "memlock",
      "iommu",
      "vfio",
      "backend",
      "hugepages",
      "dmabuf",
    ]);
    for (const check of report.checks) if (check.status !== "pass") expect(check.fix).toBeTruthy();
  });

  test.skipIf(hasIommu)(
    "no /dev/iommu: the /dev/iommu check fails with a CONFIG_IOMMUFD fix and the exit code is 1",
    () => {
      const check = report.checks.find((c) => c.id === "iommufd")!;
      expect(check.status).toBe("fail");
      expect(check.summary).toContain("/dev/iommu does not exist");
      expect(check.fix).toContain("CONFIG_IOMMUFD=y");
      expect(check.fix).toContain("bun run vm --");
      expect(report.usable).toBe(false);
      expect(report.exitCode).toBe(1);
      expect(report.verdict).toContain("NOT usable");
    },
  );

  test("the kernel config check agrees with /proc/config.gz or /boot/config-*", () => {
    const check = report.checks.find((c) => c.id === "config")!;
    if (report.facts.configSource === undefined) {
      expect(existsSync("/proc/config.gz") || existsSync(`/boot/config-${release()}`)).toBe(false);
      return;
    }
    const value = report.facts.config.CONFIG_IOMMUFD;
    if (value === "y" || value === "m") expect(check.summary).toContain(`CONFIG_IOMMUFD=${value}`);
    else {
      expect(check.summary).toContain("CONFIG_IOMMUFD is");
      if (!hasIommu) expect(check.status).toBe("fail");
    }
  });

  test("the memlock figure agrees with the shell's ulimit -l (an independent reader)", () => {
    const shell = Bun.spawnSync(["sh", "-c", "ulimit -l"], { stdout: "pipe" }).stdout.toString().trim();
    const soft = report.facts.memlock?.soft;
    if (shell === "unlimited") expect(soft).toBeUndefined();
    else expect(soft).toBe(Number(shell) * 1024);
  });
});

describe("gathering from fixed /proc and /sys text (hand-written expectations)", () => {
  // A guest like the test VM: edu on vfio-pci with its cdev, a host bridge with no driver link.
  const files: Record<string, string> = {
    "/proc/self/limits": LIMITS,
    "/proc/self/status":
      "Name:\tbun\nUmask:\t0022\nState:\tR (running)\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\n",
    "/proc/sys/vm/nr_hugepages": "16\n",
    "/sys/bus/pci/devices/0000:00:00.0/vendor": "0x8086\n",
    "/sys/bus/pci/devices/0000:00:00.0/device": "0x29c0\n",
    "/sys/bus/pci/devices/0000:00:00.0/class": "0x060000\n",
    "/sys/bus/pci/devices/0000:00:03.0/vendor": "0x1234\n",
    "/sys/bus/pci/devices/0000:00:03.0/device": "0x11e8\n",
    "/sys/bus/pci/devices/0000:00:03.0/class": "0x00ff00\n",
    "/sys/bus/pci/devices/0000:00:03.0/vfio-dev/vfio0/dev": "245:0\n",
    "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages": "16\n",
    "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages": "12\n",
    "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages": "0\n",
    "/sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages": "0\n",
  };
  const dirs: Record<string, string[]> = {
    "/sys/class/iommu": ["dmar1", "dmar0"],
    "/sys/kernel/iommu_groups": ["0", "1", "2", "3", "4"],
    "/sys/bus/pci/devices": ["0000:00:03.0", "0000:00:00.0"],
    "/sys/bus/pci/devices/0000:00:03.0/vfio-dev": ["vfio0"],
    "/sys/kernel/mm/hugepages": ["hugepages-1048576kB", "hugepages-2048kB"],
  };
  const links: Record<string, string> = {
    "/sys/bus/pci/devices/0000:00:03.0/driver": "../../../bus/pci/drivers/vfio-pci",
    "/sys/bus/pci/devices/0000:00:03.0/iommu_group": "../../../kernel/iommu_groups/3",
    "/sys/bus/pci/devices/0000:00:00.0/iommu_group": "../../../kernel/iommu_groups/0",
  };
  const fixture = (overrides: Record<string, string> = {}): DoctorSystem => ({
    kernelRelease: () => "7.2.13",
    arch: () => "x86_64",
    uid: () => 0,
    env: (name) => (name === "IOMMUFD_IN_VM" ? "1" : undefined),
    readText: (path) => overrides[path] ?? files[path],
    readBytes: () => undefined,
    listDir: (path) => dirs[path] && [...dirs[path]!],
    readLink: (path) => links[path],
    nodeType: (path) => (path === "/dev/vfio/devices/vfio0" ? "char" : "missing"),
    probeIommufd: () => {
      throw new Error("must not be called: no /dev/iommu in the fixture");
    },
    probeDmaBuf: () => {
      throw new Error("must not be called without iommufd");
    },
  });

  test("6.1's vfio-dev/vfioN without a device number is no cdev (the kernel made no node)", () => {
    const system = fixture();
    const noDevt = {
      ...system,
      readText: (path: string) => (path.endsWith("/vfio-dev/vfio0/dev") ? undefined : system.readText(path)),
    };
    const edu = gatherFacts(noDevt).pciDevices!.find((d) => d.address === "0000:00:03.0")!;
    expect([edu.driver, edu.vfioNode, edu.vfioNodeExists]).toEqual(["vfio-pci", undefined, undefined]);
  });

  test("memlock, capabilities, IOMMU units and groups, PCI devices and huge pages", () => {
    const facts = gatherFacts(fixture());
    expect(facts.memlock).toEqual({ soft: 8388608, hard: 8388608, units: "bytes" });
    expect(facts.capIpcLock).toBe(true);
    expect(facts.inVm).toBe(true);
    expect(facts.iommuUnits).toEqual(["dmar0", "dmar1"]);
    expect(facts.iommuGroups).toBe(5);
    expect(facts.pciDevices).toEqual([
      { address: "0000:00:00.0", vendor: 0x8086, device: 0x29c0, class: 0x060000, iommuGroup: "0" },
      {
        address: "0000:00:03.0",
        vendor: 0x1234,
        device: 0x11e8,
        class: 0x00ff00,
        driver: "vfio-pci",
        iommuGroup: "3",
        vfioNode: "/dev/vfio/devices/vfio0",
        vfioNodeExists: true,
      },
    ]);
    expect(facts.nrHugepages).toBe(16);
    expect(facts.hugePagePools).toEqual([
      { pageBytes: 2 * 1024 * 1024, total: 16, free: 12 },
      { pageBytes: 1024 * 1024 * 1024, total: 0, free: 0 },
    ]);
    expect(facts.iommuNode).toBe("missing");
    expect(facts.dmabuf).toBeUndefined();
  });

  test("CAP_IPC_LOCK is bit 14 of CapEff: without it, and with only it", () => {
    const status = (capEff: string) => ({ "/proc/self/status": `Name:\tbun\nCapEff:\t${capEff}\n` });
    expect(gatherFacts(fixture(status("0000000000000000"))).capIpcLock).toBe(false);
    expect(gatherFacts(fixture(status("0000000000004000"))).capIpcLock).toBe(true);
    expect(gatherFacts(fixture(status("0000000000002000"))).capIpcLock).toBe(false);
    expect(gatherFacts(fixture({ "/proc/self/status": "Name:\tbun\n" })).capIpcLock).toBeUndefined();
  });

  test("an unlimited memlock has no figure; the memlock check then passes", () => {
    const limits = LIMITS.replace(
      /^Max locked memory .*$/m,
      "Max locked memory         unlimited            unlimited            bytes     ",
    );
    const facts = gatherFacts(
      fixture({ "/proc/self/limits": limits, "/proc/self/status": "CapEff:\t0000000000000000\n" }),
    );
    expect(facts.memlock).toEqual({ soft: undefined, hard: undefined, units: "bytes" });
    expect(checkMemlock({ ...facts, uid: 1000 }).status).toBe("pass");
  });
});

describe("the CLI", () => {
  async function run(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
    const proc = Bun.spawn([process.execPath, cli, ...args], {
      cwd: root,
      stdout: "pipe",
      stderr: "pipe",
      env: { ...process.env, NO_COLOR: "1" },
    });
    const [stdout, stderr] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
    return { code: await proc.exited, stdout, stderr };
  }

  test("doctor --json parses, and its exit code follows the /dev/iommu check", async () => {
    const { code, stdout } = await run("doctor", "--json");
    const json = JSON.parse(stdout) as DoctorReport;
    expect(json.exitCode).toBe(code as 0 | 1);
    expect(json.kernel).toBe(release());
    expect(json.checks).toHaveLength(10);
    for (const check of json.checks) expect(["pass", "warn", "fail"]).toContain(check.status);
    const iommufd = json.checks.find((c) => c.id === "iommufd")!;
    expect(code).toBe(iommufd.status === "pass" ? 0 : 1);
    if (!existsSync("/dev/iommu")) {
      expect(code).toBe(1);
      expect(iommufd.status).toBe("fail");
      expect(iommufd.fix).toContain("CONFIG_IOMMUFD");
    }
  });

  test("doctor prints one labelled line per check and the verdict", async () => {
    const { code, stdout } = await run("doctor");
    const lines = stdout.split("\n");
    expect(lines[0]).toStartWith(`bun-iommufd doctor: Linux ${release()}`);
    expect(lines.filter((l) => /^(PASS|WARN|FAIL) {2}\S/.test(l))).toHaveLength(10);
    expect(stdout).not.toContain("\x1b[");
    if (!existsSync("/dev/iommu")) {
      expect(code).toBe(1);
      expect(stdout).toMatch(/^FAIL {2}\/dev\/iommu +\/dev\/iommu does not exist/m);
      expect(stdout).toMatch(/^ +fix: boot a kernel built with CONFIG_IOMMUFD=y/m);
      expect(lines.filter(Boolean).at(-1)).toContain("iommufd is NOT usable here");
    }
  });

  test("usage errors exit 2; --help exits 0", async () => {
    expect((await run("doctor", "--bogus")).code).toBe(2);
    expect((await run("frobnicate")).code).toBe(2);
    expect((await run("doctor", "--map-size", "lots")).code).toBe(2);
    const help = await run("--help");
    expect(help.code).toBe(0);
    expect(help.stdout).toContain("usage: bun-iommufd doctor");
  });

  test("--map-size changes what the memlock check plans for", async () => {
    const { stdout } = await run("doctor", "--json", "--map-size", "1G");
    expect((JSON.parse(stdout) as DoctorReport).facts.mapBytes).toBe(1 << 30);
  });
});
