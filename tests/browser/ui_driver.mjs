// Drives ComfyUI's own web UI in headless Chromium (playwright-core, Debian's /usr/bin/chromium) for
// tests/browser/test_frontend.py:  node ui_driver.mjs plan.json result.json
//
// plan: {url, artifacts, timeout_ms, gallery: {name: workflow}, train: {workflow, node, steps}, labels:
//        {workflow, load_node, apply_node}}
// result: {prompts: {name: graphToPrompt().output}, missing: {name: [types]}, train: {...}, labels: {...},
//          page_errors: [...], console_errors: [...], screenshots: [...]}
import { chromium } from "playwright-core";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { tmpdir } from "node:os";

const [planPath, resultPath] = process.argv.slice(2);
const plan = JSON.parse(readFileSync(planPath, "utf8"));
const result = { prompts: {}, missing: {}, page_errors: [], console_errors: [], screenshots: [], log: [] };
const save = () => writeFileSync(resultPath, JSON.stringify(result, null, 1));
const log = (msg) => {
  result.log.push(`${new Date().toISOString()} ${msg}`);
  console.log(msg);
};
mkdirSync(plan.artifacts, { recursive: true });

// a fresh profile (--user-data-dir) each run: playwright takes it as launchPersistentContext's first argument
const profile = mkdtempSync(join(tmpdir(), "perfusion-chromium-"));
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: plan.chromium ?? "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1920, height: 1080 },
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});

async function shot(page, name, clip) {
  const path = join(plan.artifacts, `${name}.png`);
  await page.screenshot({ path, clip });
  result.screenshots.push(path);
}

