"""Core-level reliability hooks (plain PyTorch, no ComfyUI): the AR refuses a prompt beyond its
context before computing anything, and the DiT's reference cache write reports each reference and
stops cleanly when its callback raises (what the nodes use for interrupts)."""
import json
import os

import pytest
import torch

from glm_image_core.generation import ar_generate, ar_prompt, denoise
from glm_image_core.networks import ar_model, dit
from glm_image_core.loading.registry import NETWORKS


@pytest.fixture(scope="module")
def transformer(tiny_ckpt):
    return NETWORKS["dit"].load(os.path.join(tiny_ckpt, "transformer"))


def test_prompt_beyond_context_is_refused_before_any_compute(tiny_ckpt):
    ar = NETWORKS["ar"].load(os.path.join(tiny_ckpt, "vision_language_encoder"))
    tok = ar_prompt.GlmTokenizer.from_folder(os.path.join(tiny_ckpt, "processor"))
    with open(os.path.join(tiny_ckpt, "vision_language_encoder", "config.json"), encoding="utf-8") as f:
        context = json.load(f)["text_config"]["max_position_embeddings"]
    calls = []
    with pytest.raises(ValueError, match=rf"prompt too long.*context of {context} \(max_position_embeddings\)"):
        ar_generate.generate_tokens(ar, tok, "x" * (context + 10), 64, 64, 0, callback=lambda *a: calls.append(a))
    assert calls == [], "generation started although the prompt does not fit"
    # the limit counts positions, not tokens: text plus each image grid's max(h, w)
    layout = ar_prompt.build_prompt(tok, "x" * 100, 256, 256)
    pre, dec = ar_prompt.layout_positions(layout)
    needed = int(max(pre.max(), dec.max())) + 1
    ar_generate.check_context(ar, needed, len(layout.input_ids), 256, 256)        # fits exactly
    with pytest.raises(ValueError, match="prompt too long"):
        ar_generate.check_context(ar, needed + context, len(layout.input_ids), 256, 256)


def _references(transformer, n):
    g = torch.Generator().manual_seed(0)
    refs = []
    for _ in range(n):
        lat = torch.randn(1, transformer.in_channels, 8, 12, generator=g)
        ids = torch.randint(0, 16384, (1, (8 // transformer.patch_size) * (12 // transformer.patch_size)), generator=g)
        refs.append((lat, ids, (64, 96)))
    return refs


def test_reference_cache_write_reports_each_reference(transformer):
    seen = []
    cache = denoise.build_reference_cache(transformer, _references(transformer, 3), callback=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)] and cache.num_references == 3


def test_stopping_the_cache_write_leaves_the_next_run_exact(transformer):
    refs = _references(transformer, 2)
    latents = torch.randn(1, transformer.in_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    ids = torch.zeros(1, 16, dtype=torch.long)
    glyph = torch.zeros(1, 1, transformer.text_embed_dim)

    def run(**kw):
        return denoise.denoise(transformer, latents.clone(), ids, glyph, glyph, (64, 64), 2, 1.5, {}, reference=refs, **kw)
    full = run()

    class Stop(Exception):
        pass

    def stop(done, total):
        raise Stop()
    with pytest.raises(Stop):
        run(reference_callback=stop, callback=lambda *a: pytest.fail("a step ran after the stop"))
    assert torch.equal(run(), full)
