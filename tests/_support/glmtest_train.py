"""DiT LoRA training with ComfyUI's own Train LoRA node on the GLM-Image MODEL: the dataset, the
graphs and the measurements that show it learns (tests/host/test_train_lora.py, bench/bench_train.py).

Everything runs through the real host: the dataset folder is read by the stock
``LoadImageTextDataSetFromFolder``, tokens by ``GLMImageImageToTokens``, latents by stock ``VAEEncode``,
training by stock ``TrainLoraNode`` + ``SaveLoRA``, and the LoRA comes back through stock
``LoraLoaderModelOnly``. The measurements sample with ComfyUI's own ``comfy.sample.sample_custom``:
- ``flow_loss``: the flow-matching loss of the training set at fixed (noise, sigma) pairs, i.e. the MSE
  between the model's x0 prediction (one euler step from sigma to 0) and the image's latent, in the
  DiT's normalised latent space (what the trainer's MSE compares);
- ``img2img_mse``: noise the training latent to a fixed mid sigma and denoise it back (euler); the MSE
  against the training latent says how well the model reconstructs its training images.
"""
from __future__ import annotations

import os

import numpy as np
import torch

DATASET = "glm_lora_dataset"
CAPTIONS = ['a red poster that says "GLM"', 'a green card with the word "LoRA"', 'a blue sign reading "train"',
            'a yellow label "four"']
EVAL_SIGMAS = (0.3, 0.5, 0.7, 0.9)
IMG2IMG_SIGMAS = (0.6, 0.45, 0.3, 0.15, 0.0)


def write_dataset(input_dir: str, sizes, folder: str = DATASET, captions=CAPTIONS) -> str:
    """Images (one per size, a distinct coloured pattern each) + .txt captions in input/<folder>/,
    the layout of the stock LoadImageTextDataSetFromFolder."""
    from PIL import Image
    path = os.path.join(input_dir, folder)
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.integers(40, 215, size=3)
        a = np.stack([(base[c] + 40 * np.sin((xx * (c + 1) + yy * (i + 1)) / (6.0 + 3 * i))) for c in range(3)], -1)
        a[h // 4: h // 2, w // 5: 4 * w // 5] = 255 - base          # a "label" block, position per image
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(os.path.join(path, f"img{i}.png"))
        with open(os.path.join(path, f"img{i}.txt"), "w", encoding="utf-8") as f:
            f.write(captions[i % len(captions)])
    return path


def train_inputs(host, **overrides) -> dict:
    """TrainLoraNode's inputs on this host: every widget at its default, then ``overrides``."""
    spec = host.node_class("TrainLoraNode").INPUT_TYPES()
    inputs = {}
    for section in ("required", "optional"):
        for name, s in spec.get(section, {}).items():
            if len(s) > 1 and isinstance(s[1], dict) and "default" in s[1]:
                inputs[name] = s[1]["default"]
    inputs.update(dict(training_dtype="fp32", lora_dtype="fp32", existing_lora="[None]"))
    inputs.update(overrides)
    return inputs


def output_index(host, node: str, type_name: str) -> int:
    """The slot of a node's output by type (Train LoRA's outputs differ: 0.3.75 also returns the MODEL)."""
    return list(host.node_class(node).RETURN_TYPES).index(type_name)


def dataset_graph(model: str = "GLM-Image-tiny", folder: str = DATASET, fit: str = "crop", **loader) -> dict:
    """Loader -> dataset -> Image → Semantic Tokens -> GLM-Image Conditioning + VAE Encode (lists)."""
    return {
        "1": {"class_type": "GLMImageLoader", "inputs": {"model": model, "weight_dtype": "default", **loader}},
        "2": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": folder}},
        "3": {"class_type": "GLMImageImageToTokens", "inputs": {"ar": ["1", 0], "image": ["2", 0],
                                                                 "caption": ["2", 1], "fit": fit}},
        "4": {"class_type": "GLMImageConditioning", "inputs": {"decoder": ["1", 1], "tokens": ["3", 0]}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 1], "vae": ["1", 2]}},
        # outputs, so that the conditioning and the latents are made even without a trainer downstream
        "10": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}},
        "11": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
    }


