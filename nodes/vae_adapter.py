"""GLM-Image's VAE as a stock ComfyUI ``VAE``.

``load_glm_vae`` returns a real ``comfy.sd.VAE`` (a small subclass that only replaces the
constructor): its ``first_stage_model`` is ``glm_image_core.networks.vae.GlmImageVAE`` built with
``comfy.ops`` layers and wrapped in a ``ModelPatcher``. Everything else, ``decode``,
``decode_tiled``, ``encode``, ``encode_tiled``, batching, OOM fallback to tiling and loading /
offloading through ``comfy.model_management``, is ComfyUI's own code, so the stock ``VAEDecode``,
``VAEDecodeTiled``, ``VAEEncode`` and ``VAEEncodeTiled`` nodes work unchanged.

Latent convention: RAW VAE space (posterior mode), ``[B, 16, H/8, W/8]``, as every ComfyUI VAE;
the DiT node de-normalises its output (``z * latents_std + latents_mean``) before handing it out.

The VAE works in the dtypes of its registry entry (bf16 and fp32: it overflows in fp16); ComfyUI's
global ``--fp16-vae`` falls back to one of them with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Sequence, Tuple

import torch

import comfy.model_management as mm
import comfy.ops
import comfy.sd

from . import host
from ..glm_image_core.loading import sources
from ..glm_image_core.loading.registry import NETWORKS, STORAGE_DTYPES
from ..glm_image_core.networks.vae import GlmImageVAE, VaeConfig, fit_latent_to_rgb

log = logging.getLogger("GLM-Image")

VAE = NETWORKS["vae"]
WORKING_DTYPES = list(VAE.compute)

# The SD/SDXL KL-VAE ComfyUI's memory constants were measured on (ch 128, mult 1,2,4,4).
_SD_BLOCKS = (128, 256, 512, 512)


def _decoder_activation_cells(blocks: Sequence[int]) -> float:
    """Channels × (pixels per latent cell) summed over the decoder's resolution levels."""
    rev = list(reversed(blocks))
    return float(sum(c * 4 ** i for i, c in enumerate(rev)))


def _encoder_activation_cells(blocks: Sequence[int]) -> float:
    """Channels × (cells per input pixel) summed over the encoder's resolution levels."""
    return float(sum(c / 4 ** i for i, c in enumerate(blocks)))


def choose_vae_dtype(device: torch.device, weight_dtype: str = "default") -> torch.dtype:
    """bf16 or fp32 for this device: ComfyUI's ``vae_dtype`` policy restricted to the dtypes the
    registry says the VAE works in (a global --fp16-vae falls back, with the reason, to bf16/fp32)."""
    if weight_dtype not in VAE.weight_dtype_options:
        raise ValueError(f"weight_dtype must be one of {', '.join(VAE.weight_dtype_options)}, got {weight_dtype!r} "
                         f"({VAE.refused})")
    dtype = STORAGE_DTYPES.get(weight_dtype) or mm.vae_dtype(device, WORKING_DTYPES)
    if dtype not in WORKING_DTYPES:
        dtype = torch.bfloat16 if mm.should_use_bf16(device) else torch.float32
        log.warning("GLM-Image VAE: %s; using %s instead", VAE.refused, dtype)
    if dtype == torch.bfloat16 and not mm.is_device_cpu(device) and not mm.should_use_bf16(device):
        dtype = torch.float32
    return dtype


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _quiet(text: str):
    root = logging.getLogger()
    f = _DropMessage(text)
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


