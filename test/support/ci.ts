/**
 * The one rule for "this is a CI run", shared by scripts/test.ts, .ci/run (which sets CI=true) and
 * the tests that turn a skip into a failure under CI (layout.test.ts, the kernel tests).
 *
 * CI is on when the variable is set to anything but an empty string, "0", "false" or "no" (any
 * case): CI services set CI=true, some CI=1, and a person turning it off writes CI=0 or CI=false.
 */
export function isCI(env: Record<string, string | undefined> = process.env): boolean {
  const value = env.CI?.trim().toLowerCase();
  return value !== undefined && !["", "0", "false", "no"].includes(value);
}
