"""Load GLM-Image: an official diffusers-style folder under ComfyUI's models/diffusers/."""

from __future__ import annotations

import os

from .api import io

import folder_paths

from ..glm_image_core.loading import checkpoint as ckpt
from ..glm_image_core.loading import sources
from ..glm_image_core.loading.registry import NETWORKS
from .models import (COMPUTE_DTYPES, WEIGHT_DTYPES, ComponentSpec, GLMARModel, GLMDecoderModel, GLMGlyphEncoder,
                     LazyComponent)
from .stock_model import GLMImageLatentFormat, wrap_dit
from .types import CATEGORY, GlmAR, GlmDecoder
from .vae_adapter import load_glm_vae, preview_fit_for


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


def ar_handle(src: sources.Source, weight_dtype: str, compute_dtype: str = "auto") -> GLMARModel:
    """The GLM_AR payload from an official folder or an AR single file (weights read on first use)."""
    assets = sources.ar_assets(src)

    def part(ar_part: str) -> LazyComponent:
        return LazyComponent(ComponentSpec("ar", src, weight_dtype, compute_dtype, parts=(ar_part,)))
    return GLMARModel(folder=src.name, model=part("text"), vision=part("vision"), tokenizer=assets.tokenizer,
                      processor_config=assets.processor_config, generation_config=assets.generation_config,
                      config=assets.config)


def glyph_encoder_handle(src: sources.Source, weight_dtype: str = "default", compute_dtype: str = "auto") -> GLMGlyphEncoder:
    """The glyph encoder (ByT5) and its tokenizer from an official folder or a glyph-encoder single file."""
    spec = ComponentSpec("glyph_encoder", src, weight_dtype, compute_dtype)
    return GLMGlyphEncoder(source=src.name, encoder=LazyComponent(spec), tokenizer=sources.glyph_tokenizer(src))


def decoder_handle(src: sources.Source, glyph: GLMGlyphEncoder, weight_dtype: str,
                   compute_dtype: str = "auto") -> GLMDecoderModel:
    """The GLM_DECODER payload: the DiT from an official folder or a DiT single file, plus a glyph encoder."""
    assets = sources.decoder_assets(src)
    latent_format = GLMImageLatentFormat(assets.latents_mean, assets.latents_std)
    spec = ComponentSpec("dit", src, weight_dtype, compute_dtype, wrap=wrap_dit(assets.scheduler_config, latent_format))
    decoder = GLMDecoderModel(folder=src.name, dit=LazyComponent(spec), glyph_encoder=glyph.encoder,
                              glyph_tokenizer=glyph.tokenizer, dit_config=assets.dit_config,
                              scheduler_config=assets.scheduler_config, latents_mean=assets.latents_mean,
                              latents_std=assets.latents_std)
    latent_format.preview = decoder.latent_preview_factors      # stock samplers' previews: the same fit
    return decoder


# Load GLM-Image's one weight_dtype applies to each network as its registry entry says (storage_for).

def load_ar_handle(folder: str, weight_dtype: str, compute_dtype: str = "auto") -> GLMARModel:
    return ar_handle(sources.FolderSource(folder), NETWORKS["ar"].storage_for(weight_dtype), compute_dtype)


def load_decoder_handle(folder: str, weight_dtype: str, compute_dtype: str = "auto") -> GLMDecoderModel:
    src = sources.FolderSource(folder)
    glyph = glyph_encoder_handle(src, NETWORKS["glyph_encoder"].storage_for(weight_dtype))
    return decoder_handle(src, glyph, NETWORKS["dit"].storage_for(weight_dtype), compute_dtype)


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
                               tooltip="Storage dtype of the AR and DiT weights. 'default' keeps the file's dtype; "
                                       "fp8_e4m3fn/fp8_e5m2 store the Linear weights of their transformer blocks "
                                       "in fp8 (half of bf16's memory), the rest in the compute dtype."),
                io.Combo.Input("compute_dtype", options=list(COMPUTE_DTYPES), default="auto", optional=True,
                               tooltip="Dtype of the AR's and DiT's activations; weights stored otherwise are cast "
                                       "layer by layer. 'auto': bf16/fp16 where the device has it, else fp32."),
            ],
            outputs=[
                GlmAR.Output("ar", display_name="ar", tooltip="The autoregressive model (text → semantic tokens)."),
                GlmDecoder.Output("decoder", display_name="decoder",
                                  tooltip="DiT + glyph encoder (semantic tokens → latent)."),
                io.Vae.Output("vae", display_name="vae", tooltip="GLM-Image's 16-channel VAE, for the stock VAE nodes."),
                io.Model.Output("dit_model", display_name="MODEL",
                                tooltip="The DiT as a stock MODEL (same weights as 'decoder'), for KSampler / "
                                        "SamplerCustomAdvanced with GLM-Image Conditioning, LoRA loaders and "
                                        "model patches."),
            ],
        )

    @classmethod
    def validate_inputs(cls, model, weight_dtype, compute_dtype="auto") -> bool | str:
        if model not in glm_image_folders():
            return (f"GLM-Image folder {model!r} not found under models/diffusers/ (found: "
                    f"{', '.join(glm_image_folders()) or 'none'}); put the official GLM-Image folder there")
        if weight_dtype not in WEIGHT_DTYPES:
            return f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}"
        if compute_dtype not in COMPUTE_DTYPES:
            return f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}"
        return True

    @classmethod
    def fingerprint_inputs(cls, model, weight_dtype, compute_dtype="auto"):
        # Re-load when the folder's files change (not only when the name changes).
        try:
            folder = resolve_folder(model)
        except ckpt.CheckpointError:
            return float("nan")
        stamp = []
        for comp in ckpt.OFFICIAL_FOLDERS:
            d = os.path.join(folder, comp)
            if os.path.isdir(d):
                for n in sorted(os.listdir(d)):
                    st = os.stat(os.path.join(d, n))
                    stamp.append((comp, n, st.st_size, st.st_mtime_ns))
        return (model, weight_dtype, compute_dtype, tuple(stamp))

    @classmethod
    def execute(cls, model, weight_dtype, compute_dtype="auto") -> io.NodeOutput:
        folder = resolve_folder(model)
        ckpt.check_glm_image_folder(folder)
        ar = load_ar_handle(folder, weight_dtype, compute_dtype)
        decoder = load_decoder_handle(folder, weight_dtype, compute_dtype)
        vae = load_glm_vae(sources.FolderSource(folder))
        # Latent previews: fitted from this VAE the first time the decoder node asks for a previewer.
        decoder.preview_fit = preview_fit_for(vae, decoder.latents_mean, decoder.latents_std)
        return io.NodeOutput(ar, decoder, vae, decoder.stock_model())
