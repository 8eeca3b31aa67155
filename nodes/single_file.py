"""Single-file GLM-Image loaders: one small node per component file in ComfyUI's usual folders.

    models/text_encoders/     AR model       -> Load GLM-Image AR (single file)        -> GLM_AR
    models/text_encoders/     glyph encoder  -> Load GLM-Image Glyph Encoder           -> GLM_GLYPH_ENCODER
    models/diffusion_models/  DiT            -> Load GLM-Image DiT (+ glyph encoder)   -> GLM_DECODER
    models/vae/               VAE            -> Load GLM-Image VAE (single file)       -> VAE

The outputs are the folder loader's socket types, so every other node works unchanged. The files
are written by ``scripts/convert_to_single_file.py`` (configs and tokenizers in the safetensors
metadata); detection, metadata and error messages live in ``glm_image_core.loading.single_file``.
"""

from __future__ import annotations

import os

from .api import io

import folder_paths

from ..glm_image_core.loading import checkpoint as ckpt
from ..glm_image_core.loading import single_file as sf
from ..glm_image_core.loading import sources
from ..glm_image_core.loading.registry import NETWORKS, Network
from .loader import ar_handle, decoder_handle, glyph_encoder_handle
from .models import COMPUTE_DTYPES
from .types import CATEGORY, GlmAR, GlmDecoder, GlmGlyphEncoder
from .vae_adapter import load_glm_vae, preview_fit_for

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


def safetensors_files(folder: str) -> list[str]:
    """The .safetensors files ComfyUI lists under a models folder."""
    try:
        names = folder_paths.get_filename_list(folder)
    except KeyError:
        return []
    return sorted(n for n in names if n.lower().endswith(SAFETENSORS_SUFFIXES))


def gguf_files(folder: str) -> list[str]:
    """The .gguf files under a models folder's roots (ComfyUI's own lists leave .gguf out, so that its
    stock loaders never offer them), as names relative to their root, like ComfyUI's lists."""
    try:
        roots = folder_paths.get_folder_paths(folder)
    except KeyError:
        return []
    names = set()
    for root in roots:                     # ComfyUI's own walk (the one its lists use), .gguf kept
        files, _ = folder_paths.recursive_search(root, excluded_dir_names=[".git"])
        names.update(folder_paths.filter_files_extensions(files, {".gguf"}))
    return sorted(names)


def weight_files(folder: str) -> list[str]:
    """What a single-file loader offers: safetensors files, then GGUF files (DiT / AR)."""
    return safetensors_files(folder) + gguf_files(folder)


def resolve_file(folder: str, name: str, gguf: bool = False) -> str:
    """Full path of ``name`` under ComfyUI's ``models/<folder>/`` roots; refuses names that are not
    safetensors (or GGUF, where ``gguf``) before opening anything."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise ckpt.CheckpointError(f"{name!r} not found under models/{folder}/ (searched: "
                                   f"{', '.join(folder_paths.get_folder_paths(folder))})")
    if gguf and ckpt.is_gguf(path):
        return path
    try:
        ckpt.check_safetensors_path(path)
    except ckpt.CheckpointError as e:
        raise ckpt.CheckpointError(f"{e}{' or GGUF (.gguf, scripts/convert_to_single_file.py --dtype gguf_*)' if gguf else ''}") from None
    return path


def open_component(folder: str, name: str, component: str) -> sources.SingleFileSource:
    return sf.open_single_file(resolve_file(folder, name, NETWORKS[component].takes_gguf), component)


def check_file(folder: str, name: str, component: str) -> bool | str:
    """validate_inputs helper: True, or the reason the file cannot be loaded as ``component``."""
    try:
        open_component(folder, name, component)
    except ckpt.CheckpointError as e:
        return str(e)
    return True


def check_choice(name: str, value: str, allowed) -> bool | str:
    return True if value in allowed else f"{name} must be one of {', '.join(allowed)}, got {value!r}"


def first_problem(*checks) -> bool | str:
    """validate_inputs' answer: the first check that is not True, else True."""
    return next((c for c in checks if c is not True), True)


def file_stamp(folder: str, name: str):
    """Re-load when the file changes, not only when its name does."""
    path = folder_paths.get_full_path(folder, name)
    if path is None or not os.path.isfile(path):
        return float("nan")
    st = os.stat(path)
    return (name, st.st_size, st.st_mtime_ns)


