"""The real ComfyUI frontend (the host's own: 1.32.9 on 0.3.75, 1.49.6 on 0.33; and on 0.33 also the newest
on the package index, tests/browser/NEWEST_FRONTEND, 1.58.1) in headless Chromium (Debian /usr/bin/chromium, driven by
playwright-core from tests/browser/node_modules): the pack's nodes are registered in LiteGraph;
every UI-format workflow in workflows/ loads the way drag & drop loads it, with no missing node types
and no broken links, and the frontend's own graphToPrompt() gives the committed API copy; the size
preset widget snaps to the 32-px grid and shows the token counts; the text-to-image workflow queued
with the Run (queue) button shows its output image on Save Image and the token-grid preview on the AR
node, and progress (AR per token, decoder per step) and the decoder's latent previews reach the page;
the text-rendering workflow queued the same way shows its glyph regions on the Glyph node, and the
stock-sampler workflow (SamplerCustomAdvanced) its image on Save Image. The Templates dialog lists the UI workflows under the pack, with their thumbnails. Screenshots of the
canvas go to test-artifacts/; GLM_UPDATE_SCREENSHOTS=1 also writes the small copies the README shows
to docs/screenshots/ and the template thumbnails workflows/<name>.jpg.

Needs `make browser-deps` (scripts/install_browser.sh). Without Chromium/node/playwright-core the
test is skipped with the reason; under CI (CI=true) it fails instead."""
import json
import os
import shutil
import subprocess

import pytest

import glmtest_host
import glmtest_server as gs

HERE = os.path.dirname(os.path.abspath(__file__))
T2I = os.path.join(gs.WORKFLOWS, "glm_image_t2i.json")
GLYPH = os.path.join(gs.WORKFLOWS, "glm_image_text_rendering.json")
STOCK = os.path.join(gs.WORKFLOWS, "glm_image_stock_sampler.json")
DOCS_SCREENSHOTS = os.path.join(gs.ROOT, "docs", "screenshots")
CHROMIUM = os.environ.get("GLM_CHROMIUM", "/usr/bin/chromium")
NODE = shutil.which("node")


def _require_browser_tools():
    problems = []
    if not os.access(CHROMIUM, os.X_OK):
        problems.append(f"Chromium not found at {CHROMIUM}")
    if NODE is None:
        problems.append("node not on PATH")
    if not os.path.isfile(os.path.join(HERE, "node_modules", "playwright-core", "package.json")):
        problems.append("playwright-core not installed in tests/browser/node_modules")
    if problems:
        msg = "; ".join(problems) + " — run `make browser-deps` (scripts/install_browser.sh)"
        pytest.fail("browser tier cannot run: " + msg, pytrace=False)


