"""Load GLM-Image AR LoRA: a LoRA file from models/loras/ applied to the AR through ComfyUI's patcher.

The tensors become ComfyUI weight patches (``comfy.lora.load_lora``, ComfyUI's own LoRA adapters) on
clones of the AR's two patchers (its text part and its vision tower), like the stock LoraLoader does
for a MODEL: patched when ComfyUI loads the AR, unpatched when it loads the base or another clone,
counted by model management, streamed under --lowvram / dynamic VRAM, cast for fp8 storage and
applied to the dequantized weight of a GGUF layer. Which key patches which layer, and the scale of a
PEFT adapter, come from ``glm_image_core.loading.adapters``.
"""

from __future__ import annotations

import dataclasses
import os

import torch

import comfy.lora
import comfy.utils
import folder_paths

from ..glm_image_core.loading import adapters
from ..glm_image_core.loading import checkpoint as ckpt
from ..glm_image_core.loading.registry import NETWORKS
from ..glm_image_core.networks import ar_model
from .api import io
from .models import GLMARModel
from .single_file import file_stamp, safetensors_files
from .types import CATEGORY, GlmAR

AR = NETWORKS["ar"]
# The AR under the diffusers pipeline's attribute name (``pipe.vision_language_encoder.<module>``).
DIFFUSERS_PREFIXES = ("vision_language_encoder",)
# What a LoRA that fits none of the AR's layers was most likely made for (first match wins).
FOREIGN_LORA_HINTS = (
    (("transformer_blocks.", "diffusion_model.", "image_projector", "glyph_projector"),
     "GLM-Image's DiT, not its AR: load it with LoraLoaderModelOnly on the MODEL output of Load GLM-Image"),
    (("lora_unet_", "input_blocks.", "down_blocks.", "double_blocks.", "joint_blocks."),
     "another diffusion model (its layer names are not GLM-Image's)"),
    (("embed_tokens", "lora_embedding_"), "the token embeddings; this loader patches the AR's Linear layers"),
    (("model.layers.", "self_attn.q_proj"), "another language model (its layer names are not GLM-Image's AR)"),
)


def lora_path(name: str) -> str:
    """The file under models/loras/; only safetensors is read (never a pickle)."""
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise ckpt.CheckpointError(f"LoRA {name!r} not found under models/loras/ "
                                   f"(searched: {', '.join(folder_paths.get_folder_paths('loras'))})")
    ckpt.check_safetensors_path(path)
    return path


def peft_config_beside(path, name: str):
    """The PEFT ``adapter_config.json`` in the file's folder; a clear error when it is not there."""
    cfg = os.path.join(os.path.dirname(path), adapters.PEFT_CONFIG) if path else None
    if cfg is None or not os.path.isfile(cfg):
        raise ckpt.CheckpointError(
            f"{name} is a PEFT adapter (keys 'base_model.model.…lora_A/B') but no {adapters.PEFT_CONFIG} is beside "
            "it: its scale (lora_alpha / r) is only in that file. Keep the folder PEFT's save_pretrained wrote "
            "(adapter_model.safetensors + adapter_config.json) together under models/loras/")
    with open(cfg, encoding="utf-8") as f:
        return adapters.read_peft_config(f.read(), cfg)


def ar_patches(ar: GLMARModel, lora: dict, name: str, path=None) -> dict:
    """ComfyUI weight patches {AR weight key: adapter} from a LoRA state dict (read from the file at
    ``path``, where a PEFT adapter's config sits beside it); refuses, with what was wrong, keys that
    fit no AR layer, shapes of another model and what cannot be applied."""
    lora = dict(lora)
    skeleton = AR.skeleton(ar.config)                     # meta device: names and shapes only
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    linears = [n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)]
    kmap = adapters.key_map(linears, DIFFUSERS_PREFIXES)
    matched = adapters.match(lora, kmap)
    what = f"AR LoRA {name}"
    if matched.unmatched or not matched.modules:
        raise ckpt.CheckpointError(f"{what}: " + adapters.describe_unmatched(
            matched.unmatched or sorted(lora), AR.title, FOREIGN_LORA_HINTS))
    ranks = adapters.check_shapes({k: tuple(v.shape) for k, v in lora.items()}, matched, shapes, what)
    peft = [m for m in ranks if m.startswith(adapters.PEFT_PREFIX) and f"{m}.alpha" not in lora]
    config = peft_config_beside(path, name) if peft else None
    refused = adapters.adapter_warnings(config) + \
        [f"{k}: DoRA magnitude vectors are not applied by this loader" for k in lora if "lora_magnitude_vector" in k]
    if refused:
        raise ckpt.CheckpointError(f"{what}: {refused[0]}")
    if config is not None:
        lora.update({k: torch.tensor(v) for k, v in adapters.peft_alphas(config, {m: ranks[m] for m in peft}).items()})
    return comfy.lora.load_lora(lora, kmap, log_missing=False)


