/**
 * Judging the device side of the facts: whether an IOMMU put devices in groups, which PCI devices
 * VfioDevice.open can reach, and whether VFIO can export dma-bufs. Pure functions like checks.ts.
 */
import { type CheckResult, GUEST_HINT, KERNEL_FEATURES } from "./checks.ts";
import type { DoctorFacts, PciDevice } from "./facts.ts";
import { kernelAtLeast, parseKernelRelease } from "./parse.ts";

/** QEMU's edu device: what the guest tests bind. */
const EDU = { vendor: 0x1234, device: 0x11e8 };

function hex4(n: number | undefined): string {
  return n === undefined ? "????" : n.toString(16).padStart(4, "0");
}

/** Whether a hardware (or emulated) IOMMU is active and has put devices in groups. */
export function checkIommu(facts: DoctorFacts): CheckResult {
  const base = { id: "iommu" as const, title: "IOMMU" };
  const units = facts.iommuUnits ?? [];
  const groups = facts.iommuGroups ?? 0;
  if (units.length > 0 && groups > 0) {
    return {
      ...base,
      status: "pass",
      summary: `active: ${units.join(", ")}; ${groups} IOMMU group${groups === 1 ? "" : "s"}`,
    };
  }
  const found =
    units.length > 0
      ? `${units.join(", ")} registered but no IOMMU groups`
      : `no IOMMU is active (/sys/class/iommu ${facts.iommuUnits ? "is empty" : "is missing"}, ${groups} IOMMU groups)`;
  return {
    ...base,
    status: "warn",
    summary: `${found}: without one, iommufd can map memory but no device can be attached`,
    fix:
      "enable VT-d/AMD-Vi in the firmware and boot with intel_iommu=on or amd_iommu=on (QEMU: -machine " +
      "q35,kernel-irqchip=split -device intel-iommu,intremap=on,caching-mode=on)",
  };
}

function describeDevice(d: PciDevice): string {
  const id = `${hex4(d.vendor)}:${hex4(d.device)}`;
  const name = d.vendor === EDU.vendor && d.device === EDU.device ? " (QEMU edu)" : "";
  const driver = d.driver ? `driver ${d.driver}` : "no driver";
  const group = d.iommuGroup ? `, IOMMU group ${d.iommuGroup}` : "";
  const node = d.vfioNode ? `, ${d.vfioNode}${d.vfioNodeExists ? "" : " (node missing in /dev)"}` : "";
  return `${d.address}  ${id}${name}  ${driver}${group}${node}`;
}

/** PCI devices, their drivers and VFIO cdev nodes: what VfioDevice.open can reach. */
export function checkVfio(facts: DoctorFacts): CheckResult {
  const base = { id: "vfio" as const, title: "VFIO devices" };
  const devices = facts.pciDevices;
  if (!devices) {
    return {
      ...base,
      status: "warn",
      summary: "no PCI bus (/sys/bus/pci/devices is missing)",
      fix: "VfioDevice needs PCI devices; run where the devices are (a VM with passthrough, or the host)",
    };
  }
  const details = devices.map(describeDevice);
  const ready = devices.filter((d) => d.vfioNode && d.vfioNodeExists);
  if (ready.length > 0) {
    const list = ready.map((d) => `${d.address} -> ${d.vfioNode}`).join(", ");
    return {
      ...base,
      status: "pass",
      summary: `${ready.length} of ${devices.length} PCI devices ready for VfioDevice: ${list}`,
      details,
    };
  }
  const bound = devices.filter((d) => d.driver === "vfio-pci");
  if (bound.some((d) => d.vfioNode)) {
    return {
      ...base,
      status: "warn",
      summary: "a device has a VFIO cdev in sysfs but no node in /dev/vfio/devices",
      fix: "mount devtmpfs on /dev (or let udev create the node)",
      details,
    };
  }
  if (bound.length > 0) {
    return {
      ...base,
      status: "warn",
      summary: `${bound.map((d) => d.address).join(", ")} bound to vfio-pci but without a VFIO cdev`,
      fix:
        "boot a kernel with CONFIG_VFIO_DEVICE_CDEV=y (Linux 6.6+): iommufd reaches devices only through " +
        "/dev/vfio/devices; until then the type1 backend reaches them through their group (/dev/vfio/<group>)",
      details,
    };
  }
  const vfioPci = facts.config.CONFIG_VFIO_PCI;
  if (facts.configSource && vfioPci !== "y" && vfioPci !== "m") {
    return {
      ...base,
      status: "warn",
      summary:
        `this kernel has no vfio-pci (CONFIG_VFIO_PCI is ${vfioPci === "n" ? "not set" : "absent"}): no ` +
        `device can be handed to VfioDevice`,
      fix: `build a kernel with CONFIG_VFIO_PCI=y and CONFIG_VFIO_DEVICE_CDEV=y, ${GUEST_HINT}`,
      details,
    };
  }
  const edu = devices.find((d) => d.vendor === EDU.vendor && d.device === EDU.device);
  const addr = edu?.address ?? "ADDR";
  return {
    ...base,
    status: "warn",
    summary: `none of the ${devices.length} PCI devices is bound to vfio-pci`,
    fix:
      `bind one as root: echo vfio-pci > /sys/bus/pci/devices/${addr}/driver_override; ` +
      `echo ${addr} > /sys/bus/pci/devices/${addr}/driver/unbind; ` +
      `echo ${addr} > /sys/bus/pci/drivers_probe (or bindToVfioPci("${addr}"))`,
    details,
  };
}

