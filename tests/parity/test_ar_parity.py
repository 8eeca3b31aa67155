"""AR parity against the reference oracle (transformers 5.17.0 GlmImageForConditionalGeneration,
GlmImageProcessor and diffusers 0.42.1 GlmImagePipeline) on the tiny random checkpoint, CPU fp32.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/parity -q -k ar
"""
import os
import shutil

import glmtest_oracle
import numpy as np
import pytest
import torch
from PIL import Image

from glm_image_core.generation import ar_generate, ar_prompt, image_proc
from glm_image_core.networks import ar_model
from glm_image_core.loading.registry import NETWORKS

PROMPT = 'A photo of a cat holding a sign that says "hello"'
EDIT_PROMPT = "Make it look like a watercolor painting"


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------

def _patch_lm_head(src: str, dst: str, mode: str) -> str:
    """A copy of a checkpoint with its lm_head rows past the codebook (ids >= 16384) changed.

    ``clean``: logit 0 for them and (if not so already) codebook rows scaled x3, so top-p never keeps
    a non-codebook id: the pipeline's unrestricted sampler and our codebook-restricted one must then
    agree for every seed. ``mixed``: random rows as large as the codebook's, so the pipeline samples
    EOS / non-codebook ids now and then (what our sampler must never emit)."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    p = os.path.join(dst, "vision_language_encoder", "model.safetensors")
    sd = load_file(p)
    w = sd["lm_head.weight"]
    if mode == "clean":
        if w[16384:].abs().max() > 0:
            w[:16384] *= 3.0
        w[16384:] = 0
    else:
        g = torch.Generator().manual_seed(123)
        w[16384:] = torch.randn(w[16384:].shape, generator=g) * w[:16384].std()
    save_file(sd, p, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def clean_ckpt(tiny_ckpt, tmp_path_factory):
    return _patch_lm_head(tiny_ckpt, str(tmp_path_factory.mktemp("clean") / "GLM-Image-tiny-clean"), "clean")


@pytest.fixture(scope="module")
def mixed_ckpt(tiny_ckpt, tmp_path_factory):
    return _patch_lm_head(tiny_ckpt, str(tmp_path_factory.mktemp("mixed") / "GLM-Image-tiny-mixed"), "mixed")


@pytest.fixture(scope="module")
def mixed_models(mixed_ckpt):
    from transformers import GlmImageForConditionalGeneration
    vle = os.path.join(mixed_ckpt, "vision_language_encoder")
    hf = glmtest_oracle.realign(GlmImageForConditionalGeneration.from_pretrained(vle, torch_dtype=torch.float32))
    return hf.train(False), NETWORKS["ar"].load(vle)


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    from transformers import GlmImageProcessor
    return GlmImageProcessor.from_pretrained(os.path.join(tiny_ckpt, "processor"))


@pytest.fixture(scope="module")
def hf_model(tiny_ckpt):
    from transformers import GlmImageForConditionalGeneration
    m = GlmImageForConditionalGeneration.from_pretrained(os.path.join(tiny_ckpt, "vision_language_encoder"),
                                                         torch_dtype=torch.float32)
    return glmtest_oracle.realign(m).train(False)


@pytest.fixture(scope="module")
def ours(tiny_ckpt):
    return NETWORKS["ar"].load(os.path.join(tiny_ckpt, "vision_language_encoder"))


@pytest.fixture(scope="module")
def clean_pipe(clean_ckpt):
    return glmtest_oracle.load_reference_pipeline(clean_ckpt)


@pytest.fixture(scope="module")
def clean_ours(clean_ckpt):
    return NETWORKS["ar"].load(os.path.join(clean_ckpt, "vision_language_encoder"))


def make_image(h: int, w: int, kind: str = "grad", seed: int = 0) -> np.ndarray:
    """uint8 HWC test image: the oracle's gradient + 8-px checkerboard, or seeded noise blobs."""
    if kind == "grad":
        y, x = np.mgrid[0:h, 0:w]
        r = x * 255 // max(w - 1, 1)
        g = y * 255 // max(h - 1, 1)
        b = np.where(((x // 8) + (y // 8)) % 2 == 1, 255, 0)
        return np.stack([r, g, b], -1).astype(np.uint8)
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(h // 8, 1), max(w // 8, 1), 3)).astype(np.uint8)
    return np.array(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def hf_inputs(processor, prompt, height, width, images=None):
    content = [{"type": "image", "image": Image.fromarray(im)} for im in (images or [])]
    content.append({"type": "text", "text": prompt})
    return processor.apply_chat_template([[{"role": "user", "content": content}]], tokenize=True,
                                         target_h=height, target_w=width, return_dict=True, return_tensors="pt")


def upsample2(grid: torch.Tensor) -> torch.Tensor:
    """[B, h, w] -> [B, 4hw] nearest x2, like the pipeline's _upsample_token_ids."""
    return grid.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(grid.shape[0], -1)


# --------------------------------------------------------------------------------------
# sampling primitive
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 2, 3])
def test_ar_multinomial_is_exponential_argmax(batch):
    """torch.multinomial(p, 1) == argmax(p / Exp(1)) drawing one [B, V] exponential (same stream)."""
    for trial in range(20):
        g = torch.Generator().manual_seed(1000 + trial)
        logits = torch.randn(batch, 16512, generator=g) * (0.5 + trial * 0.3)
        if trial % 3 == 0:
            logits[:, torch.randperm(16512, generator=g)[:8000]] = -float("inf")   # zeros in p
        p = torch.softmax(logits, -1)
        g1 = torch.Generator().manual_seed(trial)
        g2 = torch.Generator().manual_seed(trial)
        a = torch.multinomial(p, 1, generator=g1).squeeze(1)
        b = (p / torch.empty_like(p).exponential_(1, generator=g2)).argmax(-1)
        assert torch.equal(a, b)
        # same stream afterwards
        assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
    # and with the global generator as the pipeline uses it
    torch.manual_seed(7)
    a = torch.multinomial(p, 1).squeeze(1)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(a, (p / torch.empty_like(p).exponential_(1, generator=g)).argmax(-1))


@pytest.mark.parametrize("top_k", [0, 16512, 50])
@pytest.mark.parametrize("top_p", [0.75, 0.3, 1.0])
def test_ar_sampler_matches_transformers_warpers(top_k, top_p):
    """CodebookSampler(restrict=False) == transformers' Temperature -> TopK -> TopP -> softmax ->
    multinomial on the same generator stream, step after step (ties included)."""
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    procs = [TemperatureLogitsWarper(0.9)]
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    hf = LogitsProcessorList(procs)
    g_ref = torch.Generator().manual_seed(11)
    ours = ar_generate.CodebookSampler(0.9, top_p, top_k, 16512, 16384, torch.Generator().manual_seed(11),
                                       restrict=False)
    g = torch.Generator().manual_seed(5)
    for step in range(40):
        x = torch.randn(2, 16512, generator=g) * (0.5 + step % 5)
        if step % 3 == 0:
            x = (x * 2).round() / 2          # ties
        ref = torch.multinomial(torch.softmax(hf(None, x.clone()), -1), 1, generator=g_ref).squeeze(1)
        tok, _ = ours(x.clone())
        assert torch.equal(tok, ref), step


# --------------------------------------------------------------------------------------
# prompt ids, positions, reference tokens
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(64, 64), (64, 96), (96, 64), (1024, 1024), (1152, 768), (768, 1344), (2048, 2048)])
def test_ar_input_ids_match_processor_t2i(processor, tok, hw):
    h, w = hw
    inputs = hf_inputs(processor, PROMPT, h, w)
    lay = ar_prompt.build_prompt(tok, PROMPT, w, h)
    assert inputs["input_ids"][0].tolist() == lay.input_ids
    assert [tuple(g[1:]) for g in inputs["image_grid_thw"].tolist()] == lay.grids
    assert lay.num_generate + 1 == ar_prompt.max_new_tokens(w, h)


@pytest.mark.parametrize("sizes", [[(64, 64)], [(64, 64), (96, 64)], [(100, 70)], [(1024, 1024), (768, 1344)]])
def test_ar_input_ids_match_processor_edit(processor, tok, proc_cfg, sizes):
    images = [make_image(h, w, "noise", i) for i, (h, w) in enumerate(sizes)]
    inputs = hf_inputs(processor, EDIT_PROMPT, 64, 96, images)
    grids = []
    for im in images:
        rows, g = image_proc.preprocess_reference(torch.from_numpy(im), proc_cfg)
        grids.append(g)
    lay = ar_prompt.build_prompt(tok, EDIT_PROMPT, 96, 64, references=grids)
    assert inputs["input_ids"][0].tolist() == lay.input_ids
    assert [tuple(g[1:]) for g in inputs["image_grid_thw"].tolist()] == lay.grids
    # pixel values: our preprocessing == the processor's (torchvision backend) on the same uint8 pixels
    ours = torch.cat([image_proc.preprocess_reference(torch.from_numpy(im), proc_cfg)[0] for im in images])
    assert ours.shape == inputs["pixel_values"].shape
    assert torch.equal(ours, inputs["pixel_values"].float())
    # float 0..1 images made from the same uint8 pixels give the same rows
    f = torch.from_numpy(images[0]).float() / 255.0
    assert torch.equal(image_proc.preprocess_reference(f[None], proc_cfg)[0],
                       image_proc.preprocess_reference(torch.from_numpy(images[0]), proc_cfg)[0])


def _reference_positions(hf_model, inputs):
    inner = hf_model.model
    pos, _ = inner.get_rope_index(inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
                                  images_per_sample=inputs.get("images_per_sample"),
                                  attention_mask=inputs.get("attention_mask"))
    return pos[:, 0], inner._cached_decode_position_ids[0]


@pytest.mark.parametrize("hw", [(1024, 1024), (1152, 768), (768, 1344)])
def test_ar_positions_match_reference_t2i(processor, tok, hf_model, hw):
    h, w = hw
    inputs = hf_inputs(processor, PROMPT, h, w)
    ref_pre, ref_dec = _reference_positions(hf_model, inputs)
    lay = ar_prompt.build_prompt(tok, PROMPT, w, h)
    pre, dec = ar_prompt.layout_positions(lay)
    assert torch.equal(pre, ref_pre)
    assert torch.equal(dec, ref_dec)
    assert dec.shape[1] == ar_prompt.max_new_tokens(w, h)


@pytest.mark.parametrize("hw", [(1024, 1024), (1152, 768), (768, 1344)])
def test_ar_positions_match_reference_edit(processor, tok, hf_model, proc_cfg, hw):
    h, w = hw
    images = [make_image(256, 256, "grad"), make_image(192, 320, "noise")]
    inputs = hf_inputs(processor, EDIT_PROMPT, h, w, images)
    ref_pre, ref_dec = _reference_positions(hf_model, inputs)
    grids = [image_proc.preprocess_reference(torch.from_numpy(im), proc_cfg)[1] for im in images]
    lay = ar_prompt.build_prompt(tok, EDIT_PROMPT, w, h, references=grids)
    pre, dec = ar_prompt.layout_positions(lay)
    assert torch.equal(pre, ref_pre)
    assert torch.equal(dec, ref_dec)


@pytest.mark.parametrize("sizes", [[(64, 64)], [(64, 64), (96, 64)], [(100, 70), (256, 192)]])
def test_ar_tokenize_reference_matches(processor, hf_model, ours, proc_cfg, sizes):
    images = [make_image(h, w, "noise" if i % 2 else "grad", i) for i, (h, w) in enumerate(sizes)]
    inputs = hf_inputs(processor, EDIT_PROMPT, 64, 64, images)
    grids = inputs["image_grid_thw"][:-1]
    with torch.no_grad():
        feats = hf_model.get_image_features(inputs["pixel_values"], grids).pooler_output
        ref_ids = hf_model.get_image_tokens(torch.cat(feats, dim=0), grids)
    split = ref_ids.split(grids.prod(-1).tolist())
    mine = ar_generate.tokenize_references(ours, [torch.from_numpy(im) for im in images], proc_cfg)
    for r, m, g in zip(split, mine, grids.tolist()):
        assert tuple(m.shape) == (g[1], g[2])
        assert torch.equal(m.reshape(-1), r)
    # one at a time (the node's path) gives the same ids here
    for im, m in zip(images, mine):
        assert torch.equal(ar_generate.tokenize_reference(ours, torch.from_numpy(im).float()[None] / 255, proc_cfg), m)


# --------------------------------------------------------------------------------------
# logits
# --------------------------------------------------------------------------------------

def _sequence(tok, ours, prompt, w, h, refs=None, seed=0):
    r = ar_generate.generate_tokens(ours, tok, prompt, w, h, seed, reference_grids=refs)
    gen = r.grid.reshape(-1) if r.preview is None else torch.cat([r.preview.reshape(-1), r.grid.reshape(-1)])
    lay = ar_prompt.build_prompt(tok, prompt, w, h, references=refs)
    pre, dec = ar_prompt.layout_positions(lay)
    ids = torch.cat([lay.filled_ids(), gen])
    pos = torch.cat([pre, dec[:, :gen.numel()]], dim=1)
    return lay, ids, pos, gen.numel()


@pytest.mark.parametrize("hw", [(64, 64), (64, 96)])
def test_ar_teacher_forced_logits_t2i(processor, tok, hf_model, ours, hw):
    h, w = hw
    lay, ids, pos, n = _sequence(tok, ours, PROMPT, w, h)
    with torch.no_grad():
        ref = hf_model(input_ids=ids[None], position_ids=pos[:, None]).logits[0]
        full = ours(ids[None], pos)[0]
        # prefill + one-token steps through the static cache
        L = len(lay.input_ids)
        cache = ours.new_cache(1, ids.numel())
        steps = [ours(ids[None, :L], pos[:, :L], cache=cache, start=0)[0]]
        for i in range(L, ids.numel()):
            steps.append(ours(ids[None, i:i + 1], pos[:, i:i + 1], cache=cache, start=i)[0])
        inc = torch.cat(steps)
    assert (full - ref).abs().max().item() <= glmtest_oracle.LOGITS_TOL
    # one-row vs many-row GEMMs round differently: a few ulps of the largest logit
    tol = max(1e-5, 2e-6 * ref.abs().max().item())
    assert (inc - ref).abs().max().item() <= tol
    assert (inc - full).abs().max().item() <= tol


@pytest.mark.parametrize("sizes", [[(64, 64)], [(64, 64), (96, 64)]])
def test_ar_teacher_forced_logits_edit(processor, tok, hf_model, ours, proc_cfg, sizes):
    images = [make_image(h, w, "noise", i) for i, (h, w) in enumerate(sizes)]
    refs = ar_generate.tokenize_references(ours, [torch.from_numpy(im) for im in images], proc_cfg)
    lay, ids, pos, n = _sequence(tok, ours, EDIT_PROMPT, 96, 64, refs=refs)
    inputs = hf_inputs(processor, EDIT_PROMPT, 64, 96, images)
    L = inputs["input_ids"].shape[1]
    full_ids = torch.cat([inputs["input_ids"][0], ids[L:]])          # placeholders: HF fills them itself
    with torch.no_grad():
        ref = hf_model(input_ids=full_ids[None], position_ids=pos[:, None], pixel_values=inputs["pixel_values"],
                       image_grid_thw=inputs["image_grid_thw"], images_per_sample=inputs["images_per_sample"]).logits[0]
        mine = ours(ids[None], pos)[0]
    assert (mine - ref).abs().max().item() <= glmtest_oracle.LOGITS_TOL


@pytest.mark.parametrize("seed", [0, 1, 2, 4])
def test_ar_generate_matches_hf_generate(processor, tok, mixed_models, seed):
    """Unrestricted sampling (the pipeline's token choice) reproduces transformers' generate bit for
    bit, logits included, on a checkpoint whose lm_head gives the 128 non-codebook ids real mass;
    the codebook-restricted sampler agrees up to the first non-codebook id and never emits one."""
    hf_model, ours = mixed_models
    h, w = 64, 64
    inputs = hf_inputs(processor, PROMPT, h, w)
    torch.manual_seed(seed)
    with torch.no_grad():
        o = hf_model.generate(**inputs, max_new_tokens=ar_prompt.max_new_tokens(w, h), do_sample=True,
                              output_logits=True, return_dict_in_generate=True)
    gen = o.sequences[0, inputs["input_ids"].shape[1]:]
    ref_logits = torch.stack(o.logits, 1)[0]
    r = ar_generate.generate_tokens(ours, tok, PROMPT, w, h, seed, restrict_to_codebook=False, return_logits=True)
    mine = torch.cat([r.preview.reshape(-1), r.grid.reshape(-1)])
    eos = torch.nonzero(gen[:-1] == 16385).reshape(-1)
    # where the reference stopped on EOS inside the grid, the unrestricted sampler chose EOS there too
    n = int(eos[0]) + 1 if eos.numel() else mine.numel()
    assert torch.equal(mine[:n], gen[:n])
    assert (r.logits[0, :n] - ref_logits[:n]).abs().max().item() <= glmtest_oracle.LOGITS_TOL
    # the restricted sampler agrees up to the first non-codebook id and never emits one
    rr = ar_generate.generate_tokens(ours, tok, PROMPT, w, h, seed)
    mine_r = torch.cat([rr.preview.reshape(-1), rr.grid.reshape(-1)])
    assert int(mine_r.max()) < 16384
    bad = torch.nonzero(mine >= 16384).reshape(-1)
    first = int(bad[0]) if bad.numel() else mine.numel()
    assert torch.equal(mine_r[:first], mine[:first])
    assert rr.replaced[0] >= (1 if bad.numel() else 0)


def test_ar_mixed_checkpoint_exercises_non_codebook_ids(processor, tok, mixed_models):
    """The 'mixed' checkpoint really makes the reference pick non-codebook ids (else the test above
    would not cover the restriction)."""
    hf_model, ours = mixed_models
    hits = 0
    for seed in range(4):
        r = ar_generate.generate_tokens(ours, tok, PROMPT, 64, 64, seed, restrict_to_codebook=False)
        hits += int((torch.cat([r.preview.reshape(-1), r.grid.reshape(-1)]) >= 16384).sum())
    assert hits > 0


def test_ar_cpu_gemv_layout_same_tokens(tiny_ckpt, tok, ours):
    """The CPU column-major weight layout changes logits only by float rounding (same tokens here)."""
    fast = NETWORKS["ar"].load(os.path.join(tiny_ckpt, "vision_language_encoder"), cpu_gemv_layout=True)
    assert not fast.lm_head.weight.is_contiguous()
    for seed in (0, 1):
        a = ar_generate.generate_tokens(ours, tok, PROMPT, 64, 64, seed, return_logits=True)
        b = ar_generate.generate_tokens(fast, tok, PROMPT, 64, 64, seed, return_logits=True)
        assert torch.equal(a.grid, b.grid) and torch.equal(a.preview, b.preview)
        assert (a.logits - b.logits).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------------------
# seeded sampling vs the diffusers pipeline
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(64, 64), (64, 96)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ar_seed_parity_pipeline_t2i(clean_pipe, clean_ours, tok, hw, seed):
    h, w = hw
    prior, _, _ = clean_pipe.generate_prior_tokens(prompt=PROMPT, height=h, width=w, image=None,
                                                   device=torch.device("cpu"),
                                                   generator=torch.Generator().manual_seed(seed))
    r = ar_generate.generate_tokens(clean_ours, tok, PROMPT, w, h, seed)
    assert r.grid.shape == (1, h // 32, w // 32)
    assert r.replaced == [0]
    assert torch.equal(upsample2(r.grid), prior)


@pytest.mark.parametrize("seed", [3, 4])
def test_ar_seed_parity_pipeline_batch(clean_pipe, clean_ours, tok, seed):
    """batch_size=2 == the pipeline with the prompt repeated twice (one [2, V] draw per step)."""
    prior, _, _ = clean_pipe.generate_prior_tokens(prompt=[PROMPT, PROMPT], height=64, width=96, image=None,
                                                   device=torch.device("cpu"),
                                                   generator=torch.Generator().manual_seed(seed))
    r = ar_generate.generate_tokens(clean_ours, tok, PROMPT, 96, 64, seed, batch_size=2)
    assert torch.equal(upsample2(r.grid), prior)
    assert not torch.equal(r.grid[0], r.grid[1])


@pytest.mark.parametrize("sizes,seed", [([(64, 64)], 0), ([(64, 64)], 5), ([(64, 64), (96, 64)], 1),
                                        ([(96, 64), (64, 128)], 2)])
def test_ar_seed_parity_pipeline_edit(clean_pipe, clean_ours, tok, proc_cfg, sizes, seed):
    images = [make_image(h, w, "noise", 10 + i) for i, (h, w) in enumerate(sizes)]
    prior, ref_prior, ref_grids = clean_pipe.generate_prior_tokens(
        prompt=EDIT_PROMPT, height=64, width=96, image=[[Image.fromarray(im) for im in images]],
        device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed))
    refs = [ar_generate.tokenize_reference(clean_ours, torch.from_numpy(im).float()[None] / 255.0, proc_cfg)
            for im in images]
    assert torch.equal(torch.cat([upsample2(g[None])[0] for g in refs]), ref_prior[0])
    assert [tuple(g.shape) for g in refs] == [(gh // 2, gw // 2) for _, gh, gw in ref_grids[0].tolist()]
    r = ar_generate.generate_tokens(clean_ours, tok, EDIT_PROMPT, 96, 64, seed, reference_grids=refs)
    assert r.preview is None and r.grid.shape == (1, 2, 3)
    assert torch.equal(upsample2(r.grid), prior)


@pytest.fixture(scope="module")
def variant(request, tmp_path_factory):
    """(pipeline, our AR) of a tiny variant config (tiny_checkpoint.SIZES), lm_head made 'clean'."""
    from glm_image_core.testing.tiny_checkpoint import write_checkpoint
    base = tmp_path_factory.mktemp(request.param)
    src = write_checkpoint(str(base / "raw"), request.param, seed=7)
    ckpt = _patch_lm_head(src, str(base / "clean"), "clean")
    return (request.param, glmtest_oracle.load_reference_pipeline(ckpt),
            NETWORKS["ar"].load(os.path.join(ckpt, "vision_language_encoder")))


@pytest.mark.parametrize("variant", ["tiny-gqa4", "tiny-hd32"], indirect=True)
@pytest.mark.parametrize("sampling", [dict(temperature=0.9, top_p=0.75, top_k=16512),
                                      dict(temperature=1.0, top_p=1.0, top_k=50)], ids=["official", "top_k50"])
@pytest.mark.parametrize("seed", [0, 1])
def test_ar_seed_parity_other_configs_and_sampling(variant, tok, sampling, seed):
    """Same seed, same tokens as the pipeline for a GQA ratio of 4 and a head_dim of 32 (both with
    other unequal MRoPE sections than tiny's), at the official sampling settings and at top_k 50,
    temperature 1.0, top_p 1.0 (set in the pipeline's generation_config, passed to ours)."""
    name, pipe, ours = variant
    cfg = pipe.vision_language_encoder.generation_config
    old = {k: getattr(cfg, k) for k in sampling}
    for k, v in sampling.items():
        setattr(cfg, k, v)
    try:
        prior, _, _ = pipe.generate_prior_tokens(prompt=PROMPT, height=64, width=96, image=None,
                                                 device=torch.device("cpu"),
                                                 generator=torch.Generator().manual_seed(seed))
    finally:
        for k, v in old.items():
            setattr(cfg, k, v)
    top_k = 0 if sampling["top_k"] >= 16512 else sampling["top_k"]
    r = ar_generate.generate_tokens(ours, tok, PROMPT, 96, 64, seed, temperature=sampling["temperature"],
                                    top_p=sampling["top_p"], top_k=top_k)
    assert r.replaced == [0], name
    assert torch.equal(upsample2(r.grid), prior), name
