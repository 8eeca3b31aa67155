"""The stock-sampler path (issue 18, item 3): SamplerCustomAdvanced + RandomNoise + CFGGuider +
KSamplerSelect("euler") + GLM-Image Scheduler + EmptySD3LatentImage, driving the MODEL output with
GLM-Image Conditioning, reproduces Semantic Tokens → Latent for the same seed, steps and cfg (within
LATENT_TOL), and so the official pipeline's image (within IMAGE_TOL). Parity tier, run on both hosts."""
import os

import numpy as np
import pytest
import torch

import glmtest_host
import glmtest_oracle

pytestmark = pytest.mark.parity

PROMPT = 'A poster with the words "GLM" and "Image" on a red wall'
W, H = 384, 256


def stock_graph(seed, steps, cfg, tokens_node, batch=1):
    """Our own sampler (node 3) and the stock one (node 16) on the same tokens, in one graph."""
    return {
        "1": {"class_type": "GLMImageLoader", "inputs": {"model": "GLM-Image-tiny", "weight_dtype": "default"}},
        "3": {"class_type": "GLMImageTokensToLatent", "inputs": {"decoder": ["1", 1], "tokens": tokens_node,
              "seed": seed, "steps": steps, "cfg": cfg}},
        "10": {"class_type": "GLMImageConditioning", "inputs": {"decoder": ["1", 1], "tokens": tokens_node}},
        "11": {"class_type": "GLMImageScheduler", "inputs": {"model": ["1", 3], "tokens": tokens_node, "steps": steps}},
        "12": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "13": {"class_type": "CFGGuider", "inputs": {"model": ["1", 3], "positive": ["10", 0],
               "negative": ["10", 1], "cfg": cfg}},
        "14": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "15": {"class_type": "EmptySD3LatentImage", "inputs": {"width": W, "height": H, "batch_size": batch}},
        "16": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["12", 0], "guider": ["13", 0],
               "sampler": ["14", 0], "sigmas": ["11", 0], "latent_image": ["15", 0]}},
        "17": {"class_type": "VAEDecode", "inputs": {"samples": ["16", 0], "vae": ["1", 2]}},
        "18": {"class_type": "PreviewImage", "inputs": {"images": ["17", 0]}},
        "19": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
    }


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return glmtest_oracle.load_reference_pipeline(tiny_ckpt)


def pipeline_tokens(host, pipe, seed):
    """The official pipeline's prior tokens as a token file (so both paths see the oracle's tokens)."""
    from glm_image_core.generation.tokens import GLMTokens, save_tokens
    ref_ids, _, _ = pipe.generate_prior_tokens(prompt=PROMPT, height=H, width=W,
                                               generator=torch.Generator().manual_seed(seed))
    grid = ref_ids.cpu().view(1, H // 16, W // 16)[:, ::2, ::2].contiguous()
    name = f"stock/pipeline_tokens_{seed}.glmtokens.safetensors"
    save_tokens(GLMTokens(grid=grid, width=W, height=H, prompt=PROMPT, seed=seed),
                os.path.join(host.folder_paths.get_input_directory(), name))
    return {"class_type": "GLMImageLoadTokens", "inputs": {"token_file": name}}


@pytest.mark.parametrize("seed,steps,cfg", [(0, 3, 1.5), (7, 4, 3.0), (3, 2, 1.0)])
def test_sampler_custom_advanced_reproduces_tokens_to_latent_and_the_official_image(host, pipe, seed, steps, cfg):
    g = stock_graph(seed, steps, cfg, ["2", 0])
    g["2"] = pipeline_tokens(host, pipe, seed)
    host.run_ok(g)
    ours = glmtest_host.node_output(host, "3")["samples"]
    stock = glmtest_host.node_output(host, "16")["samples"]
    assert stock.shape == ours.shape == (1, 16, H // 8, W // 8)
    diff = (stock.float() - ours.float()).abs().max().item()
    assert diff <= glmtest_oracle.LATENT_TOL, f"stock path differs from Semantic Tokens → Latent by {diff}"
    out = pipe(prompt=PROMPT, height=H, width=W, num_inference_steps=steps, guidance_scale=cfg,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    ref = torch.from_numpy(np.asarray(out.images))
    img = glmtest_host.node_output(host, "17")
    idiff = (img.float() - ref.float()).abs().max().item()
    assert idiff <= glmtest_oracle.IMAGE_TOL, f"stock path image differs from the official pipeline by {idiff}"


# A fine-tune may ship its own schedule (issue 26, item 1): every constant of the schedule is read from the
# checkpoint's scheduler/scheduler_config.json, by Semantic Tokens → Latent, the MODEL and GLM-Image Scheduler.
SHIFTED = {"base_image_seq_len": 1024, "base_shift": 0.5, "max_shift": 1.2}


@pytest.fixture(scope="module")
def shifted_checkpoint(host, tiny_ckpt):
    """The tiny checkpoint with a scheduler config that differs from the official one (every other part linked)."""
    import json
    folder = os.path.join(host.models_dir, "diffusers", "GLM-Image-tiny-shifted")
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    for entry in os.listdir(tiny_ckpt):
        if entry != "scheduler" and not os.path.exists(os.path.join(folder, entry)):
            os.symlink(os.path.join(tiny_ckpt, entry), os.path.join(folder, entry))
    with open(os.path.join(tiny_ckpt, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert any(cfg.get(k) != v for k, v in SHIFTED.items()), "the official config already has these values"
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(cfg, **SHIFTED), f)
    return "GLM-Image-tiny-shifted"


def test_the_stock_path_follows_the_checkpoints_own_schedule(host, shifted_checkpoint):
    tokens = {"class_type": "GLMImageTextToTokens", "inputs": {"ar": ["1", 0], "prompt": PROMPT, "width": W,
              "height": H, "seed": 5, "temperature": 0.9, "top_p": 0.75, "top_k": 0, "batch_size": 1}}
    sigmas = {}
    for model in ("GLM-Image-tiny", shifted_checkpoint):
        g = stock_graph(5, 3, 1.5, ["2", 0])
        g["1"]["inputs"]["model"], g["2"] = model, tokens
        host.run_ok(g)
        sigmas[model] = glmtest_host.node_output(host, "11").clone()
    ours = glmtest_host.node_output(host, "3")["samples"]
    stock = glmtest_host.node_output(host, "16")["samples"]
    diff = (stock.float() - ours.float()).abs().max().item()
    assert diff <= glmtest_oracle.LATENT_TOL, f"stock path differs from Semantic Tokens → Latent by {diff}"
    moved = (sigmas[shifted_checkpoint] - sigmas["GLM-Image-tiny"]).abs().max().item()
    assert moved > 0.01, f"the checkpoint's schedule did not change the sigmas ({moved})"
