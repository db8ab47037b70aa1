// The repository's shape, as issue 25 set it: folders by audience and no cycle between them, files
// of one subject, and the README's layout and docs/API.md true to what the code exports. Each of
// these drifted once while nobody looked; these tests look.

import { describe, expect, test } from "bun:test";
import { readdirSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { importCycles, importGraph, sourceFiles } from "../support/imports.ts";

const root = resolve(import.meta.dir, "../..");
const read = (path: string) => readFileSync(join(root, path), "utf8");

/** Files allowed over the line limit, each with the reason it is one subject. */
const LONG_FILES: Record<string, string> = {
  "src/heap/allocator.ts":
    "one data structure: the TLSF bins, block records and offset index change together on every alloc and " +
    "free; a split would add an object hop to the allocation path, and ~50 lines are its design notes",
};
const LINE_LIMIT = 450;

describe("repository shape", () => {
  test("no import cycle joins files of different folders", () => {
    const files = sourceFiles(root, ["src", "vm", "bench", "scripts", "bin", "test", "examples"]);
    const graph = importGraph(root, files);
    expect(graph.size).toBeGreaterThan(100);
    const crossing = importCycles(graph).filter((cycle) => new Set(cycle.map((f) => dirname(f))).size > 1);
    expect(crossing).toEqual([]);
  });

  test(`no file in src/ or vm/ over ${LINE_LIMIT} lines unless it says why`, () => {
    const long = sourceFiles(root, ["src", "vm"])
      .map((file) => ({ file, lines: read(file).split("\n").length - 1 }))
      .filter(({ file, lines }) => lines > LINE_LIMIT && !(file in LONG_FILES));
    expect(long).toEqual([]);
  });

  test("the README's layout names every folder of src/", () => {
    const layout = /## Layout\n+```\n([\s\S]*?)```/.exec(read("README.md"))?.[1] ?? "";
    expect(layout).not.toBe("");
    const folders = readdirSync(join(root, "src"), { withFileTypes: true }).filter((e) => e.isDirectory());
    expect(folders.length).toBeGreaterThan(5);
    const missing = folders.map((e) => `src/${e.name}/`).filter((f) => !layout.includes(f));
    expect(missing).toEqual([]);
  });

  test("docs/API.md names every value each public entry exports", async () => {
    const doc = read("docs/API.md");
    const pkg = JSON.parse(read("package.json")) as { exports: Record<string, { bun: string }> };
    const entries = Object.values(pkg.exports).map((e) => e.bun);
    expect(entries.length).toBeGreaterThanOrEqual(3);
    const missing: string[] = [];
    for (const entry of entries) {
      const names = Object.keys(await import(join(root, entry)));
      expect(names.length).toBeGreaterThan(0);
      for (const name of names) if (!new RegExp(`\\b${name}\\b`).test(doc)) missing.push(`${entry}: ${name}`);
    }
    expect(missing).toEqual([]);
  });

  test("docs/API.md's contents line links every section", () => {
    const doc = read("docs/API.md");
    const contents = /^Contents: (.*(?:\n(?!\n).*)*)/m.exec(doc)?.[1] ?? "";
    const anchors = new Set([...contents.matchAll(/\]\(#([^)]+)\)/g)].map((m) => m[1]));
    const sections = [...doc.matchAll(/^## (.+)$/gm)].map((m) =>
      m[1]!
        .toLowerCase()
        .replace(/[^\w\s-]/g, "")
        .replace(/\s/g, "-"),
    );
    expect(sections.length).toBeGreaterThan(5);
    expect(sections.filter((s) => !anchors.has(s))).toEqual([]);
  });
});
