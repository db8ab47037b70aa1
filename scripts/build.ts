// `bun run build` (run by `prepack`): dist/, the JavaScript and declarations behind the package's
// `types` and `default` conditions (Bun itself takes the `bun` condition: the sources in src/).
//
//   bun run build        rebuilds dist/ from src/ with tsconfig.build.json, then checks it
//
// tsc's rewriteRelativeImportExtensions turns `./x.ts` into `./x.js` in the JavaScript it emits but
// leaves `./x.ts` in the declarations (microsoft/TypeScript#61037, still so in 7.0): a consumer's
// tsc then stops at TS5097 inside node_modules, or with skipLibCheck resolves nothing and types
// every import as `any`. tsc also leaves a `new URL("./x.ts", import.meta.url)` alone, which is how
// the fault queue starts its worker. So every relative reference to a `.ts` file in dist/ becomes
// `.js` here, and the build fails if any relative reference in dist/ names a file that is not there.

import { existsSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";

const root = resolve(import.meta.dir, "..");

/**
 * A relative module reference in emitted code: `from "./x"`, `import("./x")`, `import "./x"`,
 * `new URL("./x", ...)`. Group 3 is the specifier.
 */
const REFERENCE = /(\bfrom\s*|\bimport\s*\(\s*|\bimport\s+|\bnew URL\(\s*)(["'])(\.\.?\/[^"'\n]*)\2/g;

/** Lines of a doc comment or a line comment: examples there name the sources on purpose. */
const COMMENT_LINE = /^\s*(\*|\/\*|\/\/)/;

/** Calls `visit` for each relative reference outside comment lines; returns the text it rewrote. */
function eachReference(text: string, visit: (specifier: string) => string | undefined): string {
  return text
    .split("\n")
    .map((line) =>
      COMMENT_LINE.test(line)
        ? line
        : line.replace(REFERENCE, (whole, lead: string, quote: string, specifier: string) => {
            const next = visit(specifier);
            return next === undefined ? whole : `${lead}${quote}${next}${quote}`;
          }),
    )
    .join("\n");
}

/** `./x.ts` -> `./x.js`; `.d.ts` and everything else unchanged. */
export function rewriteTsSpecifiers(text: string): string {
  return eachReference(text, (s) => (s.endsWith(".ts") && !s.endsWith(".d.ts") ? `${s.slice(0, -3)}.js` : undefined));
}

function filesUnder(dir: string): string[] {
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => join(e.parentPath, e.name));
}

/**
 * Relative references in the .js and .d.ts files under `dir` that name no file there, as
 * "file: specifier" (a declaration's `./x.js` must have `./x.d.ts` beside it, as tsc looks for).
 */
export function danglingReferences(dir: string): string[] {
  const dangling: string[] = [];
  for (const file of filesUnder(dir)) {
    const declaration = file.endsWith(".d.ts");
    if (!declaration && !file.endsWith(".js")) continue;
    eachReference(readFileSync(file, "utf8"), (specifier) => {
      let target = resolve(dirname(file), specifier);
      if (declaration && target.endsWith(".js")) target = `${target.slice(0, -3)}.d.ts`;
      if (!existsSync(target)) dangling.push(`${relative(dir, file)}: ${specifier}`);
      return undefined;
    });
  }
  return dangling;
}

/** The targets (every condition) of package.json's exports that are not files under `packageRoot`. */
export function missingExportTargets(packageRoot: string): string[] {
  const pkg = JSON.parse(readFileSync(join(packageRoot, "package.json"), "utf8")) as {
    exports: Record<string, Record<string, string>>;
  };
  return Object.entries(pkg.exports).flatMap(([entry, conditions]) =>
    Object.entries(conditions)
      .filter(([, target]) => !existsSync(join(packageRoot, target)))
      .map(([condition, target]) => `${entry} (${condition}): ${target}`),
  );
}

/** Builds dist/ under `packageRoot`; throws with tsc's output, a dangling reference or a missing export. */
export function build(packageRoot = root): { files: number } {
  const dist = join(packageRoot, "dist");
  rmSync(dist, { recursive: true, force: true });
  const tsc = join(packageRoot, "node_modules/.bin/tsc");
  if (!existsSync(tsc)) throw new Error(`${tsc} is missing: run bun install`);
  const run = Bun.spawnSync([tsc, "-p", "tsconfig.build.json"], { cwd: packageRoot, stdout: "pipe", stderr: "pipe" });
  if (run.exitCode !== 0) throw new Error(`tsc -p tsconfig.build.json failed:\n${run.stdout}${run.stderr}`);
  const files = filesUnder(dist);
  for (const file of files) {
    if (!file.endsWith(".js") && !file.endsWith(".d.ts")) continue;
    const text = readFileSync(file, "utf8");
    const rewritten = rewriteTsSpecifiers(text);
    if (rewritten !== text) writeFileSync(file, rewritten);
  }
  const dangling = danglingReferences(dist);
  if (dangling.length) throw new Error(`dist/ refers to files it does not have:\n  ${dangling.join("\n  ")}`);
  const missing = missingExportTargets(packageRoot);
  if (missing.length) throw new Error(`package.json exports files the build did not make:\n  ${missing.join("\n  ")}`);
  return { files: files.length };
}

if (import.meta.main) {
  try {
    const t0 = performance.now();
    const { files } = build();
    console.log(`dist/: ${files} files in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  } catch (error) {
    console.error(`scripts/build.ts: ${(error as Error).message}`);
    process.exitCode = 1;
  }
}
