/**
 * Controller initialization and shutdown by registers (NVMe Base 2.0 sections 3.5.1 and 3.6):
 * CC.EN, CSTS.RDY, the admin queue registers, CC.SHN and CSTS.SHST, with CAP.TO as the bound of
 * every wait.
 */
import { ioError, stateError, timeoutError } from "../sys/error.ts";
import {
  ACQ,
  AQA,
  ASQ,
  CC,
  CC_EN,
  CC_IOCQES_16,
  CC_IOSQES_64,
  CC_SHN_MASK,
  CC_SHN_NORMAL,
  type Capabilities,
  type ControllerRegisters,
  CSTS,
  CSTS_CFS,
  CSTS_RDY,
  CSTS_SHST_COMPLETE,
  CSTS_SHST_MASK,
} from "./registers.ts";

export type Step = "enable" | "disable" | "shutdown";

/** Poll CSTS until `done` or CAP.TO (at least 500 ms) runs out. */
export function waitStatus(
  regs: ControllerRegisters,
  caps: Capabilities,
  step: Step,
  done: (csts: number) => boolean,
): void {
  const limit = Math.max(caps.timeoutMs, 500);
  const deadline = performance.now() + limit;
  for (;;) {
    const csts = regs.read32(CSTS);
    if (csts === 0xffffffff) {
      throw stateError(`NvmeController.${step}`, "ENODEV", "CSTS reads all ones: the controller is gone from the bus");
    }
    if (done(csts)) return;
    if (performance.now() > deadline) {
      throw timeoutError(
        `NvmeController.${step}`,
        `CSTS did not reach the expected state within CAP.TO (${limit} ms); CSTS = 0x${csts.toString(16)}`,
      );
    }
    Bun.sleepSync(1);
  }
}

/** CC.EN = 0 and wait for CSTS.RDY = 0: the controller drops every queue. */
export function disableController(regs: ControllerRegisters, caps: Capabilities): void {
  const cc = regs.read32(CC);
  if (cc & CC_EN) regs.write32(CC, cc & ~CC_EN);
  waitStatus(regs, caps, "disable", (csts) => (csts & CSTS_RDY) === 0);
}

/**
 * Disable, program the admin queue (AQA, ASQ, ACQ; 64-bit registers as two 32-bit writes), then
 * CC.EN = 1 with 64-byte submission and 16-byte completion entries, 4 KiB pages, the NVM command
 * set, and wait for CSTS.RDY = 1.
 */
export function enableController(
  regs: ControllerRegisters,
  caps: Capabilities,
  admin: { depth: number; sqIova: number; cqIova: number },
): void {
  disableController(regs, caps);
  regs.write32(AQA, (admin.depth - 1) | ((admin.depth - 1) << 16));
  regs.write64(ASQ, admin.sqIova);
  regs.write64(ACQ, admin.cqIova);
  regs.write32(CC, CC_IOSQES_64 | CC_IOCQES_16 | CC_EN);
  waitStatus(regs, caps, "enable", (csts) => (csts & CSTS_RDY) !== 0 || (csts & CSTS_CFS) !== 0);
  if (regs.read32(CSTS) & CSTS_CFS) {
    throw ioError("NvmeController.enable", "the controller reported fatal status (CSTS.CFS) while enabling");
  }
}

/** CC.SHN = normal shutdown, and wait for CSTS.SHST = complete. */
export function shutdownController(regs: ControllerRegisters, caps: Capabilities): void {
  regs.write32(CC, (regs.read32(CC) & ~CC_SHN_MASK) | CC_SHN_NORMAL);
  waitStatus(regs, caps, "shutdown", (csts) => (csts & CSTS_SHST_MASK) === CSTS_SHST_COMPLETE);
}
