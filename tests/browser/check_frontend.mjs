// Drives the real ComfyUI frontend (1.32.9 with ComfyUI 0.3.75, 1.49.6 with 0.33.0; served by the test server) in headless Chromium with
// playwright-core. Run by test_frontend.py, which starts the server and checks the JSON this prints.
//
//   node check_frontend.mjs --url http://127.0.0.1:PORT --chromium /usr/bin/chromium \
//        --out test-artifacts --nodes A,B,C  workflows/x.json ...
//
// Prints one line "RESULT <json>" with: frontend version, registered pack node types, the pack's
// extension scripts the page loaded, and per workflow: missing node types, broken links, node and
// link counts, the frontend's own graphToPrompt() output, and the screenshot path (canvas fitted to
// the graph). With --run WORKFLOW (the text-to-image one) it also checks the size preset widget
// (`sizePreset`), then queues that workflow with the Run button and waits for the Save Image and
// token preview images to appear on their nodes, recording the progress and latent preview events
// the page received (`run`). With --run-glyph WORKFLOW it queues a glyph workflow and reads the
// spans shown on the Glyph node (`glyphRun`). With --run-stock WORKFLOW it queues the stock-sampler
// workflow and waits for its Save Image image (`stockRun`). Last, it opens the Templates dialog at the pack's
// entry (`templates`: card titles, thumbnail requests).
import { chromium } from "playwright-core";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

function parseArgs(argv) {
  const a = { workflows: [] };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    if (k.startsWith("--")) a[k.slice(2)] = argv[++i];
    else a.workflows.push(k);
  }
  a.nodes = (a.nodes || "").split(",").filter(Boolean);
  a.timeout = Number(a.timeout || 90000);
  return a;
}

// The "Fit view" command of the canvas (the zoom controls' "Zoom to fit"), then let it draw.
async function fitView(page) {
  await page.evaluate(async () => {
    try { await window.app.extensionManager.command.execute("Comfy.Canvas.FitView"); } catch (e) { /* older API */ }
    window.app.canvas.setDirty(true, true);
  });
  await page.waitForTimeout(500);
}

// The Run (queue) button of the action bar, as a user clicks it. Frontend 1.32 puts the test id on
// a wrapper around the button, 1.49 on the button itself.
async function clickRun(page) {
  const q = page.getByTestId("queue-button");
  const inner = q.locator("button");
  await ((await inner.count()) > 0 ? inner.first() : q.first()).click();
}

async function loadWorkflow(page, json, name) {
  await page.evaluate(async ({ json, name }) => {
    await window.app.loadGraphData(structuredClone(json), true, true, name);
  }, { json, name });
  await page.waitForTimeout(300);
}

// The AR node's size widgets, driven the way the UI drives them (widget.setValue, which the combo
// menu and the number prompt call): a preset, then an off-grid custom width and height.
async function checkSizePreset(page, json) {
  await loadWorkflow(page, json, "glm_image_t2i (size presets)");
  return await page.evaluate(() => {
    const app = window.app;
    const node = (app.graph.nodes ?? app.graph._nodes).find((n) => n.type === "GLMImageTextToTokens");
    const w = (name) => node.widgets.find((x) => x.name === name);
    const set = (name, v) => w(name).setValue(v, { e: undefined, node, canvas: app.canvas });
    const state = () => ({ width: w("width").value, height: w("height").value,
                           preset: w("size_preset")?.value ?? null, tokenText: w("token_counts")?.value ?? null,
                           tokenTextShown: w("token_counts")?._displayValue ?? null });
    const out = { presets: w("size_preset")?.options?.values ?? [], initial: state(), steps: [] };
    const preset = out.presets.find((p) => p.startsWith("16:9"));
    set("size_preset", preset);
    out.steps.push({ action: `preset ${preset}`, ...state() });
    set("width", 1000);
    out.steps.push({ action: "width 1000", ...state() });
    set("height", 700);
    out.steps.push({ action: "height 700", ...state() });
    set("width", 5000);
    out.steps.push({ action: "width 5000", ...state() });
    return out;
  });
}

