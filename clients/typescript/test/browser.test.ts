// The package in a real browser: Debian's chromium (headless, driven through its own chromedriver,
// as the Python suite's Selenium test does) runs the page of test/browser/, bundled from the built
// package with esbuild, against the real sidecar on another origin (CORS, as with `ng serve`).
// The sidecar drops the connection after three events; the browser's native EventSource resumes.
import { accessSync, constants } from "node:fs";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import { build } from "esbuild";
import { Builder, By, type WebDriver } from "selenium-webdriver";
import chrome from "selenium-webdriver/chrome.js";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";

import { PAGE_DIR } from "./setup/sidecar.js";

function which(command: string): string | undefined {
  for (const dir of (process.env.PATH ?? "").split(path.delimiter)) {
    const file = path.join(dir, command);
    try {
      accessSync(file, constants.X_OK);
      return file;
    } catch { /* not here */ }
  }
  return undefined;
}

const CHROMIUM = which("chromium");
const CHROMEDRIVER = which("chromedriver");
const missing = !CHROMIUM || !CHROMEDRIVER;
if (missing && process.env.CI) throw new Error("chromium and chromium-driver are not installed (.ci/run installs them)");

type Mark = { what: string; at: number; id?: number; type?: string };
const FINAL = ["succeeded", "failed", "threw", "incomplete"];

describe.skipIf(missing)("in Chromium", () => {
  const sidecar = inject("sidecar");
  let driver: WebDriver;
  let profile: string;

  beforeAll(async () => {
    await build({
      entryPoints: [path.join(PAGE_DIR, "../page.ts")], outfile: path.join(PAGE_DIR, "page.js"),
      bundle: true, format: "esm", target: "es2022", sourcemap: true, logLevel: "warning",
    });
    profile = mkdtempSync(path.join(tmpdir(), "chromium-profile-"));
    const options = new chrome.Options();
    options.setChromeBinaryPath(CHROMIUM!);
    options.addArguments(
      "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1200,900",
      `--user-data-dir=${profile}`,
    );
    driver = await new Builder().forBrowser("chrome").setChromeOptions(options)
      .setChromeService(new chrome.ServiceBuilder(CHROMEDRIVER!)).build();
    await driver.manage().setTimeouts({ pageLoad: 30_000, script: 30_000 });
  });

  afterAll(async () => {
    await driver?.quit();
    if (profile) rmSync(profile, { recursive: true, force: true });
  });

  const state = async () => (await driver.findElement(By.css("body")).getAttribute("data-state")) ?? "";

  it("resumes a dropped job stream with no gap or repeat, and shows the typed result", async () => {
    const [lead] = sidecar.leads;
    const query = new URLSearchParams({ base: sidecar.baseUrl, token: sidecar.token, lead: lead!, drop: "3" });
    await driver.get(`${sidecar.pageOrigin}/index.html?${query}`);
    await driver.wait(async () => (await state()) === "ready", 30_000, "the page did not load its bundle");

    await driver.findElement(By.id("run")).click();
    await driver.wait(async () => FINAL.includes(await state()), 60_000, "the job did not finish in 60 s");
    const error = await driver.findElement(By.id("error")).getText();
    expect(await state(), error).toBe("succeeded");

    const timeline = (await driver.executeScript("return window.timeline")) as Mark[];
    const events = timeline.filter((m) => m.what === "event");
    // The sequence as delivered: 1, 2, 3, (connection dropped, browser reconnects) 4, ... done.
    expect(events.map((e) => e.id)).toEqual(events.map((_, i) => i + 1));
    expect(events.at(-1)!.type).toBe("done");
    expect(events.filter((e) => e.type === "result")).toHaveLength(1);
    const reconnects = timeline.flatMap((m, i) => (m.what === "reconnecting" ? [i] : []));
    expect(reconnects).toHaveLength(1);
    expect(timeline.slice(0, reconnects[0]).filter((m) => m.what === "event")).toHaveLength(3);

    const score = Number(await driver.findElement(By.css("#result .score")).getText());
    const classification = await driver.findElement(By.css("#result .classification")).getText();
    expect(classification).toBe(score >= 70 ? "Hot" : score >= 40 ? "Warm" : "Cold");
    expect(await driver.findElements(By.css("#result dt"))).toHaveLength(4);

    const click = timeline.find((m) => m.what === "click")!.at;
    const first = events[0]!.at - click;
    const done = events.at(-1)!.at - click;
    console.log(`browser: click to first event ${first.toFixed(0)} ms, to done ${done.toFixed(0)} ms ` +
                `(${events.length} events, one reconnect)`);
  });
});
