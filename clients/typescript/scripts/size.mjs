// Bundle size of the framework-agnostic client as an app would ship it: the built entry point with
// openapi-fetch, bundled and minified by esbuild, then gzipped. The Angular entry point is measured
// without @angular/core and rxjs, which the app already has.
import { gzipSync } from "node:zlib";
import { build } from "esbuild";

async function measure(entry, external = []) {
  const out = await build({ entryPoints: [entry], bundle: true, minify: true, format: "esm", target: "es2022", write: false, external });
  const code = out.outputFiles[0].contents;
  return { minified: code.length, gzipped: gzipSync(code, { level: 9 }).length };
}

const rows = [
  ["@crm-ai/sidecar-client", await measure("dist/index.js")],
  ["@crm-ai/sidecar-client/angular (without @angular/core, rxjs)", await measure("dist/angular/index.js", ["@angular/core", "rxjs"])],
];
for (const [name, { minified, gzipped }] of rows) console.log(`${name}: ${minified} B minified, ${gzipped} B gzipped`);