// Load the workflow, press the Run button, wait until the Save Image node shows its output image
// and the AR node its token preview image, then screenshot the canvas.
async function queueFromUi(page, json, outDir, timeout) {
  await loadWorkflow(page, json, "glm_image_t2i (queued)");
  const ids = await page.evaluate(() => {
    const nodes = window.app.graph.nodes ?? window.app.graph._nodes;
    return { save: nodes.find((n) => n.type === "SaveImage").id,
             ar: nodes.find((n) => n.type === "GLMImageTextToTokens").id,
             decoder: nodes.find((n) => n.type === "GLMImageTokensToLatent").id };
  });
  // What the server streams while it runs: progress per node, latent preview images per node.
  await page.evaluate(() => {
    window.__glmRunError = null;
    window.__glmProgress = {};
    window.__glmPreviews = {};
    const api = window.app.api;
    api.addEventListener("execution_error", (e) => { window.__glmRunError = e.detail; });
    api.addEventListener("progress", (e) => {
      const d = e.detail, p = (window.__glmProgress[d.node] ??= { events: 0, maxSeen: [] });
      p.events += 1;
      p.last = { value: d.value, max: d.max };
      if (!p.maxSeen.includes(d.max)) p.maxSeen.push(d.max);
    });
    api.addEventListener("b_preview_with_metadata", (e) => {
      const d = e.detail, p = (window.__glmPreviews[d.nodeId] ??= { count: 0 });
      p.count += 1;
      p.type = d.blob?.type;
      p.bytes = d.blob?.size;
    });
  });
  const t0 = Date.now();
  await clickRun(page);
  const shown = await page.waitForFunction((ids) => {
    const err = window.__glmRunError;
    if (err) return { error: `execution_error in node ${err.node_id} (${err.node_type}): ${err.exception_message}` };
    const g = window.app.graph;
    const imgs = (id) => (g.getNodeById(id)?.imgs || []).filter((im) => im.complete && im.naturalWidth > 0);
    const save = imgs(ids.save), ar = imgs(ids.ar);
    if (!save.length || !ar.length) return false;
    const desc = (im) => ({ src: im.src, width: im.naturalWidth, height: im.naturalHeight });
    return { save: save.map(desc), ar: ar.map(desc) };
  }, ids, { timeout, polling: 500 }).then((h) => h.jsonValue()).catch((e) => ({ error: String(e) }));
  const out = { ids, clickedMs: Date.now() - t0, ...shown };
  Object.assign(out, await page.evaluate(() => ({ progress: window.__glmProgress, previews: window.__glmPreviews })));
  out.history = await page.evaluate(async () => (await (await fetch("/api/history?max_items=10")).json()));
  await fitView(page);
  out.screenshot = path.join(outDir, "frontend-glm_image_t2i-run.png");
  await page.screenshot({ path: out.screenshot });
  return out;
}

// The Templates sidebar → the pack's entry under Extensions: the titles of its template cards, and
// the thumbnail requests it made (the pack's workflows/<name>.jpg).
async function checkTemplateBrowser(page, pack, outDir) {
  const thumbs = [];
  const onResponse = (r) => {
    const u = new URL(r.url());
    if (u.pathname.startsWith(`/api/workflow_templates/${pack}/`) && u.pathname.endsWith(".jpg"))
      thumbs.push({ path: decodeURIComponent(u.pathname), status: r.status() });
  };
  page.on("response", onResponse);
  try {
    await page.getByText("Templates", { exact: true }).first().click();
    await page.getByText(pack, { exact: true }).first().click();
    // its cards, titled by workflow name (frontends differ in the heading above them: 1.58 adds a hidden
    // "Back to <pack>" button that a heading locator would match)
    await page.getByText("glm_image_t2i", { exact: true }).first().waitFor();
    await page.waitForTimeout(1500);
    const titles = await page.evaluate(() => [...document.querySelectorAll('[role="dialog"] h3, [role="dialog"] [class*="title"]')]
      .map((e) => e.textContent.trim()).filter(Boolean));
    await page.screenshot({ path: path.join(outDir, "frontend-templates.png") });
    // cards below the fold load their thumbnails only when scrolled into view (lazy images)
    await page.mouse.move(800, 600);
    for (let i = 0; i < 8; i++) {
      await page.mouse.wheel(0, 600);
      await page.waitForTimeout(250);
    }
    await page.waitForTimeout(1000);
    return { titles, thumbs };
  } catch (e) {
    return { error: String(e), thumbs };
  } finally {
    page.off("response", onResponse);
  }
}

// Queue a glyph workflow with the Run button; the Glyph node then shows the spans it encoded.
async function glyphSpansAfterRun(page, json, timeout) {
  await loadWorkflow(page, json, "glm_image_text_rendering (queued)");
  await clickRun(page);
  return await page.waitForFunction(() => {
    const node = (window.app.graph.nodes ?? window.app.graph._nodes).find((n) => n.type === "GLMImageGlyphText");
    const w = node?.widgets?.find((x) => x.name === "glyph_spans");
    return w && w.value ? { value: w.value, shown: w._displayValue, label: w.label } : false;
  }, null, { timeout, polling: 500 }).then((h) => h.jsonValue()).catch((e) => ({ error: String(e) }));
}

