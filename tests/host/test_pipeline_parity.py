"""End to end in the real ComfyUI host: the pack's graph reproduces the official pipeline
(diffusers 0.42.1 + transformers 5.17.0) on the tiny checkpoint, same seed, CPU fp32.

- text → tokens → latent → stock VAEDecode gives the pipeline's image (AR tokens bit-identical);
- the decoder alone, fed the pipeline's prior tokens through a token file (Load Tokens), gives
  the pipeline's image too.
Non-square size, two quoted text spans (so the glyph path, with its even-count pad quirk, runs).
"""
import numpy as np
import pytest
import torch

import glmtest_host
import glmtest_oracle

PROMPT = 'A poster with the words "GLM" and "Image" on a red wall'
W, H, STEPS, CFG = 384, 256, 3, 1.5


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return glmtest_oracle.load_reference_pipeline(tiny_ckpt)


def reference_image(pipe, seed):
    out = pipe(prompt=PROMPT, height=H, width=W, num_inference_steps=STEPS, guidance_scale=CFG,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    return torch.from_numpy(np.asarray(out.images))


def graph(seed, tokens_node):
    g = {
        "1": {"class_type": "GLMImageLoader", "inputs": {"model": "GLM-Image-tiny", "weight_dtype": "default"}},
        "3": {"class_type": "GLMImageTokensToLatent", "inputs": {"decoder": ["1", 1], "tokens": tokens_node,
              "seed": seed, "steps": STEPS, "cfg": CFG}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    return g


@pytest.mark.parametrize("seed", [0, 11])
def test_text_to_image_matches_official_pipeline(host, pipe, seed):
    g = graph(seed, ["2", 0])
    g["2"] = {"class_type": "GLMImageTextToTokens", "inputs": {"ar": ["1", 0], "prompt": PROMPT, "width": W,
              "height": H, "seed": seed, "temperature": 0.9, "top_p": 0.75, "top_k": 0, "batch_size": 1}}
    host.run_ok(g)
    ours = glmtest_host.node_output(host, "4")
    tokens = glmtest_host.node_output(host, "2")
    ref_ids, _, _ = pipe.generate_prior_tokens(prompt=PROMPT, height=H, width=W,
                                               generator=torch.Generator().manual_seed(seed))
    from glm_image_core.generation.tokens import upsample_grid
    assert torch.equal(upsample_grid(tokens.grid), ref_ids.cpu().view(1, -1)), "AR tokens differ from the pipeline's"
    ref = reference_image(pipe, seed)
    assert ours.shape == ref.shape == (1, H, W, 3)
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= glmtest_oracle.IMAGE_TOL, f"image differs from the official pipeline by {diff}"


def test_decoder_from_pipeline_tokens_matches(host, pipe, tmp_path):
    """LoadTokens → TokensToLatent → VAEDecode, given the pipeline's own prior tokens."""
    import os
    from glm_image_core.generation.tokens import GLMTokens, save_tokens
    seed = 5
    ref_ids, _, _ = pipe.generate_prior_tokens(prompt=PROMPT, height=H, width=W,
                                               generator=torch.Generator().manual_seed(seed))
    grid = ref_ids.cpu().view(1, H // 16, W // 16)[:, ::2, ::2].contiguous()   # undo the ×2 upsampling
    name = "parity/pipeline_tokens.glmtokens.safetensors"
    save_tokens(GLMTokens(grid=grid, width=W, height=H, prompt=PROMPT, seed=seed),
                os.path.join(host.folder_paths.get_input_directory(), name))
    host.run_ok(graph(seed, ["2", 0]) | {"2": {"class_type": "GLMImageLoadTokens", "inputs": {"token_file": name}}})
    ours = glmtest_host.node_output(host, "4")
    ref = reference_image(pipe, seed)
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= glmtest_oracle.IMAGE_TOL, f"decoder image differs from the official pipeline by {diff}"