@pytest.fixture(scope="module")
def frontend(server):
    """Run check_frontend.mjs once against the server; returns its parsed result."""
    _require_browser_tools()
    status, body = server.post_json("/api/settings/Comfy.TutorialCompleted", True)
    assert status == 200, (status, body)   # otherwise the Templates dialog covers the canvas
    # Screenshots: no minimap, and node text drawn at every zoom (no level-of-detail switch).
    for key, value in (("Comfy.Minimap.Visible", False), ("LiteGraph.Canvas.MinFontSizeForLOD", 0)):
        status, body = server.post_json(f"/api/settings/{key}", value)
        assert status == 200, (key, status, body)
    workflows = gs.ui_workflow_paths(this_host=True)
    out = gs.ARTIFACTS if server.hosts_own else os.path.join(gs.ARTIFACTS, f"frontend-{server.frontend}")
    os.makedirs(out, exist_ok=True)
    cmd = [NODE, os.path.join(HERE, "check_frontend.mjs"), "--url", server.url, "--chromium", CHROMIUM,
           "--out", out, "--pack", gs.PACK_NAME, "--nodes", ",".join(gs.PACK_NODE_IDS),
           "--run", T2I, "--run-glyph", GLYPH, "--run-stock", STOCK, "--run-timeout", "400000", *workflows]
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=720)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"check_frontend.mjs printed no result (rc {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    res = json.loads(lines[-1][len("RESULT "):])
    with open(os.path.join(out, "frontend-result.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, indent=2)
    assert res.get("ok"), f"frontend check crashed: {res.get('error')}\nstderr: {proc.stderr[-2000:]}"
    res.update(out=out, hosts_own=server.hosts_own, expected_frontend=server.frontend)
    return res


@pytest.mark.timeout(900)
def test_frontend_registers_every_pack_node(frontend):
    assert frontend["frontendVersion"] == frontend["expected_frontend"], frontend["frontendVersion"]
    assert sorted(frontend["registered"]) == sorted(gs.PACK_NODE_IDS)


def test_pack_extension_scripts_load_without_errors(frontend):
    """Every js/*.js is served once, under the pack's folder name, and loads with no page error or
    console error of the pack (e.g. "Extension named 'comfyui.glm_image' already registered" when the
    web folder is registered twice: by WEB_DIRECTORY and by pyproject's [tool.comfy] web)."""
    js = sorted(f for f in os.listdir(os.path.join(gs.ROOT, "js")) if f.endswith(".js"))
    assert js, "the pack ships no js/*.js"
    loaded = {s["path"]: s["status"] for s in frontend["extensionScripts"]}
    for f in js:
        assert loaded.get(f"/extensions/{gs.PACK_NAME}/{f}") == 200, loaded
        twice = [p for p in loaded if p.endswith(f"/{f}") and p != f"/extensions/{gs.PACK_NAME}/{f}"]
        assert not twice, f"{f} is served twice: {twice}"
    marks = (f"/extensions/{gs.PACK_NAME}/", "comfyui.glm_image", "GLM-Image")
    ours = [e for e in frontend["pageErrors"] + frontend["console"] if any(m in e for m in marks)]
    assert not ours, "\n".join(ours)


def test_there_are_ui_workflows(frontend):
    assert {w["name"] for w in frontend["workflows"]} >= {"glm_image_t2i"}


@pytest.mark.parametrize("ui_path", gs.ui_workflow_paths(this_host=True), ids=os.path.basename)
def test_workflow_loads_without_missing_nodes_or_broken_links(frontend, ui_path):
    name = os.path.basename(ui_path)[:-len(".json")]
    r = next(w for w in frontend["workflows"] if w["name"] == name)
    assert r["missingBefore"] == [] and r["missing"] == [], f"missing node types: {r['missing'] or r['missingBefore']}"
    assert r["broken"] == [], "\n".join(r["broken"])
    assert r["errors"] == [], r["errors"]
    assert (r["nodeCount"], r["linkCount"], r["groupCount"]) == \
        (r["expectedNodes"], r["expectedLinks"], r["expectedGroups"])
    assert os.path.isfile(r["screenshot"])


@pytest.mark.parametrize("ui_path", gs.ui_workflow_paths(this_host=True), ids=os.path.basename)
def test_frontend_prompt_equals_committed_api_workflow(frontend, ui_path):
    """What the frontend itself would POST for the loaded UI workflow (graphToPrompt) equals the
    committed API copy: widget values landed on the right widgets, links on the right slots."""
    name = os.path.basename(ui_path)[:-len(".json")]
    r = next(w for w in frontend["workflows"] if w["name"] == name)
    api = gs.load_json(gs.workflow_to_api.api_path_for(ui_path))
    got = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in r["prompt"].items()}
    want = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert got == want


@pytest.mark.parametrize("ui_path", gs.ui_workflow_paths(this_host=True), ids=os.path.basename)
def test_workflow_survives_save_and_reload(frontend, ui_path):
    """Load, save (graph.serialize) and load again: the prompt must not change. Frontend 1.32.9
    writes a widget with `serialize = false` as a null hole at its index in widgets_values, but on
    load fills only the serializable widgets, in order: a non-serialized extension widget placed
    before a real one shifts every later value by one after a save/reload."""
    name = os.path.basename(ui_path)[:-len(".json")]
    r = next(w for w in frontend["workflows"] if w["name"] == name)
    strip = lambda p: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}
    assert strip(r["reloadedPrompt"]) == strip(r["prompt"])


