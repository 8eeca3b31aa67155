"""The DiT as a stock MODEL in the real ComfyUI host (issue 18, items 4–6): KSampler with stock
samplers and schedulers, stock conditioning nodes passing GLM conditioning through, LoRAs in the
diffusers/PEFT and ComfyUI formats through LoraLoaderModelOnly, EasyCache, and clear errors."""
import os

import pytest
import torch
from safetensors.torch import save_file

import glmtest_host
import glmtest_oracle

PROMPT = 'A sign that says "OPEN" in neon'
W, H = 320, 256


def base_graph(seed=0):
    return {
        "1": {"class_type": "GLMImageLoader", "inputs": {"model": "GLM-Image-tiny", "weight_dtype": "default"}},
        "2": {"class_type": "GLMImageTextToTokens", "inputs": {"ar": ["1", 0], "prompt": PROMPT, "width": W,
              "height": H, "seed": seed, "temperature": 0.9, "top_p": 0.75, "top_k": 0, "batch_size": 1}},
        "10": {"class_type": "GLMImageConditioning", "inputs": {"decoder": ["1", 1], "tokens": ["2", 0]}},
        "15": {"class_type": "EmptySD3LatentImage", "inputs": {"width": W, "height": H, "batch_size": 1}},
    }


def custom_advanced(g, model, seed, steps, cfg, positive=("10", 0), negative=("10", 1), out="16"):
    """Add RandomNoise + CFGGuider + euler + GLM-Image Scheduler + SamplerCustomAdvanced (node `out`)."""
    p = out
    g.update({
        f"{p}n": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        f"{p}g": {"class_type": "CFGGuider", "inputs": {"model": list(model), "positive": list(positive),
                  "negative": list(negative), "cfg": cfg}},
        f"{p}s": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        f"{p}k": {"class_type": "GLMImageScheduler", "inputs": {"model": list(model), "tokens": ["2", 0], "steps": steps}},
        p: {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": [f"{p}n", 0], "guider": [f"{p}g", 0],
            "sampler": [f"{p}s", 0], "sigmas": [f"{p}k", 0], "latent_image": ["15", 0]}},
        f"{p}p": {"class_type": "PreviewAny", "inputs": {"source": [p, 0]}},
    })
    return g


def latent(host, node):
    return glmtest_host.node_output(host, node)["samples"]


@pytest.mark.parametrize("sampler,scheduler", [("euler", "simple"), ("dpmpp_2m", "sgm_uniform"),
                                               ("res_multistep", "beta")])
def test_ksampler_runs_with_stock_samplers_and_schedulers(host, sampler, scheduler):
    g = base_graph()
    g["20"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 3], "seed": 4, "steps": 4, "cfg": 2.0, "sampler_name": sampler, "scheduler": scheduler,
        "positive": ["10", 0], "negative": ["10", 1], "latent_image": ["15", 0], "denoise": 1.0}}
    g["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["1", 2]}}
    g["22"] = {"class_type": "PreviewImage", "inputs": {"images": ["21", 0]}}
    host.run_ok(g)
    out = latent(host, "20")
    assert out.shape == (1, 16, H // 8, W // 8) and torch.isfinite(out).all()
    img = glmtest_host.node_output(host, "21")
    assert img.shape == (1, H, W, 3) and torch.isfinite(img).all()
    # it denoised: far from the initial noise in the DiT's space and from the empty latent
    assert out.std().item() > 0


def test_pass_through_conditioning_nodes_keep_glm_conditioning(host):
    """ConditioningSetTimestepRange over the whole range changes nothing; ConditioningZeroOut on the
    negative (a zero glyph) runs."""
    g = custom_advanced(base_graph(), ("1", 3), 2, 3, 1.5)
    g["30"] = {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["10", 0], "start": 0.0,
               "end": 1.0}}
    custom_advanced(g, ("1", 3), 2, 3, 1.5, positive=("30", 0), out="31")
    g["32"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["10", 1]}}
    custom_advanced(g, ("1", 3), 2, 3, 1.5, negative=("32", 0), out="33")
    host.run_ok(g)
    a, b, z = latent(host, "16"), latent(host, "31"), latent(host, "33")
    assert (a - b).abs().max().item() <= glmtest_oracle.LATENT_TOL
    assert torch.isfinite(z).all() and (z - a).abs().max().item() > 0


