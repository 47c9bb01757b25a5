// CI's drift check: regenerate the types into a temporary file and compare with the committed ones.
import { mkdtempSync, readFileSync, rmSync, existsSync } from "node:fs";
import { spawnSync } from "node:child_process";
import { tmpdir } from "node:os";
import path from "node:path";
import { CONTRACT, GENERATED, PACKAGE, generate } from "./generate.mjs";

const dir = mkdtempSync(path.join(tmpdir(), "sidecar-client-types-"));
try {
  const fresh = path.join(dir, "openapi.ts");
  generate(fresh);
  const committed = existsSync(GENERATED) ? readFileSync(GENERATED, "utf8") : "";
  if (readFileSync(fresh, "utf8") === committed) {
    console.log(`types are up to date with ${path.relative(PACKAGE, CONTRACT)}`);
  } else {
    const diff = spawnSync("diff", ["-u", GENERATED, fresh], { encoding: "utf8" });
    console.error(diff.stdout || "(no diff tool: the files differ)");
    console.error(`\n${path.relative(PACKAGE, GENERATED)} is out of date with ${path.relative(PACKAGE, CONTRACT)}.\n` +
                  "Run `npm run generate` in clients/typescript and commit the result.");
    process.exitCode = 1;
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
