#!/usr/bin/env python3
"""GLM-Image at the official size on this machine (CPU, 24 GiB RAM, weights ≈ 36 GB): one job per
fresh process, each printing one line ``RESULT <json>``. ``tests/fullsize`` (``make fullsize``) runs
them, asserts their bounds and writes ``bench/results/fullsize.{md,json}``.

    python bench/fullsize.py checkpoint [--folder F]              write (or reuse) the random bf16 folder
    python bench/fullsize.py load COMPONENT DTYPE [--folder F]     stream one network in: time, peak RSS
    python bench/fullsize.py t2i DTYPE [--folder F]                the whole text-to-image through ComfyUI
    python bench/fullsize.py train DTYPE [--folder F]              DiT LoRA training steps (stock Train LoRA), 512²
    python bench/fullsize.py ar-logits ours|official|ours-perturbed [--folder F] --out FILE
    python bench/fullsize.py dit-forward ours|official|ours-perturbed|gguf_* [--folder F] --out FILE
    python bench/fullsize.py gguf-convert gguf_q8_0|gguf_q5_k|gguf_q4_k   DiT + AR -> .cache/gguf-full/*.gguf

COMPONENT: ar_text | ar_vision | dit | glyph_encoder | vae; DTYPE: bf16 | fp8 (fp8_e4m3fn storage of the
AR's and DiT's block Linear weights; compute stays bf16) | gguf_* (the DiT / AR from the converted GGUF
file, blocks kept quantized). Peak RSS is the process's VmHWM.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "_support"))

import torch  # noqa: E402

FOLDER = os.path.join(ROOT, ".cache", "models", "diffusers", "GLM-Image-full-bf16")
SHARD_BYTES = 5_000_000_000          # the official folder's shard size
PROMPT = 'a cozy bakery storefront at sunrise, a hand-painted wooden sign that says "FRESH BREAD"'
SIZE, STEPS, CFG, SEED = 256, 2, 1.5, 42
GIB = 1024 ** 3


def vm_hwm() -> int:
    """Peak resident set size of this process in bytes (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def result(obj: dict) -> None:
    print("RESULT " + json.dumps(obj), flush=True)


# ---- the checkpoint ------------------------------------------------------------------------

def checkpoint(folder: str) -> dict:
    """Write the full-size random folder in bf16 (or reuse it: a stamp names the writer's version)."""
    import hashlib

    from glm_image_core.loading import configs
    from glm_image_core.testing import tiny_checkpoint
    stamp = os.path.join(folder, ".written-by")
    digest = hashlib.sha256()
    for module in (tiny_checkpoint, configs):          # the writer and the official configs it writes
        digest.update(open(module.__file__, "rb").read())
    version = digest.hexdigest()[:16]
    if os.path.isfile(stamp) and open(stamp).read().strip() == version:
        return {"folder": folder, "written": False}
    t0 = time.perf_counter()
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tiny_checkpoint.write_checkpoint(tmp, "full", seed=0, max_shard_bytes=SHARD_BYTES, dtype=torch.bfloat16)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    with open(stamp, "w") as f:
        f.write(version + "\n")
    return {"folder": folder, "written": True, "seconds": time.perf_counter() - t0, "peak_rss": vm_hwm()}


def checkpoint_facts(folder: str) -> dict:
    from glm_image_core.loading import checkpoint as ckpt
    out = {}
    for comp in ("vision_language_encoder", "transformer", "text_encoder", "vae"):
        files = ckpt.weight_files(os.path.join(folder, comp))
        dtypes, n = set(), 0
        for p in files:
            for st, shape in ckpt.safetensors_header(p)[1].values():
                dtypes.add(st)
                n += 1
        out[comp] = {"files": [os.path.basename(p) for p in files], "bytes": [os.path.getsize(p) for p in files],
                     "dtypes": sorted(dtypes), "tensors": n}
    return out


# ---- streamed loading ----------------------------------------------------------------------

LOADABLE = ("ar_text", "ar_vision", "dit", "glyph_encoder", "vae")
STORAGE = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
GGUF_DIR = os.path.join(ROOT, ".cache", "gguf-full")          # the checkout's disk, like the checkpoint


def gguf_path(component: str, dtype: str) -> str:
    return os.path.join(GGUF_DIR, f"GLM-Image-full_{component}_{dtype}.gguf")


def build(folder: str, component: str, dtype: str):
    """The network as the pack builds it (plain torch layers, compute bf16), weights streamed in.
    ``component``: a registry id, or ``ar_text`` / ``ar_vision`` for one AR part; ``dtype`` gguf_*:
    from the GGUF single file (``gguf_convert``), blocks kept quantized."""
    from glm_image_core.quantization import gguf_ops
    from glm_image_core.loading import sources
    from glm_image_core.loading import single_file as sf
    network = "ar" if component.startswith("ar_") else component
    kw = {"parts": (component[3:],)} if network == "ar" else {}
    if dtype.startswith("gguf_"):
        src = sf.open_single_file(gguf_path(network, dtype), network)
        return sources.build_network(src, network, torch.bfloat16, "cpu", gguf_ops.quantized_ops(torch.nn),
                                     torch.bfloat16, **kw)
    storage = STORAGE[dtype]
    # a dtype the network does not take (glyph encoder / VAE in fp8) is refused by the registry
    return sources.build_network(sources.FolderSource(folder), network, storage, "cpu", torch.nn, torch.bfloat16, **kw)


def load(folder: str, component: str, dtype: str) -> dict:
    base = vm_hwm()
    t0 = time.perf_counter()
    model = build(folder, component, dtype)
    seconds = time.perf_counter() - t0
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    by_dtype: dict = {}
    for t in model.state_dict().values():
        by_dtype[str(t.dtype)] = by_dtype.get(str(t.dtype), 0) + t.numel() * t.element_size()
    return {"component": component, "dtype": dtype, "seconds": seconds, "final_bytes": size,
            "bytes_by_dtype": by_dtype, "peak_rss": vm_hwm(), "rss_before": base,
            "params": sum(t.numel() for t in model.state_dict().values())}


def gguf_convert(folder: str, dtype: str) -> dict:
    """The DiT and the AR of the full-size folder as GGUF files (scripts/convert_to_single_file.py's
    code), one process: seconds, bytes, tensor types and the peak RSS of the streamed conversion."""
    from glm_image_core.loading import single_file as sf
    os.makedirs(GGUF_DIR, exist_ok=True)
    out = {"dtype": dtype, "components": {}}
    for comp in ("dit", "ar"):
        t0 = time.perf_counter()
        info = sf.convert_component(folder, comp, gguf_path(comp, dtype), None, dtype)
        out["components"][comp] = {"seconds": time.perf_counter() - t0, "bytes": info["bytes"],
                                   "tensors": info["tensors"], "types": info["dtypes"], "peak_rss": vm_hwm()}
    out["peak_rss"] = vm_hwm()
    return out


# ---- the whole text-to-image through ComfyUI ----------------------------------------------

def t2i(folder: str, dtype: str) -> dict:
    """Load GLM-Image → Text → Semantic Tokens (256²) → Semantic Tokens → Latent (2 steps, cfg 1.5) → stock
    VAE Decode, in the real ComfyUI host in-process (COMFYUI_DIR), weights from the bf16 folder."""
    import glmtest_host
    host, name = glmtest_host.host_with_checkpoint(folder, prefix="glm-fullsize-")
    import comfy.utils
    events = []

    def hook(v, t, preview, node_id=None):
        events.append((time.perf_counter(), node_id, v, t))
        if v % 10 == 0 or v == t:          # a progress line on stderr (the AR is long at full size)
            print(f"[t2i {dtype}] node {node_id}: {v}/{t} at {events[-1][0] - t0:.0f} s", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    comfy.utils.set_progress_bar_global_hook(hook)
    wd = {"bf16": "default", "fp8": "fp8_e4m3fn"}[dtype]
    prompt = {
        "1": {"class_type": "GLMImageLoader", "inputs": {"model": name, "weight_dtype": wd, "compute_dtype": "bf16"}},
        "2": {"class_type": "GLMImageTextToTokens", "inputs": {"ar": ["1", 0], "prompt": PROMPT, "width": SIZE,
              "height": SIZE, "seed": SEED, "temperature": 0.9, "top_p": 0.75, "top_k": 0, "batch_size": 1}},
        "3": {"class_type": "GLMImageTokensToLatent", "inputs": {"decoder": ["1", 1], "tokens": ["2", 0],
              "seed": SEED, "steps": STEPS, "cfg": CFG}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    host.run_ok(prompt)
    total = time.perf_counter() - t0
    image = glmtest_host.node_output(host, "4")
    latent = glmtest_host.node_output(host, "3")["samples"]
    tokens = glmtest_host.node_output(host, "2")

    def rate(node):
        ev = [(t, v) for t, n, v, _ in events if n == node]
        if len(ev) < 2 or ev[-1][1] == ev[0][1]:
            return None, None
        return (ev[-1][0] - ev[0][0]) / (ev[-1][1] - ev[0][1]), ev[-1][0] - ev[0][0]
    per_token, ar_decode_s = rate("2")
    per_step, dit_steps_s = rate("3")
    first = {n: min(t for t, m, _, _ in events if m == n) for n in ("2", "3") if any(m == n for _, m, _, _ in events)}
    return {"dtype": dtype, "size": SIZE, "steps": STEPS, "cfg": CFG, "seconds": total,
            "ar_s_per_token": per_token, "ar_decode_s": ar_decode_s, "ar_tokens": max(v for _, n, v, _ in events if n == "2"),
            "dit_s_per_step": per_step, "dit_steps_s": dit_steps_s,
            "until_first_token_s": first.get("2", t0) - t0, "peak_rss": vm_hwm(),
            "image_shape": list(image.shape), "image_finite": bool(torch.isfinite(image).all()),
            "image_mean": float(image.mean()), "image_std": float(image.std()),
            "latent_finite": bool(torch.isfinite(latent).all()), "latent_std": float(latent.float().std()),
            "grid": list(tokens.grid.shape), "comfyui": ".".join(map(str, glmtest_host.comfy_version()))}


# ---- a DiT LoRA training step (the stock Train LoRA node) ------------------------------------

TRAIN_SIZE, TRAIN_STEPS = 512, 2


def train(folder: str, dtype: str) -> dict:
    """Stock Train LoRA on the full-size DiT's MODEL in the real ComfyUI host (in-process, COMFYUI_DIR): one
    512² training image (its own tokens, glyph text, VAE latent, as docs/training.md's graph makes them),
    rank 16, bf16 training, gradient checkpointing per DiT block; TRAIN_STEPS steps. Peak RSS after the
    dataset part (vision tower, glyph encoder, VAE) and after training, and seconds per step.
    ``dtype`` gguf_*: QLoRA, the DiT from its converted GGUF file (``gguf_convert``) through Load GLM-Image
    DiT with the glyph encoder as a single file, trained in bypass mode (ComfyUI >= 0.33)."""
    import glmtest_host
    import glmtest_train as T
    host, name = glmtest_host.host_with_checkpoint(folder, prefix="glm-fullsize-")
    T.write_dataset(host.folder_paths.get_input_directory(), [(TRAIN_SIZE, TRAIN_SIZE)], folder="full_ds")
    import comfy.utils
    steps = []

    def hook(v, t, preview, node_id=None):
        if t == TRAIN_STEPS:
            steps.append(time.perf_counter())
            print(f"[train {dtype}] step {v}/{t} at {steps[-1] - t0:.0f} s", file=sys.stderr, flush=True)
    comfy.utils.set_progress_bar_global_hook(hook)
    gguf = dtype.startswith("gguf_")
    loader = {"weight_dtype": "default" if gguf else {"bf16": "default", "fp8": "fp8_e4m3fn"}[dtype],
              "compute_dtype": "bf16"}
    extra = {"checkpoint_depth": 2} if "checkpoint_depth" in host.node_class("TrainLoraNode").INPUT_TYPES()["required"] \
        else {}
    if gguf:
        extra["bypass_mode"] = True
    tg = T.train_graph(host, "loras/glm_full", model=name, loader=loader, steps=TRAIN_STEPS, learning_rate=1e-4,
                       rank=16, batch_size=1, seed=0, training_dtype="bf16", lora_dtype="bf16",
                       gradient_checkpointing=True, **extra)
    tg["2"]["inputs"]["folder"] = "full_ds"
    if gguf:
        tg.update(_gguf_dit_nodes(host, folder, dtype))
        tg["4"]["inputs"]["decoder"], tg["6"]["inputs"]["model"] = ["32", 0], ["32", 1]
    t0 = time.perf_counter()
    host.run_ok({k: v for k, v in tg.items() if k not in ("6", "7", "8")})
    dataset_s, dataset_rss = time.perf_counter() - t0, vm_hwm()
    t1 = time.perf_counter()
    host.run_ok(tg)
    train_s = time.perf_counter() - t1
    loss = T.raw_output(host, "6", T.output_index(host, "TrainLoraNode", "LOSS_MAP"))[0]["loss"]
    per_step = [b - a for a, b in zip(steps, steps[1:])]
    return {"dtype": dtype, "size": TRAIN_SIZE, "steps": TRAIN_STEPS, "rank": 16, "training_dtype": "bf16",
            "checkpoint_depth": extra.get("checkpoint_depth", "top-level layers"),
            "dataset_s": dataset_s, "peak_rss_after_dataset": dataset_rss, "train_s": train_s,
            "s_per_step": per_step[-1] if per_step else None, "peak_rss": vm_hwm(), "loss": loss,
            "loss_finite": all(x == x and abs(x) != float("inf") for x in loss),
            "comfyui": ".".join(map(str, glmtest_host.comfy_version()))}


AR_TRAIN_SIZE = 256


def ar_train(folder: str, dtype: str) -> dict:
    """GLM-Image Train AR LoRA on the full-size AR in the real ComfyUI host (in-process): one 256² training
    image (its tokens: a 16×16 preview and an 8×8 grid after the caption), rank 16, AR computing in bf16,
    gradient checkpointing per decoder layer, TRAIN_STEPS steps. ``dtype`` bf16: Load GLM-Image on the
    folder; gguf_*: QLoRA, the AR from its converted GGUF file through Load GLM-Image AR (blocks kept
    quantized). Peak RSS (VmHWM: file pages of the mapped weights included) and seconds per step."""
    import glmtest_ar_train as A
    import glmtest_host
    import glmtest_train as T
    import run as R
    host, name = glmtest_host.host_with_checkpoint(folder, prefix="glm-fullsize-ar-")
    A.write_dataset(host, (AR_TRAIN_SIZE, AR_TRAIN_SIZE), 1, T.CAPTIONS[:1], folder="full_ar_ds")
    import comfy.utils
    steps = []

    def hook(v, t, preview, node_id=None):
        if node_id == "6" and t == TRAIN_STEPS:
            steps.append(time.perf_counter())
            print(f"[ar-train {dtype}] step {v}/{t} at {steps[-1] - t0:.0f} s", file=sys.stderr, flush=True)
    comfy.utils.set_progress_bar_global_hook(hook)
    g = A.train_graph("loras/glm_full_ar", name, folder="full_ar_ds", steps=TRAIN_STEPS, learning_rate=1e-4,
                      rank=16, alpha=16.0, lora_dtype="bf16")
    g["1"]["inputs"]["compute_dtype"] = "bf16"
    if dtype.startswith("gguf_"):
        ar = R.link_into_models(gguf_path("ar", dtype), "ar", host.models_dir, host.folder_paths)
        g["1"] = R.single_file_node("ar", ar, compute_dtype="bf16")
    t0 = time.perf_counter()
    host.run_ok(g)
    train_s = time.perf_counter() - t0
    loss = glmtest_host.node_output(host, "6", 1)["loss"]
    per_step = [b - a for a, b in zip(steps, steps[1:])]
    return {"dtype": dtype, "size": AR_TRAIN_SIZE, "steps": TRAIN_STEPS, "rank": 16, "compute_dtype": "bf16",
            "adapter_dtype": "fp32 (saved bf16)", "train_s": train_s,
            "s_per_step": per_step[-1] if per_step else None, "peak_rss": vm_hwm(), "loss": loss,
            "loss_finite": all(x == x and abs(x) != float("inf") for x in loss),
            "comfyui": ".".join(map(str, glmtest_host.comfy_version()))}


def _gguf_dit_nodes(host, folder: str, dtype: str) -> dict:
    """Load GLM-Image Glyph Encoder + Load GLM-Image DiT (node "32") on the converted GGUF DiT, the glyph
    encoder written beside it as a single file; both linked into the host's model folders."""
    import run as R
    glyph = R.link_into_models(R.single_file(folder, "glyph_encoder", dtype, GGUF_DIR), "glyph_encoder",
                               host.models_dir, host.folder_paths)
    dit = R.link_into_models(gguf_path("dit", dtype), "dit", host.models_dir, host.folder_paths)
    return {"31": R.single_file_node("glyph_encoder", glyph),
            "32": R.single_file_node("dit", dit, glyph_encoder=["31", 0], compute_dtype="bf16")}


# ---- full-size parity against the official classes, one network per process --------------

def _perturb(model: torch.nn.Module, key: str, scale: float) -> None:
    w = dict(model.named_parameters())[key]
    w.data = (w.data.float() * (1 + scale)).to(w.dtype)


def ar_logits(folder: str, who: str, out: str) -> dict:
    """Logits of the first sampled token (the last prefill position) of a 256² text-to-image prompt, bf16."""
    from glm_image_core.generation import ar_prompt
    d = os.path.join(folder, "vision_language_encoder")
    tok = ar_prompt.GlmTokenizer.from_folder(os.path.join(folder, "processor"))
    lay = ar_prompt.build_prompt(tok, PROMPT, SIZE, SIZE)
    ids = lay.filled_ids()[None]
    pos, _ = ar_prompt.layout_positions(lay)
    t0 = time.perf_counter()
    if who == "official":
        from transformers import GlmImageForConditionalGeneration
        m = GlmImageForConditionalGeneration.from_pretrained(d, torch_dtype=torch.bfloat16).train(False)
        load_s = time.perf_counter() - t0
        with torch.no_grad():
            logits = m(input_ids=ids, position_ids=pos[:, None]).logits[0, -1]
    else:
        m = build(folder, "ar_text", who if who.startswith("gguf_") else "bf16")
        if who == "ours-perturbed":          # the negative control: one layer's MLP output 1% off
            _perturb(m, "model.language_model.layers.20.mlp.down_proj.weight", 0.01)
        load_s = time.perf_counter() - t0
        with torch.no_grad():
            logits = m(ids, pos, last_only=True)[0, -1]
    _save(out, logits)
    return {"who": who, "load_s": load_s, "seconds": time.perf_counter() - t0, "prompt_tokens": ids.shape[1],
            "peak_rss": vm_hwm(), "finite": bool(torch.isfinite(logits).all())}


def dit_forward(folder: str, who: str, out: str) -> dict:
    """One DiT forward (CFG-conditional pass) at 256² with fixed random inputs, bf16."""
    g = torch.Generator().manual_seed(0)
    h = w = SIZE // 8
    x = torch.randn(1, 16, h, w, generator=g).to(torch.bfloat16)
    glyph = torch.randn(1, 12, 1472, generator=g).to(torch.bfloat16)
    prior = torch.randint(0, 16384, (1, h * w // 4), generator=g)
    kw = dict(timestep=torch.tensor([750.0]), target_size=torch.tensor([[float(SIZE), float(SIZE)]]),
              crop_coords=torch.zeros(1, 2))
    t0 = time.perf_counter()
    with torch.no_grad():
        if who == "official":
            from diffusers import GlmImageTransformer2DModel
            m = GlmImageTransformer2DModel.from_pretrained(folder, subfolder="transformer",
                                                           torch_dtype=torch.bfloat16).eval()
            load_s = time.perf_counter() - t0
            y = m(x, glyph, prior, torch.zeros_like(prior, dtype=torch.bool), **kw).sample
        else:
            m = build(folder, "dit", who if who.startswith("gguf_") else "bf16")
            if who == "ours-perturbed":      # the negative control: one block's feed-forward 1% off
                _perturb(m, "transformer_blocks.15.ff.net.2.weight", 0.01)
            load_s = time.perf_counter() - t0
            y = m(x, glyph, prior, torch.zeros_like(prior, dtype=torch.bool), **kw)
    _save(out, y[0])
    return {"who": who, "load_s": load_s, "seconds": time.perf_counter() - t0, "peak_rss": vm_hwm(),
            "finite": bool(torch.isfinite(y).all())}


def _save(path: str, t: torch.Tensor) -> None:
    from safetensors.torch import save_file
    save_file({"x": t.detach().float().contiguous()}, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job", choices=["checkpoint", "load", "t2i", "train", "ar-train", "ar-logits", "dit-forward",
                                    "gguf-convert"])
    ap.add_argument("args", nargs="*")
    ap.add_argument("--folder", default=FOLDER)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    if a.job == "checkpoint":
        r = checkpoint(a.folder)
        r["layout"] = checkpoint_facts(a.folder)
    elif a.job == "load":
        r = load(a.folder, *a.args)
    elif a.job == "t2i":
        r = t2i(a.folder, *a.args)
    elif a.job == "train":
        r = train(a.folder, *a.args)
    elif a.job == "ar-train":
        r = ar_train(a.folder, *a.args)
    elif a.job == "gguf-convert":
        r = gguf_convert(a.folder, *a.args)
    elif a.job == "ar-logits":
        r = ar_logits(a.folder, a.args[0], a.out)
    else:
        r = dit_forward(a.folder, a.args[0], a.out)
    result(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