class GlmImageComfyVAE(comfy.sd.VAE):
    """``comfy.sd.VAE`` around a loaded ``GlmImageVAE``. Only ``__init__`` differs from the base class."""

    def __init__(self, model: GlmImageVAE, vae_dtype: torch.dtype, device: torch.device,
                 offload_device: torch.device):
        # Let the host's own constructor set every default attribute its methods read (whatever the
        # ComfyUI version): with an empty state dict it stops at "No VAE weights detected". Then
        # set what describes our network. The empty-sd warning is not shown to users.
        try:
            with _quiet("No VAE weights detected"):
                super().__init__(sd={})
        except Exception:      # a future constructor that refuses an empty state dict: set all below
            pass
        cfg: VaeConfig = model.config
        ratio = cfg.scale_factor
        dec_scale = _decoder_activation_cells(cfg.block_out_channels) / _decoder_activation_cells(_SD_BLOCKS)
        enc_scale = _encoder_activation_cells(cfg.block_out_channels) / _encoder_activation_cells(_SD_BLOCKS)
        # ComfyUI's AutoencoderKL estimates (comfy/sd.py), scaled by this config's activation widths.
        self.memory_used_encode = lambda shape, dtype: (1767 * shape[2] * shape[3]) * mm.dtype_size(dtype) * enc_scale
        self.memory_used_decode = lambda shape, dtype: (2178 * shape[2] * shape[3] * 64) * mm.dtype_size(dtype) * dec_scale
        self.downscale_ratio = ratio
        self.upscale_ratio = ratio
        self.latent_channels = cfg.latent_channels
        self.latent_dim = 2
        self.output_channels = cfg.out_channels
        self.process_input = lambda image: image * 2.0 - 1.0
        # In place, and returned: ComfyUI >= 0.18 calls it on a slice of its output buffer and ignores
        # the return value; older hosts use the return value.
        self.process_output = lambda image: image.add_(1.0).div_(2.0).clamp_(0.0, 1.0)
        self.working_dtypes = list(WORKING_DTYPES)
        self.disable_offload = False
        self.not_video = False
        self.size = None
        self.downscale_index_formula = None
        self.upscale_index_formula = None
        self.extra_1d_channel = None
        self.crop_input = True

        self.first_stage_model = model.train(False)
        self.device = device
        self.vae_dtype = vae_dtype
        self.output_device = mm.intermediate_device()
        self.patcher = host.new_patcher(self.first_stage_model, device, offload_device)
        self.glm_config = cfg
        log.info("GLM-Image VAE load device: %s, offload device: %s, dtype: %s", device, offload_device, vae_dtype)
        self.model_size()


def load_glm_vae(src: sources.Source, weight_dtype: str = "default") -> comfy.sd.VAE:
    """The VAE of ``src`` (an official folder or a VAE single file) as a ComfyUI VAE: the one way the
    pack loads a VAE.

    Weights are read now (like the stock VAELoader), stored in the VAE working dtype (bf16 where
    the load device supports it, else fp32) on ComfyUI's VAE offload device.
    """
    device = mm.vae_device()
    offload = mm.vae_offload_device()
    dtype = choose_vae_dtype(device, weight_dtype)
    model = sources.build_network(src, "vae", dtype, offload, comfy.ops.disable_weight_init)
    return GlmImageComfyVAE(model, dtype, device, offload)


# --------------------------------------------------------------------------------------
# Latent → RGB preview factors
# --------------------------------------------------------------------------------------

@torch.no_grad()
def _decode_raw(vae_model, raw: torch.Tensor) -> torch.Tensor:
    """Decode raw latents to unclamped [-1, 1]-convention pixels (float32, CPU)."""
    if isinstance(vae_model, comfy.sd.VAE):
        mm.load_models_gpu([vae_model.patcher],
                           memory_required=vae_model.memory_used_decode(raw.shape, vae_model.vae_dtype),
                           force_full_load=vae_model.disable_offload)
        out = vae_model.first_stage_model.decode(raw.to(vae_model.device, vae_model.vae_dtype))
    else:
        p = next(vae_model.parameters())
        out = vae_model.decode(raw.to(p.device, p.dtype))
    return out.float().cpu()


def fit_preview_factors(vae_model, latents_mean, latents_std, size: int = 12, batch: int = 4,
                        seed: int = 0) -> Tuple[list, list]:
    """Least-squares linear map from NORMALISED latents (the DiT's space) to preview RGB.

    Returns ``(factors [C][3], bias [3])`` for ``latent_preview.Latent2RGBPreviewer``, which computes
    ``rgb = x0 @ factors + bias`` per latent cell and shows it as ``(rgb + 1) / 2``, i.e. RGB in the
    [-1, 1] convention. See ``glm_image_core.networks.vae.fit_latent_to_rgb`` for the fit itself.

    ``vae_model``: a ``comfy.sd.VAE`` (the decode then goes through ComfyUI's model management:
    the VAE is loaded on its load device like for VAEDecode) or a ``GlmImageVAE`` (run where its
    weights are).
    """
    first = vae_model.first_stage_model if isinstance(vae_model, comfy.sd.VAE) else vae_model
    return fit_latent_to_rgb(lambda raw: _decode_raw(vae_model, raw), first.config.latent_channels,
                             first.config.scale_factor, latents_mean, latents_std, size=size, batch=batch, seed=seed)


def preview_fit_for(vae: comfy.sd.VAE, latents_mean: torch.Tensor, latents_std: torch.Tensor):
    """A zero-argument callable that fits preview factors for ``vae`` when first needed."""
    def fit():
        t0 = time.perf_counter()
        out = fit_preview_factors(vae, latents_mean, latents_std)
        log.info("GLM-Image: fitted latent preview factors in %.2f s", time.perf_counter() - t0)
        return out
    return fit
