// What the guest is told: the results share that vm/guest-init.sh reads at boot (its settings,
// the device table, the command as a shell script) and where the command's environment comes from.

import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { DEVICE_LISTS, guestDeviceTable, type IommuModel, type PlacedDevice } from "./devices.ts";

// Inside the guest the results share is mounted here, on the guest's own tmpfs /tmp.
const guestShare = "/tmp/.iommufd-vm";

export function shellQuote(s: string): string {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}

/** The host directory the guest gets writable at the same path, for a command run in `cwd`. */
export function workShare(cwd: string): string {
  // The guest's /tmp is its own tmpfs: share the whole top directory below /tmp, so a project's
  // node_modules one level up from cwd stays visible.
  if (cwd.startsWith("/tmp/")) return `/tmp/${cwd.slice(5).split("/")[0]}`;
  return cwd;
}

// Variables that make sense inside the guest; anything else from the host (SSH agents, display,
// the host's TMPDIR) would only mislead the command.
export function guestEnvironment(extra: Record<string, string>): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (v === undefined) continue;
    if (
      /^(IOMMUFD_|BUN_)/.test(k) ||
      ["CI", "TERM", "NO_COLOR", "FORCE_COLOR", "LANG", "LC_ALL", "TZ", "GITHUB_ACTIONS"].includes(k)
    ) {
      env[k] = v;
    }
  }
  Object.assign(env, extra);
  Object.assign(env, {
    HOME: "/tmp",
    TMPDIR: "/tmp",
    USER: "root",
    PATH: process.env.PATH || "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
    IOMMUFD_IN_VM: "1",
    IOMMUFD_VM_OUT: `${guestShare}/out`,
  });
  return env;
}

export function commandScript(command: string[], cwd: string, env: Record<string, string>): string {
  const lines = ["# Written by vm/guest-script.ts; run by the guest's /bin/sh with an empty environment."];
  for (const [k, v] of Object.entries(env)) lines.push(`export ${k}=${shellQuote(v)}`);
  // The device variables, written by the guest's init once it has bound the devices.
  lines.push(`for f in ${guestShare}/env/*; do [ -f "$f" ] && export "\${f##*/}=$(cat "$f")"; done`);
  lines.push(`cd ${shellQuote(cwd)} || exit 125`);
  // The host checked the command before booting; this catches what only the guest lacks.
  lines.push(`command -v ${shellQuote(command[0]!)} >/dev/null 2>&1 || {`);
  lines.push(`  echo "bun-iommufd vm: command not found in the guest: "${shellQuote(command[0]!)} >&2; exit 127; }`);
  lines.push(`exec ${command.map(shellQuote).join(" ")}`);
  return `${lines.join("\n")}\n`;
}

export interface ShareContents {
  hugepages: number;
  /** Prefix of IOMMUFD_VM_KERNEL in the guest (see GuestKernel in vm/images.ts), or "". */
  kernelPrefix: string;
  /** Host directory shared writable at the same path in the guest, or "". */
  work: string;
  iommu: IommuModel;
  devices: PlacedDevice[];
  /** From commandScript(). */
  script: string;
}

/** Fills a new results share (the host side of what the guest mounts at guestShare). */
export function writeShare(share: string, c: ShareContents): void {
  mkdirSync(join(share, "out"), { recursive: true });
  mkdirSync(join(share, "env"), { recursive: true });
  // Every list variable is set in the guest, empty when no device is in it.
  for (const list of DEVICE_LISTS) writeFileSync(join(share, "env", `IOMMUFD_VM_${list}`), "");
  writeFileSync(
    join(share, "config"),
    `HUGEPAGES=${c.hugepages}\nSHARE=${shellQuote(guestShare)}\nWORK=${shellQuote(c.work)}\nKERNEL_PREFIX=${shellQuote(c.kernelPrefix)}\n`,
  );
  writeFileSync(join(share, "devices"), guestDeviceTable(c.devices, c.iommu));
  writeFileSync(join(share, "cmd.sh"), c.script);
}