// Queue a workflow with the Run button and wait until its Save Image node shows the image.
async function runUntilSaved(page, json, name, timeout) {
  await loadWorkflow(page, json, `${name} (queued)`);
  await page.evaluate(() => {
    window.__glmRunError = null;
    if (!window.__glmErrorListener) {
      window.__glmErrorListener = true;
      window.app.api.addEventListener("execution_error", (e) => { window.__glmRunError = e.detail; });
    }
  });
  await clickRun(page);
  return await page.waitForFunction(() => {
    const err = window.__glmRunError;
    if (err) return { error: `execution_error in node ${err.node_id} (${err.node_type}): ${err.exception_message}` };
    const save = (window.app.graph.nodes ?? window.app.graph._nodes).find((n) => n.type === "SaveImage");
    const imgs = (save?.imgs || []).filter((im) => im.complete && im.naturalWidth > 0);
    return imgs.length ? { images: imgs.map((im) => ({ src: im.src, width: im.naturalWidth, height: im.naturalHeight })) } : false;
  }, null, { timeout, polling: 500 }).then((h) => h.jsonValue()).catch((e) => ({ error: String(e) }));
}

const args = parseArgs(process.argv.slice(2));
const FLAGS = [
  "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
];
const result = { console: [], pageErrors: [], extensionScripts: [], workflows: [] };
const t0 = Date.now();
const userDir = fs.mkdtempSync(path.join(os.tmpdir(), "glm-chromium-"));
fs.mkdirSync(args.out, { recursive: true });
let ctx;
try {
  ctx = await chromium.launchPersistentContext(userDir, {
    executablePath: args.chromium, headless: true, args: FLAGS, viewport: { width: 1600, height: 900 },
  });
  const page = ctx.pages()[0] || (await ctx.newPage());
  // The "Introducing Nodes 2.0" banner (dismissal kept in localStorage) would cover the screenshots.
  await page.addInitScript(() => localStorage.setItem("vueNodesBannerDismissed", "true"));
  page.setDefaultTimeout(args.timeout);
  page.on("console", (m) => { if (m.type() === "error") result.console.push(m.text().slice(0, 300)); });
  page.on("pageerror", (e) => result.pageErrors.push(String(e?.stack || e).slice(0, 1000)));
  page.on("response", (r) => {
    const u = new URL(r.url());
    if (u.pathname.startsWith(`/extensions/${args.pack}/`)) result.extensionScripts.push({ path: u.pathname, status: r.status() });
  });

  await page.goto(args.url + "/", { waitUntil: "load" });
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph && window.app.canvas);
  // Extensions register their node hooks before the node definitions are registered: wait for ours.
  await page.waitForFunction((ids) => ids.every((n) => window.LiteGraph.registered_node_types[n]), args.nodes);
  result.appReadyMs = Date.now() - t0;
  Object.assign(result, await page.evaluate((ids) => ({
    frontendVersion: window.__COMFYUI_FRONTEND_VERSION__ || null,
    registered: ids.filter((n) => window.LiteGraph.registered_node_types[n]),
    registeredCount: Object.keys(window.LiteGraph.registered_node_types).length,
  }), args.nodes));
  await page.screenshot({ path: path.join(args.out, "frontend-default.png") });

  for (const wf of args.workflows) {
    const json = JSON.parse(fs.readFileSync(wf, "utf8"));
    const name = path.basename(wf, ".json");
    const r = await page.evaluate(async ({ json, name }) => {
      const app = window.app, LG = window.LiteGraph;
      const errs = [];
      const missingBefore = [...new Set(json.nodes.map((n) => n.type).filter((t) => !LG.registered_node_types[t]))];
      // loadGraphData(graphData, clean, restore_view, workflow): the path the frontend takes on drag & drop.
      await app.loadGraphData(structuredClone(json), true, true, name);
      await new Promise((res) => setTimeout(res, 300));
      const g = app.graph;
      const nodes = g.nodes ?? g._nodes;
      const byId = new Map(nodes.map((n) => [n.id, n]));
      const missing = [...new Set(nodes.filter((n) => !LG.registered_node_types[n.type] || n.has_errors).map((n) => n.type))];
      const linkList = g.links instanceof Map ? [...g.links.values()] : Object.values(g.links || {});
      const broken = [];
      for (const l of linkList) {
        if (!l) continue;
        const o = byId.get(l.origin_id), t = byId.get(l.target_id);
        if (!o) { broken.push(`link ${l.id}: origin node ${l.origin_id} missing`); continue; }
        if (!t) { broken.push(`link ${l.id}: target node ${l.target_id} missing`); continue; }
        const out = o.outputs?.[l.origin_slot], inp = t.inputs?.[l.target_slot];
        if (!out) broken.push(`link ${l.id}: ${o.type} has no output slot ${l.origin_slot}`);
        else if (!(out.links || []).includes(l.id)) broken.push(`link ${l.id}: not listed on ${o.type}.${out.name}`);
        if (!inp) broken.push(`link ${l.id}: ${t.type} has no input slot ${l.target_slot}`);
        else if (inp.link !== l.id) broken.push(`link ${l.id}: ${t.type}.${inp.name} points at link ${inp.link}`);
        if (out && inp && out.type !== inp.type && out.type !== "*" && inp.type !== "*")
          broken.push(`link ${l.id}: type ${out.type} -> ${inp.type}`);
      }
      for (const n of nodes) for (const inp of n.inputs || []) {
        if (inp.link != null && !linkList.some((l) => l && l.id === inp.link))
          broken.push(`${n.type}.${inp.name}: dangling link ${inp.link}`);
      }
      let prompt = null;
      try { prompt = (await app.graphToPrompt()).output; } catch (e) { errs.push(`graphToPrompt: ${e}`); }
      const widgets = {};
      for (const n of nodes) widgets[n.id] = Object.fromEntries((n.widgets || []).map((w) => [w.name, w.value]));
      return {
        name, missingBefore, missing, broken, errors: errs, prompt, widgets,
        nodeCount: nodes.length, expectedNodes: json.nodes.length,
        linkCount: linkList.filter(Boolean).length, expectedLinks: json.links.length,
        groupCount: (g.groups ?? g._groups ?? []).length, expectedGroups: (json.groups || []).length,
      };
    }, { json, name });
    await fitView(page);
    r.screenshot = path.join(args.out, `frontend-${name}.png`);
    await page.screenshot({ path: r.screenshot });
    // Save -> reload round trip, as a user saving the workflow and opening it again would do it.
    Object.assign(r, await page.evaluate(async ({ name }) => {
      const app = window.app;
      const saved = JSON.parse(JSON.stringify(app.graph.serialize()));
      const holes = saved.nodes
        .filter((n) => Array.isArray(n.widgets_values) && n.widgets_values.some((v) => v === null))
        .map((n) => ({ id: n.id, type: n.type, widgets_values: n.widgets_values }));
      await app.loadGraphData(saved, true, true, name + "-reloaded");
      await new Promise((res) => setTimeout(res, 300));
      let reloadedPrompt = null;
      try { reloadedPrompt = (await app.graphToPrompt()).output; } catch (e) { reloadedPrompt = { error: String(e) }; }
      return { savedHoles: holes, reloadedPrompt };
    }, { name }));
    result.workflows.push(r);
  }
  if (args.run) {
    const json = JSON.parse(fs.readFileSync(args.run, "utf8"));
    result.sizePreset = await checkSizePreset(page, json);
    result.run = await queueFromUi(page, json, args.out, Number(args["run-timeout"] || 300000));
  }
  if (args["run-glyph"]) {
    const json = JSON.parse(fs.readFileSync(args["run-glyph"], "utf8"));
    result.glyphRun = await glyphSpansAfterRun(page, json, Number(args["run-timeout"] || 300000));
  }
  if (args["run-stock"]) {
    const json = JSON.parse(fs.readFileSync(args["run-stock"], "utf8"));
    result.stockRun = await runUntilSaved(page, json, path.basename(args["run-stock"], ".json"),
                                          Number(args["run-timeout"] || 300000));
  }
  // Last: the dialog it opens stays open (Escape does not close it in 1.32.9).
  result.templates = await checkTemplateBrowser(page, args.pack, args.out);
  result.ok = true;
} catch (e) {
  result.ok = false;
  result.error = String(e?.stack || e);
} finally {
  if (ctx) await ctx.close().catch(() => {});
  fs.rmSync(userDir, { recursive: true, force: true });
}
result.totalMs = Date.now() - t0;
// exit once the line is flushed: process.exit() right after a write to a pipe cuts it at 64 KiB
process.stdout.write("RESULT " + JSON.stringify(result) + "\n", () => process.exit(result.ok ? 0 : 1));
