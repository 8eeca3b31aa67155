"""Socket types. Standard ComfyUI types (LATENT, VAE, IMAGE) are used wherever they exist;
custom types carry only what is GLM-only."""
from .api import io

GlmAR = io.Custom("GLM_AR")                # the AR model (GLM-4 decoder + ViT + VQ) and its tokenizer
GlmDecoder = io.Custom("GLM_DECODER")      # DiT + glyph encoder + latent statistics + schedule settings
GlmGlyphEncoder = io.Custom("GLM_GLYPH_ENCODER")   # a single-file ByT5 glyph encoder + tokenizer, for the DiT loader
GlmTokens = io.Custom("GLM_TOKENS")        # glm_image_core.generation.tokens.GLMTokens
GlmGlyph = io.Custom("GLM_GLYPH")          # nodes.glyph.GlyphConditioning
GlmReference = io.Custom("GLM_REFERENCE")  # nodes.reference.References

CATEGORY = "GLM-Image"