def train_graph(host, prefix: str, model_node=("1", 3), positive=("4", 0), latents=("5", 0),
                model: str = "GLM-Image-tiny", loader: dict | None = None, **train) -> dict:
    """dataset_graph + Train LoRA + Save LoRA + Plot Loss Graph (``loader``: Load GLM-Image's inputs)."""
    g = dataset_graph(model, **(loader or {}))
    g["6"] = {"class_type": "TrainLoraNode", "inputs": dict(
        train_inputs(host, **train), model=list(model_node), latents=list(latents), positive=list(positive))}
    g["7"] = {"class_type": "SaveLoRA", "inputs": {"lora": ["6", output_index(host, "TrainLoraNode", "LORA_MODEL")],
                                                   "prefix": prefix,
                                                   "steps": ["6", output_index(host, "TrainLoraNode", "INT")]}}
    g["8"] = {"class_type": "LossGraphNode", "inputs": {"loss": ["6", output_index(host, "TrainLoraNode", "LOSS_MAP")],
                                                        "filename_prefix": "glm_lora_loss"}}
    return g


def loras_folder(host) -> str:
    """output/loras (where SaveLoRA writes), registered as a 'loras' folder as users do with
    extra_model_paths; the folder list cache is cleared so new files show."""
    loras = os.path.join(host.folder_paths.get_output_directory(), "loras")
    os.makedirs(loras, exist_ok=True)
    if loras not in host.folder_paths.get_folder_paths("loras"):
        host.folder_paths.add_model_folder_path("loras", loras)
    getattr(host.folder_paths, "filename_list_cache", {}).clear()
    return loras


def saved_lora(host, prefix: str) -> str:
    """The newest file SaveLoRA wrote under output/<prefix>*, as a name in the 'loras' folder list
    (output/loras is registered as a loras folder, as users do with extra_model_paths)."""
    out = host.folder_paths.get_output_directory()
    loras = loras_folder(host)
    stem = os.path.basename(prefix)
    names = sorted((f for f in os.listdir(os.path.dirname(os.path.join(out, prefix)))
                    if f.startswith(stem) and f.endswith(".safetensors")),
                   key=lambda f: os.path.getmtime(os.path.join(out, os.path.dirname(prefix), f)))
    assert names, f"SaveLoRA wrote no file for {prefix}"
    return os.path.relpath(os.path.join(out, os.path.dirname(prefix), names[-1]), loras)


def lora_model_graph(lora_name: str, strength: float, model: str = "GLM-Image-tiny", **loader) -> dict:
    g = dataset_graph(model, **loader)
    g["9"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 3], "lora_name": lora_name,
                                                              "strength_model": strength}}
    g["12"] = {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}}
    return g


def as_list(v) -> list:
    return v if isinstance(v, list) else [v]


def raw_output(host, node: str, index: int):
    """A node's output slot from the last run, as the executor keeps it (a list for list outputs)."""
    entry = host.cached_output(node)
    return (entry.outputs if hasattr(entry, "outputs") else entry)[index]


def dataset_outputs(host, model_node: str = "9"):
    """(MODEL patcher, decoder, [positive], [negative], [raw latent]) from the last run of a dataset graph
    (model_node "1": the loader's own MODEL; "9": after LoraLoaderModelOnly)."""
    model = raw_output(host, model_node, 3 if model_node == "1" else 0)[0]
    decoder = raw_output(host, "1", 1)[0]
    lat = [x["samples"] for x in raw_output(host, "5", 0)]
    return model, decoder, raw_output(host, "4", 0), raw_output(host, "4", 1), lat


def _sample(model, positive, negative, latent, sigmas, seed):
    import comfy.sample
    import comfy.samplers
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.sampler_object("euler"),
                                      torch.tensor(sigmas, dtype=torch.float32), positive, negative, latent,
                                      disable_pbar=True, seed=seed)


def flow_loss(model, decoder, positives, negatives, latents, sigmas=EVAL_SIGMAS, seed=1234) -> float:
    """Mean over images and fixed (noise, sigma) pairs of |x0_pred - x0|² in the DiT's normalised space."""
    total, n = 0.0, 0
    for i, (p, ng, lat) in enumerate(zip(positives, negatives, latents)):
        for j, s in enumerate(sigmas):
            x0 = _sample(model, p, ng, lat, [s, 0.0], seed + 97 * i + j)
            total += torch.mean((decoder.normalize(x0.float()) - decoder.normalize(lat.float())) ** 2).item()
            n += 1
    return total / n


def img2img_mse(model, decoder, positives, negatives, latents, sigmas=IMG2IMG_SIGMAS, seed=99) -> float:
    """Mean over images of |denoise(noise to sigmas[0]) - x0|² in the DiT's normalised space."""
    errs = []
    for i, (p, ng, lat) in enumerate(zip(positives, negatives, latents)):
        out = _sample(model, p, ng, lat, list(sigmas), seed + i)
        errs.append(torch.mean((decoder.normalize(out.float()) - decoder.normalize(lat.float())) ** 2).item())
    return float(np.mean(errs))
