"""AR model loading and the token sampler (plain PyTorch, tiny random checkpoint)."""
import os
import types

import pytest
import torch
import torch.nn.functional as F

from glm_image_core.generation import ar_generate
from glm_image_core.networks import ar_model
from glm_image_core.loading.checkpoint import CheckpointError
from glm_image_core.loading.registry import NETWORKS

PROMPT = "A photo of a cat"


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return NETWORKS["ar"].load(os.path.join(tiny_ckpt, "vision_language_encoder"))


class _BiasedHead(torch.nn.Module):
    """lm_head with an added logit bias (to force EOS / non-codebook winners)."""

    def __init__(self, head, bias):
        super().__init__()
        self.head, self.bias = head, bias

    def forward(self, x):
        return self.head(x) + self.bias.to(x.dtype)


@pytest.fixture
def eos_model(model):
    """The tiny model with lm_head strongly preferring EOS (16385) and the other non-codebook ids."""
    bias = torch.zeros(model.text_config.vision_vocab_size)
    bias[16384:] = 30.0
    bias[16385] = 60.0
    orig = model.lm_head
    model.lm_head = _BiasedHead(orig, bias)
    yield model
    model.lm_head = orig


def test_ar_load_state_dict_keys(model, tiny_ckpt):
    from safetensors import safe_open
    with safe_open(os.path.join(tiny_ckpt, "vision_language_encoder", "model.safetensors"), "pt") as f:
        file_keys = set(f.keys())
    own = set(model.state_dict())
    assert own == {k for k in file_keys if not k.startswith("model.vqmodel.post_quant_conv.")}
    assert "lm_head.weight" in own and "model.language_model.embed_tokens.weight" in own
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_ar_load_sharded_equals_single(tiny_ckpt, tiny_ckpt_sharded, model):
    sharded = NETWORKS["ar"].load(os.path.join(tiny_ckpt_sharded, "vision_language_encoder"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, sharded.state_dict()[k]), k


def test_ar_load_strict_errors(tiny_ckpt, tmp_path):
    import shutil
    from safetensors.torch import load_file, save_file
    d = tmp_path / "vle"
    shutil.copytree(os.path.join(tiny_ckpt, "vision_language_encoder"), d)
    sd = load_file(str(d / "model.safetensors"))
    sd.pop("model.language_model.layers.0.mlp.down_proj.weight")
    sd["model.extra.weight"] = torch.zeros(1)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing key.*down_proj.*unexpected key.*model.extra"):
        NETWORKS["ar"].load(str(d))


def test_ar_built_through_operations(tiny_ckpt):
    """Every Linear/Conv2d/Embedding/LayerNorm comes from ``operations``; a manual-cast style ops set
    (bf16 weights, fp32 compute, weights cast in forward) runs and stays close to the fp32 model."""
    made = []

    def wrap(base):
        class Op(base):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                made.append(base.__name__)

            def forward(self, x, *a, **k):
                if isinstance(self, torch.nn.Embedding):
                    return F.embedding(x, self.weight.to(torch.float32))
                w = self.weight.to(x.dtype)
                b = None if self.bias is None else self.bias.to(x.dtype)
                if isinstance(self, torch.nn.Linear):
                    return F.linear(x, w, b)
                if isinstance(self, torch.nn.Conv2d):
                    return self._conv_forward(x, w, b)
                return F.layer_norm(x, self.normalized_shape, w, b, self.eps)
        Op.__name__ = base.__name__
        return Op

    ops = types.SimpleNamespace(Linear=wrap(torch.nn.Linear), Conv2d=wrap(torch.nn.Conv2d),
                                Embedding=wrap(torch.nn.Embedding), LayerNorm=wrap(torch.nn.LayerNorm))
    m = NETWORKS["ar"].load(os.path.join(tiny_ckpt, "vision_language_encoder"), dtype=torch.bfloat16, operations=ops)
    n_lin = sum(isinstance(x, torch.nn.Linear) for x in m.modules())
    assert made.count("Linear") == n_lin and "Conv2d" in made and "Embedding" in made and "LayerNorm" in made
    assert all(type(x).__module__ != "torch.nn.modules.linear" for x in m.modules()
               if isinstance(x, torch.nn.Linear))
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    ref = NETWORKS["ar"].load(os.path.join(tiny_ckpt, "vision_language_encoder"))
    ids = torch.tensor([[16600, 16601, 16384, 5, 6]])
    pos = torch.arange(5).expand(3, 5)
    a = m(ids, pos, dtype=torch.float32)
    b = ref(ids, pos)
    assert a.dtype == torch.float32 and (a - b).abs().max().item() < 0.03 * b.abs().max().item()


def test_ar_generate_shapes_and_callback(model, tok):
    calls = []
    r = ar_generate.generate_tokens(model, tok, PROMPT, 96, 64, 3, callback=lambda d, t, p: calls.append((d, t, p)))
    assert calls.pop(0) == (0, r.num_generated, "prefill")      # once, after the prefill (interrupt point)
    assert r.grid.shape == (1, 2, 3) and r.grid.dtype == torch.int64
    assert r.preview.shape == (1, 13, 19)
    assert r.num_generated == 2 * 3 + 13 * 19 == len(calls)
    assert [c[0] for c in calls] == list(range(1, r.num_generated + 1))
    assert {c[1] for c in calls} == {r.num_generated}
    assert [c[2] for c in calls].count("preview") == 13 * 19 and calls[-1][2] == "grid"
    assert int(r.grid.max()) < 16384 and int(r.preview.max()) < 16384


def test_ar_never_short_grid(eos_model, tok):
    """A model that prefers EOS / non-codebook ids everywhere still yields a complete codebook grid."""
    r = ar_generate.generate_tokens(eos_model, tok, PROMPT, 64, 64, 0)
    assert r.grid.shape == (1, 2, 2) and r.preview.shape == (1, 16, 16)
    assert int(r.grid.max()) < 16384 and int(r.preview.max()) < 16384 and int(r.grid.min()) >= 0
    assert r.replaced == [r.num_generated]          # the unrestricted winner was never a codebook id
    # top-p so tight that only non-codebook ids survive: fall back to the best codebook logit
    r2 = ar_generate.generate_tokens(eos_model, tok, PROMPT, 64, 64, 0, top_p=0.01, temperature=0.5)
    assert int(r2.grid.max()) < 16384 and r2.replaced == [r2.num_generated]
    # unrestricted (parity-test mode) would emit EOS
    r3 = ar_generate.generate_tokens(eos_model, tok, PROMPT, 64, 64, 0, restrict_to_codebook=False)
    assert int(r3.grid[0, 0, 0]) == 16385


def test_ar_batch(model, tok):
    r = ar_generate.generate_tokens(model, tok, PROMPT, 64, 64, 11, batch_size=2)
    assert r.grid.shape == (1 * 2, 2, 2) and r.preview.shape == (2, 16, 16)
    assert not torch.equal(r.preview[0], r.preview[1])
    again = ar_generate.generate_tokens(model, tok, PROMPT, 64, 64, 11, batch_size=2)
    assert torch.equal(r.grid, again.grid) and torch.equal(r.preview, again.preview)


def test_ar_interrupt_then_rerun_identical(model, tok):
    full = ar_generate.generate_tokens(model, tok, PROMPT, 64, 96, 5)
    rng = torch.get_rng_state()

    class Stop(Exception):
        pass

    def cb(done, total, phase):
        if done == 100:
            raise Stop()
    with pytest.raises(Stop):
        ar_generate.generate_tokens(model, tok, PROMPT, 64, 96, 5, callback=cb)
    again = ar_generate.generate_tokens(model, tok, PROMPT, 64, 96, 5)
    assert torch.equal(full.grid, again.grid) and torch.equal(full.preview, again.preview)
    assert torch.equal(rng, torch.get_rng_state())         # the global RNG is never touched
    other = ar_generate.generate_tokens(model, tok, PROMPT, 64, 96, 6)
    assert not torch.equal(full.preview, other.preview)


def test_ar_edit_generation(model, tok, proc_cfg):
    img = torch.rand(1, 64, 96, 3)
    ids = ar_generate.tokenize_reference(model, img, proc_cfg)
    assert ids.shape == (2, 3) and ids.dtype == torch.int64 and int(ids.max()) < 16384
    r = ar_generate.generate_tokens(model, tok, "make it blue", 64, 64, 0, reference_grids=[ids])
    assert r.preview is None and r.grid.shape == (1, 2, 2) and r.num_generated == 4
    r2 = ar_generate.generate_tokens(model, tok, "make it blue", 64, 64, 0, reference_grids=[ids, ids[:, :2]])
    assert r2.grid.shape == (1, 2, 2)


def test_ar_top_k_and_validation(model, tok):
    a = ar_generate.generate_tokens(model, tok, PROMPT, 64, 64, 0, top_k=16512)
    b = ar_generate.generate_tokens(model, tok, PROMPT, 64, 64, 0, top_k=0)
    assert torch.equal(a.grid, b.grid) and torch.equal(a.preview, b.preview)   # k >= vocab is a no-op
    c = ar_generate.generate_tokens(model, tok, PROMPT, 64, 64, 0, top_k=5, top_p=1.0)
    assert int(c.preview.max()) < 16384
    for bad in (dict(width=70), dict(temperature=0.0), dict(top_p=0.0), dict(top_k=-1), dict(batch_size=0)):
        kw = dict(width=64, height=64, seed=0)
        kw.update(bad)
        with pytest.raises(ValueError):
            ar_generate.generate_tokens(model, tok, PROMPT, **kw)


def test_ar_compile_same_tokens(model, tok):
    """The exact decode under torch.compile (about 40 s of compiling on a CPU) gives the same tokens."""
    a = ar_generate.generate_tokens(model, tok, PROMPT, 64, 64, 0)
    b = ar_generate.generate_tokens(model, tok, PROMPT, 64, 64, 0, compile=True)
    assert torch.equal(a.grid, b.grid) and torch.equal(a.preview, b.preview)


def test_ar_rotary_fused_is_bit_identical():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 4, 5, 16, generator=g).to(dtype)
        k = torch.randn(2, 2, 5, 16, generator=g).to(dtype)
        ang = torch.randn(2, 5, 8, generator=g)
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        rq, rk = ar_model.apply_rotary(q, k, cos, sin)
        qk = ar_model.rotary_fused(torch.cat([q, k], 1), cos.unsqueeze(1), ar_model.signed_sin(sin).unsqueeze(1))
        assert torch.equal(qk[:, :4], rq) and torch.equal(qk[:, 4:], rk)


