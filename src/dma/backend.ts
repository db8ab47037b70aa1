/**
 * Which kernel API carries a device's DMA: iommufd (/dev/iommu and the device's VFIO cdev) or
 * the legacy VFIO type1 container (/dev/vfio/vfio and the device's group). Decided here and
 * nowhere else, from what the host has, unless the caller or the environment forces one.
 *
 * The decision is a pure function of a few facts, so that the doctor can print the same reason a
 * driver acts on, and a unit test can walk every branch without a kernel.
 */
import { existsSync } from "node:fs";
import { argumentError, type IommufdError, stateError } from "../sys/error.ts";
import { DEFAULT_IOMMU_PATH } from "../iommufd/iommufd.ts";
import { DEFAULT_CONTAINER_PATH } from "../type1/container.ts";
import type { DmaBackend } from "./space.ts";

/** "auto" lets the host decide; the others force a backend. */
export type BackendChoice = "auto" | DmaBackend;

/** The environment variable that forces a backend where no option does: auto, iommufd or type1. */
export const BACKEND_ENV = "BUN_IOMMUFD_BACKEND";

const CHOICES: readonly BackendChoice[] = ["auto", "iommufd", "type1"];

/** What was asked for, and by whom (the reason names it). */
export interface BackendRequest {
  choice: BackendChoice;
  source: "option" | "environment" | "default";
}

/** The backend a device gets, and why, in a phrase a person reads ("no /dev/iommu: ..."). */
export interface BackendDecision {
  backend: DmaBackend;
  reason: string;
}

/** What the host offers one device. */
export interface BackendFacts {
  /** /dev/iommu exists. */
  iommu: boolean;
  /** The device's VFIO cdev (/dev/vfio/devices/vfioN), or undefined when the kernel gave it none. */
  cdev: string | undefined;
  /** /dev/vfio/vfio exists. */
  container: boolean;
  /** An object the caller handed in (an IOAS, a container, an open device) fixes the backend. */
  given?: GivenBackend;
}

/** The backend an object handed in is on, the argument that carried it, and the reason in words. */
export interface GivenBackend {
  backend: DmaBackend;
  argument: string;
  reason: string;
}

const isChoice = (value: unknown): value is BackendChoice => CHOICES.includes(value as BackendChoice);

/**
 * The backend asked for: `option` when it names one, else $BUN_IOMMUFD_BACKEND, else "auto".
 * `option: "auto"` also defers to the environment, so a program that says "auto" can still be
 * pointed at one backend from outside. A value that is neither is EINVAL naming where it came from.
 */
export function requestedBackend(
  option: unknown,
  operation: string,
  env: Record<string, string | undefined> = process.env,
): BackendRequest {
  if (option !== undefined && !isChoice(option)) {
    throw argumentError(operation, "options.backend", `${String(option)} is not "auto", "iommufd" or "type1"`);
  }
  if (option === "iommufd" || option === "type1") return { choice: option, source: "option" };
  const value = env[BACKEND_ENV];
  if (value !== undefined && value !== "") {
    if (!isChoice(value)) {
      throw argumentError(
        operation,
        BACKEND_ENV,
        `the environment variable ${BACKEND_ENV}=${JSON.stringify(value)} is not auto, iommufd or type1`,
        "EINVAL",
        `set ${BACKEND_ENV} to auto, iommufd or type1, or unset it`,
      );
    }
    if (value !== "auto") return { choice: value, source: "environment" };
  }
  return { choice: "auto", source: option === "auto" ? "option" : "default" };
}

/**
 * The backend for `device` given the request and the host's facts. Forced: what was forced (the
 * open that follows fails with its own error if the host lacks it). Auto: an object handed in
 * decides; else iommufd when /dev/iommu and the device's cdev exist; else type1 when the
 * container exists; else ENODEV naming both missing nodes.
 */
export function chooseBackend(
  request: BackendRequest,
  facts: BackendFacts,
  device: string,
  operation: string,
): BackendDecision {
  if (request.choice !== "auto") {
    const by = request.source === "environment" ? `${BACKEND_ENV}=${request.choice}` : "options.backend";
    return { backend: request.choice, reason: `forced by ${by}` };
  }
  if (facts.given) return { backend: facts.given.backend, reason: facts.given.reason };
  if (facts.iommu && facts.cdev !== undefined) {
    return { backend: "iommufd", reason: `${DEFAULT_IOMMU_PATH} exists and ${device} has a VFIO cdev (${facts.cdev})` };
  }
  const missing = facts.iommu
    ? `${device} has no VFIO cdev (a kernel without CONFIG_VFIO_DEVICE_CDEV)`
    : `no ${DEFAULT_IOMMU_PATH} (a kernel without CONFIG_IOMMUFD, or iommufd not loaded)`;
  if (facts.container) return { backend: "type1", reason: `${missing}; ${DEFAULT_CONTAINER_PATH} exists` };
  throw noBackendError(operation, device, missing);
}

function noBackendError(operation: string, device: string, missing: string): IommufdError {
  return stateError(operation, "ENODEV", `no DMA backend for ${device}: ${missing}, and no ${DEFAULT_CONTAINER_PATH}`, {
    hint: "load vfio-pci (modprobe vfio-pci; it brings vfio_iommu_type1), or use a kernel with CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV",
  });
}

/** The facts of this host for a device bound to vfio-pci (`cdev` as pci.ts found it). */
export function hostFacts(cdev: string | undefined): BackendFacts {
  return { iommu: existsSync(DEFAULT_IOMMU_PATH), cdev, container: existsSync(DEFAULT_CONTAINER_PATH) };
}
