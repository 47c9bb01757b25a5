// Global set-up: the real sidecar (`adapter demo`: the sidecar with its gateway and CRM doubles),
// and a static server for the browser test's page, on another origin as the Angular dev server is.
// Every wait has a deadline; the demo is stopped by its pid.
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import type { TestProject } from "vitest/node";

const PACKAGE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const ROOT = path.resolve(PACKAGE, "../..");
export const PAGE_DIR = path.join(PACKAGE, "test/browser/www");

export interface Sidecar {
  baseUrl: string;
  token: string;
  leads: string[];
  deals: string[];
  othersLead: string;
  pageOrigin: string;
}

declare module "vitest" {
  export interface ProvidedContext {
    sidecar: Sidecar;
  }
}

/** The `adapter` command: $ADAPTER, else the repository's .venv (created by the README's `make` set-up). */
function adapterCommand(): string {
  if (process.env.ADAPTER) return process.env.ADAPTER;
  const venv = path.join(ROOT, ".venv/bin/adapter");
  if (!existsSync(venv)) {
    console.log("creating the Python environment: make .venv/.installed");
    const made = spawnSync("make", ["-C", ROOT, ".venv/.installed"], { stdio: "inherit", timeout: 15 * 60_000 });
    if (made.status !== 0) throw new Error("`make .venv/.installed` failed: the sidecar cannot start");
  }
  return venv;
}

function startDemo(pageOrigin: string): Promise<{ proc: ChildProcess; banner: string }> {
  const env: NodeJS.ProcessEnv = { ...process.env, CORS_ALLOW_ORIGINS: pageOrigin, LOG_LEVEL: "warning" };
  delete env.REDIS_URL; // the demo keeps its cache in memory
  const proc = spawn(adapterCommand(), ["demo", "--port", "0"], { cwd: ROOT, env, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  let err = "";
  // Drained for the process's whole life: a full pipe would block the sidecar.
  proc.stderr!.on("data", (chunk: Buffer) => { err = (err + chunk.toString()).slice(-4000); });
  return new Promise((resolve, reject) => {
    const fail = (why: string) => { clearTimeout(timer); proc.kill("SIGKILL"); reject(new Error(`${why}\n${out}\n${err}`)); };
    const timer = setTimeout(() => fail("adapter demo did not start within 60 s"), 60_000);
    proc.once("exit", (code) => fail(`adapter demo exited (${code}) before it was ready`));
    proc.once("error", (e) => fail(`adapter demo could not start: ${e.message}`));
    proc.stdout!.on("data", (chunk: Buffer) => {
      if (out.includes("Press Ctrl+C")) return; // ready: keep draining, stop collecting
      out += chunk.toString();
      if (out.includes("Press Ctrl+C")) {
        clearTimeout(timer);
        proc.removeAllListeners("exit");
        proc.removeAllListeners("error");
        resolve({ proc, banner: out });
      }
    });
  });
}

async function stopDemo(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => proc.once("exit", () => resolve()));
  proc.kill("SIGINT");
  const timer = setTimeout(() => proc.kill("SIGKILL"), 20_000);
  await exited;
  clearTimeout(timer);
}

function startPageServer(): Promise<Server> {
  const types: Record<string, string> = { ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".map": "application/json" };
  const server = createServer((req, res) => {
    const name = path.basename(new URL(req.url ?? "/", "http://page").pathname) || "index.html";
    const file = path.join(PAGE_DIR, name);
    if (!existsSync(file)) { res.writeHead(404).end(); return; }
    res.writeHead(200, { "Content-Type": types[path.extname(name)] ?? "application/octet-stream", "Cache-Control": "no-store" });
    res.end(readFileSync(file));
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

export default async function setup(project: TestProject) {
  const pages = await startPageServer();
  const pageOrigin = `http://127.0.0.1:${(pages.address() as AddressInfo).port}`;
  const { proc, banner } = await startDemo(pageOrigin);
  try {
    const baseUrl = /sidecar demo on (http:\/\/\S+)/.exec(banner)?.[1];
    const othersLead = /# Another user's lead[^\n]*\n[^\n]*"lead_id": ?"([0-9a-f]{24})"/.exec(banner)?.[1];
    if (!baseUrl || !othersLead) throw new Error(`unexpected banner from adapter demo:\n${banner}`);
    const session = await (await fetch(`${baseUrl}/demo/session`, { signal: AbortSignal.timeout(10_000) })).json() as {
      token: string; leads: { id: string }[]; deals: { id: string }[];
    };
    project.provide("sidecar", {
      baseUrl, token: session.token, othersLead, pageOrigin,
      leads: session.leads.map((l) => l.id), deals: session.deals.map((d) => d.id),
    });
  } catch (error) {
    await stopDemo(proc);
    pages.close();
    throw error;
  }
  return async () => {
    await stopDemo(proc);
    await new Promise((resolve) => pages.close(resolve));
  };
}
