"""GLM-Image Train AR LoRA in the real ComfyUI host (0.3.75 and 0.33), tiny checkpoint, CPU.

Trains on two captioned images from the stock dataset loader, saves with the stock Save LoRA, loads the
file back with Load GLM-Image AR LoRA and measures on the training images: the teacher-forced loss
falls by at least half, the token accuracy rises, and the tokens the AR samples for a training
caption move toward that image's own tokens."""
import difflib
import importlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

import glmtest_host
import glmtest_train as T

FOLDER, SIZE = "glm_ar_lora_dataset", (256, 256)
CAPTIONS = T.CAPTIONS[:2]


def pack_module(name: str):
    return importlib.import_module(f"{glmtest_host.PACK_DIR.replace('.', '_x_')}.{name}")


def train_graph(prefix: str, steps: int = 300, **train) -> dict:
    g = {"1": {"class_type": "GLMImageLoader", "inputs": {"model": "GLM-Image-tiny", "weight_dtype": "default"}},
         "2": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": FOLDER}},
         "6": {"class_type": "GLMImageTrainARLoRA", "inputs": dict(
             {"ar": ["1", 0], "image": ["2", 0], "caption": ["2", 1], "fit": "crop", "steps": steps,
              "learning_rate": 0.02, "rank": 16, "alpha": 16.0, "seed": 0, "gradient_checkpointing": True,
              "lora_dtype": "fp32"}, **train)},
         "7": {"class_type": "SaveLoRA", "inputs": {"lora": ["6", 0], "prefix": prefix, "steps": steps}},
         "8": {"class_type": "LossGraphNode", "inputs": {"loss": ["6", 1], "filename_prefix": "glm_ar_loss"}}}
    return g


@pytest.fixture(scope="module")
def dataset(host):
    path = T.write_dataset(host.folder_paths.get_input_directory(), [SIZE] * 2, folder=FOLDER, captions=CAPTIONS)
    images = [torch.from_numpy(np.array(Image.open(os.path.join(path, f"img{i}.png")).convert("RGB"))).float()[None] / 255
              for i in range(2)]
    return images


@pytest.fixture(scope="module")
def trained(host, dataset):
    host.run_ok(train_graph("loras/glm_ar_lora"))
    losses = glmtest_host.node_output(host, "6", 1)["loss"]
    return {"name": T.saved_lora(host, "loras/glm_ar_lora"), "losses": losses}


