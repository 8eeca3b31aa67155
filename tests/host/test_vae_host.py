"""GLM-Image's VAE inside the real ComfyUI host: the object `load_glm_vae` returns, driven by the
stock VAEDecode / VAEDecodeTiled / VAEEncode node classes, against diffusers' AutoencoderKL on the
same weights; ComfyUI model management; latent-preview factors and their wiring."""
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import glmtest_host
from glm_image_core.loading.configs import GLM_LATENTS_MEAN, GLM_LATENTS_STD
from glmtest_oracle import realign

MEAN = torch.tensor(GLM_LATENTS_MEAN).view(1, -1, 1, 1)
STD = torch.tensor(GLM_LATENTS_STD).view(1, -1, 1, 1)


def pack_module(name: str):
    """A submodule of the pack, as ComfyUI's custom-node loader imported it."""
    return importlib.import_module(f"{glmtest_host.PACK_DIR.replace('.', '_x_')}.{name}")


@pytest.fixture(scope="module")
def adapter(host):
    return pack_module("nodes.vae_adapter")


@pytest.fixture(scope="module")
def vae(host, adapter, tiny_ckpt):
    return adapter.load_glm_vae(pack_module("glm_image_core.loading.sources").FolderSource(tiny_ckpt))


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    from diffusers import AutoencoderKL
    return realign(AutoencoderKL.from_pretrained(tiny_ckpt, subfolder="vae").eval())


def node(host, class_type, method, *args, **kwargs):
    """Call a stock node's function the way ComfyUI's executor does (under torch.inference_mode)."""
    with torch.inference_mode():
        return getattr(host.node_class(class_type)(), method)(*args, **kwargs)


def raw_latents(b=2, h=5, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 16, h, w, generator=g) * STD + MEAN


def ref_images(ref, z):
    """diffusers decode in ComfyUI's IMAGE convention: [B,H,W,3] in [0,1]."""
    with torch.no_grad():
        x = ref.decode(z).sample
    return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


def test_is_a_real_comfy_vae(host, vae):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    assert isinstance(vae, comfy.sd.VAE)
    assert isinstance(vae.patcher, comfy.model_patcher.ModelPatcher)
    assert vae.patcher.model is vae.first_stage_model
    assert vae.latent_channels == 16
    assert vae.spacial_compression_decode() == 8 and vae.spacial_compression_encode() == 8
    assert vae.temporal_compression_decode() is None
    assert vae.vae_dtype == torch.float32               # CPU host: ComfyUI's vae_dtype policy gives fp32
    assert torch.float16 not in vae.working_dtypes
    assert vae.device == mm.vae_device() and vae.output_device == mm.intermediate_device()
    assert vae.model_size() == sum(p.numel() * 4 for p in vae.first_stage_model.parameters())
    assert vae.memory_used_decode((1, 16, 64, 64), torch.bfloat16) > 0


def test_fp16_is_never_used(host, adapter):
    import comfy.model_management as mm
    with pytest.raises(ValueError, match="overflows in fp16"):      # the registry's reason
        adapter.choose_vae_dtype(torch.device("cpu"), "fp16")
    assert adapter.choose_vae_dtype(torch.device("cpu"), "fp32") == torch.float32
    assert adapter.choose_vae_dtype(mm.vae_device(), "default") in (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError):
        adapter.choose_vae_dtype(torch.device("cpu"), "int8")


def test_stock_vae_decode_matches_diffusers(host, vae, ref):
    z = raw_latents(2, 5, 7)
    (img,) = node(host, "VAEDecode", "decode", vae, {"samples": z})
    want = ref_images(ref, z)
    assert img.shape == (2, 40, 56, 3) and img.dtype == torch.float32 and img.device.type == "cpu"
    assert (img - want).abs().max().item() <= 1e-5


