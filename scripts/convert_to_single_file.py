#!/usr/bin/env python3
"""Convert an official GLM-Image folder (diffusers layout) into one single-file safetensors per
component, for ComfyUI's usual model folders and the pack's single-file loader nodes:

    <prefix>_dit.safetensors            -> ComfyUI/models/diffusion_models/   (Load GLM-Image DiT)
    <prefix>_ar.safetensors             -> ComfyUI/models/text_encoders/      (Load GLM-Image AR model)
    <prefix>_glyph_encoder.safetensors  -> ComfyUI/models/text_encoders/      (Load GLM-Image Glyph Encoder)
    <prefix>_vae.safetensors            -> ComfyUI/models/vae/                (Load GLM-Image VAE)

Each file carries the configs and tokenizer/processor files its component needs in the
safetensors metadata (see glm_image_core/loading/single_file.py). ``--dtype`` converts the weights:
``fp8_e4m3fn``/``fp8_e5m2`` only the Linear weights of the DiT's and AR's repeated blocks (the rest
stays as stored); the glyph encoder and the VAE take only bf16/fp32 and otherwise stay as stored.
Tensors are streamed one at a time from the shards, so converting the 10B AR model needs about
one tensor of memory, not two copies of the model.

    python scripts/convert_to_single_file.py models/diffusers/GLM-Image --out converted/ --dtype fp8_e4m3fn
    python scripts/convert_to_single_file.py models/diffusers/GLM-Image --out models/ --into-models
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from glm_image_core.loading import single_file as sf# noqa: E402
from glm_image_core.loading.registry import NETWORKS  # noqa: E402
from glm_image_core.loading.checkpoint import CheckpointError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="official GLM-Image folder (model_index.json naming GlmImagePipeline)")
    ap.add_argument("--out", required=True, help="output directory (created when missing)")
    ap.add_argument("--into-models", action="store_true",
                    help="--out is ComfyUI's models/ folder: write each file into its subfolder "
                         "(diffusion_models/, text_encoders/, vae/)")
    ap.add_argument("--dtype", default="as_stored", choices=list(sf.CONVERT_DTYPES) + list(sf.GGUF_TYPES),
                    help="weight dtype of the written files (default: as stored); gguf_*: the DiT and the AR as "
                         ".gguf files with their block matrices quantized (the glyph encoder and VAE stay safetensors)")
    ap.add_argument("--components", default=",".join(NETWORKS),
                    help=f"comma-separated subset of {','.join(NETWORKS)} (default: all)")
    ap.add_argument("--prefix", default=None, help="file name prefix (default: the folder's name)")
    a = ap.parse_args(argv)
    comps = [c.strip() for c in a.components.split(",") if c.strip()]
    bad = [c for c in comps if c not in NETWORKS]
    if bad:
        ap.error(f"unknown component(s) {', '.join(bad)}; choose from {', '.join(NETWORKS)}")
    prefix = a.prefix or os.path.basename(os.path.normpath(a.folder))
    suffix = "" if a.dtype == "as_stored" else f"_{a.dtype}"
    gguf = a.dtype in sf.GGUF_TYPES
    dtype = None if gguf else sf.CONVERT_DTYPES[a.dtype]
    try:
        for c in comps:
            t0 = time.perf_counter()
            quantized = gguf and NETWORKS[c].takes_gguf       # DiT and AR; the small ones stay safetensors
            actual = True if quantized else NETWORKS[c].storage_dtype(dtype)
            ext = ".gguf" if quantized else ".safetensors"
            name = f"{prefix}_{c}{suffix if actual is not None else ''}{ext}"
            out_dir = os.path.join(a.out, NETWORKS[c].comfy_folder) if a.into_models else a.out
            os.makedirs(out_dir, exist_ok=True)
            info = sf.convert_component(a.folder, c, os.path.join(out_dir, name), dtype,
                                        a.dtype if (quantized or not gguf) else "as_stored")
            note = "" if (quantized or actual == dtype) else f" (kept as stored: the {c} takes only bf16/fp32)"
            print(f"{c:14s} -> {info['path']}  {info['tensors']} tensors, {info['bytes'] / 2**20:.1f} MiB, "
                  f"{info['dtypes']}{note}  [{time.perf_counter() - t0:.1f} s]  put it in models/"
                  f"{NETWORKS[c].comfy_folder}/")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