def _compute_dtype_input():
    return io.Combo.Input("compute_dtype", options=list(COMPUTE_DTYPES), default="auto", optional=True,
                          tooltip="Dtype of the activations; weights stored otherwise are cast layer by layer "
                                  "(comfy.ops). 'auto': bf16/fp16 where the device has it, else fp32.")


_FP8_TOOLTIP = ("Storage dtype of the weights. 'default' keeps the file's dtypes (an fp8-converted file stays "
                "fp8; a GGUF file's blocks stay quantized, any other choice dequantizes them at load); "
                "fp8_e4m3fn/fp8_e5m2 store the Linear weights of the transformer blocks in fp8, the "
                "rest (norms, biases, embeddings, timestep MLPs) in the compute dtype.")


class SingleFileLoader(io.ComfyNode):
    """What the four single-file loaders share: the file list, validation, the re-load fingerprint
    and opening the file; each subclass names its network (a registry id: its models/ folder, the
    weight dtypes it takes and why others are refused come from there), its file input and what it
    makes of the opened file (:meth:`load`)."""
    NETWORK: str = ""
    FILE_INPUT: str = ""

    @classmethod
    def entry(cls) -> Network:
        return NETWORKS[cls.NETWORK]

    @classmethod
    def schema(cls, display_name: str, description: str, inputs: list, outputs: list) -> io.Schema:
        return io.Schema(node_id=cls.__name__, display_name=display_name, category=CATEGORY,
                         description=description, inputs=inputs, outputs=outputs)

    @classmethod
    def file_input(cls, tooltip: str):
        net = cls.entry()
        folder = net.comfy_folder
        options = weight_files(folder) if net.takes_gguf else safetensors_files(folder)
        return io.Combo.Input(cls.FILE_INPUT, options=options, tooltip=tooltip)

    @classmethod
    def weight_dtype_input(cls, tooltip: str):
        return io.Combo.Input("weight_dtype", options=list(cls.entry().weight_dtype_options), default="default",
                              tooltip=tooltip)

    @classmethod
    def validate_inputs(cls, weight_dtype, compute_dtype="auto", **inputs) -> bool | str:
        net = cls.entry()
        dtype_ok = check_choice("weight_dtype", weight_dtype, net.weight_dtype_options)
        if dtype_ok is not True and net.refused:
            dtype_ok = f"{dtype_ok} ({net.refused})"
        return first_problem(dtype_ok, check_choice("compute_dtype", compute_dtype, COMPUTE_DTYPES),
                             check_file(net.comfy_folder, inputs.get(cls.FILE_INPUT), cls.NETWORK))

    @classmethod
    def fingerprint_inputs(cls, weight_dtype, compute_dtype="auto", **inputs):
        return (file_stamp(cls.entry().comfy_folder, inputs.get(cls.FILE_INPUT)), weight_dtype, compute_dtype)

    @classmethod
    def execute(cls, weight_dtype, compute_dtype="auto", **inputs) -> io.NodeOutput:
        src = open_component(cls.entry().comfy_folder, inputs.pop(cls.FILE_INPUT), cls.NETWORK)
        return io.NodeOutput(*cls.load(src, weight_dtype, compute_dtype, **inputs))

    @classmethod
    def load(cls, src: sources.SingleFileSource, weight_dtype: str, compute_dtype: str, **links) -> tuple:
        raise NotImplementedError


class GLMImageARLoader(SingleFileLoader):
    NETWORK, FILE_INPUT = "ar", "ar_name"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            display_name="Load GLM-Image AR (single file)",
            description="Loads GLM-Image's autoregressive model from one safetensors or GGUF file in "
                        "models/text_encoders/ (written by scripts/convert_to_single_file.py; tokenizer and configs are in its metadata). "
                        "Weights are read the first time Text → Semantic Tokens runs.",
            inputs=[
                cls.file_input("A GLM-Image AR single file (…_ar.safetensors, or …_ar_gguf_q4_k.gguf etc.: quantized "
                               "blocks stay quantized in memory) in models/text_encoders/."),
                cls.weight_dtype_input(_FP8_TOOLTIP),
                _compute_dtype_input(),
            ],
            outputs=[GlmAR.Output("ar", display_name="ar", tooltip="The autoregressive model (text → semantic tokens).")],
        )

    @classmethod
    def load(cls, src, weight_dtype, compute_dtype):
        return (ar_handle(src, weight_dtype, compute_dtype),)