def test_a_latent_of_another_size_is_refused_clearly(host):
    g = custom_advanced(base_graph(), ("1", 3), 1, 2, 1.5)
    g["15"]["inputs"].update(width=W + 64)
    ok, res = host.run(g)
    assert not ok
    msg = str(host.execution_error())
    assert "tokens' size" in msg and "EmptySD3LatentImage" in msg, msg


# ---- LoRA -------------------------------------------------------------------------------------

LORA_LAYERS = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn1.to_out.0",
               "transformer_blocks.0.ff.net.2", "proj_out"]
RANK = 2


def lora_factors(network, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in LORA_LAYERS:
        w = network.get_submodule(name).weight
        out[name] = (0.2 * torch.randn(RANK, w.shape[1], generator=g), 0.2 * torch.randn(w.shape[0], RANK, generator=g))
    return out


def lora_state_dict(factors, fmt):
    sd = {}
    for name, (down, up) in factors.items():
        if fmt == "diffusers":
            sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = down, up
        elif fmt == "diffusers-transformer":
            sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = down, up
        else:   # ComfyUI's own: diffusion_model.<key>.lora_down/lora_up (+ alpha = rank: scale 1)
            sd[f"diffusion_model.{name}.lora_down.weight"] = down
            sd[f"diffusion_model.{name}.lora_up.weight"] = up
            sd[f"diffusion_model.{name}.alpha"] = torch.tensor(float(RANK))
    return sd


@pytest.mark.parametrize("fmt", ["diffusers", "diffusers-transformer", "comfyui"])
def test_lora_loader_model_only_equals_weights_merged_by_hand(host, fmt):
    import comfy.model_management as mm
    g = base_graph()
    host.run_ok(custom_advanced(dict(g), ("1", 3), 5, 3, 1.5))            # builds the DiT
    decoder = glmtest_host.node_output(host, "1", 1)
    net = decoder.dit.network
    factors = lora_factors(net)
    strength = 0.8
    loras = os.path.join(host.models_dir, "loras")
    os.makedirs(loras, exist_ok=True)
    host.folder_paths.add_model_folder_path("loras", loras, is_default=True)
    name = f"glm_test_{fmt}.safetensors"
    save_file({k: v.contiguous() for k, v in lora_state_dict(factors, fmt).items()}, os.path.join(loras, name))

    g = base_graph()
    g["40"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 3], "lora_name": name,
               "strength_model": strength}}
    custom_advanced(g, ("40", 0), 5, 3, 1.5, out="41")
    custom_advanced(g, ("1", 3), 5, 3, 1.5, out="42")
    host.run_ok(g)
    with_lora, without = latent(host, "41"), latent(host, "42")
    assert (with_lora - without).abs().max().item() > 1e-3, "the LoRA changed nothing (keys not mapped?)"

    mm.unload_all_models()                          # ComfyUI restores the unpatched weights
    saved = {n: net.get_submodule(n).weight.detach().clone() for n in LORA_LAYERS}
    try:
        with torch.no_grad():
            for n, (down, up) in factors.items():
                net.get_submodule(n).weight += strength * (up @ down)
        g2 = base_graph()
        g2["50"] = {"class_type": "GLMImageTokensToLatent", "inputs": {"decoder": ["1", 1], "tokens": ["2", 0],
                    "seed": 5, "steps": 3, "cfg": 1.5}}
        g2["51"] = {"class_type": "PreviewAny", "inputs": {"source": ["50", 0]}}
        host.run_ok(g2)
        merged = latent(host, "50")
    finally:
        mm.unload_all_models()
        with torch.no_grad():
            for n, w in saved.items():
                net.get_submodule(n).weight.copy_(w)
        # a prompt without these nodes makes the classic cache drop their outputs (merged-weight results)
        host.run_ok({"60": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                     "61": {"class_type": "PreviewAny", "inputs": {"source": ["60", 0]}}})
    diff = (with_lora - merged).abs().max().item()
    assert diff <= glmtest_oracle.LATENT_TOL, f"LoRA through LoraLoaderModelOnly differs from the merged weights by {diff}"


