"""Untrusted graphs and files in the real ComfyUI host:

- file names from widgets never escape ComfyUI's folders: Load Tokens with `../`, an absolute path,
  a symlinked file or folder pointing outside input/; Save Tokens with `../`, an absolute prefix or
  a symlinked folder pointing outside output/; a loader model name with `../`. Each is refused at
  validation and nothing is read or written outside;
- no network access at import or execution: a fresh process with outbound sockets and name lookups
  blocked imports ComfyUI and the pack and runs the committed API workflows (those for its ComfyUI) in-process.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOADER = {"class_type": "GLMImageLoader", "inputs": {"model": "GLM-Image-tiny", "weight_dtype": "default"}}


@pytest.fixture(scope="module")
def outside(host, tmp_path_factory):
    """A folder outside ComfyUI's input/output folders holding a valid token file, and symlinks to it
    from inside input/ and output/."""
    from glm_image_core.generation.tokens import GLMTokens, save_tokens
    d = tmp_path_factory.mktemp("outside")
    secret = save_tokens(GLMTokens(grid=torch.zeros(1, 8, 8, dtype=torch.long), width=256, height=256),
                         str(d / "secret.glmtokens.safetensors"))
    inp, out = host.folder_paths.get_input_directory(), host.folder_paths.get_output_directory()
    links = {os.path.join(inp, "t9_link.glmtokens.safetensors"): secret,
             os.path.join(inp, "t9_linkdir"): str(d), os.path.join(out, "t9_linkdir"): str(d)}
    for link, target in links.items():
        if not os.path.lexists(link):
            os.symlink(target, link)
    yield d
    for link in links:
        os.remove(link)


def load_tokens_graph(name):
    return {"1": {"class_type": "GLMImageLoadTokens", "inputs": {"token_file": name}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}


@pytest.mark.parametrize("name", [
    "../secret.glmtokens.safetensors", "../../../../../../etc/passwd", "/etc/passwd",
    "t9_link.glmtokens.safetensors", "t9_linkdir/secret.glmtokens.safetensors", "",
])
def test_load_tokens_never_reads_outside_input(host, outside, name):
    (ok, _, _, node_errors), _ = host.validate(load_tokens_graph(name))
    assert not ok and "1" in node_errors, node_errors
    text = json.dumps(node_errors["1"]["errors"])
    assert "token_file" in text and ("outside ComfyUI's input folder" in text or "relative path inside" in text), text


@pytest.mark.parametrize("prefix", ["../escaped/t", "/tmp/t9-escaped/t", "t9_linkdir/t", "a/../../escaped/t"])
def test_save_tokens_never_writes_outside_output(host, outside, prefix):
    before = set(os.listdir(outside))
    g = {"1": {"class_type": "GLMImageLoadTokens", "inputs": {"token_file": "t9_save_src.glmtokens.safetensors"}},
         "2": {"class_type": "GLMImageSaveTokens", "inputs": {"tokens": ["1", 0], "filename_prefix": prefix}}}
    from glm_image_core.generation.tokens import GLMTokens, save_tokens
    save_tokens(GLMTokens(grid=torch.zeros(1, 8, 8, dtype=torch.long), width=256, height=256),
                os.path.join(host.folder_paths.get_input_directory(), "t9_save_src.glmtokens.safetensors"))
    (ok, _, _, node_errors), _ = host.validate(g)
    assert not ok and "2" in node_errors, node_errors
    text = json.dumps(node_errors["2"]["errors"])
    assert "filename_prefix" in text and "inside ComfyUI's output folder" in text, text
    assert set(os.listdir(outside)) == before
    assert not os.path.exists("/tmp/t9-escaped") and not os.path.exists(
        os.path.join(os.path.dirname(host.folder_paths.get_output_directory()), "escaped"))


def test_save_tokens_inside_output_still_works(host, outside):
    g = {"1": {"class_type": "GLMImageLoadTokens", "inputs": {"token_file": "t9_save_src.glmtokens.safetensors"}},
         "2": {"class_type": "GLMImageSaveTokens", "inputs": {"tokens": ["1", 0], "filename_prefix": "t9/sub/t"}}}
    from glm_image_core.generation.tokens import GLMTokens, save_tokens
    save_tokens(GLMTokens(grid=torch.zeros(1, 8, 8, dtype=torch.long), width=256, height=256),
                os.path.join(host.folder_paths.get_input_directory(), "t9_save_src.glmtokens.safetensors"))
    res = host.run_ok(g)
    f = res["outputs"]["2"]["tokens"][0]
    assert os.path.isfile(os.path.join(host.folder_paths.get_output_directory(), f["subfolder"], f["filename"]))


@pytest.mark.parametrize("model", ["../GLM-Image-tiny", "../../models/diffusers/GLM-Image-tiny", "/etc"])
def test_loader_model_name_never_leaves_models_diffusers(host, model):
    g = {"1": {"class_type": "GLMImageLoader", "inputs": {"model": model, "weight_dtype": "default"}},
         "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    (ok, _, _, node_errors), _ = host.validate(g)
    assert not ok and "1" in node_errors, node_errors
    assert "not found under models/diffusers" in json.dumps(node_errors["1"]["errors"])


# ---------------------------------------------------------------------------------------------
# no network
# ---------------------------------------------------------------------------------------------

NO_NETWORK_RUN = r'''
import atexit, json, os, shutil, socket, sys, tempfile, traceback
attempts = []

def blocked(kind):
    def refuse(*args, **kwargs):
        attempts.append({"kind": kind, "args": repr(args)[:200], "stack": "".join(traceback.format_stack(limit=15))})
        raise OSError(f"network access blocked by the test ({kind})")
    return refuse

_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        blocked("connect")(address)
    return _connect(self, address)
def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        blocked("connect_ex")(address)
    return _connect_ex(self, address)
socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "create_connection"):
    setattr(socket, name, blocked(name))

root, tiny = sys.argv[1], sys.argv[2]
sys.path[:0] = [root, os.path.join(root, "tests", "_support")]
import glmtest_host, glmtest_server
base = tempfile.mkdtemp(prefix="glm-no-net-")
atexit.register(shutil.rmtree, base, True)
os.makedirs(os.path.join(base, "models", "diffusers"))
os.symlink(tiny, os.path.join(base, "models", "diffusers", "GLM-Image-tiny"))
host = glmtest_host.Host(base)            # imports ComfyUI and loads the pack
glmtest_server.copy_example_inputs(host.folder_paths.get_input_directory())
glmtest_server.copy_example_loras(os.path.join(host.models_dir, "loras"), host.folder_paths)
ran = {}
for ui in glmtest_server.ui_workflow_paths(this_host=True):      # the API copies of what runs in this ComfyUI
    path = glmtest_server.workflow_to_api.api_path_for(ui)
    f = os.path.basename(path)
    prompt = glmtest_server.load_workflow_for_tiny(path)
    if any(n["class_type"] == "UpscaleModelLoader" for n in prompt.values()):
        continue                          # needs an upscale model file; not a network question
    ok, res = host.run(prompt)
    err = host.execution_error()
    ran[f] = ok or (res.get("node_errors") and json.dumps(res)[:300]) or (err or {}).get("exception_message", "")[:300]
print("RESULT " + json.dumps({"attempts": attempts, "ran": ran}))
'''


@pytest.mark.timeout(900)
def test_no_network_at_import_or_execution(tiny_ckpt, tmp_path):
    script = tmp_path / "no_network_run.py"
    script.write_text(NO_NETWORK_RUN, encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("COMFYUI_DIR", None)
    proc = subprocess.run([sys.executable, str(script), ROOT, tiny_ckpt], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=840)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert not result["attempts"], "network access attempted:\n" + "\n\n".join(
        f"{a['kind']} {a['args']}\n{a['stack']}" for a in result["attempts"])
    ran = result["ran"]
    assert {"glm_image_t2i_api.json", "glm_image_edit_api.json"} <= set(ran), ran
    failed = {k: v for k, v in ran.items() if v is not True}
    assert not failed, failed