def handles(host, lora_name=None, strength=1.0):
    g = {"1": {"class_type": "GLMImageLoader", "inputs": {"model": "GLM-Image-tiny", "weight_dtype": "default"}},
         "3": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    if lora_name:
        g["2"] = {"class_type": "GLMImageARLoraLoader", "inputs": {"ar": ["1", 0], "lora_name": lora_name,
                                                                   "strength": strength}}
        g["3"]["inputs"]["source"] = ["2", 0]
    host.run_ok(g)
    return glmtest_host.node_output(host, "2" if lora_name else "1")


def measure(ar, images):
    """(mean teacher-forced loss, mean token accuracy) of the training images after their captions."""
    ar_train, ar_training = pack_module("nodes.ar_train"), pack_module("glm_image_core.generation.ar_training")
    examples = ar_train.training_examples(ar, images, CAPTIONS, "crop")
    network = ar.model.load()
    losses, accs = [], []
    with torch.no_grad():
        for ex in examples:
            loss, acc = ar_training.token_loss(ar_training.teacher_forced_logits(network, ex, ar.model.load_device,
                                                                                 ar.model.compute_dtype), ex.targets)
            losses.append(loss.item())
            accs.append(acc)
    return float(np.mean(losses)), float(np.mean(accs)), examples


def sampled_overlap(host, lora_name, examples) -> float:
    """How close the tokens the AR writes for each training caption (greedy: top_k 1; preview, then grid)
    come to that image's own: difflib's similarity ratio of the two sequences (matching runs in order,
    so one dropped repeat does not hide the rest), averaged over the images."""
    ratios = []
    for i, ex in enumerate(examples):
        g = {"1": {"class_type": "GLMImageLoader", "inputs": {"model": "GLM-Image-tiny", "weight_dtype": "default"}},
             "2": {"class_type": "GLMImageTextToTokens", "inputs": {
                 "ar": ["1", 0], "prompt": CAPTIONS[i], "width": SIZE[0], "height": SIZE[1], "seed": 5,
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


def test_training_learns_the_images_tokens_and_the_saved_lora_loads_back(host, dataset, trained):
    losses = trained["losses"]
    assert len(losses) == 300 and all(np.isfinite(losses))
    base_loss, base_acc, examples = measure(handles(host), dataset)
    lora_loss, lora_acc, _ = measure(handles(host, trained["name"]), dataset)
    print(f"\nAR LoRA on the training images: loss {base_loss:.3f} -> {lora_loss:.3f} "
          f"({lora_loss / base_loss:.3f}x), token accuracy {base_acc:.3f} -> {lora_acc:.3f}")
    assert lora_loss <= 0.5 * base_loss
    assert lora_acc > base_acc + 0.2
    before, after = sampled_overlap(host, None, examples), sampled_overlap(host, trained["name"], examples)
    print(f"greedy tokens for the training captions vs the images' own (sequence similarity): {before:.3f} -> {after:.3f}")
    assert after > before + 0.02
    zero_loss, _, _ = measure(handles(host, trained["name"], 0.0), dataset)
    assert zero_loss == base_loss                      # strength 0: the base, bit for bit


def test_the_saved_file_is_comfyuis_lora_format(host, trained):
    from safetensors.torch import load_file
    sd = load_file(os.path.join(T.loras_folder(host), trained["name"]))
    ups = [k for k in sd if k.endswith(".lora_up.weight")]
    assert ups and all(k.startswith("model.language_model.layers.") for k in ups)
    assert {k.rsplit(".", 3)[-3] for k in ups} >= {"q_proj", "v_proj", "gate_up_proj", "down_proj"}
    assert all(f"{k[:-len('.lora_up.weight')]}.alpha" in sd for k in ups)
    assert not any("visual" in k or "lm_head" in k for k in sd)       # the vision tower and lm_head stay frozen


def test_checkpointing_changes_memory_not_the_result(host, dataset):
    """The same seed trains the same LoRA with and without gradient checkpointing."""
    outs = []
    for ckpt in (True, False):
        host.run_ok(train_graph(f"loras/glm_ar_ckpt_{ckpt}", steps=3, gradient_checkpointing=ckpt))
        outs.append(glmtest_host.node_output(host, "6", 0))
    assert outs[0].keys() == outs[1].keys()
    for k in outs[0]:
        assert torch.allclose(outs[0][k], outs[1][k], rtol=1e-4, atol=1e-6), k


def execution_message(host, graph) -> str:
    ok, _ = host.run(graph)
    assert not ok, "expected the trainer to fail"
    err = host.execution_error()
    assert err["node_type"] == "GLMImageTrainARLoRA", err
    assert not err["exception_type"].startswith(("torch", "RuntimeError")), err["exception_type"]
    return err["exception_message"]


def test_bad_input_is_refused_with_what_was_wrong(host, dataset):
    g = train_graph("loras/glm_ar_bad", steps=2)     # (the stock loss graph needs two points)
    g["9"] = {"class_type": "EmptyImage", "inputs": {"width": 256, "height": 256, "batch_size": 2, "color": 0}}
    g["6"]["inputs"].update(image=["9", 0], caption="one caption for both")
    host.run_ok(g)                                   # one caption for all images is fine
    g["6"]["inputs"]["caption"] = ["2", 1]
    g["2"]["inputs"]["folder"] = FOLDER
    g["9"]["inputs"]["batch_size"] = 3               # 3 images, 2 captions
    assert "captions for 3 images" in execution_message(host, g)
    g["9"]["inputs"].update(width=16, height=16, batch_size=2)
    assert "outside what" in execution_message(host, g)


def test_an_interrupt_stops_training_and_the_next_run_trains_again(host, dataset):
    import comfy.model_management as mm
    import comfy.utils
    calls = []

    def hook(value, total, preview, node_id=None):
        # ">=": ComfyUI >= 0.2x throttles progress reports, so not every step reaches the hook
        if not calls and node_id == "6" and total == 5 and 1 <= value < total:
            calls.append(value)
            mm.interrupt_current_processing()
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        ok, _ = host.run(train_graph("loras/glm_ar_interrupted", steps=5))
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    assert calls and not ok and host.cached_output("6") is None
    host.run_ok(train_graph("loras/glm_ar_after", steps=2))
    assert len(glmtest_host.node_output(host, "6", 1)["loss"]) == 2



