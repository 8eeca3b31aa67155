"""Our GlmImageDiT vs diffusers GlmImageTransformer2DModel on the tiny checkpoint (fp32 CPU, <= 1e-5;
with one thread it is bit-exact)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import glmtest_oracle
from glm_image_core.loading.checkpoint import CheckpointError
from glm_image_core.networks.dit import GlmImageDiT, ReferenceKVCache
from glm_image_core.loading.registry import NETWORKS

TOL = 1e-5


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    from diffusers import GlmImageTransformer2DModel
    ref = GlmImageTransformer2DModel.from_pretrained(tiny_ckpt, subfolder="transformer")
    glmtest_oracle.realign(ref).eval()
    return ref, NETWORKS["dit"].load(f"{tiny_ckpt}/transformer")


def _inputs(cfg, B=2, h=8, w=12, L=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, h, w, generator=g)
    ehs = torch.randn(B, L, cfg.text_embed_dim, generator=g)
    ids = torch.randint(0, cfg.prior_vq_quantizer_codebook_size, (B, h * w // 4), generator=g)
    kw = dict(timestep=torch.tensor([999.0, 499.0][:B]), target_size=torch.tensor([[8.0 * h, 8.0 * w]] * B),
              crop_coords=torch.zeros(B, 2))
    return x, ehs, ids, kw


def _diff(a, b):
    return (a - b).abs().max().item()


def test_state_dict_keys_identical(models):
    ref, ours = models
    assert set(ours.state_dict()) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k


@torch.no_grad()
def test_t2i_non_square_batch2(models):
    ref, ours = models
    x, ehs, ids, kw = _inputs(ref.config)                  # 64x96 px -> 8x12 latent
    drop = torch.zeros_like(ids, dtype=torch.bool)
    a = ref(x, ehs, ids, drop, **kw).sample
    b = ours(x, ehs, ids, drop, **kw)
    assert b.shape == a.shape == x.shape
    assert _diff(a, b) <= TOL


@torch.no_grad()
def test_prior_drop(models):
    ref, ours = models
    x, ehs, ids, kw = _inputs(ref.config)
    a = ref(x, ehs[:, :1], ids, torch.ones_like(ids, dtype=torch.bool), **kw).sample
    assert _diff(a, ours(x, ehs[:, :1], ids, True, **kw)) <= TOL
    assert _diff(a, ours(x, ehs[:, :1], ids, torch.ones_like(ids, dtype=torch.bool), **kw)) <= TOL
    # partial drop mask
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, ::3] = True
    a = ref(x, ehs, ids, mask, **kw).sample
    assert _diff(a, ours(x, ehs, ids, mask, **kw)) <= TOL


@torch.no_grad()
def test_reference_cache_write_read_two_references(models):
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache
    ref, ours = models
    cfg = ref.config
    g = torch.Generator().manual_seed(7)
    rc, oc = GlmImageKVCache(cfg.num_layers), ReferenceKVCache(ours.num_layers)
    rc.set_mode("write")
    oc.set_mode("write")
    for rh, rw in [(8, 8), (4, 12)]:                        # two references of different sizes
        lat = torch.randn(1, cfg.in_channels, rh, rw, generator=g)
        rid = torch.randint(0, cfg.prior_vq_quantizer_codebook_size, (rh * rw // 4,), generator=g)
        kw = dict(timestep=torch.zeros(1), target_size=torch.tensor([[8 * rh, 8 * rw]]), crop_coords=torch.zeros(1, 2))
        empty = torch.zeros(1, 0, cfg.text_embed_dim)
        ra = ref(lat, empty, rid, torch.zeros_like(rid, dtype=torch.bool), kv_caches=rc, **kw).sample
        oa = ours(lat, empty, rid, False, kv_cache=oc, **kw)
        assert _diff(ra, oa) <= TOL
    assert oc.num_tokens == 16 + 12
    for layer in range(cfg.num_layers):
        assert _diff(rc[layer].k_caches[0], oc.k[layer]) <= TOL
        assert _diff(rc[layer].v_caches[0], oc.v[layer]) <= TOL

    x, ehs, ids, kw = _inputs(cfg)                          # batch 2 reads a batch-1 cache
    drop = torch.zeros_like(ids, dtype=torch.bool)
    rc.set_mode("read")
    oc.set_mode("read")
    a = ref(x, ehs, ids, drop, kv_caches=rc, **kw).sample
    b = ours(x, ehs, ids, drop, kv_cache=oc, **kw)
    assert _diff(a, b) <= TOL
    plain = ours(x, ehs, ids, drop, **kw)
    assert _diff(plain, b) > 1e-4                           # the cache does change the result
    rc.set_mode("skip")
    oc.set_mode("skip")
    a = ref(x, ehs[:, :1], ids, ~drop, kv_caches=rc, **kw).sample
    assert _diff(a, ours(x, ehs[:, :1], ids, True, kv_cache=oc, **kw)) <= TOL
    assert oc.num_tokens == 28                              # read/skip leave the cache unchanged

    # packed multi-pass (cond reads the cache, uncond skips it; different glyph lengths)
    ctx_c, ctx_u = ours.project_glyph(ehs), ours.project_glyph(ehs[:, :1])
    priors = torch.stack([ours.project_prior(ids, False), ours.project_prior(ids, True)])
    temb = ours.time_embed(kw["timestep"], kw["target_size"], kw["crop_coords"])
    vc, vu = ours.forward_multi(x, [ctx_c, ctx_u], priors, temb, ["read", "skip"], oc)
    rc.set_mode("read")
    assert _diff(ref(x, ehs, ids, drop, kv_caches=rc, **kw).sample, vc) <= TOL
    rc.set_mode("skip")
    assert _diff(ref(x, ehs[:, :1], ids, ~drop, kv_caches=rc, **kw).sample, vu) <= TOL


@torch.no_grad()
def test_packed_passes_equal_separate_passes(models):
    _, ours = models
    x, ehs, ids, kw = _inputs(models[0].config, B=1, L=7)
    temb = ours.time_embed(kw["timestep"], kw["target_size"], kw["crop_coords"])
    ctxs = [ours.project_glyph(ehs), ours.project_glyph(ehs[:, :1]), ours.project_glyph(ehs[:, :3])]
    pri = [ours.project_prior(ids, False), ours.project_prior(ids, True), ours.project_prior(ids, False)]
    packed = ours.forward_multi(x, ctxs, pri, temb)
    for c, p, v in zip(ctxs, pri, packed):
        assert _diff(ours.forward_multi(x, [c], [p], temb)[0], v) <= TOL


def test_sharded_checkpoint_loads_same_weights(tiny_ckpt, tiny_ckpt_sharded):
    a, b = NETWORKS["dit"].load(f"{tiny_ckpt}/transformer"), NETWORKS["dit"].load(f"{tiny_ckpt_sharded}/transformer")
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_strict_load_reports_bad_keys(tmp_path, tiny_ckpt):
    import shutil
    from safetensors.torch import load_file, save_file
    d = tmp_path / "transformer"
    shutil.copytree(f"{tiny_ckpt}/transformer", d)
    f = d / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd.pop("proj_out.bias")
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"missing key.*proj_out\.bias.*unexpected key.*extra\.weight"):
        NETWORKS["dit"].load(str(d))


class _CastLinear(nn.Linear):
    """Mimics comfy.ops.manual_cast: weights stay in their storage dtype, cast per forward."""

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class _CastEmbedding(nn.Embedding):
    def forward(self, ids):
        return F.embedding(ids, self.weight.to(torch.float32))


class _CastOps:
    Linear = _CastLinear
    Embedding = _CastEmbedding


@torch.no_grad()
def test_operations_with_per_forward_weight_cast(models):
    """Built through ``operations`` with bf16 storage and fp32 compute = fp32 model on bf16-rounded weights."""
    _, ours = models
    sd16 = {k: v.to(torch.bfloat16) for k, v in ours.state_dict().items()}
    cast = GlmImageDiT(ours.config, dtype=torch.bfloat16, operations=_CastOps)
    cast.load_state_dict(sd16)
    cast.compute_dtype = torch.float32
    assert all(p.dtype == torch.bfloat16 for p in cast.parameters())
    plain = GlmImageDiT(ours.config)
    plain.load_state_dict({k: v.float() for k, v in sd16.items()})
    x, ehs, ids, kw = _inputs(models[0].config)
    drop = torch.zeros_like(ids, dtype=torch.bool)
    assert _diff(cast(x, ehs, ids, drop, **kw), plain(x, ehs, ids, drop, **kw)) <= TOL


@torch.no_grad()
def test_bf16_compute_close_to_reference_bf16(models):
    ref, ours = models
    from diffusers import GlmImageTransformer2DModel
    ref16 = GlmImageTransformer2DModel.from_config(ref.config).to(torch.bfloat16)
    ref16.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
    o16 = GlmImageDiT(ours.config, dtype=torch.bfloat16)
    o16.load_state_dict({k: v.to(torch.bfloat16) for k, v in ours.state_dict().items()})
    x, ehs, ids, kw = _inputs(ref.config)
    drop = torch.zeros_like(ids, dtype=torch.bool)
    kw16 = {k: v.to(torch.bfloat16) for k, v in kw.items()}
    a = ref16.eval()(x.bfloat16(), ehs.bfloat16(), ids, drop, **kw16).sample.float()
    b = o16(x.bfloat16(), ehs.bfloat16(), ids, drop, **kw16).float()
    assert b.dtype == torch.float32 and _diff(a, b) <= 0.05 * a.abs().max().item()


def test_load_dit_dtype_and_no_meta(tiny_ckpt):
    m = NETWORKS["dit"].load(f"{tiny_ckpt}/transformer", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in m.parameters())
    assert not any(p.requires_grad for p in m.parameters())
    assert m.compute_dtype == torch.bfloat16


def test_forward_with_autograd(models):
    """Grad-enabled forward (e.g. for training tools) gives the same output and backpropagates."""
    _, ours = models
    x, ehs, ids, kw = _inputs(models[0].config, B=1)
    with torch.no_grad():
        ref = ours(x, ehs, ids, False, **kw)
    xg = x.clone().requires_grad_(True)
    out = ours(xg, ehs, ids, False, **kw)
    assert torch.equal(out.detach(), ref)
    out.square().mean().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
