// Compiles the TypeScript blocks of docs/angular.md and of the package's README against the built
// package, as an Angular app would (bundler resolution, decorators), so neither can drift from the
// package's API.
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { spawnSync } from "node:child_process";
import path from "node:path";
import { PACKAGE } from "./generate.mjs";

const DOCS = [path.resolve(PACKAGE, "../../docs/angular.md"), path.join(PACKAGE, "README.md")];
// Inside the package, so the package's own name resolves to it (self-reference through "exports").
const DIR = path.join(PACKAGE, ".docs-check");

const docs = DOCS.map((doc, d) => {
  const blocks = [...readFileSync(doc, "utf8").matchAll(/```ts\n([\s\S]*?)```/g)].map((m) => m[1]);
  if (blocks.length === 0) throw new Error(`no \`\`\`ts blocks in ${doc}`);
  return { name: path.relative(PACKAGE, doc), prefix: `doc-${d + 1}-snippet`, blocks };
});

rmSync(DIR, { recursive: true, force: true });
mkdirSync(DIR);
try {
  // What the guide's snippets take from the app around them.
  writeFileSync(path.join(DIR, "auth.service.ts"), "export class AuthService { accessToken(): string | null { return null; } }\n");
  for (const { prefix, blocks } of docs) blocks.forEach((code, i) => writeFileSync(path.join(DIR, `${prefix}-${i + 1}.ts`), code));
  writeFileSync(path.join(DIR, "tsconfig.json"), JSON.stringify({
    compilerOptions: {
      target: "ES2022", module: "ESNext", moduleResolution: "bundler", lib: ["ES2022", "DOM", "DOM.Iterable"],
      strict: true, experimentalDecorators: true, noEmit: true, skipLibCheck: true, types: [],
    },
    include: ["*.ts"],
  }));
  const tsc = path.join(PACKAGE, "node_modules/typescript/bin/tsc");
  const run = spawnSync(process.execPath, [tsc, "-p", DIR], { cwd: PACKAGE, encoding: "utf8" });
  if (run.status !== 0) {
    console.error(run.stdout + run.stderr);
    const key = docs.map(({ name, prefix }) => `${prefix}-N is the Nth block of ${name}`).join("; ");
    console.error(`code blocks do not compile against the package (${key})`);
    process.exitCode = 1;
  } else {
    console.log(docs.map(({ name, blocks }) => `${blocks.length} code blocks of ${name}`).join(", ") + " compile against the package");
  }
} finally {
  rmSync(DIR, { recursive: true, force: true });
}
