/**
 * Every struct size, field offset, ioctl number and flag the library uses, compared with what a C
 * compiler says about the real kernel headers.
 */
import { beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { StructLayout } from "../../src/uapi/codec.ts";
import * as iommufd from "../../src/uapi/iommufd.ts";
import * as selftest from "../../src/uapi/iommufd-test.ts";
import * as udmabuf from "../../src/uapi/udmabuf.ts";
import * as vfio from "../../src/uapi/vfio.ts";
import { isCI } from "../support/ci.ts";
import { selftestHeaderDir, uapiIncludeDir } from "../support/headers.ts";

interface Suite {
  header: string;
  layouts: StructLayout[];
  requests: Record<string, number>;
  constants: Record<string, number>;
}

const SUITES: Suite[] = [
  {
    header: "linux/iommufd.h",
    layouts: iommufd.IOMMUFD_LAYOUTS,
    requests: iommufd.IOMMUFD_REQUESTS,
    constants: iommufd.IOMMUFD_CONSTANTS,
  },
  { header: "linux/vfio.h", layouts: vfio.VFIO_LAYOUTS, requests: vfio.VFIO_REQUESTS, constants: vfio.VFIO_CONSTANTS },
  {
    header: "linux/vfio.h",
    layouts: vfio.VFIO_TYPE1_LAYOUTS,
    requests: vfio.VFIO_TYPE1_REQUESTS,
    constants: vfio.VFIO_TYPE1_CONSTANTS,
  },
  {
    header: "linux/udmabuf.h",
    layouts: udmabuf.UDMABUF_LAYOUTS,
    requests: udmabuf.UDMABUF_REQUESTS,
    constants: udmabuf.UDMABUF_CONSTANTS,
  },
];

const SELFTEST: Suite = {
  header: "iommufd_test.h",
  layouts: selftest.IOMMUFD_TEST_LAYOUTS,
  requests: selftest.IOMMUFD_TEST_REQUESTS,
  constants: selftest.IOMMUFD_TEST_CONSTANTS,
};

/** One C program printing `key value` lines for everything in the suites. */
function cProgram(suites: Suite[]): string {
  const lines: string[] = [];
  for (const suite of suites) {
    for (const layout of suite.layouts) {
      lines.push(`  P("size ${layout.cName}", sizeof(${layout.cName}));`);
      for (const field of layout.fieldList) {
        const member = layout.cPath[field.name] ?? field.name;
        lines.push(`  P("offset ${layout.cName}.${field.name}", offsetof(${layout.cName}, ${member}));`);
        lines.push(`  P("fieldsize ${layout.cName}.${field.name}", sizeof(((${layout.cName} *)0)->${member}));`);
      }
    }
    for (const name of Object.keys(suite.requests)) lines.push(`  P("request ${name}", (unsigned long)(${name}));`);
    for (const name of Object.keys(suite.constants)) lines.push(`  P("constant ${name}", (unsigned long)(${name}));`);
  }
  return [
    "#include <stddef.h>",
    "#include <stdio.h>",
    ...suites.map((s) => `#include <${s.header}>`),
    '#define P(key, value) printf("%s %lu\\n", key, (unsigned long)(value))',
    "int main(void) {",
    ...lines,
    "  return 0;",
    "}",
  ].join("\n");
}

function expectedFromLibrary(suites: Suite[]): Map<string, number> {
  const out = new Map<string, number>();
  for (const suite of suites) {
    for (const layout of suite.layouts) {
      out.set(`size ${layout.cName}`, layout.size);
      for (const field of layout.fieldList) {
        out.set(`offset ${layout.cName}.${field.name}`, field.offset);
        out.set(`fieldsize ${layout.cName}.${field.name}`, field.size * field.count);
      }
    }
    for (const [name, value] of Object.entries(suite.requests)) out.set(`request ${name}`, value);
    for (const [name, value] of Object.entries(suite.constants)) out.set(`constant ${name}`, value);
  }
  return out;
}

function compileAndRun(suites: Suite[], includeDirs: string[]): Map<string, number> {
  const dir = mkdtempSync(join(tmpdir(), "iommufd-layout-"));
  const source = join(dir, "layout.c");
  const binary = join(dir, "layout");
  writeFileSync(source, cProgram(suites));
  // -nostdinc is not used: libc headers come from the system, kernel UAPI headers come first.
  const cc = Bun.spawnSync(["cc", "-Wall", "-Werror", ...includeDirs.map((d) => `-I${d}`), "-o", binary, source], {
    stderr: "pipe",
  });
  if (cc.exitCode !== 0) throw new Error(`cc failed:\n${cc.stderr.toString()}`);
  const run = Bun.spawnSync([binary], { stdout: "pipe" });
  const values = new Map<string, number>();
  for (const line of run.stdout.toString().trim().split("\n")) {
    const cut = line.lastIndexOf(" ");
    values.set(line.slice(0, cut), Number(line.slice(cut + 1)));
  }
  return values;
}

function compare(suites: Suite[], includeDirs: string[]): void {
  const fromC = compileAndRun(suites, includeDirs);
  const fromLibrary = expectedFromLibrary(suites);
  const mismatches: string[] = [];
  for (const [key, value] of fromLibrary) {
    if (fromC.get(key) !== value) mismatches.push(`${key}: library ${value}, kernel header ${fromC.get(key)}`);
  }
  expect(mismatches).toEqual([]);
  expect(fromC.size).toBe(fromLibrary.size);
}

describe("UAPI layouts match the kernel headers", () => {
  let include = "";
  beforeAll(() => {
    include = uapiIncludeDir();
  });

  test("iommufd.h, vfio.h and udmabuf.h: every size, offset, request and flag", () => {
    compare(SUITES, [include]);
  });

  test("the C generator covers every field of every layout", () => {
    const keys = expectedFromLibrary(SUITES);
    const fields = SUITES.flatMap((s) => s.layouts).reduce((n, l) => n + l.fieldList.length, 0);
    const structs = SUITES.reduce((n, s) => n + s.layouts.length, 0);
    const named = SUITES.reduce((n, s) => n + Object.keys(s.requests).length + Object.keys(s.constants).length, 0);
    expect(keys.size).toBe(structs + 2 * fields + named);
    expect(Object.keys(iommufd.IOMMUFD_REQUESTS)).toHaveLength(21);
  });

  const selftestDir = selftestHeaderDir();
  const needSelftest = isCI();
  test.skipIf(!selftestDir && !needSelftest)(
    "iommufd_test.h (selftest commands) matches the header kept with the test kernel" +
      (selftestDir ? "" : " [skipped: no test kernel built yet; run `bun run kernel`]"),
    () => {
      if (!selftestDir) throw new Error("no cached test kernel with iommufd_test.h; the kernel build must run first");
      compare([SELFTEST], [include, selftestDir]);
    },
  );
});
