"""Load GLM-Image: an official diffusers-style folder under ComfyUI's models/diffusers/."""

from __future__ import annotations

import os

import torch
from comfy_api.latest import io

import folder_paths

from ..glm_image_core import checkpoint as ckpt
from .models import WEIGHT_DTYPES, ComponentSpec, GLMARModel, GLMDecoderModel, LazyComponent
from .types import CATEGORY, GlmAR, GlmDecoder


def glm_image_folders() -> list[str]:
    """Names (relative to a models/diffusers root) of folders whose model_index.json names GlmImagePipeline."""
    found = []
    for root in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            if ckpt.is_glm_image_folder(os.path.join(root, name)):
                found.append(name)
    return sorted(set(found))


def resolve_folder(name: str) -> str:
    for root in folder_paths.get_folder_paths("diffusers"):
        path = os.path.join(root, name)
        if os.path.commonpath([os.path.abspath(path), os.path.abspath(root)]) != os.path.abspath(root):
            continue   # never leave the models/diffusers roots
        if os.path.isdir(path):
            return path
    raise ckpt.CheckpointError(f"GLM-Image model folder {name!r} not found under models/diffusers "
                               f"(searched: {', '.join(folder_paths.get_folder_paths('diffusers'))})")


def load_ar_handle(folder: str, weight_dtype: str) -> GLMARModel:
    from ..glm_image_core import ar_model, ar_prompt
    comp = os.path.join(folder, "vision_language_encoder")
    config = ckpt.read_json(os.path.join(comp, "config.json"))
    gen_path = os.path.join(comp, "generation_config.json")
    generation = ckpt.read_json(gen_path) if os.path.isfile(gen_path) else {}
    spec = ComponentSpec("AR model", comp, role="text_encoder", weight_dtype=weight_dtype,
                         build=lambda dt, dev, ops: ar_model.load_ar(comp, dtype=dt, device=dev, operations=ops))
    tokenizer = ar_prompt.GlmTokenizer.from_folder(os.path.join(folder, "processor"))
    return GLMARModel(folder=folder, model=LazyComponent(spec), tokenizer=tokenizer,
                      processor_config=ar_prompt.read_processor_config(os.path.join(folder, "processor")),
                      generation_config=generation, config=config)


def load_decoder_handle(folder: str, weight_dtype: str) -> GLMDecoderModel:
    from ..glm_image_core import dit, glyph
    dit_dir = os.path.join(folder, "transformer")
    te_dir = os.path.join(folder, "text_encoder")
    dit_config = ckpt.read_json(os.path.join(dit_dir, "config.json"))
    vae_config = ckpt.read_json(os.path.join(folder, "vae", "config.json"))
    sched = ckpt.read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    c = int(dit_config["in_channels"])
    mean = torch.tensor(vae_config.get("latents_mean") or [0.0] * c, dtype=torch.float32)
    std = torch.tensor(vae_config.get("latents_std") or [1.0] * c, dtype=torch.float32)
    if mean.numel() != c or std.numel() != c:
        raise ckpt.CheckpointError(f"vae/config.json latents_mean/std have {mean.numel()}/{std.numel()} values; "
                                   f"the DiT has {c} latent channels")
    dit_spec = ComponentSpec("DiT", dit_dir, weight_dtype=weight_dtype,
                             build=lambda dt, dev, ops: dit.load_dit(dit_dir, dtype=dt, device=dev, operations=ops))
    # The glyph encoder is small and numerically sensitive (T5): keep it as stored unless fp32 is asked.
    te_dtype = "fp32" if weight_dtype == "fp32" else "default"
    te_spec = ComponentSpec("glyph encoder", te_dir, role="text_encoder", weight_dtype=te_dtype,
                            build=lambda dt, dev, ops: glyph.load_glyph_encoder(te_dir, dtype=dt, device=dev,
                                                                                 operations=ops))
    return GLMDecoderModel(folder=folder, dit=LazyComponent(dit_spec), glyph_encoder=LazyComponent(te_spec),
                           glyph_tokenizer=glyph.ByT5Tokenizer.from_folder(os.path.join(folder, "tokenizer")),
                           dit_config=dit_config, scheduler_config=sched, latents_mean=mean, latents_std=std)


class GLMImageLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GLMImageLoader",
            display_name="Load GLM-Image",
            category=CATEGORY,
            description="Loads an official GLM-Image folder (diffusers layout, e.g. models/diffusers/GLM-Image/). "
                        "Weights are read lazily, the first time a stage needs them.",
            inputs=[
                io.Combo.Input("model", options=glm_image_folders(),
                               tooltip="A folder under models/diffusers/ whose model_index.json names GlmImagePipeline."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="Storage dtype of the AR and DiT weights. 'default' keeps the file's dtype."),
            ],
            outputs=[
                GlmAR.Output("ar", display_name="ar", tooltip="The autoregressive model (text → semantic tokens)."),
                GlmDecoder.Output("decoder", display_name="decoder",
                                  tooltip="DiT + glyph encoder (semantic tokens → latent)."),
                io.Vae.Output("vae", display_name="vae", tooltip="GLM-Image's 16-channel VAE, for the stock VAE nodes."),
            ],
        )

    @classmethod
    def validate_inputs(cls, model, weight_dtype) -> bool | str:
        if model not in glm_image_folders():
            return (f"GLM-Image folder {model!r} not found under models/diffusers/ (found: "
                    f"{', '.join(glm_image_folders()) or 'none'}); put the official GLM-Image folder there")
        if weight_dtype not in WEIGHT_DTYPES:
            return f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}"
        return True

    @classmethod
    def fingerprint_inputs(cls, model, weight_dtype):
        # Re-load when the folder's files change (not only when the name changes).
        try:
            folder = resolve_folder(model)
        except ckpt.CheckpointError:
            return float("nan")
        stamp = []
        for comp in ckpt.COMPONENTS:
            d = os.path.join(folder, comp)
            if os.path.isdir(d):
                for n in sorted(os.listdir(d)):
                    st = os.stat(os.path.join(d, n))
                    stamp.append((comp, n, st.st_size, st.st_mtime_ns))
        return (model, weight_dtype, tuple(stamp))

    @classmethod
    def execute(cls, model, weight_dtype) -> io.NodeOutput:
        from .vae_adapter import load_glm_vae, preview_fit_for
        folder = resolve_folder(model)
        ckpt.check_glm_image_folder(folder)
        ar = load_ar_handle(folder, weight_dtype)
        decoder = load_decoder_handle(folder, weight_dtype)
        vae = load_glm_vae(os.path.join(folder, "vae"))
        # Latent previews: fitted from this VAE the first time the decoder node asks for a previewer.
        decoder.preview_fit = preview_fit_for(vae, decoder.latents_mean, decoder.latents_std)
        return io.NodeOutput(ar, decoder, vae)