class GLMImageGlyphEncoderLoader(SingleFileLoader):
    NETWORK, FILE_INPUT = "glyph_encoder", "glyph_encoder_name"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            display_name="Load GLM-Image Glyph Encoder (single file)",
            description="Loads GLM-Image's ByT5 glyph encoder (it encodes the quoted text of the prompt) from one "
                        "safetensors file in models/text_encoders/. Connect it to Load GLM-Image DiT.",
            inputs=[
                cls.file_input("A GLM-Image glyph encoder single file (…_glyph_encoder.safetensors) "
                               "in models/text_encoders/."),
                cls.weight_dtype_input("Storage dtype of the glyph encoder's weights; 'default' keeps the file's "
                                       f"dtype; {cls.entry().refused}."),
            ],
            outputs=[GlmGlyphEncoder.Output("glyph_encoder", display_name="glyph_encoder",
                                            tooltip="Goes into Load GLM-Image DiT's glyph_encoder input.")],
        )

    @classmethod
    def load(cls, src, weight_dtype, compute_dtype):
        return (glyph_encoder_handle(src, weight_dtype),)


class GLMImageDiTLoader(SingleFileLoader):
    NETWORK, FILE_INPUT = "dit", "dit_name"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            display_name="Load GLM-Image DiT (single file)",
            description="Loads GLM-Image's diffusion transformer from one safetensors or GGUF file in models/diffusion_models/ "
                        "and joins it with a glyph encoder into the decoder that Semantic Tokens → Latent takes. "
                        "Its metadata carries the schedule and the latent statistics.",
            inputs=[
                cls.file_input("A GLM-Image DiT single file (…_dit.safetensors, or …_dit_gguf_q4_k.gguf etc.: quantized "
                               "blocks stay quantized in memory) in models/diffusion_models/ or models/unet/."),
                GlmGlyphEncoder.Input("glyph_encoder",
                                      tooltip="From Load GLM-Image Glyph Encoder: the DiT's text conditioning "
                                              "(quoted text in the prompt) needs it."),
                cls.weight_dtype_input(_FP8_TOOLTIP),
                _compute_dtype_input(),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional: GLM-Image's VAE, only for latent previews while sampling (when "
                                     "ComfyUI shows previews); the folder loader wires this itself."),
            ],
            outputs=[GlmDecoder.Output("decoder", display_name="decoder",
                                       tooltip="DiT + glyph encoder (semantic tokens → latent)."),
                     io.Model.Output("dit_model", display_name="MODEL",
                                     tooltip="The DiT as a stock MODEL (same weights as 'decoder'), for KSampler / "
                                             "SamplerCustomAdvanced with GLM-Image Conditioning, LoRA loaders and "
                                             "model patches.")],
        )

    @classmethod
    def load(cls, src, weight_dtype, compute_dtype, glyph_encoder=None, vae=None):
        decoder = decoder_handle(src, glyph_encoder, weight_dtype, compute_dtype)
        if vae is not None:
            decoder.preview_fit = preview_fit_for(vae, decoder.latents_mean, decoder.latents_std)
        return decoder, decoder.stock_model()


class GLMImageVAELoader(SingleFileLoader):
    NETWORK, FILE_INPUT = "vae", "vae_name"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            display_name="Load GLM-Image VAE (single file)",
            description="Loads GLM-Image's 16-channel VAE from one safetensors file in models/vae/ as a stock "
                        "ComfyUI VAE (VAE Decode/Encode and their tiled versions work with it).",
            inputs=[
                cls.file_input("A GLM-Image VAE single file (…_vae.safetensors) in models/vae/."),
                cls.weight_dtype_input("Storage and compute dtype of the VAE ('default': bf16 where the device "
                                       f"has it, else fp32); {cls.entry().refused}."),
            ],
            outputs=[io.Vae.Output("vae", display_name="vae", tooltip="GLM-Image's 16-channel VAE.")],
        )

    @classmethod
    def load(cls, src, weight_dtype, compute_dtype):
        return (load_glm_vae(src, weight_dtype),)


NODES = [GLMImageARLoader, GLMImageGlyphEncoderLoader, GLMImageDiTLoader, GLMImageVAELoader]
