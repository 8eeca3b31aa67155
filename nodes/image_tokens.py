"""GLM-Image Image → Semantic Tokens: an image's own semantic tokens, the condition the DiT sees for it.

The AR's vision tower + VQ codebook tokenise the image exactly as the official pipeline tokenises a
condition image (transformers' processor, ``get_image_features``, ``get_image_tokens``), at the grid
the DiT uses for that image's size (H/32 × W/32). Uses: re-rendering an image through the DiT, and
the condition of each training image for a DiT LoRA (stock Train LoRA node).

Lists in, lists out: a dataset loader gives a list of images (of any sizes) and a list of captions;
this node checks that they pair up and gives one GLM_TOKENS and one fitted IMAGE per image, so the
conditioning and the VAE latent of image i stay together through the stock trainer.
"""

from __future__ import annotations

import logging

import torch
from .api import io

import comfy.model_management as mm
import comfy.utils

from ..glm_image_core.generation import image_proc
from ..glm_image_core.generation.tokens import GLMTokens
from .reference import to_rgb, tokenize_image
from .types import CATEGORY, GlmAR, GlmTokens

log = logging.getLogger("GLM-Image")


def split_images(images: list) -> list:
    """A list of IMAGE batches -> one [1, H, W, 3] float image per picture, in order."""
    out = []
    for batch in images:
        if batch is None or batch.shape[0] == 0:
            continue
        batch = to_rgb(batch).float()
        out.extend(batch[b:b + 1] for b in range(batch.shape[0]))
    return out


def pair_captions(captions: list, count: int) -> list:
    """One caption per image: the same one for all, or exactly one each (a clear error otherwise)."""
    captions = [c if c is not None else "" for c in (captions or [""])]
    if len(captions) == 1:
        return captions * count
    if len(captions) != count:
        raise ValueError(f"{len(captions)} captions for {count} images: give one caption per image (a dataset "
                         "loader's texts output) or a single caption for all of them")
    return captions


def dataset_inputs(caption_meaning: str) -> list:
    """The image / caption / fit inputs of a node that takes a dataset (Image → Semantic Tokens, Train AR
    LoRA): a batch or a dataset loader's lists, paired by ``pair_captions``, fitted by ``image_proc``."""
    return [
        io.Image.Input("image", tooltip="Image(s): a batch, or a list from a dataset loader (any sizes)."),
        io.String.Input("caption", multiline=True, default="", optional=True,
                        tooltip=f"{caption_meaning} One for all images, or a list with one per image (a dataset "
                                "loader's texts)."),
        io.Combo.Input("fit", options=list(image_proc.FIT_MODES), default="crop",
                       tooltip="Sizes that are not multiples of 32 px inside the processor's range: 'crop' "
                               "centre-crops to multiples of 32 (no resampling), 'resize' resizes to the nearest "
                               "multiple-of-32 size of the same aspect ratio."),
    ]


class GLMImageImageToTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GLMImageImageToTokens",
            display_name="GLM-Image Image → Semantic Tokens",
            category=CATEGORY,
            description="An image's own semantic tokens (the AR's vision tower + VQ codebook, as the official "
                        "pipeline tokenises a condition image), one token per 32×32 pixels. Decode them with "
                        "Semantic Tokens → Latent to re-render the image, or use them with GLM-Image Conditioning "
                        "and VAE Encode of the 'image' output to train a DiT LoRA with the stock Train LoRA node. "
                        "One output per image: a batch or a dataset list becomes a list.",
            is_input_list=True,
            inputs=[
                GlmAR.Input("ar", tooltip="From Load GLM-Image (its vision tower tokenises the image)."),
                *dataset_inputs("Caption of the image(s): its quoted text becomes the glyph text downstream, as a "
                                "prompt's does."),
            ],
            outputs=[
                GlmTokens.Output("tokens", display_name="tokens", is_output_list=True,
                                 tooltip="One token grid per image (H/32 × W/32), its caption as prompt."),
                io.Image.Output("image_out", display_name="image", is_output_list=True,
                                tooltip="Each image as tokenised (cropped or resized to the grid): encode "
                                        "this one with VAE Encode so latent and tokens match."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, ar, image, caption=None, fit=None) -> io.NodeOutput:
        ar = ar[0]
        fit = (fit or ["crop"])[0]
        pictures = split_images(image)
        if not pictures:
            raise ValueError("no images: give at least one image (the batch or dataset list is empty)")
        captions = pair_captions(caption, len(pictures))
        for i, pic in enumerate(pictures):
            if not torch.isfinite(pic).all():
                raise ValueError(f"image {i + 1} contains NaN or infinite values; images must hold finite pixel "
                                 "values (0..1)")
        pbar = comfy.utils.ProgressBar(len(pictures), node_id=cls.hidden.unique_id)
        tokens_out, images_out = [], []
        for i, (pic, text) in enumerate(zip(pictures, captions)):
            mm.throw_exception_if_processing_interrupted()
            h, w = int(pic.shape[1]), int(pic.shape[2])
            try:
                crop, size, note = image_proc.fit_token_grid(h, w, ar.processor_config, fit)
            except ValueError as e:
                raise ValueError(f"image {i + 1}: {e}") from None
            if note:
                log.info("GLM-Image Image → Semantic Tokens, image %d: %s", i + 1, note)
            pic = image_proc.fit_image(pic, crop, size)
            th, tw = size
            ids = tokenize_image(ar, pic)
            tokens_out.append(GLMTokens(grid=ids.cpu()[None], width=tw, height=th, prompt=text, seed=0,
                                        sampling={"from_image": True}, codebook_size=ar.codebook_size,
                                        source=ar.name).validate())
            images_out.append(pic.cpu())
            pbar.update(1)
        return io.NodeOutput(tokens_out, images_out)
