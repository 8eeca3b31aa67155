"""GLM-Image components under ComfyUI's model management.

Each network (AR, DiT, glyph encoder) is built from `glm_image_core` with `comfy.ops` layers on
the offload device, wrapped in a `ModelPatcher`, and moved with `load_models_gpu` right before
use, so ComfyUI evicts one stage to make room for the next and partially loads (lowvram) what
does not fit. Weights are read on first use, not when the loader node runs: a graph whose AR
output is cached never reads the AR weights at all.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import latent_preview
from comfy.cli_args import LatentPreviewMethod, args

from ..glm_image_core.loading import checkpoint as ckpt
from ..glm_image_core.quantization import gguf_ops
from ..glm_image_core.loading import sources
from ..glm_image_core.loading.registry import NETWORKS, STORAGE_DTYPES, Network
from . import host

log = logging.getLogger("GLM-Image")

# Storage dtype of the weights. fp8: only the Linear weights of the DiT's and AR's repeated blocks
# (biases, norms, embeddings, timestep MLPs stay in the compute dtype; see checkpoint.storage_dtypes).
WEIGHT_DTYPES = {"default": None, **STORAGE_DTYPES}
# Dtype of the activations; weights stored otherwise are cast per layer by comfy.ops (manual cast).
# "auto": ComfyUI's choice for the load device (bf16/fp16 on GPUs that have them, fp32 on CPU).
COMPUTE_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def stored_dtype(weight_files: Sequence[str]) -> torch.dtype:
    """The floating dtype a component's weights are stored in (read from the files' headers): fp8
    when any tensor is fp8 (a file converted to fp8 keeps its small tensors in higher precision),
    else the dtype of most parameters (a GGUF file: of its tensors that are not block-quantized)."""
    counts: dict = {}
    for p in weight_files:
        for st_dtype, shape in ckpt.weights_header(p)[1].values():
            dt = ckpt.SAFETENSORS_FLOAT_DTYPES.get(st_dtype)
            if dt is not None:
                counts[dt] = counts.get(dt, 0) + math.prod(shape)
    fp8 = [dt for dt in counts if ckpt.is_fp8(dt)]
    if fp8:
        return max(fp8, key=counts.get)
    return max(counts, key=counts.get) if counts else torch.float32


def gguf_operations(base: type) -> type:
    """``base`` (the comfy.ops namespace picked for the float weights) whose Linear and Embedding keep
    GGUF blocks (glm_image_core.quantization.gguf_ops): ComfyUI's own cast path moves a Linear's uint8 blocks to the
    compute device — whole under a full load, layer by layer under --lowvram / dynamic VRAM — and the
    layer dequantizes them there, in the input's dtype, for its one product. The AR looks its embedding
    rows up where the table lives (``gguf_ops.embedding_rows``)."""
    class Embedding(gguf_ops.QuantizedWeightMixin, base.Embedding):
        def forward(self, ids, *args, **kwargs):
            if self.ggml is None:
                return super().forward(ids, *args, **kwargs)
            return gguf_ops.embedding_rows(self, ids, kwargs.get("out_dtype") or torch.float32)

    class Linear(gguf_ops.QuantizedWeightMixin, base.Linear):
        def forward(self, x, *args, **kwargs):
            if self.ggml is None:
                return super().forward(x, *args, **kwargs)
            # The weight's patches (ComfyUI's own functions: a LoRA's LowVramPatch, a trainer's adapters)
            # apply to the dequantized weight, never to the blocks, which are fetched as stored.
            patches, self.weight_function = self.weight_function, []
            try:
                weight, bias, offload = comfy.ops.cast_bias_weight(self, x, dtype=self.weight.dtype, device=x.device,
                                                                   bias_dtype=x.dtype, offloadable=True)
            finally:
                self.weight_function = patches
            try:
                w = self.dequantized(weight, x.dtype)
                for patch in weight_patches(self, patches):
                    try:
                        w = patch(w)
                    except RuntimeError as e:
                        if "shape" not in str(e):
                            raise
                        raise ValueError(GGUF_TRAINING_REFUSED) from None
                return torch.nn.functional.linear(x, w.to(x.dtype), bias)
            finally:
                comfy.ops.uncast_bias_weight(self, weight, bias, offload)
    Linear.__name__ = Linear.__qualname__ = f"GGUF{base.Linear.__name__}"
    Embedding.__name__ = Embedding.__qualname__ = f"GGUF{base.Embedding.__name__}"
    return gguf_ops.quantized_ops(base, Linear, Embedding)


# A weight function sized for the stored blocks instead of the weight: what ComfyUI 0.3.75's Train LoRA makes
# (it sizes its adapters from ``module.weight.shape``, the uint8 blocks here, inline where nothing can help it).
GGUF_TRAINING_REFUSED = ("GLM-Image: this ComfyUI's Train LoRA cannot train on GGUF-quantized weights: it sizes its "
                         "adapters from the stored blocks, not from the weights they hold. Train on ComfyUI 0.33 or "
                         "newer (GGUF trains there, bypass_mode on or off), or on the DiT stored in fp8 (Load GLM-Image "
                         "or Load GLM-Image DiT with weight_dtype fp8_e4m3fn, half the bf16 memory) or bf16; the "
                         "trained LoRA then loads on the GGUF DiT.")


class _LogicalWeight:
    """What ComfyUI's Train LoRA is shown of a GGUF layer when it makes the layer's adapter: a weight of the
    logical (float) shape on the blocks' device, which is all the trainer reads (shape and device). An
    expanded scalar: no memory. The blocks themselves keep their own shape, which ComfyUI's memory
    accounting (dynamic VRAM's allocations included) must see."""

    def __init__(self, layer):
        self.weight = torch.empty((), device=layer.weight.device).expand(layer.ggml[1])


def install_gguf_training() -> None:
    """Make ComfyUI's Train LoRA size a GGUF layer's adapter from the weight the blocks hold (once, GGUF
    layers only). The adapter is then ComfyUI's own: a weight wrapper applied to the dequantized weight
    (``gguf_operations``' Linear), or in bypass_mode a forward hook around the layer — QLoRA, frozen blocks
    and a float LoRA, with ComfyUI's trainer and adapters. The trainer module is found by its file, as
    ComfyUI loads comfy_extras under their paths; a trainer that makes adapters inline (0.3.75) is left
    as it is, and its shape error becomes GGUF_TRAINING_REFUSED."""
    for module in list(sys.modules.values()):
        path = (getattr(module, "__file__", None) or "").replace(os.sep, "/")
        create = getattr(module, "_create_weight_adapter", None) if path.endswith("comfy_extras/nodes_train.py") else None
        if create is None or getattr(create, "glm_image", False):
            continue

        def create_weight_adapter(layer, *args, _create=create, **kwargs):
            return _create(_LogicalWeight(layer) if getattr(layer, "ggml", None) is not None else layer, *args, **kwargs)
        create_weight_adapter.glm_image = True
        create_weight_adapter.__wrapped__ = create
        module._create_weight_adapter = create_weight_adapter


class GGUFPatcherMixin:
    """Put before the host's patcher class for a network holding GGUF blocks: a weight patch (a LoRA) is
    never merged into blocks, as ComfyUI merges patches into float weights on a full load. The blocks
    are moved as stored, and ComfyUI's own ``LowVramPatch`` is kept on the layer (``glm_weight_patch``)
    until the model is unpatched; ``gguf_operations``' Linear applies it to the dequantized weight in
    each forward, as --lowvram does for every streamed layer (city96's ComfyUI-GGUF does the same)."""

    def patch_weight_to_device(self, key, *args, **kwargs):
        layer = quantized_layer(self.model, key)
        if layer is None or key not in self.patches:
            return super().patch_weight_to_device(key, *args, **kwargs)
        patches = self.patches.pop(key)
        try:
            out = super().patch_weight_to_device(key, *args, **kwargs)
        finally:
            self.patches[key] = patches
        layer.glm_weight_patch = comfy.model_patcher.LowVramPatch(key, self.patches)
        return out

    def unpatch_model(self, device_to=None, unpatch_weights=True, *args, **kwargs):
        if unpatch_weights:             # (a partial reload unpatches without it and keeps patched layers)
            for _, layer in gguf_ops.quantized_layers(self.model):
                layer.glm_weight_patch = None
        return super().unpatch_model(device_to, unpatch_weights, *args, **kwargs)

    def clone(self, *args, **kwargs):
        # ComfyUI's clone picks the plain ModelPatcher class for a non-dynamic delegate: keep the mixin.
        n = super().clone(*args, **kwargs)
        n.__class__ = gguf_patcher(type(n))
        return n


_GGUF_PATCHERS: dict = {}


def gguf_patcher(base: type) -> type:
    """``base`` (a patcher class) with :class:`GGUFPatcherMixin`, one class per base."""
    if issubclass(base, GGUFPatcherMixin):
        return base
    if base not in _GGUF_PATCHERS:
        _GGUF_PATCHERS[base] = type(f"GGUF{base.__name__}", (GGUFPatcherMixin, base), {})
    return _GGUF_PATCHERS[base]


def weight_patches(layer, weight_function: list) -> list:
    """What a GGUF layer applies to its dequantized weight: its weight functions (a streamed layer's
    LowVramPatch, a trainer's adapters) and the patch kept from a full load, unless a LowVramPatch of
    the same key is already among them."""
    kept = getattr(layer, "glm_weight_patch", None)
    if kept is None or any(getattr(f, "key", None) == kept.key for f in weight_function):
        return list(weight_function)
    return [kept] + list(weight_function)


def quantized_layer(model: torch.nn.Module, key: str):
    """The layer whose GGUF blocks ``key`` ("<module>.weight") names, else None."""
    name, _, param = key.rpartition(".")
    if param != "weight":
        return None
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        return None
    return layer if getattr(layer, "ggml", None) is not None else None


def keeps_blocks(spec: "ComponentSpec") -> bool:
    """A GGUF file loaded as stored: its block-quantized weights stay blocks in memory (an explicit
    weight_dtype dequantizes them at load instead)."""
    return spec.weight_dtype == "default" and any(ckpt.is_gguf(f) for f in spec.weight_files)


@dataclass(frozen=True)
class ComponentSpec:
    """How to build one network: registry id ``network`` (AR: of ``parts`` only) with its config and
    weights from ``source`` (an official folder or a single file), stored and computing as asked.
    ``wrap(network, weight_dtype, compute_dtype)``, when given, makes the model the patcher holds
    (the DiT: a ComfyUI BaseModel around it, see stock_model)."""
    network: str
    source: sources.Source
    weight_dtype: str = "default"
    compute_dtype: str = "auto"
    parts: Tuple[str, ...] = ()
    wrap: Optional[Callable[[torch.nn.Module, torch.dtype, torch.dtype], torch.nn.Module]] = None

    @property
    def entry(self) -> Network:
        return NETWORKS[self.network]

    @property
    def name(self) -> str:
        return f"{self.entry.short}{' (' + '+'.join(self.parts) + ')' if self.parts else ''}"

    @property
    def weight_files(self) -> Sequence[str]:
        return self.source.weight_files(self.network)

    def build(self, weight: torch.dtype, device: torch.device, operations, compute: torch.dtype) -> torch.nn.Module:
        return sources.build_network(self.source, self.network, weight, device, operations, compute,
                                     **({"parts": self.parts} if self.parts else {}))


class LazyComponent:
    """A network built on first use and kept in a ModelPatcher for ComfyUI to move around."""

    def __init__(self, spec: ComponentSpec):
        self.spec = spec
        self._patcher: Optional[comfy.model_patcher.ModelPatcher] = None
        self._lock = threading.Lock()
        self.load_device, self.offload_device = host.main_devices()

    def dtypes(self):
        """(weight storage dtype, compute dtype) for this component on its load device; a compute
        dtype the network does not run in is refused by the registry when it is built."""
        weight = WEIGHT_DTYPES[self.spec.weight_dtype] or stored_dtype(self.spec.weight_files)
        compute = COMPUTE_DTYPES[self.spec.compute_dtype]
        if compute is None:
            compute = mm.unet_manual_cast(weight, self.load_device, list(self.spec.entry.compute)) or weight
        return weight, compute

    @property
    def patcher(self) -> comfy.model_patcher.ModelPatcher:
        with self._lock:
            if self._patcher is None:
                self._patcher = self.build_patcher()
            return self._patcher

    def build_patcher(self, disable_dynamic: bool = False) -> comfy.model_patcher.ModelPatcher:
        """Build the network from its files and wrap it in a new patcher (the core class, or the plain
        ModelPatcher when ``disable_dynamic``)."""
        weight, compute = self.dtypes()
        ops = comfy.ops.pick_operations(weight, compute, load_device=self.load_device)
        if keeps_blocks(self.spec):
            ops = gguf_operations(ops)
        log.info("GLM-Image: loading %s (%s weights, %s compute) from %s",
                 self.spec.name, weight, compute, self.spec.source.name)
        network = self.spec.build(weight, self.offload_device, ops, compute)
        network.train(False).requires_grad_(False)
        model = network if self.spec.wrap is None else self.spec.wrap(network, weight, compute)
        patcher = host.new_patcher(model, self.load_device, self.offload_device, disable_dynamic=disable_dynamic,
                                   patcher_class=gguf_patcher if keeps_blocks(self.spec) else None)
        patcher.glm_compute_dtype = compute
        patcher.glm_network = network
        # GGUF blocks are dequantized one layer at a time: room for the widest layer's float copy
        patcher.glm_scratch_bytes = gguf_ops.dequant_scratch_bytes(network, compute)
        # ComfyUI >= 0.2x builds a private copy of a model from this factory, as for its own loaders:
        # the stock trainer's clone(force_deepcopy=True), dynamic VRAM's non-dynamic delegate.
        patcher.cached_patcher_init = (rebuilt_patcher, (self.spec,))
        return patcher

    @property
    def network(self) -> torch.nn.Module:
        """The glm_image_core network (inside the patcher's model when ``spec.wrap`` made one)."""
        return self.patcher.glm_network

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.patcher.glm_compute_dtype

    def load(self, memory_required: int = 0) -> torch.nn.Module:
        """Make the network ready on its load device (ComfyUI frees/evicts what it must)."""
        p = self.patcher
        mm.load_models_gpu([p], memory_required=memory_required + p.glm_scratch_bytes)
        return p.glm_network

    def patched(self, patches: dict, strength: float) -> "LazyComponent":
        """This network with ComfyUI weight patches (a LoRA: ``comfy.lora.load_lora``'s output) added at
        ``strength`` on a clone of its patcher, as the stock LoraLoader does for a MODEL: the weights are
        shared, patched when ComfyUI loads the clone and restored when it loads the base."""
        return PatchedComponent(self, patches, strength)

    def fresh(self) -> "LazyComponent":
        """The same network built anew from its files when first used (its own weights, none shared):
        for training, whose weights must not be the inference tensors ComfyUI's execution makes."""
        return LazyComponent(self.spec)

    def fully_resident(self) -> bool:
        """Every weight sits on the load device and stays there while the network runs: not partially
        loaded (lowvram streaming) and not under dynamic VRAM, which may page weights in and out
        behind a forward's back. Only then may a CUDA graph keep pointers to them across tokens."""
        p = self.patcher
        dynamic = getattr(p, "is_dynamic", lambda: False)()
        return not dynamic and p.loaded_size() >= p.model_size()


class PatchedComponent(LazyComponent):
    """A LazyComponent whose patcher is a clone of ``base``'s carrying weight patches (see
    :meth:`LazyComponent.patched`); built when first used, like the base."""

    def __init__(self, base: LazyComponent, patches: dict, strength: float):
        super().__init__(base.spec)
        self.base, self.patches, self.strength = base, patches, strength

    def build_patcher(self, disable_dynamic: bool = False) -> comfy.model_patcher.ModelPatcher:
        base = self.base.patcher
        patcher = base.clone()
        for attr in ("glm_compute_dtype", "glm_network", "glm_scratch_bytes"):
            setattr(patcher, attr, getattr(base, attr))
        patcher.add_patches(self.patches, self.strength)
        return patcher

    def fresh(self) -> "LazyComponent":
        return self.base.fresh().patched(self.patches, self.strength)


def rebuilt_patcher(spec: ComponentSpec, disable_dynamic: bool = False) -> comfy.model_patcher.ModelPatcher:
    """The ``cached_patcher_init`` factory: the same network built afresh from its files."""
    return LazyComponent(spec).build_patcher(disable_dynamic=disable_dynamic)


@dataclass
class GLMARModel:
    """Payload of the GLM_AR socket. The AR is two networks built from the same files: ``model``, the
    text part (decoder + lm_head, all Text → Semantic Tokens needs) and ``vision``, the vision tower +
    VQ (built and loaded only when Reference Edit tokenises a reference), so a text-to-image run
    never puts the vision weights on the device."""
    folder: str
    model: LazyComponent               # ar_model.GlmImageAR(parts=("text",))
    vision: LazyComponent              # ar_model.GlmImageAR(parts=("vision",))
    tokenizer: object                  # glm_image_core.generation.ar_prompt.GlmTokenizer
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
class GLMGlyphEncoder:
    """Payload of the GLM_GLYPH_ENCODER socket (single-file glyph encoder loader -> DiT loader)."""
    source: str
    encoder: LazyComponent
    tokenizer: object                  # glm_image_core.generation.glyph_text.ByT5Tokenizer


@dataclass
class GLMDecoderModel:
    """Payload of the GLM_DECODER socket: DiT + glyph encoder + latent statistics + schedule."""
    folder: str
    dit: LazyComponent
    glyph_encoder: LazyComponent
    glyph_tokenizer: object            # glm_image_core.generation.glyph_text.ByT5Tokenizer
    dit_config: dict
    scheduler_config: dict
    latents_mean: torch.Tensor         # [C]
    latents_std: torch.Tensor          # [C]
    preview_factors: Optional[tuple] = None   # (rgb factors [C][3], bias [3]) fitted on normalised latents
    preview_fit: Optional[Callable[[], tuple]] = field(default=None, repr=False)   # computes preview_factors once

    def latent_preview_factors(self) -> Optional[tuple]:
        """(Latent2RGB factors [C][3], bias [3]) for latents in the DiT's normalised space, or None when
        previews are off (``--preview-method none``, ComfyUI's default) or no factors can be had.
        Factors not yet known are fitted once, on first use, from the VAE (``preview_fit``)."""
        if args.preview_method == LatentPreviewMethod.NoPreviews:
            return None
        if self.preview_factors is None and self.preview_fit is not None:
            fit, self.preview_fit = self.preview_fit, None      # one attempt only
            try:
                self.preview_factors = fit()
            except Exception as e:  # a preview must never break sampling
                log.warning("GLM-Image: could not fit latent preview factors (%s); previews disabled", e)
        return self.preview_factors

    def previewer(self):
        """A ComfyUI Latent2RGB previewer for normalised latents, or None (see latent_preview_factors)."""
        f = self.latent_preview_factors()
        return None if f is None else latent_preview.Latent2RGBPreviewer(*f)

    def stock_model(self) -> comfy.model_patcher.ModelPatcher:
        """The MODEL socket's payload: a clone of the DiT's patcher — the same weights and memory
        accounting, with patches (LoRA, …) of its own. Builds the DiT (weights in the file's dtype
        stay mapped from the file until sampling pages them in)."""
        return self.dit.patcher.clone()

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
