/**
 * PCI config space of a VFIO device: byte reads and writes through the config region of the
 * device fd, and bus mastering (the VFIO feature where the kernel has it, else the command
 * register). VfioDevice's config methods call these.
 */
import { argumentError, ioError } from "../sys/error.ts";
import { preadInto, pwriteFrom } from "../sys/fd.ts";
import { isErrno } from "../sys/ioctl.ts";
import { hex } from "../sys/validate.ts";
import {
  VFIO_DEVICE_FEATURE,
  VFIO_DEVICE_FEATURE_BUS_MASTER,
  VFIO_DEVICE_FEATURE_CLEAR_MASTER,
  VFIO_DEVICE_FEATURE_SET,
  VFIO_DEVICE_FEATURE_SET_MASTER,
  vfio_device_feature,
  vfio_device_feature_bus_master,
} from "../uapi/vfio.ts";
import type { VfioDevice } from "./device.ts";

/** A PCI Express function's config space (conventional PCI uses the first 256 bytes). */
const CONFIG_SPACE_SIZE = 4096;
const PCI_COMMAND = 0x04;
const PCI_COMMAND_MASTER = 0x4;

export function readConfig(device: VfioDevice, offset: number, length: number): Uint8Array {
  const op = "VfioDevice.readConfig";
  checkConfigRange(op, offset, length);
  const out = new Uint8Array(length);
  const n = preadInto(device.fd, out, device.configOffset(op) + offset, op);
  if (n !== length) throw ioError(op, `read ${n} of ${length} config bytes at ${hex(offset)}`);
  return out;
}

export function writeConfig(device: VfioDevice, offset: number, bytes: Uint8Array): void {
  const op = "VfioDevice.writeConfig";
  checkConfigRange(op, offset, bytes.length);
  const n = pwriteFrom(device.fd, bytes, device.configOffset(op) + offset, op);
  if (n !== bytes.length) throw ioError(op, `wrote ${n} of ${bytes.length} config bytes at ${hex(offset)}`);
}

export function setBusMaster(device: VfioDevice, enabled: boolean): void {
  const op = "VFIO_DEVICE_FEATURE_BUS_MASTER";
  const payload = vfio_device_feature_bus_master.size;
  const cmd = vfio_device_feature.create(payload);
  cmd.fill({
    argsz: vfio_device_feature.size + payload,
    flags: VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_BUS_MASTER,
  });
  cmd.view.setUint32(
    vfio_device_feature.size,
    enabled ? VFIO_DEVICE_FEATURE_SET_MASTER : VFIO_DEVICE_FEATURE_CLEAR_MASTER,
    true,
  );
  try {
    device.ioctl(VFIO_DEVICE_FEATURE, cmd, op);
    return;
  } catch (error) {
    // Kernels without the feature: fall back to the command register below.
    if (!isErrno(error, "ENOTTY") && !isErrno(error, "EINVAL") && !isErrno(error, "EOPNOTSUPP")) throw error;
  }
  const command = device.readConfig16(PCI_COMMAND);
  device.writeConfig16(PCI_COMMAND, enabled ? command | PCI_COMMAND_MASTER : command & ~PCI_COMMAND_MASTER);
}

export function busMasterOn(device: VfioDevice): boolean {
  return (device.readConfig16(PCI_COMMAND) & PCI_COMMAND_MASTER) !== 0;
}

function checkConfigRange(op: string, offset: number, length: number): void {
  if (!Number.isInteger(offset) || offset < 0 || offset >= CONFIG_SPACE_SIZE)
    throw argumentError(op, "offset", `${offset} is outside PCI config space`);
  if (!Number.isInteger(length) || length <= 0 || offset + length > CONFIG_SPACE_SIZE) {
    throw argumentError(op, "length", `${length} bytes at ${hex(offset)} do not fit in PCI config space`);
  }
}
