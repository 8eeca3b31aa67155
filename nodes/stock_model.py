"""The GLM-Image DiT as a stock ComfyUI MODEL, so KSampler, SamplerCustomAdvanced, LoRA loaders and
model patches (EasyCache, …) drive it like the models ComfyUI integrates itself.

One network, one patcher: the decoder's DiT is built once, inside ``GLMImageModel`` (a
``comfy.model_base.BaseModel``), and both paths use it — ``GLMImageTokensToLatent`` through
``LazyComponent.network`` (the core ``GlmImageDiT``), the MODEL socket through a clone of the same
patcher. ``GLMImageDiffusionModel`` holds the DiT's own modules under their own names (so weight
keys are ``diffusion_model.transformer_blocks.N…``, diffusers' names) and speaks ComfyUI's calling
convention; the math is the core DiT's.

What ComfyUI's sampling needs to know of GLM-Image:
- flow matching (``ModelType.FLOW``: ``x0 = x - sigma * v``), sigmas fed as they are (multiplier 1);
- the DiT is fed the *unshifted* timestep minus one, computed from sigma and the latent's size
  (``schedule.unshifted_timestep``, ``process_timestep`` below), so any scheduler works and
  ``GLMImageScheduler``'s sigmas reproduce the official schedule exactly;
- LATENTs stay in raw VAE space; ``GLMImageLatentFormat`` maps them to the DiT's (z - mean) / std.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

import comfy.conds
import comfy.latent_formats
import comfy.lora
import comfy.lora_convert
import comfy.sd
import comfy.model_base
import comfy.patcher_extension
import comfy.supported_models_base

from ..glm_image_core.generation import denoise as dn
from ..glm_image_core.quantization import gguf_ops
from ..glm_image_core.loading import memory_plan as mp
from ..glm_image_core.generation import schedule as sch
from ..glm_image_core.networks.dit import GlmImageDiT

log = logging.getLogger("GLM-Image")

# Conditioning keys GLMImageConditioning writes (beside the glyph embeddings in the cross_attn slot).
PRIOR_IDS = "glm_prior_ids"          # [B or 1, N] int64 upsampled AR ids
PRIOR_DROP = "glm_prior_drop"        # True on the negative: the official CFG drops the prior
REFERENCE = "glm_reference"          # dit.ReferenceKVCache, positive only (edits)
DECODER_NAME = "glm_decoder"         # the checkpoint the conditioning was made for


class GLMImageLatentFormat(comfy.latent_formats.LatentFormat):
    """Raw 16-channel VAE latents <-> the DiT's space, (z - mean) / std per channel (the official
    pipeline's latents_mean / latents_std). Preview factors are fitted from the VAE on first use."""
    latent_channels = 16
    spacial_downscale_ratio = 8     # pixels per latent cell (ComfyUI's name; 0.3.75's LatentFormat lacks it)

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, preview: Optional[Callable[[], Optional[tuple]]] = None):
        self.latents_mean = mean.reshape(1, -1, 1, 1).float()
        self.latents_std = std.reshape(1, -1, 1, 1).float()
        self.latent_channels = int(mean.numel())
        self.preview = preview

    def process_in(self, latent):
        return (latent - self.latents_mean.to(latent)) / self.latents_std.to(latent)

    def process_out(self, latent):
        return latent * self.latents_std.to(latent) + self.latents_mean.to(latent)

    def _preview_factors(self):
        return self.preview() if self.preview is not None else None

    @property
    def latent_rgb_factors(self):
        f = self._preview_factors()
        return None if f is None else f[0]

    @property
    def latent_rgb_factors_bias(self):
        f = self._preview_factors()
        return None if f is None else f[1]


class GLMImageModelConfig(comfy.supported_models_base.BASE):
    unet_config = {"disable_unet_model_creation": True}     # the DiT is built by glm_image_core
    sampling_settings = {"multiplier": 1.0}
    memory_usage_factor = 1.0                                # unused: GLMImageModel.memory_required

    def __init__(self, latent_format: GLMImageLatentFormat, shift: float, storage: torch.dtype,
                 compute: torch.dtype):
        super().__init__(self.unet_config)
        self.latent_format = latent_format
        self.sampling_settings = {"multiplier": 1.0, "shift": float(shift)}
        self.manual_cast_dtype = None if compute == storage else compute
        self.supported_inference_dtypes = [compute]


