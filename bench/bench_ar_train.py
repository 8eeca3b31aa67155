#!/usr/bin/env python
"""An AR LoRA trained with GLM-Image Train AR LoRA, medium checkpoint, CPU, in the real ComfyUI host
(in-process): does it learn, and what does a step cost.

The graph is the one docs/ar-lora.md shows (tests/_support/glmtest_ar_train.py builds it): a dataset folder
read by the stock LoadImageTextDataSetFromFolder -> GLM-Image Train AR LoRA -> stock Save LoRA, loaded
back with Load GLM-Image AR LoRA. Measured on the training images, base AR vs AR + LoRA: the
teacher-forced cross-entropy of each image's own tokens after its caption and the top-1 token accuracy
(the trainer's loss), and how close the greedy tokens the AR writes for each training caption come to
that image's own (difflib similarity of the sequences); seconds per step, peak RSS. Writes
bench/results/ar-train.{md,json}.

    .venv/bin/python bench/bench_ar_train.py                         # medium, 4 images of 256², 300 steps
    .venv/bin/python bench/bench_ar_train.py --size tiny --steps 5    # smoke run
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
    a = training_bench_args(__doc__, px=256, steps=300, lr=0.001, out="ar-train")

    import torch
    import glmtest_ar_train as A
    import glmtest_host
    import glmtest_train as T

    model = "GLM-Image-bench"
    host, _ = glmtest_host.host_with_checkpoint(cached_checkpoint(a.size), model, "glm-bench-ar-train-")
    captions = T.CAPTIONS[:a.images]
    images = A.write_dataset(host, (a.px, a.px), a.images, captions)
    size = (a.px, a.px)
    base_loss, base_acc, examples = A.measure(A.ar_with_lora(host, model), images, captions)
    base_sim = A.sampled_similarity(host, model, None, examples, captions, size)

    torch.manual_seed(0)
    t0 = time.perf_counter()
    res_train = host.run_ok(A.train_graph("loras/glm_bench_ar", model, steps=a.steps, learning_rate=a.lr,
                                          rank=a.rank, alpha=float(a.rank)))
    train_s = time.perf_counter() - t0
    loss = glmtest_host.node_output(host, "6", 1)["loss"]
    graph_png = host.output_images(res_train, "8")[0]
    name = T.saved_lora(host, "loras/glm_bench_ar")
    lora_loss, lora_acc, _ = A.measure(A.ar_with_lora(host, model, name), images, captions)
    lora_sim = A.sampled_similarity(host, model, name, examples, captions, size)
    zero_loss, _, _ = A.measure(A.ar_with_lora(host, model, name, 0.0), images, captions)
    tenth = max(1, len(loss) // 10)
    res = {
        "machine": f"{os.cpu_count()} cores, {platform.platform()}", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "comfyui": ".".join(map(str, glmtest_host.comfy_version())), "checkpoint": a.size, "images": a.images,
        "px": a.px, "steps": a.steps, "learning_rate": a.lr, "rank": a.rank, "torch_threads": torch.get_num_threads(),
        "targets_per_image": examples[0].num_targets,
        "train_seconds": train_s, "seconds_per_step": train_s / a.steps, "peak_rss_mb": peak_rss_mb(),
        "loss": {"base": base_loss, "lora": lora_loss, "ratio": lora_loss / base_loss, "strength_0": zero_loss},
        "token_accuracy": {"base": base_acc, "lora": lora_acc},
        "greedy_similarity": {"base": base_sim, "lora": lora_sim},
        "train_loss_first_tenth": sum(loss[:tenth]) / tenth, "train_loss_last_tenth": sum(loss[-tenth:]) / tenth,
        "train_loss": loss,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    shutil.copy(graph_png, a.out + "-loss.png")
    md = [
        f"# AR LoRA with GLM-Image Train AR LoRA ({a.size} checkpoint, {a.images} images of {a.px}², CPU)", "",
        f"Machine: {res['machine']}; {res['date']}; ComfyUI {res['comfyui']}; torch threads {res['torch_threads']}. "
        f"Train AR LoRA: {a.steps} steps (one image each), AdamW, lr {a.lr}, rank {a.rank}, alpha {a.rank}, "
        f"gradient checkpointing, fp32; {res['targets_per_image']} target tokens per image (preview + grid). "
        "Written by `bench/bench_ar_train.py`.", "",
        "| measure, on the training images | base | LoRA |", "|---|---|---|",
        f"| teacher-forced cross-entropy of the image's own tokens | {base_loss:.3f} | {lora_loss:.3f} "
        f"({res['loss']['ratio']:.3f}×) |",
        f"| top-1 token accuracy, teacher-forced | {base_acc:.3f} | {lora_acc:.3f} |",
        f"| greedy tokens for the caption vs the image's own (sequence similarity) | {base_sim:.3f} | {lora_sim:.3f} |",
        f"| loss at strength 0 | {base_loss:.3f} | {zero_loss:.3f} |", "",
        f"Training loss: mean of the first tenth {res['train_loss_first_tenth']:.3f}, of the last tenth "
        f"{res['train_loss_last_tenth']:.3f}. {res['seconds_per_step']:.2f} s per step ({train_s:.0f} s in all, with "
        f"tokenising the images); peak RSS {res['peak_rss_mb']:.0f} MiB.", "",
        f"Plot Loss Graph of the run: ![loss]({os.path.basename(a.out)}-loss.png)", ""]
    write_report(a.out, res, md)


if __name__ == "__main__":
    main()
