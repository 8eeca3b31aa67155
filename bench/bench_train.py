#!/usr/bin/env python
"""A DiT LoRA trained with ComfyUI's own Train LoRA node on the GLM-Image MODEL, medium checkpoint, CPU,
in the real ComfyUI host (in-process): does it learn, and what does a step cost.

The graph is the one docs/training.md shows (tests/_support/glmtest_train.py builds it): a dataset folder
read by the stock LoadImageTextDataSetFromFolder -> GLM-Image Image → Semantic Tokens -> GLM-Image
Conditioning + stock VAE Encode -> stock TrainLoraNode -> SaveLoRA, loaded back with stock
LoraLoaderModelOnly. Measured with ComfyUI's own ``comfy.sample.sample_custom``, base model vs LoRA:
the flow-matching loss of the training set at fixed (noise, sigma) pairs, and the img2img latent MSE
from sigma 0.6 (both in the DiT's normalised latent space); the training loss of the first and last
tenth of the steps; seconds per training step. Writes bench/results/train.{md,json}.

    .venv/bin/python bench/bench_train.py                         # medium, 4 images of 128², 150 steps
    .venv/bin/python bench/bench_train.py --size tiny --steps 5    # smoke run
"""
from __future__ import annotations

import os
import platform
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (ROOT, SUPPORT, cached_checkpoint, peak_rss_mb, training_bench_args,  # noqa: E402
                     write_report)

sys.path.insert(0, SUPPORT)
sys.path.insert(0, ROOT)


def main() -> None:
    a = training_bench_args(__doc__, px=128, steps=150, lr=0.002, out="train")

    import torch
    import glmtest_host
    import glmtest_train as T

    host, _ = glmtest_host.host_with_checkpoint(cached_checkpoint(a.size), "GLM-Image-bench", "glm-bench-train-")
    T.write_dataset(host.folder_paths.get_input_directory(), [(a.px, a.px)] * a.images)

    host.run_ok(T.dataset_graph("GLM-Image-bench"))
    model, decoder, pos, neg, lat = T.dataset_outputs(host, "1")
    before = {"flow": T.flow_loss(model, decoder, pos, neg, lat), "i2i": T.img2img_mse(model, decoder, pos, neg, lat)}

    torch.manual_seed(0)
    t0 = time.perf_counter()
    res_train = host.run_ok(T.train_graph(host, "loras/glm_bench", model="GLM-Image-bench", steps=a.steps,
                                          learning_rate=a.lr, rank=a.rank, batch_size=1, seed=3))
    train_s = time.perf_counter() - t0
    loss = T.raw_output(host, "6", T.output_index(host, "TrainLoraNode", "LOSS_MAP"))[0]["loss"]
    graph_png = host.output_images(res_train, "8")[0]
    name = T.saved_lora(host, "loras/glm_bench")
    host.run_ok(T.lora_model_graph(name, 1.0, model="GLM-Image-bench"))
    model1, decoder, pos, neg, lat = T.dataset_outputs(host, "9")
    after = {"flow": T.flow_loss(model1, decoder, pos, neg, lat), "i2i": T.img2img_mse(model1, decoder, pos, neg, lat)}
    tenth = max(1, len(loss) // 10)
    res = {
        "machine": f"{os.cpu_count()} cores, {platform.platform()}", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "comfyui": ".".join(map(str, glmtest_host.comfy_version())), "checkpoint": a.size, "images": a.images,
        "px": a.px, "steps": a.steps, "learning_rate": a.lr, "rank": a.rank, "torch_threads": torch.get_num_threads(),
        "train_seconds": train_s, "seconds_per_step": train_s / a.steps, "peak_rss_mb": peak_rss_mb(),
        "flow_loss": {"base": before["flow"], "lora": after["flow"], "ratio": after["flow"] / before["flow"]},
        "img2img_mse": {"base": before["i2i"], "lora": after["i2i"], "ratio": after["i2i"] / before["i2i"]},
        "train_loss_first_tenth": sum(loss[:tenth]) / tenth, "train_loss_last_tenth": sum(loss[-tenth:]) / tenth,
        "loss": loss,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    shutil.copy(graph_png, a.out + "-loss.png")
    md = [
        f"# DiT LoRA with the stock Train LoRA node ({a.size} checkpoint, {a.images} images of {a.px}², CPU)", "",
        f"Machine: {res['machine']}; {res['date']}; ComfyUI {res['comfyui']}; torch threads {res['torch_threads']}. "
        f"Train LoRA: {a.steps} steps, AdamW, lr {a.lr}, rank {a.rank}, batch 1, fp32. Written by "
        "`bench/bench_train.py`.", "",
        "| measure | base | LoRA | LoRA / base |", "|---|---|---|---|",
        f"| flow-matching loss at fixed (noise, sigma ∈ {{{', '.join(map(str, T.EVAL_SIGMAS))}}}) | "
        f"{before['flow']:.4f} | {after['flow']:.4f} | {res['flow_loss']['ratio']:.3f} |",
        f"| img2img latent MSE, euler from sigma {T.IMG2IMG_SIGMAS[0]} | {before['i2i']:.4f} | {after['i2i']:.4f} | "
        f"{res['img2img_mse']['ratio']:.3f} |", "",
        f"Training loss (each step its own random sigma): mean of the first tenth {res['train_loss_first_tenth']:.3f}, "
        f"of the last tenth {res['train_loss_last_tenth']:.3f}. {res['seconds_per_step']:.2f} s per step "
        f"({train_s:.0f} s in all, with the LoRA set-up); peak RSS {res['peak_rss_mb']:.0f} MiB.", "",
        f"Plot Loss Graph of the run: ![loss]({os.path.basename(a.out)}-loss.png)", ""]
    write_report(a.out, res, md)


if __name__ == "__main__":
    main()
