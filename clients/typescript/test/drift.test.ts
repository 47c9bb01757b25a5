// The drift check CI runs (`npm run check:types`): it passes on the committed contract and fails,
// naming the field, on a contract changed without regenerating the types.
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { describe, expect, it } from "vitest";

const PACKAGE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const CONTRACT = path.resolve(PACKAGE, "../../openapi/openapi.json");

function checkTypes(contract?: string) {
  const env = { ...process.env, ...(contract ? { SIDECAR_OPENAPI: contract } : {}) };
  return spawnSync(process.execPath, ["scripts/check-types.mjs"], { cwd: PACKAGE, env, encoding: "utf8", timeout: 60_000 });
}

describe("npm run check:types", () => {
  it("passes on the committed contract", () => {
    const run = checkTypes();
    expect(run.status, run.stderr).toBe(0);
  });

  it("fails when a field of the contract changed and the types were not regenerated", () => {
    const contract = JSON.parse(readFileSync(CONTRACT, "utf8"));
    const deal = contract.components.schemas.DealPredictResult;
    deal.properties.health_pct = deal.properties.health_score;
    delete deal.properties.health_score;
    deal.required = deal.required.map((name: string) => (name === "health_score" ? "health_pct" : name));
    const dir = mkdtempSync(path.join(tmpdir(), "contract-"));
    try {
      const changed = path.join(dir, "openapi.json");
      writeFileSync(changed, JSON.stringify(contract));
      const run = checkTypes(changed);
      expect(run.status).toBe(1);
      expect(run.stderr).toMatch(/^-\s+health_score: number;$/m);
      expect(run.stderr).toMatch(/^\+\s+health_pct: number;$/m);
      expect(run.stderr).toMatch(/out of date.*npm run generate/s);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