# ---- model patches ------------------------------------------------------------------------------

def test_easycache_runs_on_the_glm_model(host):
    g = custom_advanced(base_graph(), ("1", 3), 8, 10, 1.5)
    g["70"] = {"class_type": "EasyCache", "inputs": {"model": ["1", 3], "reuse_threshold": 0.2, "start_percent": 0.15,
               "end_percent": 0.95, "verbose": False}}
    custom_advanced(g, ("70", 0), 8, 10, 1.5, out="71")
    host.run_ok(g)
    plain, cached = latent(host, "16"), latent(host, "71")
    assert cached.shape == plain.shape and torch.isfinite(cached).all()
    rel = ((cached - plain).norm() / plain.norm()).item()
    assert rel < 0.5, rel


# ---- schedules ----------------------------------------------------------------------------------

def token_file(host, px: int) -> str:
    from glm_image_core.generation.tokens import GLMTokens, save_tokens
    name = f"stock/tokens_{px}.glmtokens.safetensors"
    grid = torch.randint(0, 16384, (1, px // 32, px // 32), generator=torch.Generator().manual_seed(px))
    save_tokens(GLMTokens(grid=grid, width=px, height=px), os.path.join(host.folder_paths.get_input_directory(), name))
    return name


@pytest.mark.parametrize("px,shift", [(1024, None), (512, 1.75), (2048, 6.25)])
def test_ksampler_simple_schedule_follows_the_official_one(host, px, shift):
    """What docs/architecture.md promises KSampler users: BasicScheduler 'simple' on the MODEL (its built-in shift,
    the official one at 1024²; ModelSamplingAuraFlow with 0.75·√(W·H)/256 + 0.25 at other sizes) gives
    GLM-Image Scheduler's sigmas within 1e-3."""
    steps = 50
    model = ["1", 3]
    g = {"1": {"class_type": "GLMImageLoader", "inputs": {"model": "GLM-Image-tiny", "weight_dtype": "default"}},
         "2": {"class_type": "GLMImageLoadTokens", "inputs": {"token_file": token_file(host, px)}},
         "3": {"class_type": "GLMImageScheduler", "inputs": {"model": model, "tokens": ["2", 0], "steps": steps}},
         "3p": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}}
    if shift is not None:
        assert shift == 0.75 * px / 256 + 0.25
        g["4"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 3], "shift": shift}}
        model = ["4", 0]
    g["5"] = {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": "simple", "steps": steps,
              "denoise": 1.0}}
    g["5p"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}
    host.run_ok(g)
    official, simple = glmtest_host.node_output(host, "3"), glmtest_host.node_output(host, "5")
    assert official.shape == simple.shape == (steps + 1,)
    assert (official - simple).abs().max().item() < 1e-3


def test_a_batch_of_two_matches_semantic_tokens_to_latent(host):
    """Tokens of batch 2 (two AR samples) through the stock path with a latent batch of 2: each image
    is the one Semantic Tokens → Latent gives (the prior ids batch with the latent, the noise is drawn
    for the whole batch like KSampler's)."""
    g = base_graph(seed=6)
    g["2"]["inputs"]["batch_size"] = 2
    g["15"]["inputs"]["batch_size"] = 2
    custom_advanced(g, ("1", 3), 6, 3, 2.0)
    g["3"] = {"class_type": "GLMImageTokensToLatent", "inputs": {"decoder": ["1", 1], "tokens": ["2", 0],
              "seed": 6, "steps": 3, "cfg": 2.0}}
    g["3p"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}
    host.run_ok(g)
    tokens = glmtest_host.node_output(host, "2")
    assert tokens.batch_size == 2 and not torch.equal(tokens.grid[0], tokens.grid[1])
    own, stock = latent(host, "3"), latent(host, "16")
    assert own.shape == stock.shape == (2, 16, H // 8, W // 8)
    assert (own - stock).abs().max().item() <= glmtest_oracle.LATENT_TOL
