// The command line of the test guest: `bunx bun-iommufd vm [options] -- <command...>`, also
// `bun run vm` and `bun vm/cli.ts` in this repository. Parses options, checks the host, runs.

import { existsSync } from "node:fs";
import { resolve } from "node:path";
import { DeviceSpecError, type DeviceSpec, IOMMU_MODELS, type IommuModel, parseDeviceSpec } from "./devices.ts";
import { hostCheck } from "./host.ts";
import { cacheDir, isKernelName, KERNEL_NAMES } from "./images.ts";
import { EXIT_TIMEOUT, EXIT_VM_FAILURE, type GuestOptions, runInGuest } from "./run.ts";

export function usage(program = "bun-iommufd vm"): string {
  return `usage: ${program} [options] -- <command...>
       ${program} --check

Boots a throwaway QEMU guest whose kernel has iommufd, VFIO, an emulated IOMMU and the devices
you ask for, runs the command there as root in the current directory and exits with its status.
The guest sees the host's filesystem read-only, the current directory writable at the same path,
and its own /tmp. The kernel is built once (about 15 min) and cached in ${cacheDir()}.

devices (each bound to vfio-pci, first at PCI 0000:00:03.0 = /dev/vfio/devices/vfio0, or its
group /dev/vfio/N on a kernel without VFIO cdevs):
  --device edu                 QEMU's edu (DMA engine, MSI); repeatable. Default: one edu
  --device nvme[,size=64M][,cmb=16M][,name=N][,file=PATH][,driver=vfio|kernel]
                               an NVMe controller with one namespace on a raw disk image
                               (new sparse image in --disk-dir unless file= names one; cmb = a
                               controller memory buffer; driver=kernel leaves it on the kernel's
                               nvme driver as /dev/nvmeXn1)
  --disk-dir DIR               where new disk images go (default: a new directory under $TMPDIR,
                               printed, kept after the run)
  --iommu ${IOMMU_MODELS.join("|")}    emulated IOMMU (default intel)

machine:
  --memory SIZE      guest memory (default 4G)
  --cpus N           virtual CPUs (default 2)
  --hugepages N      2 MiB huge pages to reserve (default 256, or IOMMUFD_VM_HUGEPAGES)
  --kvm              use KVM instead of TCG (or IOMMUFD_VM_KVM=1); only on hosts with real KVM
  --kernel NAME|PATH the guest's kernel (default 7.2; fetched or built once, then cached):
                       7.2     our build: iommufd, MAP_FILE, dma-buf export, selftest hooks,
                               fault injection (IOMMUFD_TEST_KERNEL replaces it)
                       6.12    Debian's 6.12 LTS source, same build: iommufd without MAP_FILE
                               or VFIO dma-buf export
                       debian  the host's stock Debian kernel as shipped (Debian 12: 6.1, no
                               iommufd, VFIO type1 container only; its modules are loaded)
                     or a bzImage path (./debian for a file of that name)

run:
  --timeout S        overall limit in seconds (default 1800); exit ${EXIT_TIMEOUT} when it runs out
  --boot-timeout S   limit for boot and setup before one retry (default 180)
  --env K=V          pass a variable to the command (repeatable); CI, IOMMUFD_*, BUN_* pass anyway
  --cwd DIR          run the command there (default: the current directory)
  --out DIR          copy what the command wrote to $IOMMUFD_VM_OUT into DIR
  --allow-kernel-warnings   a kernel WARNING/BUG during the command is a note, not a failure
  --panic-on-warn    stop the guest at the first kernel WARNING (shows which step caused it)
  --check            list what this host lacks to run the guest, and how to install it
  -h, --help         this text

In the guest: IOMMUFD_IN_VM=1, HOME=/tmp, debugfs, huge pages, ulimit -l unlimited;
IOMMUFD_VM_KERNEL (what booted: 7.2.13, 6.12.118, debian-6.1.0-57-amd64, or \`uname -r\` of a
path); IOMMUFD_VM_FEATURES, what that kernel has, of: iommufd (/dev/iommu), vfio-cdev
(/dev/vfio/devices), vfio-container (/dev/vfio/vfio), iommufd-test (selftest hooks),
fault-injection, udmabuf, hugepages; the devices in IOMMUFD_VM_DEVICES (JSON: name, kind, addr,
driver, group (/dev/vfio/N), vfio (the cdev, where the kernel has them), NVMe size/cmb/disk) and
IOMMUFD_VM_VFIO, IOMMUFD_VM_EDU, IOMMUFD_VM_NVME, IOMMUFD_VM_NVME_CMB, IOMMUFD_VM_NVME_KERNEL
("0000:00:03.0=/dev/vfio/devices/vfio0,...": the cdev, else the group).

exit status: the command's own; 127 if it does not exist; ${EXIT_TIMEOUT} on timeout; ${EXIT_VM_FAILURE} when the guest
failed (no kernel, emulator fault, kernel panic) or the kernel logged a WARNING/BUG while the
command ran; 2 for bad options.`;
}

