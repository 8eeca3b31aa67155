"""Every committed API workflow (workflows/api/*_api.json) runs in the real in-process ComfyUI host on
the tiny checkpoint and saves images of the requested size. The example images the edit workflows
load are copied into the input folder first, as a user would put them there."""
import glob
import os
import shutil

import pytest
from PIL import Image

import glmtest_host

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOWS = os.path.join(ROOT, "workflows")
API = sorted(glob.glob(os.path.join(WORKFLOWS, "api", "*_api.json")))


def test_every_feature_has_a_workflow():
    names = {os.path.basename(p)[:-len("_api.json")] for p in API}
    assert names >= {"glm_image_t2i", "glm_image_edit", "glm_image_multi_reference", "glm_image_text_rendering"}


@pytest.mark.parametrize("api_path", API, ids=os.path.basename)
def test_api_workflow_runs_in_host(host, api_path):
    import json
    for f in glob.glob(os.path.join(WORKFLOWS, "*.png")):
        shutil.copyfile(f, os.path.join(host.folder_paths.get_input_directory(), os.path.basename(f)))
    with open(api_path, encoding="utf-8") as f:
        prompt = json.load(f)
    res = host.run_ok(prompt)
    tok = next(k for k, v in prompt.items() if v["class_type"] == "GLMImageTextToTokens")
    w, h = prompt[tok]["inputs"]["width"], prompt[tok]["inputs"]["height"]
    save = [k for k, v in prompt.items() if v["class_type"] in ("SaveImage", "PreviewImage")]
    assert save
    paths = [p for k in save for p in host.output_images(res, k)]
    assert len(paths) == prompt[tok]["inputs"]["batch_size"] * len(save)
    for p in paths:
        with Image.open(p) as im:
            assert im.size == (w, h)
    refs = [k for k, v in prompt.items() if v["class_type"] == "GLMImageReferenceEdit"]
    if refs:
        tokens = glmtest_host.node_output(host, tok)
        assert tokens.num_references == len(refs)     # chained: the last node carries all references
    glyph = [k for k, v in prompt.items() if v["class_type"] == "GLMImageGlyphText"]
    for k in glyph:
        want = [ln for ln in prompt[k]["inputs"]["text"].splitlines() if ln.strip()]
        assert glmtest_host.node_output(host, k).spans == want
