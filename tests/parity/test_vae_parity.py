"""glm_image_core.networks.vae.GlmImageVAE against diffusers' AutoencoderKL (the oracle), fp32 on CPU."""
import os

import pytest
import torch
from torch import nn

from glm_image_core.loading import checkpoint as ckpt
from glm_image_core.networks.vae import GlmImageVAE
from glmtest_oracle import realign
from glm_image_core.loading.registry import NETWORKS

TOL = 1e-5


def _ref(folder, subfolder=None):
    from diffusers import AutoencoderKL
    return realign(AutoencoderKL.from_pretrained(folder, subfolder=subfolder).eval())


def _compare(ours, ref, latent_channels, h=6, w=9, batch=2, seed=0):
    """(decode max abs diff, encode-mode max abs diff) on a non-square size."""
    g = torch.Generator().manual_seed(seed)
    f = ours.scale_factor
    z = torch.randn(batch, latent_channels, h, w, generator=g) * 2.0
    x = torch.rand(batch, 3, h * f, w * f, generator=g) * 2 - 1
    with torch.no_grad():
        a, b = ref.decode(z).sample, ours.decode(z)
        assert a.shape == b.shape == (batch, 3, h * f, w * f)
        dec = (a - b).abs().max().item()
        a, b = ref.encode(x).latent_dist.mode(), ours.encode(x)
        assert a.shape == b.shape == (batch, latent_channels, h, w)
        enc = (a - b).abs().max().item()
        assert torch.isfinite(b).all()
    return dec, enc


def test_tiny_glm_vae_matches_diffusers(tiny_ckpt):
    ref = _ref(tiny_ckpt, "vae")
    ours = NETWORKS["vae"].load(os.path.join(tiny_ckpt, "vae"))
    cfg = ckpt.read_json(os.path.join(tiny_ckpt, "vae", "config.json"))
    assert not cfg["mid_block_add_attention"] and not cfg["use_quant_conv"] and not cfg["use_post_quant_conv"]
    assert ours.quant_conv is None and ours.post_quant_conv is None
    assert ours.encoder.mid_block.attentions is None and ours.decoder.mid_block.attentions is None
    assert set(ours.state_dict()) == set(ref.state_dict())
    dec, enc = _compare(ours, ref, 16, h=5, w=7)
    assert dec <= TOL and enc <= TOL, (dec, enc)


def _random_diffusers_vae(folder, seed=0, **cfg):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    m = AutoencoderKL(**cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():          # move norms/biases off their trivial init so every parameter matters
        for name, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    m.save_pretrained(folder)
    return folder


ORACLE_TINY = dict(block_out_channels=(4, 8, 16, 16), latent_channels=4, norm_num_groups=4, layers_per_block=1,
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   mid_block_add_attention=True, use_quant_conv=True, use_post_quant_conv=True)


@pytest.mark.parametrize("cfg", [
    ORACLE_TINY,
    # three blocks (×4 downscale), two layers per block, quant convs but no mid attention
    dict(block_out_channels=(8, 16, 16), latent_channels=6, norm_num_groups=8, layers_per_block=2,
         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
         mid_block_add_attention=False, use_quant_conv=True, use_post_quant_conv=False),
], ids=["oracle-tiny-attn-quant", "3blocks-lpb2"])
def test_config_driven_structure_matches_diffusers(tmp_path, cfg):
    folder = _random_diffusers_vae(str(tmp_path / "vae"), **cfg)
    ref = _ref(folder)
    ours = NETWORKS["vae"].load(folder)
    config = ckpt.read_json(os.path.join(folder, "config.json"))
    assert (ours.quant_conv is not None) == config["use_quant_conv"]
    assert (ours.post_quant_conv is not None) == config["use_post_quant_conv"]
    assert (ours.decoder.mid_block.attentions is not None) == config["mid_block_add_attention"]
    assert ours.scale_factor == 2 ** (len(cfg["block_out_channels"]) - 1)
    assert set(ours.state_dict()) == set(ref.state_dict())
    dec, enc = _compare(ours, ref, cfg["latent_channels"], h=12, w=20)
    assert dec <= TOL and enc <= TOL, (dec, enc)


def test_every_layer_comes_from_operations(tiny_ckpt):
    made = []

    class Ops:                           # a comfy.ops-like namespace that records what it builds
        class Conv2d(nn.Conv2d):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                made.append(self)

        class GroupNorm(nn.GroupNorm):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                made.append(self)

        class Linear(nn.Linear):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                made.append(self)

    cfg = dict(ckpt.read_json(os.path.join(tiny_ckpt, "vae", "config.json")), mid_block_add_attention=True,
               use_quant_conv=True, use_post_quant_conv=True)
    m = GlmImageVAE(cfg, dtype=torch.bfloat16, device="cpu", operations=Ops)
    with_params = [mod for mod in m.modules() if any(True for _ in mod.parameters(recurse=False))]
    assert with_params and all(any(mod is x for x in made) for mod in with_params)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())


def test_strict_load_names_the_problem(tmp_path, tiny_ckpt):
    from safetensors.torch import load_file, save_file
    src = os.path.join(tiny_ckpt, "vae")
    dst = tmp_path / "vae"
    dst.mkdir()
    (dst / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    sd = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
    sd.pop("decoder.conv_out.weight")
    sd["quant_conv.weight"] = torch.zeros(32, 32, 1, 1)
    save_file(sd, str(dst / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match="decoder.conv_out.weight") as e:
        NETWORKS["vae"].load(str(dst))
    assert "quant_conv.weight" in str(e.value)


def test_unsupported_block_types_are_refused(tiny_ckpt):
    cfg = dict(ckpt.read_json(os.path.join(tiny_ckpt, "vae", "config.json")))
    cfg["down_block_types"] = ["DownBlock2D"] * 4
    with pytest.raises(ckpt.CheckpointError, match="down_block_types"):
        GlmImageVAE(cfg)


def test_bf16_decode_is_close_to_fp32(tiny_ckpt):
    d = os.path.join(tiny_ckpt, "vae")
    m32, m16 = NETWORKS["vae"].load(d), NETWORKS["vae"].load(d, dtype=torch.bfloat16)
    z = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(7)) * 2
    with torch.no_grad():
        a, b = m32.decode(z), m16.decode(z.bfloat16()).float()
    assert torch.isfinite(b).all() and (a - b).abs().max().item() < 0.1


def test_preview_fit_recovers_a_linear_decoder():
    """fit_latent_to_rgb works in the DiT's normalised space and returns factors as [C][3]."""
    from glm_image_core.loading.configs import GLM_LATENTS_MEAN, GLM_LATENTS_STD
    from glm_image_core.networks.vae import fit_latent_to_rgb
    g = torch.Generator().manual_seed(11)
    true_f, true_b = torch.randn(16, 3, generator=g) * 0.2, torch.randn(3, generator=g) * 0.1
    mean = torch.tensor(GLM_LATENTS_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(GLM_LATENTS_STD).view(1, -1, 1, 1)

    def decode(raw):                      # a "VAE" that is exactly linear in normalised latents, ×8 nearest
        rgb = torch.einsum("bchw,cd->bdhw", (raw - mean) / std, true_f) + true_b.view(1, 3, 1, 1)
        return torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest")

    f, b = fit_latent_to_rgb(decode, 16, 8, GLM_LATENTS_MEAN, GLM_LATENTS_STD)
    assert torch.tensor(f).shape == (16, 3) and torch.tensor(b).shape == (3,)
    assert torch.allclose(torch.tensor(f), true_f, atol=1e-4) and torch.allclose(torch.tensor(b), true_b, atol=1e-4)
