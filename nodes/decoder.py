"""GLM-Image Semantic Tokens → Latent: the DiT decoder (flow matching, CFG, glyph + reference)."""

from __future__ import annotations

import torch
from .api import io

import comfy.model_management as mm
import comfy.sample
import comfy.utils

from ..glm_image_core.generation import denoise as dn
from ..glm_image_core.loading import memory_plan as mp
from ..glm_image_core.generation.tokens import upsample_grid
from .glyph import encode_glyph
from .types import CATEGORY, GlmDecoder, GlmGlyph, GlmReference, GlmTokens


def check_tokens(tokens, decoder) -> None:
    """Tokens must fit this decoder's prior codebook and the 32-pixel grid."""
    tokens.validate()
    if tokens.codebook_size > decoder.codebook_size or int(tokens.grid.max()) >= decoder.codebook_size:
        raise ValueError(f"tokens come from a model with a {tokens.codebook_size}-entry codebook (max id "
                         f"{int(tokens.grid.max())}), but this decoder's prior embedding has "
                         f"{decoder.codebook_size} rows: use tokens from the same GLM-Image checkpoint")


def check_reference_count(tokens, reference) -> None:
    """The DiT must see the references the AR saw when it sampled these tokens (the pipeline's rule)."""
    given = 0 if reference is None else len(reference)
    if tokens.num_references != given:
        raise ValueError(f"tokens were sampled with {tokens.num_references} reference image(s), but {given} "
                         "reach this node's 'reference' input: connect the same GLM-Image Reference Edit output "
                         "to Text → Semantic Tokens and to Semantic Tokens → Latent")


def glyphs_for(decoder, tokens, glyph=None, negative_glyph=None) -> tuple:
    """(glyph, negative glyph) of a DiT run: the given ones, checked against the decoder, or the
    official defaults — the quoted spans of the tokens' prompt, and empty text."""
    if glyph is None:
        glyph = encode_glyph(decoder, tokens.prompt, mode="prompt")
    if negative_glyph is None:
        negative_glyph = encode_glyph(decoder, "", mode="regions")
    for name, g in (("glyph", glyph), ("negative_glyph", negative_glyph)):
        if g.decoder_name != decoder.name or g.embeds.shape[-1] != decoder.dit_config["text_embed_dim"]:
            raise ValueError(f"{name} was encoded for model {g.decoder_name!r} ({g.embeds.shape[-1]}-d), "
                             f"not for this decoder ({decoder.name!r}); connect the same loader")
    return glyph, negative_glyph


def check_inputs(decoder, tokens, reference) -> None:
    """Everything a DiT run checks before it starts: tokens, reference count and model."""
    check_tokens(tokens, decoder)
    check_reference_count(tokens, reference)
    if reference is not None:
        reference.check_compatible_decoder(decoder, tokens)


class GLMImageTokensToLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GLMImageTokensToLatent",
            display_name="GLM-Image Semantic Tokens → Latent",
            category=CATEGORY,
            description="Runs GLM-Image's DiT: denoises a latent guided by the semantic tokens, the glyph text "
                        "and optional reference images. Outputs a standard LATENT (raw VAE space) for "
                        "VAEDecode, latent upscalers and every other latent node.",
            inputs=[
                GlmDecoder.Input("decoder", tooltip="From Load GLM-Image."),
                GlmTokens.Input("tokens", tooltip="From Text → Semantic Tokens or Load Tokens; sets the image size."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial noise (drawn like ComfyUI's KSampler, on the CPU)."),
                io.Int.Input("steps", default=30, min=1, max=200, tooltip="Denoising steps (official default 50)."),
                io.Float.Input("cfg", default=1.5, min=1.0, max=20.0, step=0.05,
                               tooltip="Classifier-free guidance scale; 1.0 skips the unconditional pass."),
                GlmGlyph.Input("glyph", optional=True,
                               tooltip="Glyph text regions; default: the quoted spans of the tokens' prompt."),
                GlmReference.Input("reference", optional=True,
                                   tooltip="Reference images for editing (the same output fed to Text → Semantic Tokens)."),
                GlmGlyph.Input("negative_glyph", optional=True,
                               tooltip="Glyph conditioning of the unconditional pass; default: empty text (official)."),
            ],
            outputs=[io.Latent.Output("latent", display_name="LATENT",
                                      tooltip="[B,16,H/8,W/8] float32 raw VAE latent.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, decoder, tokens, seed, steps, cfg, glyph=None, reference=None,
                negative_glyph=None) -> io.NodeOutput:
        check_inputs(decoder, tokens, reference)
        glyph, negative_glyph = glyphs_for(decoder, tokens, glyph, negative_glyph)

        B, W, H = tokens.batch_size, tokens.width, tokens.height
        C = decoder.latent_channels
        noise = comfy.sample.prepare_noise(torch.zeros(B, C, H // 8, W // 8, dtype=torch.float32), seed)

        previewer = decoder.previewer()      # before the DiT loads: fitting it may use the VAE once
        dtype = decoder.dit.compute_dtype
        ref_tokens = 0 if reference is None else sum(4 * r.ar_ids.numel() for r in reference.items)  # 2×2 patches per AR id
        dit = decoder.dit.load(memory_required=mp.dit_activation_bytes(
            decoder.dit_config, W, H, max(glyph.embeds.shape[1], negative_glyph.embeds.shape[1]), B,
            passes=2 if cfg > 1 else 1, dtype_bytes=dtype.itemsize, reference_tokens=ref_tokens))
        device = decoder.dit.load_device
        pbar = comfy.utils.ProgressBar(steps, node_id=cls.hidden.unique_id)

        def on_step(i: int, total: int, latents: torch.Tensor) -> None:
            preview = None
            if previewer is not None:
                preview = previewer.decode_latent_to_preview_image("JPEG", latents[:1])
            pbar.update_absolute(i + 1, total, preview)
            mm.throw_exception_if_processing_interrupted()      # after the report, like the AR's tokens

        def on_reference(done: int, total: int) -> None:
            mm.throw_exception_if_processing_interrupted()

        refs = None if reference is None else reference.dit_inputs(decoder, device)
        latents = dn.denoise(
            dit, noise.to(device), upsample_grid(tokens.grid).to(device),
            glyph.embeds.to(device, dtype).expand(B, -1, -1), negative_glyph.embeds.to(device, dtype).expand(B, -1, -1),
            (H, W), steps, cfg, decoder.scheduler_config, reference=refs, callback=on_step, compute_dtype=dtype,
            reference_callback=on_reference)
        raw = decoder.denormalize(latents.float())
        return io.NodeOutput({"samples": raw.to(mm.intermediate_device(), torch.float32)})
