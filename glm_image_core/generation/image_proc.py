"""Reference-image preprocessing for the GLM-Image AR (vision tower input), plain PyTorch.

Matches transformers 5.17's ``GlmImageImageProcessor`` on its torchvision backend (the one used
when torchvision is installed, as in ComfyUI), for a PIL RGB image given to the pipeline:

1. the image is a uint8 tensor [3, H, W];
2. ``smart_resize`` picks the size (each side *halved*, then rounded to a multiple of
   ``patch_size`` inside the processor's pixel range);
3. the uint8 tensor is resized with ``torch.nn.functional.interpolate(mode="bicubic", antialias=True,
   align_corners=False)`` directly on uint8 (torchvision's CPU path for bicubic), skipped when the
   size does not change;
4. rescale and normalise fused: ``(x.float() - mean/rescale) / (std/rescale)``;
5. patchify to rows of ``3*patch*patch`` in (channel, y, x) order, row-major over the patch grid.

**Float images (ComfyUI IMAGE, 0..1).** The reference pipeline sees PIL uint8 pixels. We convert a
float image with ``round(x*255)`` (clamped) first and then follow the uint8 path, so an image that
came from 8-bit pixels (``uint8/255``, as ComfyUI's LoadImage makes) gives exactly the reference's
input; for other float images this is the 8-bit quantisation PIL would apply anyway.

**Fitting a reference to the DiT grid.** The DiT needs the reference's VAE patch grid (H/16) to
equal twice the AR grid. ``smart_resize`` halves a side of S pixels to S/2 and snaps it to a
multiple of 16, so for S a multiple of 32 with the short side ≥ sqrt(min_pixels) and the long side
≤ sqrt(max_pixels) (that is how ``smart_resize`` reads its pixel counts) the AR grid is exactly S/32,
and diffusers' VAE preparation (floor to a multiple of 16, PIL lanczos resize to that size) leaves the
image unchanged. :func:`fit_reference_size` picks such a size; resize the image to it once
(:func:`resize_image`) and give the same pixels to the VAE and to :func:`preprocess_reference`.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

_RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}     # PIL ids -> interpolate modes


def smart_resize(height: int, width: int, factor: int = 16, min_pixels: int = 512 * 512,
                 max_pixels: int = 2048 * 2048) -> Tuple[int, int]:
    """transformers' GLM-Image ``smart_resize``: the resized (height, width) the vision tower sees."""
    if height < factor or width < factor:
        raise ValueError(f"height:{height} or width:{width} must be larger than factor:{factor}")
    elif max(height, width) / min(height, width) > 4:
        raise ValueError(f"absolute aspect ratio must be smaller than 4, got {max(height, width) / min(height, width)}")
    shortest_edge = int(round(math.sqrt(min_pixels)))
    longest_edge = int(round(math.sqrt(max_pixels)))
    min_side = min(height, width)
    max_side = max(height, width)
    scale = 1.0
    if min_side < shortest_edge:
        scale = shortest_edge / min_side
    if max_side * scale > longest_edge:
        scale = longest_edge / max_side
    height = height // 2
    width = width // 2
    h_bar = max(factor, int(round(height * scale / factor)) * factor)
    w_bar = max(factor, int(round(width * scale / factor)) * factor)
    if max(h_bar, w_bar) > longest_edge:
        beta = max(h_bar, w_bar) / longest_edge
        h_bar = max(factor, int(math.floor((h_bar / beta) / factor)) * factor)
        w_bar = max(factor, int(math.floor((w_bar / beta) / factor)) * factor)
    return h_bar, w_bar


def to_uint8_chw(image: torch.Tensor) -> torch.Tensor:
    """A single image as uint8 [3, H, W] on the CPU.

    Accepts uint8 or float (0..1) in [H, W, 3], [1, H, W, 3] (ComfyUI IMAGE) or [3, H, W] layout;
    float is converted with ``round(x*255)`` clamped to 0..255 (see the module docstring).
    Grey (1 channel) is repeated, alpha (4th channel) dropped.
    """
    x = image.detach()
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of {x.shape[0]}")
        x = x[0]
    if x.dim() != 3:
        raise ValueError(f"expected an image [H,W,C] or [C,H,W], got shape {tuple(image.shape)}")
    if x.shape[-1] in (1, 3, 4):           # HWC (ComfyUI, numpy, PIL) -> CHW
        x = x.permute(2, 0, 1)
    c = x.shape[0]
    if c == 4:
        x = x[:3]
    elif c == 1:
        x = x.expand(3, -1, -1)
    elif c != 3:
        raise ValueError(f"image must have 1, 3 or 4 channels, got {c}")
    x = x.cpu()
    if x.dtype != torch.uint8:
        x = (x.float() * 255.0).round().clamp(0, 255).to(torch.uint8)
    return x.contiguous()


