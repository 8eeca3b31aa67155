"""Every committed API workflow (workflows/api/*_api.json) runs in the real in-process ComfyUI host on
the tiny checkpoint, and every image it saves has the size its graph implies (GLM size, latent and
image upscales, the upscale model's factor). The example images and token file the workflows load are
copied into the input folder first, and a tiny random-weight RealESRGAN-compact model is put into
models/upscale_models/, as a user would have them. The token-reuse workflow is also checked for what
it promises: one AR run, different decoder seeds give different images, the same seed the same image,
and Load Tokens gives back exactly what Save Tokens wrote."""
import copy
import glob
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import glmtest_host
import glmtest_server
import glmtest_upscale

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOWS = os.path.join(ROOT, "workflows")
# the API copies of the UI workflows that run in this ComfyUI (workflow_to_api.min_comfyui)
API = [glmtest_server.workflow_to_api.api_path_for(p) for p in glmtest_server.ui_workflow_paths(this_host=True)]
ALL_API = sorted(glob.glob(os.path.join(WORKFLOWS, "api", "*_api.json")))
SAVE_NODES = ("SaveImage", "PreviewImage")


@pytest.fixture(scope="module")
def wf_host(host):
    glmtest_server.copy_example_inputs(host.folder_paths.get_input_directory())
    glmtest_server.copy_example_loras(os.path.join(host.models_dir, "loras"), host.folder_paths)
    glmtest_upscale.write_tiny_upscale_model(os.path.join(host.models_dir, "upscale_models"))
    return host


def load(api_path: str) -> dict:
    with open(api_path, encoding="utf-8") as f:
        return json.load(f)