export class UsageError extends Error {}

/** Parses the options before the command; throws UsageError for anything it does not accept. */
export function parseArgs(argv: string[]): GuestOptions & { check?: boolean; help?: boolean } {
  const opts: GuestOptions & { check?: boolean; help?: boolean } = { command: [], env: {} };
  const devices: DeviceSpec[] = [];
  const value = (i: number, name: string): string => {
    const v = argv[i];
    if (v === undefined) throw new UsageError(`${name} needs a value`);
    return v;
  };
  const positive = (s: string, name: string): number => {
    const n = Number(s);
    if (!Number.isFinite(n) || n <= 0) throw new UsageError(`${name} wants a positive number, not ${s}`);
    return n;
  };
  const count = (s: string, name: string, min: number): number => {
    const n = Number(s);
    if (!Number.isInteger(n) || n < min)
      throw new UsageError(`${name} wants a whole number of at least ${min}, not ${s}`);
    return n;
  };
  let i = 0;
  for (; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === "--") {
      i++;
      break;
    }
    if (!a.startsWith("-")) break; // `bun run vm -- cmd` drops the "--"
    switch (a) {
      case "-h":
      case "--help":
        opts.help = true;
        return opts;
      case "--check":
        opts.check = true;
        break;
      case "--timeout":
        opts.timeoutSeconds = positive(value(++i, a), a);
        break;
      case "--boot-timeout":
        opts.bootTimeoutSeconds = positive(value(++i, a), a);
        break;
      case "--memory":
        opts.memory = value(++i, a);
        if (!/^\d+[KMGT]?$/i.test(opts.memory))
          throw new UsageError(`--memory wants a size like 4G or 2048M, not ${opts.memory}`);
        break;
      case "--cpus":
        opts.cpus = count(value(++i, a), a, 1);
        break;
      case "--hugepages":
        opts.hugepages = count(value(++i, a), a, 0);
        break;
      case "--kvm":
        opts.kvm = true;
        break;
      case "--kernel": {
        const choice = value(++i, a);
        if (isKernelName(choice)) {
          opts.kernel = choice;
          break;
        }
        opts.kernel = resolve(choice);
        if (!existsSync(opts.kernel)) {
          throw new UsageError(`--kernel ${choice}: neither a kernel name (${KERNEL_NAMES.join(", ")}) nor a file`);
        }
        break;
      }
      case "--cwd":
        opts.cwd = resolve(value(++i, a));
        break;
      case "--out":
        opts.outDir = resolve(value(++i, a));
        break;
      case "--disk-dir":
        opts.diskDir = resolve(value(++i, a));
        break;
      case "--allow-kernel-warnings":
        opts.allowKernelWarnings = true;
        break;
      case "--panic-on-warn":
        opts.panicOnWarn = true;
        break;
      case "--device":
        try {
          devices.push(parseDeviceSpec(value(++i, a)));
        } catch (e) {
          if (e instanceof DeviceSpecError) throw new UsageError(e.message);
          throw e;
        }
        break;
      case "--iommu": {
        const model = value(++i, a);
        if (!IOMMU_MODELS.includes(model as IommuModel)) {
          throw new UsageError(`--iommu wants one of ${IOMMU_MODELS.join(", ")}, not ${model}`);
        }
        opts.iommu = model as IommuModel;
        break;
      }
      case "--env": {
        const kv = value(++i, a);
        const eq = kv.indexOf("=");
        if (eq <= 0) throw new UsageError(`--env wants K=V, not ${kv}`);
        opts.env![kv.slice(0, eq)] = kv.slice(eq + 1);
        break;
      }
      default:
        throw new UsageError(`unknown option ${a}`);
    }
  }
  if (devices.length) opts.devices = devices;
  opts.command = argv.slice(i);
  if (opts.command.length === 0 && !opts.check) throw new UsageError("no command given (put it after --)");
  return opts;
}

export async function main(argv: string[], program = "bun-iommufd vm"): Promise<number> {
  let opts: ReturnType<typeof parseArgs>;
  try {
    opts = parseArgs(argv);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    console.error(`${program}: ${e.message}\n(${program} --help lists the options)`);
    return 2;
  }
  if (opts.help) {
    console.log(usage(program));
    return 0;
  }
  if (opts.check) {
    const report = await hostCheck();
    console.log(report.text);
    return report.ok ? 0 : 1;
  }
  const result = await runInGuest(opts);
  return result.exitCode;
}

if (import.meta.main) process.exitCode = await main(process.argv.slice(2));
