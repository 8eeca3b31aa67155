#!/usr/bin/env python
"""GGUF weights against bf16: what each quant type costs and changes (medium checkpoint, CPU), and the
memory each implies at full size.

The medium random checkpoint is written in bf16 (like the official files) and converted by
scripts/convert_to_single_file.py to bf16 safetensors single files and to gguf_q8_0 / gguf_q5_k /
gguf_q4_k. Each variant then runs in its own process (so its peak RSS is its own) in the real ComfyUI
host, through the single-file loader nodes:

* the AR: Text → Semantic Tokens at --px², fixed seed → seconds per token, and the tokens' agreement
  with the bf16 AR's (fraction of grid positions equal; sampling diverges after the first change);
* the DiT: Semantic Tokens → Latent from the bf16 AR's tokens (so every variant decodes the same
  tokens) → seconds per step, and the stock VAE Decode's image against the bf16 one (PSNR); and one
  DiT forward on fixed inputs → its relative L2 error against bf16;
* peak RSS of the process, and the bytes of the AR text part + DiT as ComfyUI counts them.

fp8_e4m3fn storage of the bf16 files is measured too, for reference. The full-size table is computed
from the official tensor list (no run): each tensor quantized as the converter does. Writes
bench/results/gguf.{md,json}.

    python bench/bench_gguf.py [--px 256] [--steps 8]
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import PROMPT, ROOT, NodeTimer, cached_checkpoint, current_rss_mb, peak_rss_mb, psnr, write_report  # noqa: E402

VARIANTS = {                  # name: (conversion, weight_dtype of the loaders)
    "bf16": ("as_stored", "default"),
    "fp8_e4m3fn": ("as_stored", "fp8_e4m3fn"),
    "gguf_q8_0": ("gguf_q8_0", "default"),
    "gguf_q5_k": ("gguf_q5_k", "default"),
    "gguf_q4_k": ("gguf_q4_k", "default"),
}
PREFIX = "bench"


def files_of(variant: str) -> tuple:
    conv = VARIANTS[variant][0]
    if conv == "as_stored":
        return f"{PREFIX}_dit.safetensors", f"{PREFIX}_ar.safetensors"
    return f"{PREFIX}_dit_{conv}.gguf", f"{PREFIX}_ar_{conv}.gguf"


# ---- the checkpoint and its conversions (parent) --------------------------------------------------

def convert_all(folder: str, models: str, variants) -> dict:
    """The ``variants``' files under ``models``/<ComfyUI folder>/; {file name: (bytes, seconds)}."""
    out = {}
    for conv in sorted({VARIANTS[v][0] for v in variants}):
        t = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_to_single_file.py"), folder,
                        "--out", models, "--into-models", "--dtype", conv, "--prefix", PREFIX], check=True,
                       capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        dt = time.perf_counter() - t
        for sub in ("diffusion_models", "text_encoders"):
            for name in os.listdir(os.path.join(models, sub)):
                if name not in out:
                    out[name] = (os.path.getsize(os.path.join(models, sub, name)), dt)
    return out


# ---- one variant (worker process) -----------------------------------------------------------------

