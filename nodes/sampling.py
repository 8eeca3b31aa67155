"""The stock-sampler path: GLM-Image's conditioning and schedule for KSampler / SamplerCustomAdvanced
driving the DiT's MODEL (stock_model). GLMImageTokensToLatent stays the exact, one-node path; this
path reproduces it with SamplerCustomAdvanced + CFGGuider + euler + GLMImageScheduler."""

from __future__ import annotations

from .api import io

import comfy.model_management as mm

from ..glm_image_core.generation import denoise as dn
from ..glm_image_core.loading import memory_plan as mp
from ..glm_image_core.generation.tokens import upsample_grid
from .decoder import check_inputs, glyphs_for
from .stock_model import DECODER_NAME, PRIOR_DROP, PRIOR_IDS, REFERENCE, GLMImageModel
from .types import CATEGORY, GlmDecoder, GlmGlyph, GlmReference, GlmTokens


class GLMImageConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GLMImageConditioning",
            display_name="GLM-Image Conditioning",
            category=CATEGORY,
            description="GLM-Image's DiT conditioning as stock CONDITIONING, for KSampler / CFGGuider with the "
                        "MODEL output of Load GLM-Image. positive: the semantic tokens, the glyph text and the "
                        "reference images; negative: what the official CFG runs unconditionally (empty glyph "
                        "text, the tokens dropped, no reference). Use a latent of the tokens' size.",
            inputs=[
                GlmDecoder.Input("decoder", tooltip="From Load GLM-Image (encodes the glyph text)."),
                GlmTokens.Input("tokens", tooltip="From Text → Semantic Tokens or Load Tokens; sets the image size."),
                GlmGlyph.Input("glyph", optional=True,
                               tooltip="Glyph text regions; default: the quoted spans of the tokens' prompt."),
                GlmGlyph.Input("negative_glyph", optional=True,
                               tooltip="Glyph conditioning of the negative; default: empty text (official)."),
                GlmReference.Input("reference", optional=True,
                                   tooltip="Reference images for editing (the same output fed to Text → Semantic "
                                           "Tokens); written once into the DiT's key/value cache here."),
            ],
            outputs=[io.Conditioning.Output("positive", display_name="positive"),
                     io.Conditioning.Output("negative", display_name="negative")],
        )

    @classmethod
    def execute(cls, decoder, tokens, glyph=None, negative_glyph=None, reference=None) -> io.NodeOutput:
        check_inputs(decoder, tokens, reference)
        glyph, negative_glyph = glyphs_for(decoder, tokens, glyph, negative_glyph)
        ids = upsample_grid(tokens.grid)                                   # [B, N]
        pos = {PRIOR_IDS: ids, DECODER_NAME: decoder.name}
        neg = {PRIOR_IDS: ids, PRIOR_DROP: True, DECODER_NAME: decoder.name}
        if reference is not None and len(reference):
            pos[REFERENCE] = reference_cache(decoder, reference)
        return io.NodeOutput([[glyph.embeds, pos]], [[negative_glyph.embeds, neg]])


def reference_cache(decoder, reference):
    """The references' keys/values, written once by the DiT at timestep 0 (the pipeline's step 6)."""
    dtype = decoder.dit.compute_dtype
    ref_tokens = sum(4 * r.ar_ids.numel() for r in reference.items)
    biggest = max(reference.items, key=lambda r: r.width * r.height)
    dit = decoder.dit.load(memory_required=mp.dit_activation_bytes(
        decoder.dit_config, biggest.width, biggest.height, 0, 1, passes=1, dtype_bytes=dtype.itemsize,
        reference_tokens=ref_tokens))
    device = decoder.dit.load_device
    return dn.build_reference_cache(dit, reference.dit_inputs(decoder, device), dtype, device,
                                    callback=lambda done, total: mm.throw_exception_if_processing_interrupted())


class GLMImageScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GLMImageScheduler",
            display_name="GLM-Image Scheduler",
            category=CATEGORY,
            description="GLM-Image's sigmas for the tokens' image size: the resolution-shifted flow schedule of the "
                        "MODEL's checkpoint (its scheduler config and patch size). With SamplerCustomAdvanced, "
                        "CFGGuider, KSamplerSelect 'euler' and RandomNoise it reproduces Semantic Tokens → Latent for "
                        "the same seed, steps and cfg.",
            inputs=[
                io.Model.Input("model", tooltip="The GLM-Image MODEL (Load GLM-Image or Load GLM-Image DiT): the "
                                                "schedule is its checkpoint's."),
                GlmTokens.Input("tokens", tooltip="Sets the image size the schedule is shifted for."),
                io.Int.Input("steps", default=30, min=1, max=200, tooltip="Denoising steps (official default 50)."),
            ],
            outputs=[io.Sigmas.Output("sigmas", display_name="SIGMAS")],
        )

    @classmethod
    def execute(cls, model, tokens, steps) -> io.NodeOutput:
        tokens.validate()
        glm = getattr(model, "model", None)
        if not isinstance(glm, GLMImageModel):
            raise ValueError(f"GLM-Image Scheduler needs the GLM-Image MODEL (from Load GLM-Image or Load GLM-Image "
                             f"DiT), got a MODEL of {type(glm).__name__}: its schedule is that checkpoint's")
        return io.NodeOutput(glm.sigmas(tokens.width, tokens.height, steps))
