"""AR LoRA training with GLM-Image Train AR LoRA: the graph and the measurements that show it learns
(tests/host/test_ar_train.py, bench/bench_ar_train.py).

Everything runs through the real host: the dataset folder is read by the stock
``LoadImageTextDataSetFromFolder``, the LoRA is trained by ``GLMImageTrainARLoRA``, saved by the stock
``SaveLoRA`` and loaded back by ``GLMImageARLoraLoader``. The measurements, base vs LoRA, on the training
images:
- ``measure``: the teacher-forced cross-entropy of each image's own tokens after its caption and the
  top-1 token accuracy (``glm_image_core.generation.ar_training``, the loss the trainer minimises);
- ``sampled_similarity``: the tokens the AR writes for each training caption (greedy, top_k 1; preview
  then grid) against the image's own, as difflib's similarity ratio of the two sequences (matching runs
  in order, so one dropped repeat does not hide everything after it).
"""
from __future__ import annotations

import difflib
import importlib
import os

import numpy as np
import torch
from PIL import Image

import glmtest_host
import glmtest_train as T

FOLDER = "glm_ar_lora_dataset"


def pack_module(name: str):
    return importlib.import_module(f"{glmtest_host.PACK_DIR.replace('.', '_x_')}.{name}")


def write_dataset(host, size, count: int, captions, folder: str = FOLDER) -> list:
    """The dataset folder (stock loader layout) and its images as IMAGE tensors [1, H, W, 3]."""
    path = T.write_dataset(host.folder_paths.get_input_directory(), [size] * count, folder=folder, captions=captions)
    return [torch.from_numpy(np.array(Image.open(os.path.join(path, f"img{i}.png")).convert("RGB"))).float()[None] / 255
            for i in range(count)]


def gguf_ar(host, folder: str, dtype: str = "gguf_q8_0") -> str:
    """The AR of ``folder`` as a GGUF single file in the host's models/text_encoders/ (written once, by
    scripts/convert_to_single_file.py's code); returns the name Load GLM-Image AR takes."""
    from glm_image_core.loading import single_file as sf
    d = os.path.join(host.models_dir, "text_encoders")
    os.makedirs(d, exist_ok=True)
    host.folder_paths.add_model_folder_path("text_encoders", d, is_default=True)
    name = f"{os.path.basename(os.path.normpath(folder))}_ar_{dtype}.gguf"
    if not os.path.exists(os.path.join(d, name)):
        sf.convert_component(folder, "ar", os.path.join(d, name), None, dtype)
    return name


def train_graph(prefix: str, model: str = "GLM-Image-tiny", folder: str = FOLDER, steps: int = 300, **train) -> dict:
    """Load GLM-Image -> stock dataset loader -> Train AR LoRA -> Save LoRA + Plot Loss Graph."""
    return {"1": {"class_type": "GLMImageLoader", "inputs": {"model": model, "weight_dtype": "default"}},
            "2": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": folder}},
            "6": {"class_type": "GLMImageTrainARLoRA", "inputs": dict(
                {"ar": ["1", 0], "image": ["2", 0], "caption": ["2", 1], "fit": "crop", "steps": steps,
                 "learning_rate": 0.02, "rank": 16, "alpha": 16.0, "seed": 0, "gradient_checkpointing": True,
                 "lora_dtype": "fp32"}, **train)},
            "7": {"class_type": "SaveLoRA", "inputs": {"lora": ["6", 0], "prefix": prefix, "steps": steps}},
            "8": {"class_type": "LossGraphNode", "inputs": {"loss": ["6", 1], "filename_prefix": "glm_ar_loss"}}}


def ar_with_lora(host, model: str, lora_name=None, strength: float = 1.0):
    """The GLM_AR of Load GLM-Image, through Load GLM-Image AR LoRA when ``lora_name`` is given."""
    g = {"1": {"class_type": "GLMImageLoader", "inputs": {"model": model, "weight_dtype": "default"}},
         "3": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    if lora_name:
        g["2"] = {"class_type": "GLMImageARLoraLoader", "inputs": {"ar": ["1", 0], "lora_name": lora_name,
                                                                   "strength": strength}}
        g["3"]["inputs"]["source"] = ["2", 0]
    host.run_ok(g)
    return glmtest_host.node_output(host, "2" if lora_name else "1")


def measure(ar, images, captions):
    """(mean teacher-forced loss, mean token accuracy, the examples) of the images after their captions."""
    ar_train, ar_training = pack_module("nodes.ar_train"), pack_module("glm_image_core.generation.ar_training")
    examples = ar_train.training_examples(ar, images, captions, "crop")
    network = ar.model.load()
    losses, accs = [], []
    with torch.no_grad():
        for ex in examples:
            loss, acc = ar_training.token_loss(ar_training.teacher_forced_logits(
                network, ex, ar.model.load_device, ar.model.compute_dtype), ex.targets)
            losses.append(loss.item())
            accs.append(acc)
    return float(np.mean(losses)), float(np.mean(accs)), examples


def sampled_similarity(host, model: str, lora_name, examples, captions, size) -> float:
    """Mean similarity ratio of the greedy tokens for each caption to that image's own tokens."""
    ratios = []
    for ex, caption in zip(examples, captions):
        g = {"1": {"class_type": "GLMImageLoader", "inputs": {"model": model, "weight_dtype": "default"}},
             "2": {"class_type": "GLMImageTextToTokens", "inputs": {
                 "ar": ["1", 0], "prompt": caption, "width": size[0], "height": size[1], "seed": 5,
                 "temperature": 0.9, "top_p": 0.75, "top_k": 1, "batch_size": 1}},
             "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
        if lora_name:
            g["4"] = {"class_type": "GLMImageARLoraLoader", "inputs": {"ar": ["1", 0], "lora_name": lora_name,
                                                                       "strength": 1.0}}
            g["2"]["inputs"]["ar"] = ["4", 0]
        host.run_ok(g)
        t = glmtest_host.node_output(host, "2")
        sampled = torch.cat([t.preview[0].reshape(-1), t.grid[0].reshape(-1)])
        ratios.append(difflib.SequenceMatcher(None, sampled.tolist(), ex.targets.tolist(), autojunk=False).ratio())
    return float(np.mean(ratios))
