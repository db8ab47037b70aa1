#!/usr/bin/env bun
/**
 * The bun-iommufd command. `doctor` checks whether this machine can run the library and prints
 * one line per check with a fix (logic in src/doctor/). `vm` runs a command in the test guest: a
 * QEMU machine with an iommufd kernel, an emulated IOMMU and devices on vfio-pci (logic in vm/).
 */
import { formatReport, parseSize, reportJson, runDoctor } from "../src/doctor/index.ts";

const USAGE = `usage: bun-iommufd doctor [--json] [--map-size SIZE] [--no-device-probe] [--no-color]
       bun-iommufd vm [options] -- <command...>    (bun-iommufd vm --help for the options)

Checks whether iommufd (/dev/iommu) and VFIO are usable on this machine, one line per check
with a fix. Exits 0 when iommufd is usable (the device opens and an IOAS can be created), else 1.

  --json              machine-readable report on stdout
  --map-size SIZE     mapping size the locked-memory check plans for (default 64M)
  --no-device-probe   do not bind a VFIO device to probe its dma-buf support
  --no-color          plain labels even on a terminal (NO_COLOR works too)
  --iommu PATH        iommufd device node (default /dev/iommu)`;

function main(argv: string[]): number {
  const [command, ...rest] = argv;
  if (command === undefined || command === "-h" || command === "--help" || command === "help") {
    console.log(USAGE);
    return command === undefined ? 2 : 0;
  }
  if (command !== "doctor" && command !== "vm") {
    console.error(`bun-iommufd: unknown command "${command}"\n\n${USAGE}`);
    return 2;
  }
  let json = false;
  let color = process.stdout.isTTY === true && !process.env.NO_COLOR;
  let mapBytes: number | undefined;
  let noDeviceProbe = false;
  let iommuPath: string | undefined;
  for (let i = 0; i < rest.length; i++) {
    const arg = rest[i]!;
    const value = (): string => {
      const v = rest[++i];
      if (v === undefined) throw new Error(`${arg} needs a value`);
      return v;
    };
    try {
      switch (arg) {
        case "--json":
          json = true;
          break;
        case "--no-color":
          color = false;
          break;
        case "--no-device-probe":
          noDeviceProbe = true;
          break;
        case "--map-size": {
          const text = value();
          mapBytes = parseSize(text);
          if (mapBytes === undefined || mapBytes <= 0)
            throw new Error(`--map-size wants a size like 64M or 1G, not "${text}"`);
          break;
        }
        case "--iommu":
          iommuPath = value();
          break;
        case "-h":
        case "--help":
          console.log(USAGE);
          return 0;
        default:
          throw new Error(`unknown option ${arg}`);
      }
    } catch (error) {
      console.error(`bun-iommufd doctor: ${(error as Error).message}\n\n${USAGE}`);
      return 2;
    }
  }
  const report = runDoctor({ mapBytes, noDeviceProbe, iommuPath });
  console.log(json ? reportJson(report) : formatReport(report, { color }));
  return report.exitCode;
}

if (process.argv[2] === "vm") {
  // Loaded only for this command: the doctor must not pay for the guest's code.
  const { main: vmMain } = await import("../vm/cli.ts");
  process.exitCode = await vmMain(process.argv.slice(3));
} else {
  process.exitCode = main(process.argv.slice(2));
}