def with_lora(ar: GLMARModel, patches: dict, strength: float) -> GLMARModel:
    """The GLM_AR whose text part and vision tower carry ``patches`` (split by part) at ``strength``."""
    parts = {p: {k: v for k, v in patches.items() if ar_model.part_of_key(k) == p} for p in ar_model.ALL_PARTS}
    return dataclasses.replace(
        ar, model=ar.model.patched(parts["text"], strength) if parts["text"] else ar.model,
        vision=ar.vision.patched(parts["vision"], strength) if parts["vision"] else ar.vision)


class GLMImageARLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GLMImageARLoraLoader",
            display_name="Load GLM-Image AR LoRA",
            category=CATEGORY,
            description="Applies a LoRA to GLM-Image's autoregressive model (what is drawn and where): a PEFT "
                        "adapter (adapter_model.safetensors with its adapter_config.json beside it), a LoRA saved "
                        "by GLM-Image Train AR LoRA / SaveLoRA, or diffusers/kohya names. Chain several to stack them.",
            inputs=[
                GlmAR.Input("ar", tooltip="From Load GLM-Image, Load GLM-Image AR or another AR LoRA loader."),
                io.Combo.Input("lora_name", options=safetensors_files("loras"),
                               tooltip="A LoRA for GLM-Image's AR in models/loras/ (safetensors)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="How strongly the LoRA changes the AR; 0 gives the base model."),
            ],
            outputs=[GlmAR.Output("ar_with_lora", display_name="ar", tooltip="The AR with the LoRA applied.")],
        )

    @classmethod
    def validate_inputs(cls, lora_name, strength=1.0) -> bool | str:
        try:
            lora_path(lora_name)
        except ckpt.CheckpointError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, lora_name, strength=1.0, ar=None):
        return (file_stamp("loras", lora_name), strength)

    @classmethod
    def execute(cls, ar, lora_name, strength=1.0) -> io.NodeOutput:
        if strength == 0:                  # the base model, bit for bit (as the stock LoraLoader does)
            return io.NodeOutput(ar)
        path = lora_path(lora_name)
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        return io.NodeOutput(with_lora(ar, ar_patches(ar, lora, lora_name, path), strength))


class GLMImageARLoraModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GLMImageARLoraModelLoader",
            display_name="Load GLM-Image AR LoRA Model",
            category=CATEGORY,
            description="Applies a LORA_MODEL (the output of GLM-Image Train AR LoRA) to GLM-Image's AR without a "
                        "file, as the stock Load LoRA Model does for a MODEL.",
            inputs=[
                GlmAR.Input("ar", tooltip="From Load GLM-Image or another AR LoRA loader."),
                io.Custom("LORA_MODEL").Input("lora", tooltip="From GLM-Image Train AR LoRA."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="How strongly the LoRA changes the AR; 0 gives the base model."),
            ],
            outputs=[GlmAR.Output("ar_with_lora", display_name="ar", tooltip="The AR with the LoRA applied.")],
        )

    @classmethod
    def execute(cls, ar, lora, strength=1.0) -> io.NodeOutput:
        if strength == 0:
            return io.NodeOutput(ar)
        return io.NodeOutput(with_lora(ar, ar_patches(ar, lora, "LORA_MODEL"), strength))


NODES = [GLMImageARLoraLoader, GLMImageARLoraModelLoader]
