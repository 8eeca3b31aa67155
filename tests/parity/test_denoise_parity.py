"""Glyph + denoise loop vs GlmImagePipeline(prior_token_ids=..., latents=..., output_type="latent")
on the tiny checkpoint: t2i with CFG, cfg=1, and i2i with two references; plus the schedule vs
diffusers' FlowMatchEulerDiscreteScheduler."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import glmtest_oracle
from glm_image_core.generation.denoise import build_reference_cache, denoise

from glm_image_core.generation.glyph_text import glyph_for_prompt, load_glyph_tokenizer, uncond_glyph
from glm_image_core.generation.schedule import calculate_mu, glm_sigmas, glm_timesteps
from glm_image_core.loading.registry import NETWORKS

TOL = glmtest_oracle.LATENT_TOL
H, W = 64, 96
PROMPT = "a shop sign reading 'OPEN' and “Welcome” in the rain"


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return glmtest_oracle.load_reference_pipeline(tiny_ckpt)


@pytest.fixture(scope="module")
def ours(tiny_ckpt):
    with open(f"{tiny_ckpt}/scheduler/scheduler_config.json") as f:
        sched = json.load(f)
    return dict(dit=NETWORKS["dit"].load(f"{tiny_ckpt}/transformer"), enc=NETWORKS["glyph_encoder"].load(f"{tiny_ckpt}/text_encoder"),
                tok=load_glyph_tokenizer(f"{tiny_ckpt}/tokenizer"), sched=sched)


def _fixed_inputs(seed=0, h=H, w=W):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, h // 8, w // 8, generator=g)
    ids = torch.randint(0, 16384, (1, (h // 16) * (w // 16)), generator=g)
    return latents, ids


def _ours(o, latents, ids, cfg, steps=3, **kw):
    c = glyph_for_prompt(o["enc"], o["tok"], PROMPT, "cpu", torch.float32)
    u = uncond_glyph(o["enc"], o["tok"], "cpu", torch.float32)
    return denoise(o["dit"], latents.clone(), ids, c, u, (H, W), steps, cfg, o["sched"], **kw)


@pytest.mark.parametrize("cfg", [1.5, 1.0, 4.0])
def test_t2i_matches_pipeline(pipe, ours, cfg):
    latents, ids = _fixed_inputs()
    ref = pipe(prompt=PROMPT, prior_token_ids=ids, latents=latents.clone(), height=H, width=W,
               num_inference_steps=3, guidance_scale=cfg, output_type="latent").images
    out = _ours(ours, latents, ids, cfg)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (ref - out).abs().max().item() <= TOL
    # the unpacked cond/uncond path gives the same result
    assert (out - _ours(ours, latents, ids, cfg, packed_cfg=False)).abs().max().item() <= TOL


def test_cfg_one_skips_uncond_pass(ours):
    latents, ids = _fixed_inputs()
    calls = []
    dit = ours["dit"]
    orig = dit.forward_multi

    def spy(x, contexts, *a, **k):
        calls.append(len(contexts))
        return orig(x, contexts, *a, **k)
    dit.forward_multi = spy
    try:
        _ours(ours, latents, ids, 1.0)
        assert calls == [1, 1, 1]
        calls.clear()
        _ours(ours, latents, ids, 1.5)
        assert calls == [2, 2, 2]
    finally:
        del dit.forward_multi


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@torch.no_grad()
def test_i2i_two_references_matches_pipeline(pipe, ours):
    latents, ids = _fixed_inputs(3)
    g = torch.Generator().manual_seed(5)
    imgs = [_image(64, 64, 1), _image(32, 96, 2)]                        # different sizes
    ref_ids = [torch.randint(0, 16384, ((im.size[1] // 16) * (im.size[0] // 16),), generator=g) for im in imgs]
    grids = torch.tensor([[1, im.size[1] // 16, im.size[0] // 16] for im in imgs])
    ref = pipe(prompt=PROMPT, image=imgs, prior_token_ids=ids, prior_token_image_ids=[torch.cat(ref_ids)],
               source_image_grid_thw=[grids], latents=latents.clone(), height=H, width=W,
               num_inference_steps=3, guidance_scale=1.5, output_type="latent").images
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1)
    refs = []
    for im, rid in zip(imgs, ref_ids):
        x = pipe.image_processor.preprocess(im, height=im.size[1], width=im.size[0])
        z = pipe.vae.encode(x).latent_dist.mode()
        refs.append(((z - mean) / std, rid.unsqueeze(0), (im.size[1], im.size[0])))
    out = _ours(ours, latents, ids, 1.5, reference=refs)
    assert (ref - out).abs().max().item() <= TOL
    # a prebuilt cache gives the same result and is reusable
    cache = build_reference_cache(ours["dit"], refs)
    assert cache.num_references == 2 and cache.num_tokens == 16 + 12
    assert (_ours(ours, latents, ids, 1.5, reference=cache) - out).abs().max().item() <= TOL
    assert (_ours(ours, latents, ids, 1.5, reference=cache) - out).abs().max().item() <= TOL
    # and the references matter
    assert (_ours(ours, latents, ids, 1.5) - out).abs().max().item() > 1e-4


def test_callback_progress_and_exceptions_propagate(ours):
    latents, ids = _fixed_inputs()
    seen = []
    out = _ours(ours, latents, ids, 1.5, steps=4, callback=lambda i, n, x: seen.append((i, n, x.clone())))
    assert [(i, n) for i, n, _ in seen] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert torch.equal(seen[-1][2], out)

    class Interrupted(Exception):
        pass

    def stop(i, n, x):
        if i == 1:
            raise Interrupted
    with pytest.raises(Interrupted):
        _ours(ours, latents, ids, 1.5, steps=4, callback=stop)


def test_deterministic_and_no_global_rng(ours):
    latents, ids = _fixed_inputs()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = _ours(ours, latents, ids, 1.5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, _ours(ours, latents, ids, 1.5))


def test_input_validation(ours):
    latents, ids = _fixed_inputs()
    with pytest.raises(ValueError, match="prior_token_ids"):
        _ours(ours, latents, ids[:, :-1], 1.5)
    with pytest.raises(ValueError, match="uncond_glyph"):
        denoise(ours["dit"], latents, ids, torch.zeros(1, 1, 32), None, (H, W), 2, 1.5, ours["sched"])


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 28, 30, 50, 100])
@pytest.mark.parametrize("cfg_over", [{}, {"time_shift_type": "exponential"},
                                      {"use_dynamic_shifting": False, "shift": 3.0},
                                      {"base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 1024}])
@pytest.mark.parametrize("hw", [(64, 96), (1024, 1024), (1152, 768), (2048, 2048)])
def test_schedule_matches_diffusers_scheduler(tiny_ckpt, steps, cfg_over, hw):
    """timesteps / sigmas exactly as GlmImagePipeline computes them (bit-identical)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift
    with open(f"{tiny_ckpt}/scheduler/scheduler_config.json") as f:
        cfg = dict(json.load(f), **cfg_over)
    sch = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    seq = ((hw[0] // 8) * (hw[1] // 8)) // 4
    ts = np.linspace(sch.config.num_train_timesteps, 1.0, steps + 1)[:-1].astype(np.int64).astype(np.float32)
    sig = ts / sch.config.num_train_timesteps
    mu = calculate_shift(seq, sch.config.get("base_image_seq_len", 256), sch.config.get("base_shift", 0.25),
                         sch.config.get("max_shift", 0.75))
    sch.set_timesteps(timesteps=ts, sigmas=sig, mu=mu)
    assert calculate_mu(seq, cfg) == mu
    assert torch.equal(glm_timesteps(steps, cfg), sch.timesteps)
    assert torch.equal(glm_sigmas(steps, cfg, mu=mu), sch.sigmas)
    assert torch.equal(glm_sigmas(steps, cfg, image_seq_len=seq), sch.sigmas)


def test_upsample_token_grid_matches_pipeline():
    from diffusers import GlmImagePipeline
    from glm_image_core.generation.denoise import upsample_token_grid
    g = torch.Generator().manual_seed(2)
    grid = torch.randint(0, 16384, (2, 3, 5), generator=g)
    ours = upsample_token_grid(grid)
    assert ours.shape == (2, 60) and ours.dtype == torch.long
    for b in range(2):
        ref = GlmImagePipeline._upsample_token_ids(grid[b].reshape(-1), 3, 5)
        assert torch.equal(ours[b:b + 1], ref)
    assert torch.equal(upsample_token_grid(grid[0]), ours[:1])


def test_callback_x0_is_flow_prediction(ours):
    latents, ids = _fixed_inputs()
    got = []
    _ours(ours, latents, ids, 1.5, steps=2, callback=lambda i, n, x, x0: got.append((x.clone(), x0.clone())),
          callback_x0=True)
    sig = glm_sigmas(2, ours["sched"], image_seq_len=(H // 16) * (W // 16))
    # Euler: x_{i+1} = x_i + (s_{i+1} - s_i) v ; flow prediction x0 = x_i - s_i v
    x1, x0_0 = got[0]
    v = (x1 - latents) / (sig[1] - sig[0])
    assert torch.allclose(x0_0, latents - sig[0] * v, atol=1e-4)
    x2, x0_1 = got[1]
    assert torch.allclose(x0_1, x2, atol=1e-5)         # final sigma is 0: x0 of the last step = result