def worker(variant: str, base: str, px: int, steps: int, ref_tokens: str | None) -> dict:
    import torch
    import glmtest_host
    from glm_image_core.quantization import gguf_ops
    from glm_image_core.generation.tokens import save_tokens
    import_rss = current_rss_mb()
    host = glmtest_host.Host(base)
    for sub in ("diffusion_models", "text_encoders", "vae"):
        host.folder_paths.add_model_folder_path(sub, os.path.join(base, "models", sub), is_default=True)
    dit_file, ar_file = files_of(variant)
    wd = VARIANTS[variant][1]
    timer = NodeTimer(host)

    loaders = {
        "10": {"class_type": "GLMImageARLoader", "inputs": {"ar_name": ar_file, "weight_dtype": wd}},
        "11": {"class_type": "GLMImageGlyphEncoderLoader", "inputs": {"glyph_encoder_name": f"{PREFIX}_glyph_encoder.safetensors",
                                                                     "weight_dtype": "default"}},
        "12": {"class_type": "GLMImageDiTLoader", "inputs": {"dit_name": dit_file, "glyph_encoder": ["11", 0],
                                                             "weight_dtype": wd}},
        "13": {"class_type": "GLMImageVAELoader", "inputs": {"vae_name": f"{PREFIX}_vae.safetensors", "weight_dtype": "default"}},
    }
    # the AR: tokens of its own
    timer.clear()
    host.run_ok({**{k: v for k, v in loaders.items() if k == "10"},
                 "2": {"class_type": "GLMImageTextToTokens", "inputs": {
                     "ar": ["10", 0], "prompt": PROMPT, "width": px, "height": px, "seed": 0, "temperature": 0.9,
                     "top_p": 0.75, "top_k": 0, "batch_size": 1}},
                 "9": {"class_type": "GLMImageSaveTokens", "inputs": {"tokens": ["2", 0], "filename_prefix": "bench/tokens"}}})
    tokens = glmtest_host.node_output(host, "2")
    ar = glmtest_host.node_output(host, "10")
    n_tokens = int(tokens.grid.numel()) + (px // 64) ** 2      # the grid + the preview grid (256² → 16×16 + 8×8)
    ar_s = timer.seconds("2")
    own = os.path.join(host.folder_paths.get_input_directory(), f"own-{variant}.glmtokens.safetensors")
    save_tokens(tokens, own)
    # the DiT on the reference (bf16) tokens
    ref = ref_tokens or own
    shutil.copy(ref, os.path.join(host.folder_paths.get_input_directory(), "ref.glmtokens.safetensors"))
    timer.clear()
    host.run_ok({**{k: v for k, v in loaders.items() if k != "10"},
                 "3": {"class_type": "GLMImageLoadTokens", "inputs": {"token_file": "ref.glmtokens.safetensors"}},
                 "4": {"class_type": "GLMImageTokensToLatent", "inputs": {"decoder": ["12", 0], "tokens": ["3", 0],
                       "seed": 0, "steps": steps, "cfg": 1.5}},
                 "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["13", 0]}},
                 "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}})
    dit_s = timer.seconds("4")
    image = glmtest_host.node_output(host, "5").float()
    # one DiT forward on fixed inputs
    decoder = glmtest_host.node_output(host, "12")
    net = decoder.dit.load()
    dtype = decoder.dit.compute_dtype
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, decoder.latent_channels, px // 8, px // 8, generator=g).to(dtype)
    glyph = torch.randn(1, 8, net.text_embed_dim, generator=g).to(dtype)
    ids = torch.randint(0, decoder.codebook_size, (1, (px // 16) ** 2), generator=g)
    with torch.no_grad():
        out = net(x, glyph, ids, False, torch.tensor([500.0]), torch.tensor([[float(px), float(px)]]),
                  torch.zeros(1, 2)).float()
    work = os.path.join(base, f"out-{variant}.pt")
    # tensors go back through safetensors (never pickle)
    from safetensors.torch import save_file
    save_file({"image": image.contiguous(), "dit_out": out.contiguous()}, work)
    quantized = len(gguf_ops.quantized_layers(net)) + len(gguf_ops.quantized_layers(ar.model.network))
    return {"variant": variant, "ar_seconds": ar_s, "ar_tokens": n_tokens, "dit_seconds": dit_s, "steps": steps,
            "tokens_file": own, "outputs": work, "grid": tokens.grid.flatten().tolist(),
            "weights_bytes": {"ar_text": ar.model.patcher.model_size(), "dit": decoder.dit.patcher.model_size()},
            "quantized_layers": quantized, "import_rss_mb": import_rss, "peak_rss_mb": peak_rss_mb()}


def run_worker(variant: str, base: str, a, ref_tokens: str | None) -> dict:
    cmd = [sys.executable, __file__, "--_worker", variant, base, "--px", str(a.px), "--steps", str(a.steps)]
    if ref_tokens:
        cmd += ["--_ref", ref_tokens]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
    if p.returncode != 0:
        raise SystemExit(f"worker {variant} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- full size: bytes from the official tensor list -----------------------------------------------

def full_size_bytes() -> dict:
    """{variant: {"dit", "ar_text", "ar_vision"}: bytes} at the official size, each tensor stored as
    the converter stores it (bf16 / fp8 for the fp8-eligible matrices / ggml blocks where the row
    holds whole blocks, ``gguf_quant.block_type_for``), from the shapes alone."""
    from glm_image_core.quantization import gguf_quant
    from glm_image_core.testing import tiny_checkpoint
    from glm_image_core.loading import single_file as sf
    from glm_image_core.loading.registry import NETWORKS
    cfgs = tiny_checkpoint.configs_for("full")
    shapes = {"dit": list(tiny_checkpoint.dit_shapes(cfgs["transformer/config.json"])),
              "ar": list(tiny_checkpoint.ar_shapes(cfgs["vision_language_encoder/config.json"]))}
    out = {}
    for variant, (conv, wd) in VARIANTS.items():
        qt = sf.GGUF_TYPES.get(conv)
        parts = {"dit": 0, "ar_text": 0, "ar_vision": 0}
        for comp, items in shapes.items():
            net = NETWORKS[comp]
            for key, shape in items:
                eligible = len(shape) == 2 and net.fp8_keys.match(key)
                bt = gguf_quant.block_type_for(shape, qt) if (qt is not None and net.gguf_blocks(key, shape)) else None
                if bt is not None:
                    n = gguf_quant.nbytes(shape, bt)
                else:
                    n = math.prod(shape) * (1 if (wd.startswith("fp8") and eligible) else 2)
                part = comp if comp == "dit" else ("ar_vision" if (".visual." in key or ".vqmodel." in key) else "ar_text")
                parts[part] += n
        out[variant] = parts
    return out


# ---- report ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--px", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", default="medium", choices=["tiny", "medium"],
                    help="checkpoint (tiny: the smoke test; its DiT is too narrow for blocks)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "gguf"))
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_ref", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._worker:
        print(json.dumps(worker(a._worker[0], a._worker[1], a.px, a.steps, a._ref)))
        return 0

    import torch
    from safetensors.torch import load_file
    t0 = time.perf_counter()
    variants = ["bf16"] + [v for v in a.variants.split(",") if v != "bf16"]      # bf16 first: the reference
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    folder = cached_checkpoint(a.size, bf16=True)
    base = tempfile.mkdtemp(prefix="glm-bench-gguf-")
    atexit.register(shutil.rmtree, base, True)
    files = convert_all(folder, os.path.join(base, "models"), variants)
    runs = {}
    for v in variants:
        runs[v] = run_worker(v, base, a, runs["bf16"]["tokens_file"] if v != "bf16" else None)
        print(f"{v}: {runs[v]['ar_seconds']:.1f} s AR, {runs[v]['dit_seconds']:.1f} s DiT, "
              f"peak {runs[v]['peak_rss_mb']:.0f} MiB", file=sys.stderr)
    ref = load_file(runs["bf16"]["outputs"])
    full = full_size_bytes()
    rows = {}
    for v, r in runs.items():
        o = load_file(r["outputs"])
        grid, ref_grid = torch.tensor(r["grid"]), torch.tensor(runs["bf16"]["grid"])
        dit_file, ar_file = files_of(v)
        rows[v] = {
            "files_mib": {"dit": files[dit_file][0] / 2**20, "ar": files[ar_file][0] / 2**20},
            "weights_mib": {k: b / 2**20 for k, b in r["weights_bytes"].items()},
            "peak_rss_mib": r["peak_rss_mb"], "import_rss_mib": r["import_rss_mb"],
            "ar_s_per_token": r["ar_seconds"] / r["ar_tokens"], "dit_s_per_step": r["dit_seconds"] / r["steps"],
            "dit_rel_l2": ((o["dit_out"] - ref["dit_out"]).norm() / ref["dit_out"].norm()).item(),
            "token_agreement": (grid == ref_grid).float().mean().item(),
            "image_psnr_db": psnr(o["image"], ref["image"]),
            "quantized_layers": r["quantized_layers"],
            "full_size_gib": {k: b / 2**30 for k, b in full[v].items()},
        }
    res = {"machine": f"{os.cpu_count()} cores, {platform.platform()}", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "checkpoint": f"{a.size} (bf16)",
           "px": a.px, "steps": a.steps, "threads": a.threads, "rows": rows,
           "total_minutes": (time.perf_counter() - t0) / 60}
    b = rows["bf16"]
    md = [f"# GGUF weights vs bf16 ({a.size} checkpoint in bf16, {a.px}², {a.steps} steps, CPU, {a.threads} thread)", "",
          f"Machine: {res['machine']}; torch {res['torch']}; {res['date']}. Each row is its own process in the real "
          "ComfyUI host, through the single-file loaders (`bench/bench_gguf.py`). Errors are against the bf16 row: the "
          "DiT's output of one forward on fixed inputs (relative L2), the AR's tokens for the same seed (fraction "
          "equal), the image the DiT and stock VAE Decode make from the bf16 AR's tokens (PSNR).", "",
          "| weights | DiT file | AR file | AR + DiT in memory | peak RSS | AR s / token | vs bf16 | DiT s / step | "
          "vs bf16 | DiT rel. L2 | tokens equal | image PSNR |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, r in rows.items():
        mem = r["weights_mib"]["ar_text"] + r["weights_mib"]["dit"]
        md.append(f"| {v} | {r['files_mib']['dit']:.0f} MiB | {r['files_mib']['ar']:.0f} MiB | {mem:.0f} MiB | "
                  f"{r['peak_rss_mib']:.0f} MiB | {r['ar_s_per_token'] * 1000:.1f} ms | "
                  f"{r['ar_s_per_token'] / b['ar_s_per_token']:.2f} | {r['dit_s_per_step']:.2f} | "
                  f"{r['dit_s_per_step'] / b['dit_s_per_step']:.2f} | {r['dit_rel_l2']:.4f} | "
                  f"{r['token_agreement'] * 100:.0f} % | "
                  f"{'—' if math.isinf(r['image_psnr_db']) else format(r['image_psnr_db'], '.1f') + ' dB'} |")
    md += ["", "## At full size (computed from the official tensor list)", "",
           "Weights each stage puts on the GPU when it runs (ComfyUI loads one stage at a time; the vision tower only "
           "for edits), plus activations (`make memory`).", "",
           "| weights | DiT | AR text part | AR vision tower + VQ | largest stage (AR text or DiT) |", "|---|---|---|---|---|"]
    for v, r in rows.items():
        f = r["full_size_gib"]
        md.append(f"| {v} | {f['dit']:.2f} GiB | {f['ar_text']:.2f} GiB | {f['ar_vision']:.2f} GiB | "
                  f"{max(f['dit'], f['ar_text']):.2f} GiB |")
    md += ["", "- Random weights: the errors show how much each format perturbs this network, not the visual quality "
           "on the trained one. Token agreement drops at the first differing token and stays low after it (sampling "
           "diverges), so it is a strict measure.",
           "- fp8 on the CPU computes in fp32, so the tensors fp8 does not cover (embeddings, norms, heads) are kept in "
           "fp32: more memory than bf16 here; on a GPU they are bf16.",
           "- Speed: every forward dequantizes each layer's blocks (one layer at a time), on the CPU a few times the cost "
           "of bf16's cast. On a GPU the DiT's steps are compute-bound and the dequantization is a small extra; the AR "
           "decodes one token per forward, so it reads the blocks and writes and reads a float copy of each weight "
           "every token: GGUF is how the AR fits a small card, bf16 or fp8 are faster where they fit.", ""]
    write_report(a.out, res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
