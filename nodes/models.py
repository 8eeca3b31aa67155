"""GLM-Image components under ComfyUI's model management.

Each network (AR, DiT, glyph encoder) is built from `glm_image_core` with `comfy.ops` layers on
the offload device, wrapped in a `ModelPatcher`, and moved with `load_models_gpu` right before
use, so ComfyUI evicts one stage to make room for the next and partially loads (lowvram) what
does not fit. Weights are read on first use, not when the loader node runs: a graph whose AR
output is cached never reads the AR weights at all.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops

from ..glm_image_core import checkpoint as ckpt

log = logging.getLogger("GLM-Image")

WEIGHT_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def stored_dtype(component_dir: str) -> torch.dtype:
    """The floating dtype most of a component's weights are stored in (read from safetensors headers)."""
    from safetensors import safe_open
    counts: dict = {}
    for p in ckpt.weight_files(component_dir):
        with safe_open(p, framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}.get(sl.get_dtype())
                if dt is not None:
                    n = 1
                    for s in sl.get_shape():
                        n *= s
                    counts[dt] = counts.get(dt, 0) + n
    return max(counts, key=counts.get) if counts else torch.float32


@dataclass
class ComponentSpec:
    """How to build one network: `build(dtype, device, operations) -> nn.Module` with weights loaded."""
    name: str
    component_dir: str
    build: Callable[[torch.dtype, torch.device, object], torch.nn.Module]
    weight_dtype: str = "default"
    role: str = "diffusion"            # "diffusion" | "text_encoder": picks ComfyUI's device policy
    supported_compute: tuple = (torch.bfloat16, torch.float16, torch.float32)


class LazyComponent:
    """A network built on first use and kept in a ModelPatcher for ComfyUI to move around."""

    def __init__(self, spec: ComponentSpec):
        self.spec = spec
        self._patcher: Optional[comfy.model_patcher.ModelPatcher] = None
        self._lock = threading.Lock()
        if spec.role == "text_encoder":
            self.load_device, self.offload_device = mm.text_encoder_device(), mm.text_encoder_offload_device()
        else:
            self.load_device, self.offload_device = mm.get_torch_device(), mm.unet_offload_device()

    def dtypes(self):
        """(weight storage dtype, compute dtype) for this component on its load device."""
        weight = WEIGHT_DTYPES[self.spec.weight_dtype] or stored_dtype(self.spec.component_dir)
        compute = mm.unet_manual_cast(weight, self.load_device, list(self.spec.supported_compute)) or weight
        return weight, compute

    @property
    def patcher(self) -> comfy.model_patcher.ModelPatcher:
        with self._lock:
            if self._patcher is None:
                weight, compute = self.dtypes()
                ops = comfy.ops.pick_operations(weight, compute, load_device=self.load_device)
                log.info("GLM-Image: loading %s (%s weights, %s compute) from %s",
                         self.spec.name, weight, compute, self.spec.component_dir)
                model = self.spec.build(weight, self.offload_device, ops)
                model.train(False).requires_grad_(False)
                self._patcher = comfy.model_patcher.ModelPatcher(
                    model, load_device=self.load_device, offload_device=self.offload_device)
                self._patcher.glm_compute_dtype = compute
            return self._patcher

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.patcher.glm_compute_dtype

    def load(self, memory_required: int = 0) -> torch.nn.Module:
        """Make the network ready on its load device (ComfyUI frees/evicts what it must)."""
        p = self.patcher
        mm.load_models_gpu([p], memory_required=memory_required)
        return p.model


@dataclass
class GLMARModel:
    """Payload of the GLM_AR socket."""
    folder: str
    model: LazyComponent
    tokenizer: object                  # glm_image_core.ar_prompt.GlmTokenizer
    processor_config: dict             # image processor settings (patch size, pixel range, mean/std)
    generation_config: dict
    config: dict                       # vision_language_encoder/config.json

    @property
    def codebook_size(self) -> int:
        return int(self.config["vq_config"]["num_embeddings"])

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.folder))


@dataclass
class GLMDecoderModel:
    """Payload of the GLM_DECODER socket: DiT + glyph encoder + latent statistics + schedule."""
    folder: str
    dit: LazyComponent
    glyph_encoder: LazyComponent
    glyph_tokenizer: object            # glm_image_core.glyph.ByT5Tokenizer
    dit_config: dict
    scheduler_config: dict
    latents_mean: torch.Tensor         # [C]
    latents_std: torch.Tensor          # [C]
    preview_factors: Optional[tuple] = None   # (rgb factors [C][3], bias [3]) fitted on normalised latents
    preview_fit: Optional[Callable[[], tuple]] = field(default=None, repr=False)   # computes preview_factors once

    def previewer(self):
        """A ComfyUI Latent2RGB previewer for latents in the DiT's normalised space, or None when
        previews are off (``--preview-method none``, ComfyUI's default) or no factors can be had.
        Factors not yet known are fitted once, on first use, from the VAE (``preview_fit``)."""
        from comfy.cli_args import LatentPreviewMethod, args
        if args.preview_method == LatentPreviewMethod.NoPreviews:
            return None
        if self.preview_factors is None and self.preview_fit is not None:
            fit, self.preview_fit = self.preview_fit, None      # one attempt only
            try:
                self.preview_factors = fit()
            except Exception as e:  # a preview must never break sampling
                log.warning("GLM-Image: could not fit latent preview factors (%s); previews disabled", e)
        if self.preview_factors is None:
            return None
        import latent_preview
        factors, bias = self.preview_factors
        return latent_preview.Latent2RGBPreviewer(factors, bias)

    @property
    def codebook_size(self) -> int:
        return int(self.dit_config["prior_vq_quantizer_codebook_size"])

    @property
    def latent_channels(self) -> int:
        return int(self.dit_config["in_channels"])

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.folder))

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent -> the DiT's normalised space: (z - mean) / std per channel."""
        m = self.latents_mean.view(1, -1, 1, 1).to(raw)
        s = self.latents_std.view(1, -1, 1, 1).to(raw)
        return (raw - m) / s

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The DiT's normalised space -> raw VAE latent: z * std + mean per channel."""
        m = self.latents_mean.view(1, -1, 1, 1).to(z)
        s = self.latents_std.view(1, -1, 1, 1).to(z)
        return z * s + m
