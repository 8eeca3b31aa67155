"""ComfyUI's attention selection reaches GLM's networks (nodes/attention.py): each of ComfyUI's
attention functions that runs on a CPU, adapted, matches torch's SDPA on every call pattern the
networks use (GQA, causal prefill, the static decode's additive mask, boolean masks, T5's bias with
scale 1); with no attention flag the pack keeps SDPA; with one installed, the AR and the DiT really
call it and give the same tokens / latents as with SDPA."""
import importlib
import os
import types

import pytest
import torch

import glmtest_host


def pack_module(name: str):
    return importlib.import_module(f"{glmtest_host.PACK_DIR.replace('.', '_x_')}.{name}")


def cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v = r(2, 4, 9, 16), r(2, 2, 9, 16), r(2, 2, 9, 16)
    dec_mask = torch.zeros(1, 1, 1, 9)
    dec_mask[..., 6:] = float("-inf")
    bool_mask = torch.ones(9, 9, dtype=torch.bool).tril()
    yield "gqa", (q, k, v), {}
    yield "causal prefill", (q, k, v), dict(scale=0.3, causal=True)
    yield "static decode mask", (q[:, :, :1], k, v), dict(mask=dec_mask, scale=0.25)
    yield "bool mask", (q, k, v), dict(mask=bool_mask)
    yield "t5 bias, scale 1", (r(2, 4, 9, 16), r(2, 4, 9, 16), r(2, 4, 9, 16)), dict(mask=r(1, 4, 9, 9), scale=1.0)


@pytest.mark.parametrize("name", ["attention_basic", "attention_split", "attention_sub_quad", "attention_pytorch"])
def test_each_comfy_attention_adapted_matches_sdpa(host, name):
    import comfy.ldm.modules.attention as ca
    run = pack_module("nodes.attention").adapt(getattr(ca, name))
    sdpa = pack_module("glm_image_core.networks.attention").sdpa
    for case, args, kw in cases():
        want = sdpa(*args, **kw)
        got = run(*args, **kw)
        assert got.shape == want.shape, (name, case)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (name, case, (got - want).abs().max())


def test_no_flag_keeps_sdpa_and_a_flag_picks_comfy(host):
    import comfy.ldm.modules.attention as ca
    from comfy.cli_args import args
    att = pack_module("nodes.attention")
    core = pack_module("glm_image_core.networks.attention")
    assert att.selected(args, ca) is None                      # this host runs without an attention flag
    assert core.current() is core.sdpa
    flagged = types.SimpleNamespace(**vars(args))
    flagged.use_split_cross_attention = True
    picked = types.SimpleNamespace(optimized_attention=ca.attention_split, attention_pytorch=ca.attention_pytorch)
    assert att.selected(flagged, picked) is ca.attention_split
    sdpa_picked = types.SimpleNamespace(optimized_attention=ca.attention_pytorch, attention_pytorch=ca.attention_pytorch)
    assert att.selected(flagged, sdpa_picked) is None          # the flag resolved to SDPA itself


def test_installed_attention_runs_in_the_networks(host, tiny_ckpt):
    import comfy.ldm.modules.attention as ca
    core = pack_module("glm_image_core.networks.attention")
    networks = pack_module("glm_image_core.loading.registry").NETWORKS     # the pack's copy: its attention
    ar_generate = pack_module("glm_image_core.generation.ar_generate")
    ar_prompt = pack_module("glm_image_core.generation.ar_prompt")
    adapted = pack_module("nodes.attention").adapt(ca.attention_split)
    calls = []

    def counted(*a, **k):
        calls.append(1)
        return adapted(*a, **k)

    m = networks["ar"].load(os.path.join(tiny_ckpt, "vision_language_encoder"))
    tok = ar_prompt.GlmTokenizer.from_folder(os.path.join(tiny_ckpt, "processor"))
    want = ar_generate.generate_tokens(m, tok, "a cat", 256, 256, 3, return_logits=True)
    prev = core.use(counted)
    try:
        got = ar_generate.generate_tokens(m, tok, "a cat", 256, 256, 3, return_logits=True)
    finally:
        core.use(prev)
    assert len(calls) == m.text_config.num_layers * want.num_generated    # prefill + every decode step
    assert torch.equal(got.grid, want.grid)
    assert torch.allclose(got.logits, want.logits, rtol=1e-4, atol=1e-4)


def test_installed_attention_runs_in_the_dit_and_glyph_encoder(host, tiny_ckpt):
    import json

    import comfy.ldm.modules.attention as ca
    core = pack_module("glm_image_core.networks.attention")
    networks, glyph, denoise = (pack_module(f"glm_image_core.{n}") for n in
                                ("loading.registry", "generation.glyph_text", "generation.denoise"))
    dit = networks.NETWORKS["dit"].load(f"{tiny_ckpt}/transformer")
    enc = networks.NETWORKS["glyph_encoder"].load(f"{tiny_ckpt}/text_encoder")
    tok = glyph.load_glyph_tokenizer(f"{tiny_ckpt}/tokenizer")
    with open(f"{tiny_ckpt}/scheduler/scheduler_config.json") as f:
        sched = json.load(f)
    g = torch.Generator().manual_seed(0)
    latents, ids = torch.randn(1, 16, 8, 8, generator=g), torch.randint(0, 16384, (1, 16), generator=g)

    def glyphs():
        return (glyph.glyph_for_prompt(enc, tok, 'a sign that says "HI"', "cpu", torch.float32),
                glyph.uncond_glyph(enc, tok, "cpu", torch.float32))

    def run(c, u):
        return denoise.denoise(dit, latents.clone(), ids, c, u, (64, 64), 2, 1.5, sched)

    want_glyph = glyphs()
    want = run(*want_glyph)
    adapted, calls = pack_module("nodes.attention").adapt(ca.attention_sub_quad), []
    prev = core.use(lambda *a, **k: calls.append(1) or adapted(*a, **k))
    try:
        got_glyph = glyphs()
        n_glyph = len(calls)
        got = run(*got_glyph)
    finally:
        core.use(prev)
    assert n_glyph > 0 and len(calls) - n_glyph >= 2 * dit.num_layers, (n_glyph, len(calls))
    for a, b in zip(got_glyph, want_glyph):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