def test_ar_top_p_mask_fast_equals_reference():
    """The sort-free top-p mask equals transformers' formula bit for bit, ties and -inf included."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for t in range(60):
        x = torch.randn(1 + t % 3, 16512, generator=g) * (0.3 + 0.2 * (t % 10))
        if t % 4 == 1:      # many exact ties (quantised logits), some straddling the cut
            x = (x * 4).round() / 4
        if t % 4 == 2:      # top-k style -inf entries
            x[:, torch.randperm(16512, generator=g)[:9000]] = -float("inf")
        if t % 4 == 3:      # peaky
            x[:, :20] += 12
        cases.append(x)
    fallbacks = 0
    for x in cases:
        for top_p in (0.75, 0.3, 0.95, 0.01):
            ref = ar_generate.top_p_remove_mask_reference(x, top_p)
            fast = ar_generate.top_p_remove_mask(x, top_p)
            assert torch.equal(ref, fast)
            sv = torch.sort(x).values
            fallbacks += int(bool((sv[:, 1:] == sv[:, :-1]).any()))
    assert fallbacks > 0        # tie cases were exercised


def test_codebook_sampler_replaced_flags_exactly_the_non_codebook_winners():
    """``replaced`` is True exactly where the unrestricted sampler (same draw) picks a non-codebook id;
    elsewhere both pick the same token; the device (sync-free) form agrees with the CPU form."""
    V, cb = 16512, 16384
    g = torch.Generator().manual_seed(0)
    seen = 0
    for seed in range(40):
        logits = torch.randn(3, V, generator=g) * 2
        logits[:, cb:] += 1.5 * (seed % 4)        # non-codebook ids win in some rows
        outs = [ar_generate.CodebookSampler(0.9, 0.75, 0, V, cb, ar_generate._generator(seed, "cpu"), **kw)(logits)
                for kw in (dict(), dict(sync_free=True), dict(restrict=False))]
        (tok, rep), (tok_d, rep_d), (full, _) = outs
        assert torch.equal(rep, full >= cb) and torch.equal(tok[~rep], full[~rep])
        assert torch.equal(tok, tok_d) and torch.equal(rep, rep_d) and int(tok.max()) < cb
        seen += int(rep.sum())
    assert seen > 0
