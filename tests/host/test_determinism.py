"""docs/testing.md's Determinism claims that the in-process host can check (across process restarts:
tests/server/test_reliability.py):

- latent previews (ComfyUI's --preview-method) do not change the result;
- a batch samples its grids from one generator, so its first grid is not the batch-size-1 grid of
  the same seed.
"""
import pytest
import torch

import glmtest_host

LOADER = {"class_type": "GLMImageLoader", "inputs": {"model": "GLM-Image-tiny", "weight_dtype": "default"}}


def graph(seed, batch_size=1):
    return {"1": LOADER,
            "2": {"class_type": "GLMImageTextToTokens", "inputs": {"ar": ["1", 0], "prompt": "a blue door",
                  "width": 256, "height": 256, "seed": seed, "temperature": 0.9, "top_p": 0.75, "top_k": 0,
                  "batch_size": batch_size}},
            "3": {"class_type": "GLMImageTokensToLatent", "inputs": {"decoder": ["1", 1], "tokens": ["2", 0],
                  "seed": seed, "steps": 2, "cfg": 1.5}},
            "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
            "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}}


def latent(host):
    return glmtest_host.node_output(host, "3")["samples"].clone()


def test_latent_previews_do_not_change_the_result(host):
    import comfy.utils
    previews = []
    comfy.utils.set_progress_bar_global_hook(lambda v, t, preview, node_id=None: previews.append(preview))
    try:
        with host.previews("latent2rgb"):
            host.run_ok(graph(11))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    with_previews = latent(host)
    assert any(p is not None for p in previews), "no latent preview was produced"
    with host.previews("none"):
        host.run_ok(graph(12))          # another seed in between: the next run recomputes
        host.run_ok(graph(11))
    assert torch.equal(latent(host), with_previews)


def test_batch_grids_come_from_one_generator(host):
    host.run_ok(graph(21, batch_size=1))
    single = glmtest_host.node_output(host, "2").grid.clone()
    host.run_ok(graph(21, batch_size=2))
    batch = glmtest_host.node_output(host, "2").grid
    assert batch.shape[0] == 2 and not torch.equal(batch[0], single[0]), \
        "the first grid of a batch equals the single grid: docs/testing.md's batch note is wrong"