def test_stock_vae_decode_equals_the_direct_decode(host, vae):
    """Stock VAEDecode (whatever the host does with ``process_output``: ComfyUI >= 0.18 calls it on its
    own output buffer and ignores the return value) gives exactly the network's decode mapped to [0, 1]."""
    z = raw_latents(2, 5, 7, seed=3)
    (img,) = node(host, "VAEDecode", "decode", vae, {"samples": z})
    with torch.inference_mode():
        direct = vae.first_stage_model.decode(z.to(vae.vae_dtype)).float()
    want = ((direct + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)
    assert torch.equal(img, want), (img - want).abs().max()


def test_decode_goes_through_model_management(host, vae):
    import comfy.model_management as mm
    mm.unload_all_models()
    assert not any(lm.model is vae.patcher for lm in mm.current_loaded_models)
    node(host, "VAEDecode", "decode", vae, {"samples": raw_latents(1, 4, 4)})
    assert any(lm.model is vae.patcher for lm in mm.current_loaded_models)
    mm.unload_all_models()
    assert not any(lm.model is vae.patcher for lm in mm.current_loaded_models)
    p = next(vae.first_stage_model.parameters())
    assert p.device == mm.vae_offload_device()
    # and it comes back on the next use
    (img,) = node(host, "VAEDecode", "decode", vae, {"samples": raw_latents(1, 4, 4)})
    assert torch.isfinite(img).all()


def test_decode_tiled_single_tile_equals_untiled(host, vae, ref):
    z = raw_latents(2, 6, 9, seed=1)
    (img,) = node(host, "VAEDecodeTiled", "decode", vae, {"samples": z}, tile_size=512, overlap=64)
    assert img.shape == (2, 48, 72, 3)
    assert (img - ref_images(ref, z)).abs().max().item() <= 1e-5


def test_decode_tiled_large_latent(host, vae, ref):
    z = raw_latents(1, 40, 24, seed=2)                   # 320×192 px, several 128-px tiles
    (img,) = node(host, "VAEDecodeTiled", "decode", vae, {"samples": z}, tile_size=128, overlap=32)
    want = ref_images(ref, z)
    assert img.shape == want.shape == (1, 320, 192, 3)
    assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    err = (img - want).abs()
    # Tiling is approximate (feathered seams, small per-tile context), but close on average.
    assert err.mean().item() < 0.05, err.mean().item()


def test_stock_vae_encode_matches_diffusers_mode(host, vae, ref):
    g = torch.Generator().manual_seed(3)
    pixels = torch.rand(2, 40, 56, 3, generator=g)
    (lat,) = node(host, "VAEEncode", "encode", vae, pixels)
    with torch.no_grad():
        want = ref.encode(pixels.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()
    assert lat["samples"].shape == (2, 16, 5, 7) and lat["samples"].dtype == torch.float32
    assert (lat["samples"] - want).abs().max().item() <= 1e-5


def test_vae_encode_crops_like_stock(host, vae, ref):
    g = torch.Generator().manual_seed(4)
    pixels = torch.rand(1, 43, 61, 3, generator=g)      # cropped to 40×56, centred (offsets 1, 2)
    (lat,) = node(host, "VAEEncode", "encode", vae, pixels)
    with torch.no_grad():
        want = ref.encode(pixels[:, 1:41, 2:58].permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()
    assert (lat["samples"] - want).abs().max().item() <= 1e-5


def test_encode_tiled_runs(host, vae):
    g = torch.Generator().manual_seed(5)
    pixels = torch.rand(1, 192, 256, 3, generator=g)
    (lat,) = node(host, "VAEEncodeTiled", "encode", vae, pixels, tile_size=128, overlap=32)
    assert lat["samples"].shape == (1, 16, 24, 32) and torch.isfinite(lat["samples"]).all()


def test_bf16_weights_decode(host, adapter, vae, tiny_ckpt):
    v16 = adapter.load_glm_vae(pack_module("glm_image_core.loading.sources").FolderSource(tiny_ckpt), weight_dtype="bf16")
    assert v16.vae_dtype == torch.bfloat16
    assert next(v16.first_stage_model.parameters()).dtype == torch.bfloat16
    z = raw_latents(1, 5, 7, seed=6)
    (a,) = node(host, "VAEDecode", "decode", v16, {"samples": z})
    (b,) = node(host, "VAEDecode", "decode", vae, {"samples": z})
    assert a.dtype == torch.float32 and (a - b).abs().max().item() < 0.05


def _held_out_fit_error(vae, factors, bias, seed=123):
    """(MSE of the linear preview, of predicting 0, of predicting the mean colour) on fresh latents."""
    from glm_image_core.networks.vae import sample_normalised_latents
    zn = sample_normalised_latents(16, 4, 12, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        rgb = vae.first_stage_model.decode(zn * STD + MEAN).float()
    cells = F.avg_pool2d(rgb, 8)[:, :, 1:-1, 1:-1]
    x = zn[:, :, 1:-1, 1:-1]
    pred = torch.einsum("bchw,cd->bdhw", x, torch.tensor(factors)) + torch.tensor(bias).view(1, 3, 1, 1)
    const = cells.mean(dim=(0, 2, 3), keepdim=True)
    return ((pred - cells) ** 2).mean().item(), (cells ** 2).mean().item(), ((cells - const) ** 2).mean().item()


def test_preview_factors_fit(host, adapter, vae):
    import latent_preview
    factors, bias = adapter.fit_preview_factors(vae, MEAN.flatten(), STD.flatten())
    assert np.array(factors).shape == (16, 3) and np.array(bias).shape == (3,)
    assert np.isfinite(factors).all() and np.isfinite(bias).all()
    again = adapter.fit_preview_factors(vae, MEAN.flatten(), STD.flatten())
    assert again == (factors, bias)                       # deterministic
    fit_mse, zero_mse, const_mse = _held_out_fit_error(vae, factors, bias)
    # Random test weights make colours only weakly linear in the latent; still the fit must beat
    # both the blank preview and the mean colour on latents it has not seen.
    assert fit_mse < zero_mse and fit_mse < const_mse, (fit_mse, zero_mse, const_mse)
    fmt, image, _ = latent_preview.Latent2RGBPreviewer(factors, bias).decode_latent_to_preview_image(
        "JPEG", torch.randn(1, 16, 6, 10))
    assert fmt == "JPEG" and image.size == (10, 6)


def test_preview_factors_follow_latent2rgb_convention(host):
    """Factors from the fit, fed to ComfyUI's own Latent2RGBPreviewer, reproduce a linear decoder's colours."""
    import latent_preview
    from glm_image_core.networks.vae import fit_latent_to_rgb
    g = torch.Generator().manual_seed(12)
    true_f, true_b = torch.randn(16, 3, generator=g) * 0.3, torch.randn(3, generator=g) * 0.2

    def decode(raw):
        rgb = torch.einsum("bchw,cd->bdhw", (raw - MEAN) / STD, true_f) + true_b.view(1, 3, 1, 1)
        return F.interpolate(rgb, scale_factor=8, mode="nearest")

    factors, bias = fit_latent_to_rgb(decode, 16, 8, MEAN.flatten(), STD.flatten())
    x0 = torch.randn(1, 16, 6, 10, generator=g)
    _, image, _ = latent_preview.Latent2RGBPreviewer(factors, bias).decode_latent_to_preview_image("JPEG", x0)
    want = latent_preview.preview_to_image(decode(x0 * STD + MEAN)[0, :, ::8, ::8].permute(1, 2, 0))
    assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(want, dtype=np.int16)).max() <= 1


def test_preview_fit_also_takes_the_core_module(host, adapter, vae):
    a = adapter.fit_preview_factors(vae.first_stage_model, MEAN.flatten(), STD.flatten())
    b = adapter.fit_preview_factors(vae, MEAN.flatten(), STD.flatten())
    assert np.allclose(a[0], b[0], atol=1e-5) and np.allclose(a[1], b[1], atol=1e-5)


def _decoder_handle(models, fit):
    """A GLMDecoderModel with only what previewer() reads."""
    return models.GLMDecoderModel(folder="x", dit=None, glyph_encoder=None, glyph_tokenizer=None, dit_config={},
                                  scheduler_config={}, latents_mean=MEAN.flatten(), latents_std=STD.flatten(),
                                  preview_fit=fit)


def test_previewer_wiring(host, adapter, vae, monkeypatch):
    import latent_preview
    from comfy.cli_args import LatentPreviewMethod, args
    models = pack_module("nodes.models")
    calls = []

    def fit():
        calls.append(1)
        return adapter.preview_fit_for(vae, MEAN.flatten(), STD.flatten())()

    h = _decoder_handle(models, fit)
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.NoPreviews)
    assert h.previewer() is None and calls == []         # previews off: nothing fitted
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Auto)
    p = h.previewer()
    assert isinstance(p, latent_preview.Latent2RGBPreviewer) and len(calls) == 1
    assert h.preview_factors is not None
    assert h.previewer() is not None and len(calls) == 1  # fitted once

    def broken():
        raise RuntimeError("boom")
    h2 = _decoder_handle(models, broken)
    assert h2.previewer() is None and h2.previewer() is None


def test_loader_vae_in_a_prompt(host, ref):
    """GLMImageLoader's VAE output through stock nodes in an executed API prompt (needs the full pack)."""
    from PIL import Image
    prompt = {
        "1": {"class_type": "GLMImageLoader", "inputs": {"model": "GLM-Image-tiny", "weight_dtype": "default"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0x3366CC}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "glmvae"}},
    }
    res = host.run_ok(prompt)
    (path,) = host.output_images(res, "5")
    got = np.asarray(Image.open(path)).astype(np.float32) / 255
    px = torch.zeros(1, 3, 48, 64)
    px[:, 0], px[:, 1], px[:, 2] = 0x33 / 255, 0x66 / 255, 0xCC / 255
    with torch.no_grad():
        want = ref_images(ref, ref.encode(px * 2 - 1).latent_dist.mode())[0].numpy()
    # SaveImage truncates to uint8: got = floor(255 * want) / 255
    assert got.shape == (48, 64, 3)
    assert (want - got).min() >= -1e-5 and (want - got).max() <= 1.0 / 255 + 1e-5