def expected_images(host, prompt: dict, node_id: str) -> tuple[int, int, int]:
    """(width, height, batch) of the IMAGE/LATENT a node outputs, followed up the graph."""
    node = prompt[node_id]
    ct, inp = node["class_type"], node["inputs"]
    up = lambda name: expected_images(host, prompt, inp[name][0])
    if ct in SAVE_NODES:
        return up("images")
    if ct == "VAEDecode":
        return up("samples")
    if ct == "GLMImageTokensToLatent":
        return up("tokens")
    if ct in ("SamplerCustomAdvanced", "KSampler"):
        return up("latent_image")
    if ct == "EmptySD3LatentImage":
        return inp["width"], inp["height"], inp["batch_size"]
    if ct == "GLMImageTextToTokens":
        return inp["width"], inp["height"], inp["batch_size"]
    if ct == "GLMImageImageToTokens":        # the image cropped to multiples of 32 (fit "crop")
        assert inp["fit"] == "crop"
        w, h, b = up("image")
        return w // 32 * 32, h // 32 * 32, b
    if ct == "VAEEncode":
        return up("pixels")
    if ct == "LoadImageTextDataSetFromFolder":     # one image per file; the shipped datasets are one size
        folder = os.path.join(host.folder_paths.get_input_directory(), inp["folder"])
        sizes = set()
        for f in os.listdir(folder):
            if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp")):
                with Image.open(os.path.join(folder, f)) as im:
                    sizes.add(im.size)
        assert len(sizes) == 1, sizes
        (w, h), = sizes
        return w, h, sum(f.lower().endswith((".png", ".jpg", ".jpeg", ".webp")) for f in os.listdir(folder))
    if ct == "LoadImage":
        with Image.open(os.path.join(host.folder_paths.get_input_directory(), inp["image"])) as im:
            return im.size[0], im.size[1], 1
    if ct == "GLMImageLoadTokens":
        from glm_image_core.generation.tokens import load_tokens
        t = load_tokens(os.path.join(host.folder_paths.get_input_directory(), inp["token_file"]))
        return t.width, t.height, t.batch_size
    if ct == "LatentUpscaleBy":               # scales the latent grid (pixels / 8), rounded
        w, h, b = up("samples")
        return round(w // 8 * inp["scale_by"]) * 8, round(h // 8 * inp["scale_by"]) * 8, b
    if ct == "ImageScaleBy":
        w, h, b = up("image")
        return round(w * inp["scale_by"]), round(h * inp["scale_by"]), b
    if ct == "ImageUpscaleWithModel":
        w, h, b = up("image")
        assert prompt[inp["upscale_model"][0]]["inputs"]["model_name"] == glmtest_upscale.NAME
        return w * glmtest_upscale.SCALE, h * glmtest_upscale.SCALE, b
    raise AssertionError(f"expected_images: no rule for {ct} (node {node_id}); add one")


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_workflows_left_out_on_this_host_really_do_not_fit_it(host):
    """A workflow marked for a newer ComfyUI (extra.glm_image.min_comfyui) uses a stock node whose
    outputs differ in this host; on a host that runs them all, every workflow runs."""
    left_out = sorted(set(glmtest_server.ui_workflow_paths()) - set(glmtest_server.ui_workflow_paths(this_host=True)))
    if glmtest_host.comfy_version() >= (0, 33, 0):
        assert left_out == []
        return
    assert left_out, "ComfyUI 0.3.75 runs every shipped workflow: no min_comfyui marker is needed"
    for path in left_out:
        wf = load(path)
        differ = [n["type"] for n in wf["nodes"] if n["type"] in host.nodes.NODE_CLASS_MAPPINGS and
                  [o["type"] for o in n.get("outputs", [])] != list(host.node_class(n["type"]).RETURN_TYPES)]
        assert differ, f"{os.path.basename(path)} is marked for a newer ComfyUI, but every node fits this one"


def test_every_feature_has_a_workflow():
    names = {os.path.basename(p)[:-len("_api.json")] for p in ALL_API}
    assert names >= {"glm_image_t2i", "glm_image_edit", "glm_image_multi_reference", "glm_image_text_rendering",
                     "glm_image_token_reuse", "glm_image_chain", "glm_image_t2i_official",
                     "glm_image_stock_sampler", "glm_image_rerender", "glm_image_train_lora", "glm_image_lora",
                     "glm_image_train_both"}


def test_official_weights_workflow_has_the_official_settings():
    prompt = load(os.path.join(WORKFLOWS, "api", "glm_image_t2i_official_api.json"))
    by_type = {v["class_type"]: v["inputs"] for v in prompt.values()}
    assert by_type["GLMImageLoader"]["model"] == glmtest_server.OFFICIAL_NAME
    ar, dec = by_type["GLMImageTextToTokens"], by_type["GLMImageTokensToLatent"]
    assert (ar["width"], ar["height"], ar["temperature"], ar["top_p"]) == (1024, 1024, 0.9, 0.75)
    assert (dec["steps"], dec["cfg"]) == (50, 1.5)      # the pipeline's num_inference_steps / guidance_scale


@pytest.mark.parametrize("api_path", API, ids=os.path.basename)
def test_api_workflow_runs_in_host(wf_host, api_path):
    host = wf_host
    prompt = glmtest_server.load_workflow_for_tiny(api_path)     # the official-weights one on tiny weights
    res = host.run_ok(prompt)
    save = [k for k, v in prompt.items() if v["class_type"] in SAVE_NODES]
    assert save
    for k in save:
        w, h, batch = expected_images(host, prompt, k)
        paths = host.output_images(res, k)
        assert len(paths) == batch, (k, paths)
        for p in paths:
            with Image.open(p) as im:
                assert im.size == (w, h), f"node {k} ({prompt[k]['_meta']['title']}): {im.size} != {(w, h)}"
    tok = [k for k, v in prompt.items() if v["class_type"] == "GLMImageTextToTokens"]
    refs = [k for k, v in prompt.items() if v["class_type"] == "GLMImageReferenceEdit"]
    if refs:
        assert glmtest_host.node_output(host, tok[0]).num_references == len(refs)   # chained: the last carries all
    for k in (k for k, v in prompt.items() if v["class_type"] == "GLMImageGlyphText"):
        want = [ln for ln in prompt[k]["inputs"]["text"].splitlines() if ln.strip()]
        assert glmtest_host.node_output(host, k).spans == want
    for k in (k for k, v in prompt.items() if v["class_type"] == "UpscaleModelLoader"):
        model = glmtest_host.node_output(host, k)          # spandrel's descriptor: a real loaded upscaler
        assert (model.architecture.name, model.scale) == ("RealESRGAN Compact", glmtest_upscale.SCALE)


def _decoders_by_save_node(prompt: dict) -> dict:
    """SaveImage id -> (class of the tokens' source node, decoder seed), for SaveImage <- VAEDecode <- Tokens→Latent."""
    out = {}
    for k, v in prompt.items():
        if v["class_type"] == "SaveImage":
            dec = prompt[prompt[v["inputs"]["images"][0]]["inputs"]["samples"][0]]
            assert dec["class_type"] == "GLMImageTokensToLatent"
            out[k] = (prompt[dec["inputs"]["tokens"][0]]["class_type"], dec["inputs"]["seed"])
    return out


def _same_tokens(a, b) -> bool:
    same_preview = (a.preview is None and b.preview is None) or \
        (a.preview is not None and b.preview is not None and a.preview.equal(b.preview))
    return a.grid.equal(b.grid) and same_preview and a.metadata() == b.metadata()


def test_token_reuse_workflow_does_what_it_says(wf_host):
    from glm_image_core.generation.tokens import load_tokens
    host = wf_host
    prompt = load(os.path.join(WORKFLOWS, "api", "glm_image_token_reuse_api.json"))
    ids = lambda ct: [k for k, v in prompt.items() if v["class_type"] == ct]
    (ar,), (save_tokens,), (load_node,) = ids("GLMImageTextToTokens"), ids("GLMImageSaveTokens"), ids("GLMImageLoadTokens")
    decoders = _decoders_by_save_node(prompt)
    from_ar = {seed: k for k, (src, seed) in decoders.items() if src == "GLMImageTextToTokens"}
    (loaded_save, (_, loaded_seed)), = [(k, d) for k, d in decoders.items() if d[0] == "GLMImageLoadTokens"]
    assert len(from_ar) >= 2 and loaded_seed in from_ar, decoders
    # Every decoder fed by the AR node reads the same cached output: the AR node runs once.
    assert all(prompt[prompt[prompt[k]["inputs"]["images"][0]]["inputs"]["samples"][0]]["inputs"]["tokens"] == [ar, 0]
               for k in from_ar.values())

    # A fresh copy per run, as each POST /prompt is: the executor notes fingerprints in the prompt dict.
    res = host.run_ok(copy.deepcopy(prompt))
    ar_tokens = glmtest_host.node_output(host, ar)
    img = {k: pixels(host.output_images(res, k)[0]) for k in decoders}
    seeds = sorted(from_ar)
    assert not np.array_equal(img[from_ar[seeds[0]]], img[from_ar[seeds[1]]]), "other decoder seed, same image"

    # Save Tokens wrote exactly the AR's tokens.
    (saved,) = res["outputs"][save_tokens]["tokens"]
    saved_path = os.path.join(host.folder_paths.get_output_directory(), saved["subfolder"], saved["filename"])
    assert _same_tokens(load_tokens(saved_path), ar_tokens)

    # Decode the saved file later: put it where Load Tokens reads and queue the same graph again.
    shutil.copyfile(saved_path, os.path.join(host.folder_paths.get_input_directory(),
                                             prompt[load_node]["inputs"]["token_file"]))
    res2 = host.run_ok(copy.deepcopy(prompt))
    # ComfyUI's execution_cached event lists the nodes whose outputs it reuses instead of running them.
    cached = {n for e, d in host.server.events if e == "execution_cached" for n in d.get("nodes", [])}
    assert ar in cached, "the AR node ran again although its inputs did not change"
    assert load_node not in cached, "Load Tokens did not notice that its file changed"
    assert _same_tokens(glmtest_host.node_output(host, load_node), ar_tokens)
    assert np.array_equal(pixels(host.output_images(res2, loaded_save)[0]), img[from_ar[loaded_seed]]), \
        "loaded tokens + the same decoder seed must give the same image"