def test_size_preset_snaps_to_the_token_grid_and_shows_token_counts(frontend):
    """On the AR node: picking a preset sets width × height; an off-grid custom value snaps to the
    nearest multiple of 32 (clamped to 256..2048); the token-count text follows, with the same
    preview/full grid sizes and token total as the AR itself (glm_image_core.generation.ar_prompt)."""
    from glm_image_core.generation.ar_prompt import max_new_tokens, preview_grid
    sp = frontend["sizePreset"]
    assert len(sp["presets"]) > 3 and "custom" in sp["presets"]

    def text(w, h):
        th, tw = h // 32, w // 32
        ph, pw = preview_grid(th, tw)
        return f"preview {ph}×{pw} + grid {th}×{tw} = {max_new_tokens(w, h)} tokens"

    assert sp["initial"]["tokenText"] == text(sp["initial"]["width"], sp["initial"]["height"])
    preset, w1000, h700, w5000 = sp["steps"]
    assert (preset["width"], preset["height"]) == (1344, 768) and preset["preset"].startswith("16:9")
    assert (w1000["width"], w1000["height"], w1000["preset"]) == (992, 768, "custom")
    assert (h700["width"], h700["height"]) == (992, 704)
    assert (w5000["width"], w5000["height"]) == (2048, 704)
    for step in [sp["initial"], *sp["steps"]]:
        assert step["width"] % 32 == 0 and step["height"] % 32 == 0, step
        assert step["tokenText"] == text(step["width"], step["height"]), step
        assert step["tokenTextShown"] == step["tokenText"], "the token counts are not drawn on the node"


def _run(frontend):
    run = frontend["run"]
    assert "error" not in run, f"the queued workflow's images did not appear on the canvas: {run['error']}"
    return run


def test_t2i_workflow_queued_from_the_ui_shows_its_output_image(frontend):
    """The Queue button runs the loaded text-to-image workflow on the server; Save Image shows the
    saved PNG (at the workflow's size) and /history has the same file for that node."""
    from urllib.parse import parse_qs, urlparse
    run = _run(frontend)
    ui = gs.load_json(T2I)
    ar = next(n for n in ui["nodes"] if n["type"] == "GLMImageTextToTokens")
    w, h = ar["widgets_values"][1], ar["widgets_values"][2]
    (img,) = run["save"]
    assert (img["width"], img["height"]) == (w, h)
    q = parse_qs(urlparse(img["src"]).query)
    assert q["type"] == ["output"]
    entries = [e for e in run["history"].values() if str(run["ids"]["save"]) in (e.get("outputs") or {})]
    assert entries, "no /history entry with the Save Image node's output"
    assert entries[-1]["status"]["status_str"] == "success"
    files = [i["filename"] for i in entries[-1]["outputs"][str(run["ids"]["save"])]["images"]]
    assert q["filename"][0] in files
    assert os.path.isfile(run["screenshot"])


def test_token_preview_image_appears_on_the_ar_node(frontend):
    """After the run, the AR node shows the colour map of its token grid (a temp UI image the node
    sends): one image, a square 256 px for the 8×8 grid of a 256×256 image."""
    from urllib.parse import parse_qs, urlparse
    run = _run(frontend)
    (img,) = run["ar"]
    assert parse_qs(urlparse(img["src"]).query)["type"] == ["temp"]
    assert (img["width"], img["height"]) == (256, 256)


def test_stock_sampler_workflow_runs_from_the_ui(frontend):
    """The SamplerCustomAdvanced workflow (the DiT's MODEL, GLM-Image Conditioning and Scheduler,
    stock noise/guider/sampler nodes) queued with the Run button shows its image on Save Image."""
    r = frontend["stockRun"]
    assert "error" not in r, r.get("error")
    (img,) = r["images"]
    assert (img["width"], img["height"]) == (256, 256)


def test_template_browser_shows_the_ui_workflows_with_thumbnails(frontend):
    """The Templates dialog lists the pack under Extensions with one card per UI workflow (no API
    copies), and each card's thumbnail (workflows/<name>.jpg) loads."""
    t = frontend["templates"]
    assert "error" not in t, t.get("error")
    names = sorted(os.path.basename(p)[:-len(".json")] for p in gs.ui_workflow_paths())
    assert sorted(x for x in t["titles"] if x.startswith("glm_image")) == names
    thumbs = {os.path.basename(x["path"])[:-len(".jpg")]: x["status"] for x in t["thumbs"]}
    assert thumbs == {n: 200 for n in names}


