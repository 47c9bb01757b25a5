// Generates the contract's types from openapi/openapi.json, the sidecar's committed OpenAPI document.
// `npm run generate` writes src/generated/openapi.ts; `npm run check:types` (CI) writes to a temporary
// file and fails when it differs from the committed one, so a contract change cannot ship without
// regenerated types. One place for the generator's flags keeps both byte-identical.
import { execFileSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
export const PACKAGE = path.resolve(here, "..");
// $SIDECAR_OPENAPI points elsewhere only for the test of the drift check itself.
export const CONTRACT = path.resolve(PACKAGE, process.env.SIDECAR_OPENAPI ?? "../../openapi/openapi.json");
export const GENERATED = path.join(PACKAGE, "src/generated/openapi.ts");

export function generate(output) {
  const cli = path.join(PACKAGE, "node_modules/openapi-typescript/bin/cli.js");
  // --default-non-nullable false: a request field with a default (email `context`, `tone`) stays optional,
  // as the server treats it; response fields are required because the schema says so, not because of defaults.
  execFileSync(process.execPath, [cli, CONTRACT, "--output", output, "--default-non-nullable", "false"], {
    cwd: PACKAGE,
    stdio: ["ignore", "ignore", "inherit"],
  });
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  generate(process.argv[2] ?? GENERATED);
}