try {
  const page = browser.pages()[0] ?? (await browser.newPage());
  page.setDefaultTimeout(plan.timeout_ms);
  page.on("pageerror", (err) => result.page_errors.push(String(err?.stack ?? err)));
  page.on("console", (msg) => {
    if (msg.type() === "error") result.console_errors.push(msg.text());
  });

  await page.goto(plan.url, { waitUntil: "load" });
  await page.waitForFunction(() => window.app?.graph && window.app.extensions?.some((e) => e.name === "perfusion.core"));
  // the websocket is up (the server knows our client id): progress and perfusion.train messages reach us
  for (let k = 0; !(await page.evaluate(async () => !!(await import("/scripts/api.js")).api.clientId)); k++) {
    if (k > plan.timeout_ms / 100) throw new Error("the UI never got a websocket client id");
    await page.waitForTimeout(100);
  }
  await page.evaluate(async () => {
    const { api } = await import("/scripts/api.js");
    window.__perfusion = { done: 0, errors: [] };
    window.__perfusionLoad = async (wf) => {
      await app.loadGraphData(wf);
      const ds = wf.extra?.ds; // this UI does not restore the saved view; newer ones do: show what they show
      if (ds) {
        app.canvas.ds.scale = ds.scale;
        app.canvas.ds.offset = [...ds.offset];
      }
      app.graph.setDirtyCanvas(true, true);
    };
    api.addEventListener("executing", ({ detail }) => { if (detail === null) window.__perfusion.done += 1; });
    api.addEventListener("execution_error", ({ detail }) => window.__perfusion.errors.push(detail));
  });
  log("UI ready");

  // ---- every gallery workflow: loads without missing nodes; graphToPrompt is what the UI would queue
  for (const [name, workflow] of Object.entries(plan.gallery)) {
    const out = await page.evaluate(async (wf) => {
      const missing = wf.nodes.map((n) => n.type).filter((t) => !(t in LiteGraph.registered_node_types));
      await window.__perfusionLoad(wf);
      const prompt = await app.graphToPrompt();
      return { missing, output: prompt.output };
    }, workflow);
    result.prompts[name] = out.output;
    result.missing[name] = out.missing;
    await page.waitForTimeout(400);
    await shot(page, `workflow-${name}`);
    log(`loaded ${name}`);
  }
  save();

  // ---- train: queue with the Queue button, watch the live chart
  if (plan.train) {
    const { workflow, node: trainId } = plan.train;
    await page.evaluate(async (wf) => await window.__perfusionLoad(wf), workflow);
    const done = await page.evaluate(() => window.__perfusion.done);
    await page.click("#queue-button");
    log("queued training");
    const seen = [];
    let running = null;
    const deadline = Date.now() + plan.timeout_ms;
    for (;;) {
      const state = await page.evaluate(([id, before]) => {
        const t = app.graph.getNodeById(id)?.perfusion?.train;
        return { t: t && { status: t.status, step: t.step, steps: t.steps, n: t.losses.length },
                 finished: window.__perfusion.done > before, errors: window.__perfusion.errors };
      }, [trainId, done]);
      if (state.t && state.t.status === "running" && !seen.includes(state.t.step)) {
        seen.push(state.t.step);
        if (!running && state.t.step < state.t.steps) {
          running = state.t;
          await shot(page, "train-running");
        }
      }
      if (state.errors.length) throw new Error(`execution_error: ${JSON.stringify(state.errors[0]).slice(0, 2000)}`);
      if (state.finished && state.t?.status !== "running") break;
      if (Date.now() > deadline) throw new Error(`training did not finish: ${JSON.stringify(state)}`);
      await page.waitForTimeout(100);
    }
    log(`training finished; running states seen at steps ${seen.join(",")}`);
    await page.waitForTimeout(500); // a few frames after the last message
    await shot(page, "train-done");
    // zoom onto the Train node, then look for the chart's running-mean line on the real canvas
    await page.evaluate((id) => {
      const node = app.graph.getNodeById(id);
      app.canvas.ds.scale = 1.2;
      app.canvas.ds.offset = [40 / 1.2 - node.pos[0], 70 / 1.2 - node.pos[1]];
      app.graph.setDirtyCanvas(true, true);
    }, trainId);
    await page.waitForTimeout(300);
    result.train = await page.evaluate((id) => {
      const node = app.graph.getNodeById(id);
      app.canvas.draw(true, true);
      const t = node.perfusion.train;
      const [cx, cy, cw, ch] = t.drawn.chart; // node-local
      const { scale, offset } = app.canvas.ds;
      const canvas = app.canvas.canvas;
      const rect = canvas.getBoundingClientRect();
      const ratio = canvas.width / rect.width;
      const px = (x) => Math.round((x + offset[0]) * scale * ratio);
      const py = (y) => Math.round((y + offset[1]) * scale * ratio);
      const x0 = px(node.pos[0] + cx), y0 = py(node.pos[1] + cy);
      const w = Math.max(1, px(node.pos[0] + cx + cw) - x0), h = Math.max(1, py(node.pos[1] + cy + ch) - y0);
      const data = canvas.getContext("2d").getImageData(x0, y0, w, h).data;
      const want = t.drawn.color.match(/[0-9a-f]{2}/gi).map((v) => parseInt(v, 16));
      let hits = 0;
      for (let k = 0; k < data.length; k += 4) {
        if (Math.abs(data[k] - want[0]) + Math.abs(data[k + 1] - want[1]) + Math.abs(data[k + 2] - want[2]) < 60) hits++;
      }
      const top = rect.y + (node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT + offset[1]) * scale - 10;
      return {
        status: t.status, step: t.step, steps: t.steps, losses: t.losses, message: t.message, drawn: t.drawn,
        chart_pixels: hits,
        clip: { x: Math.max(0, rect.x + (node.pos[0] + offset[0]) * scale - 10), y: Math.max(0, top),
                width: (node.size[0] + 20) * scale,
                height: Math.min((node.size[1] + LiteGraph.NODE_TITLE_HEIGHT + 20) * scale, window.innerHeight - Math.max(0, top)) },
      };
    }, trainId);
    result.train.running_seen = running;
    await shot(page, "train-node", result.train.clip);
    save();
  }

  // ---- labels on Load Concept and Apply
  if (plan.labels) {
    const { workflow, load_node: loadId, apply_node: applyId } = plan.labels;
    await page.evaluate(async (wf) => await window.__perfusionLoad(wf), workflow);
    await page.waitForFunction(([a, b]) => [a, b].every((id) => app.graph.getNodeById(id)?.perfusion?.drawn?.info),
      [loadId, applyId]);
    await page.waitForTimeout(300);
    result.labels = await page.evaluate(([a, b]) => ({
      load: app.graph.getNodeById(a).perfusion.drawn,
      apply: app.graph.getNodeById(b).perfusion.drawn,
    }), [loadId, applyId]);
    // the context menu action sets the recommended β/τ on Apply
    result.labels.menu = await page.evaluate((id) => {
      const node = app.graph.getNodeById(id);
      node.widgets.find((w) => w.name === "beta").value = 1.5;
      const options = [];
      node.getExtraMenuOptions(app.canvas, options);
      const item = options.find((o) => o?.content?.startsWith("Perfusion: recommended β/τ (global"));
      item?.callback();
      return { items: options.filter(Boolean).map((o) => o.content),
               beta: node.widgets.find((w) => w.name === "beta").value };
    }, applyId);
    await shot(page, "concept-labels");
    save();
  }
} catch (err) {
  result.error = String(err?.stack ?? err);
  log(`FAILED: ${result.error}`);
} finally {
  save();
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit(result.error ? 1 : 0);
