"""The real ComfyUI frontend (1.32.9) in headless Chromium (Debian /usr/bin/chromium, driven by
playwright-core from tests/browser/node_modules): the pack's nodes are registered in LiteGraph, and
every UI-format workflow in workflows/ loads the way drag & drop loads it, with no missing node types
and no broken links, and the frontend's own graphToPrompt() gives the committed API copy.

Needs `make browser-deps` (scripts/install_browser.sh). Without Chromium/node/playwright-core the
test is skipped with the reason; under CI (CI=true) it fails instead."""
import json
import os
import shutil
import subprocess

import pytest

import glmtest_server as gs

HERE = os.path.dirname(os.path.abspath(__file__))
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
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("browser tier cannot run under CI: " + msg, pytrace=False)
        pytest.skip("browser tier not runnable: " + msg)


@pytest.fixture(scope="module")
def frontend(server):
    """Run check_frontend.mjs once against the server; returns its parsed result."""
    _require_browser_tools()
    status, body = server.post_json("/api/settings/Comfy.TutorialCompleted", True)
    assert status == 200, (status, body)   # otherwise the Templates dialog covers the canvas
    workflows = gs.ui_workflow_paths()
    cmd = [NODE, os.path.join(HERE, "check_frontend.mjs"), "--url", server.url, "--chromium", CHROMIUM,
           "--out", gs.ARTIFACTS, "--pack", gs.PACK_NAME, "--nodes", ",".join(gs.PACK_NODE_IDS), *workflows]
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"check_frontend.mjs printed no result (rc {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    res = json.loads(lines[-1][len("RESULT "):])
    os.makedirs(gs.ARTIFACTS, exist_ok=True)
    with open(os.path.join(gs.ARTIFACTS, "frontend-result.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, indent=2)
    assert res.get("ok"), f"frontend check crashed: {res.get('error')}\nstderr: {proc.stderr[-2000:]}"
    return res


@pytest.mark.timeout(420)
def test_frontend_registers_every_pack_node(frontend):
    assert frontend["frontendVersion"] == "1.32.9", frontend["frontendVersion"]
    assert sorted(frontend["registered"]) == sorted(gs.PACK_NODE_IDS)


def test_pack_extension_scripts_load_without_errors(frontend):
    js = sorted(f for f in os.listdir(os.path.join(gs.ROOT, "js")) if f.endswith(".js"))
    if not js:
        pytest.skip("the pack has no js/*.js yet")
    loaded = {s["path"]: s["status"] for s in frontend["extensionScripts"]}
    for f in js:
        assert loaded.get(f"/extensions/{gs.PACK_NAME}/{f}") == 200, loaded
    ours = [e for e in frontend["pageErrors"] if f"/extensions/{gs.PACK_NAME}/" in e]
    assert not ours, "\n".join(ours)


def test_there_are_ui_workflows(frontend):
    assert {w["name"] for w in frontend["workflows"]} >= {"glm_image_t2i"}


@pytest.mark.parametrize("ui_path", gs.ui_workflow_paths(), ids=os.path.basename)
def test_workflow_loads_without_missing_nodes_or_broken_links(frontend, ui_path):
    name = os.path.basename(ui_path)[:-len(".json")]
    r = next(w for w in frontend["workflows"] if w["name"] == name)
    assert r["missingBefore"] == [] and r["missing"] == [], f"missing node types: {r['missing'] or r['missingBefore']}"
    assert r["broken"] == [], "\n".join(r["broken"])
    assert r["errors"] == [], r["errors"]
    assert (r["nodeCount"], r["linkCount"], r["groupCount"]) == \
        (r["expectedNodes"], r["expectedLinks"], r["expectedGroups"])
    assert os.path.isfile(r["screenshot"])


@pytest.mark.parametrize("ui_path", gs.ui_workflow_paths(), ids=os.path.basename)
def test_frontend_prompt_equals_committed_api_workflow(frontend, ui_path):
    """What the frontend itself would POST for the loaded UI workflow (graphToPrompt) equals the
    committed API copy: widget values landed on the right widgets, links on the right slots."""
    name = os.path.basename(ui_path)[:-len(".json")]
    r = next(w for w in frontend["workflows"] if w["name"] == name)
    api = gs.load_json(gs.workflow_to_api.api_path_for(ui_path))
    got = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in r["prompt"].items()}
    want = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert got == want


@pytest.mark.parametrize("ui_path", gs.ui_workflow_paths(), ids=os.path.basename)
def test_workflow_survives_save_and_reload(frontend, ui_path):
    """Load, save (graph.serialize) and load again: the prompt must not change. Frontend 1.32.9
    writes a widget with `serialize = false` as a null hole at its index in widgets_values, but on
    load fills only the serializable widgets, in order: a non-serialized extension widget placed
    before a real one shifts every later value by one after a save/reload."""
    name = os.path.basename(ui_path)[:-len(".json")]
    r = next(w for w in frontend["workflows"] if w["name"] == name)
    strip = lambda p: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}
    assert strip(r["reloadedPrompt"]) == strip(r["prompt"])
