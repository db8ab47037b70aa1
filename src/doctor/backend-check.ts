/**
 * Which DMA backend each device bound to vfio-pci gets here, and why: the same decision
 * openDmaDevice makes (src/dma/backend.ts), fed with the doctor's facts instead of opening
 * anything. Pure, like checks.ts.
 */
import { BACKEND_ENV, type BackendRequest, chooseBackend, requestedBackend } from "../dma/backend.ts";
import { IommufdError } from "../sys/error.ts";
import type { CheckResult } from "./checks.ts";
import type { DoctorFacts } from "./facts.ts";

/** The backend each vfio-pci device gets (iommufd or type1), with the reason openDmaDevice would give. */
export function checkBackend(facts: DoctorFacts): CheckResult {
  const base = { id: "backend" as const, title: "DMA backend" };
  let request: BackendRequest;
  try {
    request = requestedBackend(undefined, "doctor", { [BACKEND_ENV]: facts.backendEnv });
  } catch {
    return {
      ...base,
      status: "fail",
      summary: `the environment variable ${BACKEND_ENV}=${JSON.stringify(facts.backendEnv)} is not auto, iommufd or type1`,
      fix: `set ${BACKEND_ENV} to auto, iommufd or type1, or unset it`,
    };
  }
  const iommu = facts.iommufd?.ok ?? facts.iommuNode === "char";
  const container = facts.vfioContainer === true;
  const bound = (facts.pciDevices ?? []).filter((d) => d.driver === "vfio-pci");
  if (bound.length === 0) {
    const hosts = [iommu && "iommufd (/dev/iommu) for devices with a VFIO cdev", container && "type1 (/dev/vfio/vfio)"];
    const offered = hosts.filter(Boolean).join(", else ");
    return {
      ...base,
      status: offered ? "pass" : "warn",
      summary: offered
        ? `no device on vfio-pci yet; one would get ${offered}`
        : "neither /dev/iommu nor /dev/vfio/vfio",
      ...(!offered && { fix: "load vfio-pci (modprobe vfio-pci), or boot a kernel with CONFIG_IOMMUFD" }),
    };
  }
  const outcomes = bound.map((d) => {
    const cdev = d.vfioNodeExists ? d.vfioNode : undefined;
    try {
      const decision = chooseBackend(request, { iommu, cdev, container }, d.address, "doctor");
      return {
        address: d.address,
        backend: decision.backend as string,
        line: `${d.address}: ${decision.backend}, ${decision.reason}`,
      };
    } catch (error) {
      if (!(error instanceof IommufdError)) throw error;
      return { address: d.address, backend: undefined, line: `${d.address}: none: ${error.message}` };
    }
  });
  const stranded = outcomes.filter((o) => o.backend === undefined);
  if (stranded.length > 0) {
    return {
      ...base,
      status: "warn",
      summary: `${stranded.map((o) => o.address).join(", ")} can be reached by neither iommufd nor a VFIO container`,
      fix: "load vfio-pci (modprobe vfio-pci; it brings vfio_iommu_type1), or boot a kernel with CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV",
      details: outcomes.map((o) => o.line),
    };
  }
  const first = outcomes[0]!;
  const others = outcomes.length > 1 ? ` (and ${outcomes.length - 1} more device(s), see below)` : "";
  return { ...base, status: "pass", summary: `${first.line}${others}`, details: outcomes.map((o) => o.line) };
}