def preprocess_reference(image: torch.Tensor, processor_cfg: dict) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Pixel rows [gh*gw, 3*p*p] (float32) and the grid (gh, gw) of one reference image.

    ``processor_cfg`` is :func:`glm_image_core.generation.ar_prompt.read_processor_config`'s dict.
    """
    p = int(processor_cfg["patch_size"])
    img = to_uint8_chw(image)[None]                       # [1, 3, H, W] uint8
    _, c, h, w = img.shape
    if processor_cfg.get("do_resize", True):
        nh, nw = smart_resize(h, w, factor=p * int(processor_cfg.get("merge_size", 1)),
                              min_pixels=processor_cfg["min_pixels"], max_pixels=processor_cfg["max_pixels"])
        if (nh, nw) != (h, w):
            mode = _RESAMPLE_MODES.get(int(processor_cfg.get("resample", 3)), "bicubic")
            img = F.interpolate(img, size=[nh, nw], mode=mode, align_corners=False, antialias=True)
    x = img
    do_rescale = processor_cfg.get("do_rescale", True)
    do_normalize = processor_cfg.get("do_normalize", True)
    rescale = float(processor_cfg.get("rescale_factor", 1 / 255))
    if do_normalize:
        mean = torch.tensor(processor_cfg["image_mean"])
        std = torch.tensor(processor_cfg["image_std"])
        if do_rescale:      # fused like transformers' TorchvisionBackend
            mean = mean * (1.0 / rescale)
            std = std * (1.0 / rescale)
        if not do_rescale:
            x = x.to(torch.float32)
        x = x.to(torch.float32).sub(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
    elif do_rescale:
        x = x * rescale
    x = x.to(torch.float32)
    b, c, hh, ww = x.shape
    gh, gw = hh // p, ww // p
    rows = (x.reshape(b, c, gh, 1, p, gw, 1, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
            .reshape(b, gh * gw, c * p * p))
    return rows[0].contiguous(), (gh, gw)


def fit_reference_size(height: int, width: int, processor_cfg: dict, max_pixels: int | None = None,
                       multiple: int = 32) -> Tuple[int, int, str]:
    """A size (th, tw) for a reference image so that the AR grid is exactly (th/32, tw/32) and the
    DiT's reference latent grid (th/16, tw/16) is twice it (see the module docstring).

    Keeps the pixel count (capped at ``max_pixels`` if given) and the aspect ratio as closely as
    multiples of ``multiple`` allow, inside the processor's range (short side ≥ sqrt(min_pixels),
    long side ≤ sqrt(max_pixels)). A size that already qualifies is returned unchanged.
    Returns (th, tw, note) where note says what changed ("" when nothing did).
    Raises ValueError for aspect ratios above 4 (the processor refuses them).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"reference image has an empty size {width}x{height}")
    if max(height, width) / min(height, width) > 4:
        raise ValueError(f"reference image {width}x{height} has an aspect ratio above 4:1, which GLM-Image's "
                         "image processor refuses; crop it first")
    lo = int(round(math.sqrt(processor_cfg["min_pixels"])))
    hi = int(round(math.sqrt(processor_cfg["max_pixels"])))
    lo_m = max(multiple, -(-lo // multiple) * multiple)      # smallest allowed side (multiple of 32)
    hi_m = max(lo_m, (hi // multiple) * multiple)             # largest allowed side

    def ok(h, w):
        return (h % multiple == 0 and w % multiple == 0 and min(h, w) >= lo_m and max(h, w) <= hi_m
                and (max_pixels is None or h * w <= max_pixels))

    if ok(height, width):
        return height, width, ""
    area = float(height * width)
    if max_pixels is not None:
        area = min(area, float(max_pixels))
    ratio = height / width
    best = None
    # search around the ideal height; widths follow the aspect ratio
    ideal_h = math.sqrt(area * ratio)
    for dh in range(-3, 4):
        th = int(round(ideal_h / multiple)) * multiple + dh * multiple
        th = min(max(th, lo_m), hi_m)
        tw = int(round(th / ratio / multiple)) * multiple
        tw = min(max(tw, lo_m), hi_m)
        if max_pixels is not None:
            while th * tw > max_pixels and max(th, tw) > lo_m:
                if th >= tw:
                    th -= multiple
                else:
                    tw -= multiple
        if not ok(th, tw) or max(th, tw) / min(th, tw) > 4:
            continue
        err = abs(math.log((th / tw) / ratio)) + 0.5 * abs(math.log(th * tw / area))
        if best is None or err < best[0]:
            best = (err, th, tw)
    if best is None:
        raise ValueError(f"cannot fit a {width}x{height} reference into the image processor's range "
                         f"(sides {lo_m}..{hi_m} px, multiples of {multiple})")
    _, th, tw = best
    return th, tw, f"resized {width}x{height} -> {tw}x{th} to fit the 32-pixel token grid"


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a ComfyUI IMAGE [B, H, W, C] (float 0..1) to ``height``×``width`` (bicubic, antialiased,
    clamped to 0..1). The same pixels should then go to the VAE and to :func:`preprocess_reference`."""
    if image.dim() != 4:
        raise ValueError(f"expected an IMAGE [B,H,W,C], got shape {tuple(image.shape)}")
    if image.shape[1] == height and image.shape[2] == width:
        return image
    x = image.movedim(-1, 1).float()
    x = F.interpolate(x, size=[height, width], mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0, 1).movedim(1, -1).to(image.dtype)


FIT_MODES = ("crop", "resize")


def fit_token_grid(height: int, width: int, processor_cfg: dict, fit: str = "crop",
                   multiple: int = 32) -> Tuple[Tuple[int, int, int, int], Tuple[int, int], str]:
    """How an image of ``height``×``width`` pixels becomes one whose token grid is exactly
    (H/32, W/32) — the grid the DiT uses for that image size (``Image → Semantic Tokens``).

    An image whose sides are multiples of ``multiple`` inside the processor's range (short side ≥
    sqrt(min_pixels), long side ≤ sqrt(max_pixels)) with an aspect ratio of at most 4 is kept as it is.
    Any other size:
    - ``fit="crop"``: centre-cropped to the largest multiples of 32 (no resampling: the kept pixels are
      the image's own), and refused when that leaves it outside the processor's range;
    - ``fit="resize"``: resized (bicubic) to the nearest multiple-of-32 size of the same aspect ratio and
      pixel count inside the range (:func:`fit_reference_size`, what Reference Edit does).

    Returns ((top, left, crop_h, crop_w), (th, tw), note): crop first, then resize to (th, tw) when it
    differs from the crop; note says what changed ("" when nothing did).
    """
    if fit not in FIT_MODES:
        raise ValueError(f"fit must be one of {FIT_MODES}, got {fit!r}")
    if height <= 0 or width <= 0:
        raise ValueError(f"image has an empty size {width}x{height}")
    if fit == "resize":
        th, tw, note = fit_reference_size(height, width, processor_cfg, multiple=multiple)
        return (0, 0, height, width), (th, tw), note
    ch, cw = (height // multiple) * multiple, (width // multiple) * multiple
    lo = max(multiple, -(-int(round(math.sqrt(processor_cfg["min_pixels"]))) // multiple) * multiple)
    hi = (int(round(math.sqrt(processor_cfg["max_pixels"]))) // multiple) * multiple
    if min(ch, cw) < lo or max(ch, cw) > hi or max(ch, cw) / min(ch, cw) > 4:
        raise ValueError(f"a {width}x{height} image cropped to multiples of {multiple} ({cw}x{ch}) is outside what "
                         f"GLM-Image's image processor tokenises exactly: sides {lo}..{hi} px with an aspect ratio of "
                         "at most 4. Scale the image first, or set fit to 'resize'")
    top, left = (height - ch) // 2, (width - cw) // 2
    note = "" if (ch, cw) == (height, width) else \
        f"centre-cropped {width}x{height} -> {cw}x{ch} to fit the {multiple}-pixel token grid"
    return (top, left, ch, cw), (ch, cw), note


def fit_image(image: torch.Tensor, crop: Tuple[int, int, int, int], size: Tuple[int, int]) -> torch.Tensor:
    """Apply :func:`fit_token_grid`'s (crop, size) to an IMAGE [B, H, W, C]."""
    top, left, ch, cw = crop
    image = image[:, top:top + ch, left:left + cw]
    return resize_image(image, *size)