class GLMImageDiffusionModel(torch.nn.Module):
    """The core DiT's modules under their own names, called the way ComfyUI calls a diffusion model."""

    def __init__(self, dit: GlmImageDiT, storage: torch.dtype):
        super().__init__()
        object.__setattr__(self, "network", dit)     # not a submodule: its children are ours
        for name, child in dit.named_children():
            self.add_module(name, child)
        self.dtype = storage

    def forward(self, x, timesteps, context=None, control=None, transformer_options={}, **kwargs):
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._forward, self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                     transformer_options),
        ).execute(x, timesteps, context, control, transformer_options, **kwargs)

    def _forward(self, x, timesteps, context, control, transformer_options, glm_glyph=None, glm_prior_ids=None,
                 glm_prior_drop=False, glm_reference=None, **kwargs):
        if glm_prior_ids is None or glm_glyph is None:
            raise ValueError("GLM-Image's MODEL needs its conditioning from 'GLM-Image Conditioning' (semantic "
                             "tokens + glyph text); text-encoder conditioning (CLIPTextEncode, …) cannot drive it")
        dit = self.network
        B, _, h, w = x.shape
        dtype = x.dtype
        ids = glm_prior_ids.reshape(glm_prior_ids.shape[0], -1)
        ids = dn.batch_to(ids, B, "prior ids")
        n = (h // dit.patch_size) * (w // dit.patch_size)
        if ids.shape[-1] != n:
            raise ValueError(f"the conditioning's semantic tokens are for {ids.shape[-1] // 4} grid cells, but the "
                             f"latent is {w * 8}x{h * 8} pixels ({n // 4} cells): use a latent of the tokens' size "
                             "(EmptySD3LatentImage with the tokens' width and height)")
        ctx = dit.project_glyph(dn.batch_to(glm_glyph, B, "glyph").to(x.device), dtype)
        prior = dit.project_prior(ids, bool(glm_prior_drop), dtype)
        target = torch.tensor([[h * 8, w * 8]], dtype=dtype, device=x.device).repeat(B, 1)
        crop = torch.zeros(B, 2, dtype=dtype, device=x.device)
        temb = dit.time_embed(timesteps.reshape(-1).expand(B), target, crop, dtype)
        cache = glm_reference
        if cache is not None:
            cache = cache.to(device=x.device)
        return dit.forward_multi(x, [ctx], [prior], temb, ["read" if cache is not None else None], cache)[0]


class GLMImageModel(comfy.model_base.BaseModel):
    """GLM-Image's DiT for ComfyUI's samplers (flow matching, raw-VAE LATENTs, GLM conditioning)."""

    def __init__(self, dit: GlmImageDiT, storage: torch.dtype, compute: torch.dtype, scheduler_config: dict,
                 latent_format: GLMImageLatentFormat, device=None):
        # KSampler's schedulers read model_sampling's shift: this checkpoint's at 1024² (GLMImageScheduler
        # computes it for any size).
        shift = sch.mu_for_latent(128, 128, dit.patch_size, scheduler_config)
        config = GLMImageModelConfig(latent_format, shift, storage, compute)
        super().__init__(config, comfy.model_base.ModelType.FLOW, device=device)
        self.diffusion_model = GLMImageDiffusionModel(dit, storage)
        self.scheduler_config = dict(scheduler_config)
        self.dit_config = dict(dit.config)
        self.compute_dtype = compute
        self.scratch_bytes = gguf_ops.dequant_scratch_bytes(dit, compute)    # GGUF: one layer dequantized at a time

    def process_timestep(self, timestep, x=None, **kwargs):
        # timestep = model_sampling.timestep(sigma) = sigma * multiplier (1, or 1000 after ModelSamplingSD3)
        sigma = timestep / float(self.model_sampling.multiplier)
        mu = self.mu_for_latent(x.shape[-2], x.shape[-1])
        return dn.dit_timestep(sch.unshifted_timestep(sigma, self.scheduler_config, mu)).to(timestep.device)

    def mu_for_latent(self, latent_h: int, latent_w: int) -> float:
        """The time shift of this checkpoint (its scheduler config and DiT patch size) for a latent size."""
        return sch.mu_for_latent(latent_h, latent_w, self.diffusion_model.network.patch_size, self.scheduler_config)

    def sigmas(self, width: int, height: int, steps: int) -> torch.Tensor:
        """This checkpoint's sigmas (steps + 1, terminal 0) for an image of width × height pixels: what
        Semantic Tokens → Latent samples with (GLM-Image Scheduler)."""
        r = self.latent_format.spacial_downscale_ratio
        return sch.glm_sigmas(steps, self.scheduler_config, mu=self.mu_for_latent(height // r, width // r))

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        # The glyph tokens join the image tokens in one attention (single stream): they must not be
        # padded or repeated to a common length like cross-attention context (CONDCrossAttn), so they
        # travel as a regular cond that only batches with glyphs of the same length.
        out.pop("c_crossattn", None)
        glyph = kwargs.get("cross_attn", None)
        if glyph is not None:
            out["glm_glyph"] = comfy.conds.CONDRegular(glyph)
        ids = kwargs.get(PRIOR_IDS, None)
        if ids is not None:
            out[PRIOR_IDS] = comfy.conds.CONDRegular(ids)
        out[PRIOR_DROP] = comfy.conds.CONDConstant(bool(kwargs.get(PRIOR_DROP, False)))
        ref = kwargs.get(REFERENCE, None)
        if ref is not None:
            out[REFERENCE] = comfy.conds.CONDConstant(ref)
        return out

    def memory_required(self, input_shape, cond_shapes={}):
        # input_shape: [batch (cond and uncond together), C, h, w]; glyph length unknown here: 256 tokens.
        dtype = self.manual_cast_dtype or self.get_dtype()
        return self.scratch_bytes + mp.dit_activation_bytes(
            self.dit_config, int(input_shape[-1]) * 8, int(input_shape[-2]) * 8, 256, batch=int(input_shape[0]),
            passes=1, dtype_bytes=max(dtype.itemsize, 2))


def wrap_dit(scheduler_config: dict, latent_format: GLMImageLatentFormat):
    """``ComponentSpec.wrap`` for the DiT: core network -> the model its patcher holds."""
    def wrap(dit: GlmImageDiT, storage: torch.dtype, compute: torch.dtype) -> GLMImageModel:
        return GLMImageModel(dit, storage, compute, scheduler_config, latent_format)
    return wrap


# ---- LoRA keys ----------------------------------------------------------------------------------
# ComfyUI maps LoRA keys per model class (comfy.lora.model_lora_keys_unet, isinstance branches); its
# generic rule covers ComfyUI's own "diffusion_model.<key>" format. GLM-Image LoRAs written by
# diffusers / PEFT trainers name the diffusers modules directly, with or without "transformer.":
# the DiT keeps diffusers' names, so both map one to one.

def glm_lora_key_map(model, key_map: dict) -> dict:
    if isinstance(model, GLMImageModel):
        for k in model.state_dict().keys():
            if k.startswith("diffusion_model.") and k.endswith(".weight"):
                name = k[len("diffusion_model."):-len(".weight")]
                key_map[name] = k
                key_map["transformer." + name] = k
                key_map["base_model.model." + name] = k
    return key_map


# What a LoRA that fits none of the DiT's layers was most likely made for (first match wins).
FOREIGN_LORA_HINTS = (
    (("language_model.", "lm_head", "model.visual.", ".visual.blocks.", "vision_language_encoder"),
     "GLM-Image's autoregressive model (the AR), not its DiT: the MODEL output is the DiT"),
    (("lora_unet_", "lora_te", "input_blocks.", "down_blocks.", "double_blocks.", "joint_blocks."),
     "another diffusion model (its layer names are not GLM-Image's)"),
)


def check_lora_fits(model, lora: dict) -> None:
    """Refuse, with what was wrong, a LoRA of which no key fits the GLM-Image DiT (ComfyUI itself only
    logs 'lora key not loaded' and returns the model unchanged)."""
    if not isinstance(getattr(model, "model", None), GLMImageModel) or not lora:
        return
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map, log_missing=False):
        return
    keys = sorted(lora)
    guess = next((what for marks, what in FOREIGN_LORA_HINTS if any(m in k for k in keys for m in marks)),
                 "another model")
    raise ValueError(f"this LoRA fits none of the GLM-Image DiT's layers ({len(keys)} tensors, e.g. "
                     f"{', '.join(repr(k) for k in keys[:3])}): it looks like a LoRA for {guess}. GLM-Image DiT "
                     "LoRAs name the DiT's modules, e.g. 'transformer_blocks.0.attn1.to_q.lora_A.weight' or "
                     "'diffusion_model.transformer_blocks.0.attn1.to_q.lora_up.weight'")


def install_lora_keys() -> None:
    """Extend ComfyUI's LoRA key map with GLM-Image's diffusers names, and make its LoRA loading refuse a
    LoRA that fits none of the DiT's layers (once; other models untouched)."""
    for name in ("load_lora_for_models", "load_bypass_lora_for_models"):
        load = getattr(comfy.sd, name, None)
        if load is not None and not getattr(load, "glm_image", False):
            setattr(comfy.sd, name, _checked_lora_loader(load))
    original = comfy.lora.model_lora_keys_unet
    if getattr(original, "glm_image", False):
        return

    def model_lora_keys_unet(model, key_map={}):
        key_map = original(model, key_map)
        return glm_lora_key_map(model, key_map)

    model_lora_keys_unet.glm_image = True
    model_lora_keys_unet.__wrapped__ = original
    comfy.lora.model_lora_keys_unet = model_lora_keys_unet


def _checked_lora_loader(load):
    def load_checked(model, clip, lora, *args, **kwargs):
        check_lora_fits(model, lora)
        return load(model, clip, lora, *args, **kwargs)
    load_checked.glm_image = True
    load_checked.__wrapped__ = load
    return load_checked
