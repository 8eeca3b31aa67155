"""Reference editing end to end in the real ComfyUI host equals the official pipeline
(diffusers 0.42.1 + transformers 5.17.0) on the tiny checkpoint, same seed, CPU fp32.

Graph: Loader → LoadImage (stock) → GLMImageReferenceEdit (chained for several references)
→ GLMImageTextToTokens(reference) → GLMImageTokensToLatent(reference) → VAEDecode → PreviewImage.
The stock LoadImage gives IMAGE = uint8/255, exactly the pixels PIL hands the pipeline. The reference
sizes are multiples of 32 inside the processor's pixel range, so neither side resizes anything.
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import glmtest_host
import glmtest_oracle

PROMPT = 'Make it look like a watercolor painting with the word "GLM"'
STEPS, CFG = 3, 1.5


def synthetic_rgb(h: int, w: int) -> Image.Image:
    """reference-oracle.md §5: R = x·255//(w−1), G = y·255//(h−1), B = 8-px checkerboard."""
    y, x = np.mgrid[0:h, 0:w]
    r = x * 255 // (w - 1)
    g = y * 255 // (h - 1)
    b = np.where(((x // 8) + (y // 8)) % 2 == 1, 255, 0)
    return Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return glmtest_oracle.load_reference_pipeline(tiny_ckpt)


def put_input(host, name: str, img: Image.Image) -> str:
    img.save(os.path.join(host.folder_paths.get_input_directory(), name))
    return name


def edit_graph(names, W, H, seed):
    g = {"1": {"class_type": "GLMImageLoader", "inputs": {"model": "GLM-Image-tiny", "weight_dtype": "default"}}}
    prev = None
    for i, name in enumerate(names):
        li, re = f"1{i}0", f"1{i}1"
        g[li] = {"class_type": "LoadImage", "inputs": {"image": name}}
        g[re] = {"class_type": "GLMImageReferenceEdit",
                 "inputs": {"ar": ["1", 0], "decoder": ["1", 1], "vae": ["1", 2], "image": [li, 0]}}
        if prev is not None:
            g[re]["inputs"]["reference"] = [prev, 0]
        prev = re
    g["2"] = {"class_type": "GLMImageTextToTokens", "inputs": {
        "ar": ["1", 0], "prompt": PROMPT, "width": W, "height": H, "seed": seed, "temperature": 0.9,
        "top_p": 0.75, "top_k": 0, "batch_size": 1, "reference": [prev, 0]}}
    g["3"] = {"class_type": "GLMImageTokensToLatent", "inputs": {
        "decoder": ["1", 1], "tokens": ["2", 0], "seed": seed, "steps": STEPS, "cfg": CFG,
        "reference": [prev, 0]}}
    g["4"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}}
    g["5"] = {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}
    return g, prev


CASES = {
    "one_reference": ([(256, 256)], 256, 256, 0),
    "two_references": ([(256, 256), (384, 256)], 256, 384, 3),     # sizes are (H, W)
}


@pytest.mark.parametrize("case", list(CASES))
def test_edit_matches_official_pipeline(host, pipe, case):
    from glm_image_core.generation.tokens import upsample_grid
    sizes, W, H, seed = CASES[case]
    pil = [synthetic_rgb(h, w) for h, w in sizes]
    names = [put_input(host, f"edit_parity_{case}_{i}.png", im) for i, im in enumerate(pil)]
    g, ref_node = edit_graph(names, W, H, seed)
    host.run_ok(g)
    ours = glmtest_host.node_output(host, "4")
    tokens = glmtest_host.node_output(host, "2")
    refs = glmtest_host.node_output(host, ref_node)
    assert len(refs) == len(pil) and tokens.num_references == len(pil)

    ref_ids, src_ids, src_grids = pipe.generate_prior_tokens(
        prompt=PROMPT, height=H, width=W, image=[pil], generator=torch.Generator().manual_seed(seed))
    # reference (source) tokens: ours, upsampled ×2 and concatenated in order, equal the pipeline's
    ours_src = torch.cat([upsample_grid(r.ar_ids[None]).view(-1) for r in refs.items])
    assert src_grids[0].tolist() == [[1, 2 * r.ar_ids.shape[0], 2 * r.ar_ids.shape[1]] for r in refs.items]
    assert torch.equal(ours_src, src_ids[0].cpu().view(-1)), "reference tokens differ from the pipeline's"
    assert torch.equal(upsample_grid(tokens.grid), ref_ids.cpu().view(1, -1)), "AR tokens differ from the pipeline's"

    out = pipe(prompt=PROMPT, image=pil, height=H, width=W, num_inference_steps=STEPS, guidance_scale=CFG,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    ref = torch.from_numpy(np.asarray(out.images))
    assert ours.shape == ref.shape == (1, H, W, 3)
    diff = (ours.float() - ref.float()).abs().max().item()
    print(f"\n{case}: image max abs diff vs official pipeline = {diff:.3g}")
    assert diff <= 1e-4, f"edit image differs from the official pipeline by {diff}"