def _docs_copy(src: str, dst: str, width: int = 1000) -> None:
    """A small README copy of a screenshot: 1000 px wide, 128-colour palette."""
    from PIL import Image
    with Image.open(src) as im:
        im = im.convert("RGB")
        im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
        im.quantize(colors=128).save(dst, optimize=True)


def test_canvas_screenshots_are_saved(frontend):
    shots = [w["screenshot"] for w in frontend["workflows"]] + [_run(frontend)["screenshot"],
                                                              os.path.join(frontend["out"], "frontend-templates.png")]
    for p in shots:
        assert os.path.isfile(p) and os.path.getsize(p) > 10_000, p
    if os.environ.get("GLM_UPDATE_SCREENSHOTS") == "1" and frontend["hosts_own"]:
        os.makedirs(DOCS_SCREENSHOTS, exist_ok=True)
        for p in shots:
            _docs_copy(p, os.path.join(DOCS_SCREENSHOTS, os.path.basename(p)[len("frontend-"):]))
        for w in frontend["workflows"]:
            shot = _run(frontend)["screenshot"] if w["name"] == "glm_image_t2i" else w["screenshot"]
            _thumbnail(shot, os.path.join(gs.WORKFLOWS, w["name"] + ".jpg"))


def _thumbnail(src: str, dst: str, size: int = 360) -> None:
    """The template browser's card image (<workflow>.jpg next to the workflow): the middle of the
    fitted canvas, square like the card."""
    from PIL import Image
    with Image.open(src) as im:
        im = im.convert("RGB")
        w, h = im.size
        side = min(w, h) * 4 // 5
        box = ((w - side) // 2, (h - side) // 2 + 20, (w + side) // 2, (h + side) // 2 + 20)
        im.crop(box).resize((size, size), Image.LANCZOS).save(dst, quality=80, optimize=True)


def test_progress_and_latent_previews_reach_the_frontend(frontend):
    """While the queued workflow runs, the frontend receives progress for the AR node (per token,
    up to the preview + full grid) and for the decoder (per step, up to `steps`), and latent preview
    images of the decoder (the server runs with --preview-method auto)."""
    from glm_image_core.generation.ar_prompt import preview_grid
    run = _run(frontend)
    ui = gs.load_json(T2I)
    by_type = {n["type"]: n for n in ui["nodes"]}
    steps = by_type["GLMImageTokensToLatent"]["widgets_values"][2]
    w, h = by_type["GLMImageTextToTokens"]["widgets_values"][1:3]
    ph, pw = preview_grid(h // 32, w // 32)
    tokens = ph * pw + (h // 32) * (w // 32)          # preview grid, then the full grid
    ar, dec = run["progress"].get(str(run["ids"]["ar"])), run["progress"].get(str(run["ids"]["decoder"]))
    assert ar and ar["maxSeen"] == [tokens] and ar["last"]["value"] == tokens, run["progress"]
    if glmtest_host.host_throttles_progress():   # the host forwards at most one update per 100 ms
        assert ar["events"] >= 2, "the AR should report progress while it samples"
    else:
        assert ar["events"] >= tokens // 2, "the AR should report progress per token"
    assert dec and dec["maxSeen"] == [steps] and dec["last"]["value"] == steps, run["progress"]
    prev = run["previews"].get(str(run["ids"]["decoder"]))
    assert prev and prev["count"] >= 1 and prev["bytes"] > 0, run["previews"]
    assert prev["type"].startswith("image/"), prev


def test_glyph_node_shows_the_spans_it_encoded_after_a_run(frontend):
    """The text-rendering workflow queued with the Run button: the Glyph Text Regions node shows the
    regions it encoded (one per line of its text), drawn on the node."""
    g = frontend["glyphRun"]
    assert "error" not in g, g.get("error")
    glyph = next(n for n in gs.load_json(GLYPH)["nodes"] if n["type"] == "GLMImageGlyphText")
    regions = [ln for ln in glyph["widgets_values"][0].splitlines() if ln.strip()]
    assert g["value"] == "   ".join(f"{i + 1}: {r!r}" for i, r in enumerate(regions))
    assert g["shown"] == g["value"], "the glyph spans are not drawn on the node"
