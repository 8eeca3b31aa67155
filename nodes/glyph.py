"""GLM-Image Glyph Text Regions: the Glyph-ByT5 conditioning of the DiT (text to render)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from .api import io, ui

from ..glm_image_core.generation import glyph_text as core_glyph
from .types import CATEGORY, GlmDecoder, GlmGlyph

MODE_PROMPT = "quoted spans of the text"      # official behaviour (quirks included)
MODE_REGIONS = "one region per line"          # explicit control
MODES = [MODE_PROMPT, MODE_REGIONS]


@dataclass
class GlyphConditioning:
    """Payload of the GLM_GLYPH socket."""
    embeds: torch.Tensor          # [1, L, text_embed_dim] encoded glyph sequence (intermediate device)
    spans: list = field(default_factory=list)   # the text regions encoded, in order ([""] = unconditional)
    decoder_name: str = ""


def glyph_spans(text: str, mode: str) -> list[str]:
    if mode in ("prompt", MODE_PROMPT):
        return core_glyph.extract_glyph_texts(text)
    if mode in ("regions", MODE_REGIONS):
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return lines or [""]
    raise ValueError(f"glyph mode must be one of {MODES}, got {mode!r}")


def encode_glyph(decoder, text: str, mode: str) -> GlyphConditioning:
    spans = glyph_spans(text, mode)
    enc = decoder.glyph_encoder.load()
    embeds = core_glyph.encode_glyph_texts(enc, decoder.glyph_tokenizer, spans,
                                           device=decoder.glyph_encoder.load_device,
                                           dtype=decoder.glyph_encoder.compute_dtype)
    return GlyphConditioning(embeds=embeds.float().cpu(), spans=spans, decoder_name=decoder.name)


class GLMImageGlyphText(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GLMImageGlyphText",
            display_name="GLM-Image Glyph Text Regions",
            category=CATEGORY,
            description="Encodes the text GLM-Image should render (Glyph-ByT5). Default: the quoted spans of the "
                        "text, exactly like the official pipeline. 'one region per line' renders each line as "
                        "given, quoted or not. Empty text = no glyph conditioning.",
            inputs=[
                GlmDecoder.Input("decoder", tooltip="From Load GLM-Image."),
                io.String.Input("text", multiline=True, default="",
                                tooltip="A prompt with \"quoted\" text, or one text region per line."),
                io.Combo.Input("mode", options=MODES, default=MODE_PROMPT,
                               tooltip="How to read the text: quoted spans (official) or one region per line."),
            ],
            outputs=[GlmGlyph.Output("glyph", display_name="glyph",
                                     tooltip="Glyph conditioning for Semantic Tokens → Latent.")],
        )

    @classmethod
    def execute(cls, decoder, text, mode=MODE_PROMPT) -> io.NodeOutput:
        g = encode_glyph(decoder, text, mode)
        shown = "\n".join(f"{i + 1}: {s!r}" for i, s in enumerate(g.spans)) if g.spans != [""] else "(no glyph text)"
        return io.NodeOutput(g, ui=ui.PreviewText(shown))