/** VFIO dma-buf export: a real feature probe when a device could be bound, else version and config. */
export function checkDmaBuf(facts: DoctorFacts): CheckResult {
  const base = { id: "dmabuf" as const, title: "VFIO dma-buf" };
  const probe = facts.dmabuf;
  const where = probe ? `${probe.node}${probe.pciAddress ? ` (${probe.pciAddress})` : ""}` : "";
  const rebuild = "boot Linux 6.19+ built with CONFIG_PCI_P2PDMA=y and CONFIG_VFIO_PCI_DMABUF=y";
  if (probe?.supported === true) {
    return {
      ...base,
      status: "pass",
      summary: `${where} can export BAR slices as dma-bufs (VFIO_DEVICE_FEATURE_DMA_BUF probe)`,
    };
  }
  if (probe?.supported === false) {
    const notty = probe.code === "ENOTTY";
    return {
      ...base,
      status: "warn",
      summary: notty
        ? `the kernel does not know VFIO_DEVICE_FEATURE_DMA_BUF (probe on ${where} gave ENOTTY)`
        : `${where} refused the dma-buf feature probe [${probe.code ?? "?"}]: its driver cannot export dma-bufs`,
      fix: notty ? rebuild : "use a device driven by vfio-pci with an mmappable BAR",
    };
  }
  const version = parseKernelRelease(facts.kernelRelease);
  const newEnough = version
    ? kernelAtLeast(version, KERNEL_FEATURES.dmabuf.major, KERNEL_FEATURES.dmabuf.minor)
    : undefined;
  const config = facts.config.CONFIG_VFIO_PCI_DMABUF;
  const notProbed = probe
    ? `could not probe ${where}: ${probe.message ?? probe.code ?? "unknown error"}`
    : "not probed (no VFIO device could be bound)";
  if (newEnough === false || config === "n" || (facts.configSource && config === undefined)) {
    const reasons = [
      newEnough === false
        ? `Linux ${version!.major}.${version!.minor} < ${KERNEL_FEATURES.dmabuf.major}.${KERNEL_FEATURES.dmabuf.minor}`
        : undefined,
      config === "n" || (facts.configSource && config === undefined) ? "CONFIG_VFIO_PCI_DMABUF is not set" : undefined,
    ].filter(Boolean);
    return { ...base, status: "warn", summary: `not available: ${reasons.join(" and ")}`, fix: rebuild };
  }
  if (config === "y" && newEnough) {
    return {
      ...base,
      status: "pass",
      summary: `CONFIG_VFIO_PCI_DMABUF=y on Linux ${version!.major}.${version!.minor}; ${notProbed}`,
    };
  }
  return {
    ...base,
    status: "warn",
    summary: `unknown: ${notProbed}, and the kernel config does not say`,
    fix: `bind a device to vfio-pci and run the doctor again as a user who can open it; else ${rebuild}`,
  };
}
