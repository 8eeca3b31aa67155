"""GLM-Image Train AR LoRA in the real ComfyUI host (0.3.75 and 0.33), tiny checkpoint, CPU.

Trains on two captioned images from the stock dataset loader, saves with the stock Save LoRA, loads the
file back with Load GLM-Image AR LoRA and measures on the training images: the teacher-forced loss
falls by at least half, the token accuracy rises, and the tokens the AR samples for a training
caption move toward that image's own tokens."""
import os

import numpy as np
import pytest
import torch

import glmtest_ar_train as A
import glmtest_host
import glmtest_train as T

SIZE = (256, 256)
CAPTIONS = T.CAPTIONS[:2]
MODEL = "GLM-Image-tiny"


def train_graph(prefix: str, steps: int = 300, **train) -> dict:
    return A.train_graph(prefix, MODEL, steps=steps, **train)


@pytest.fixture(scope="module")
def dataset(host):
    return A.write_dataset(host, SIZE, 2, CAPTIONS)


@pytest.fixture(scope="module")
def trained(host, dataset):
    host.run_ok(train_graph("loras/glm_ar_lora"))
    losses = glmtest_host.node_output(host, "6", 1)["loss"]
    return {"name": T.saved_lora(host, "loras/glm_ar_lora"), "losses": losses}


def test_training_learns_the_images_tokens_and_the_saved_lora_loads_back(host, dataset, trained):
    losses = trained["losses"]
    assert len(losses) == 300 and all(np.isfinite(losses))
    base_loss, base_acc, examples = A.measure(A.ar_with_lora(host, MODEL), dataset, CAPTIONS)
    lora_loss, lora_acc, _ = A.measure(A.ar_with_lora(host, MODEL, trained["name"]), dataset, CAPTIONS)
    print(f"\nAR LoRA on the training images: loss {base_loss:.3f} -> {lora_loss:.3f} "
          f"({lora_loss / base_loss:.3f}x), token accuracy {base_acc:.3f} -> {lora_acc:.3f}")
    assert lora_loss <= 0.5 * base_loss
    assert lora_acc > base_acc + 0.2
    before, after = (A.sampled_similarity(host, MODEL, lora, examples, CAPTIONS, SIZE) for lora in (None, trained["name"]))
    print(f"greedy tokens for the training captions vs the images' own (sequence similarity): {before:.3f} -> {after:.3f}")
    assert after > before + 0.02
    zero_loss, _, _ = A.measure(A.ar_with_lora(host, MODEL, trained["name"], 0.0), dataset, CAPTIONS)
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





def test_qlora_on_a_gguf_ar_learns_with_adapters_of_the_logical_shape(host, dataset, tiny_ckpt):
    """The AR from a GGUF Q8_0 file, blocks kept quantized: the adapters have the weights' (out, in) shapes,
    the loss falls, and the blocks stay uint8 (QLoRA, on both ComfyUI versions: the trainer is the pack's)."""
    from safetensors.torch import load_file
    name = A.gguf_ar(host, tiny_ckpt)
    g = train_graph("loras/glm_ar_qlora", steps=40)
    g["1"] = {"class_type": "GLMImageARLoader", "inputs": {"ar_name": name, "weight_dtype": "default"}}
    host.run_ok(g)
    losses = glmtest_host.node_output(host, "6", 1)["loss"]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    sd = load_file(os.path.join(T.loras_folder(host), T.saved_lora(host, "loras/glm_ar_qlora")))
    ar = glmtest_host.node_output(host, "1")
    shapes = {k: tuple(v.shape) for k, v in A.pack_module("glm_image_core.loading.registry").NETWORKS["ar"]
              .skeleton(ar.config).state_dict().items()}
    for k, up in sd.items():
        if k.endswith(".lora_up.weight"):
            module = k[:-len(".lora_up.weight")]
            down = sd[f"{module}.lora_down.weight"]
            assert (up.shape[0], down.shape[1]) == shapes[f"{module}.weight"], k
    quantized = A.pack_module("glm_image_core.quantization.gguf_ops").quantized_layers(ar.model.patcher.glm_network)
    assert quantized and all(layer.weight.dtype == torch.uint8 for _, layer in quantized)


def test_images_of_other_sizes_train_each_at_its_own_grid(host):
    """A dataset of two sizes (non-square too): each image is its own sequence (its preview and grid)."""
    T.write_dataset(host.folder_paths.get_input_directory(), [(256, 256), (384, 256)], folder="glm_ar_mixed",
                    captions=CAPTIONS)
    g = train_graph("loras/glm_ar_mixed", steps=4)
    g["2"]["inputs"]["folder"] = "glm_ar_mixed"
    host.run_ok(g)
    losses = glmtest_host.node_output(host, "6", 1)["loss"]
    assert len(losses) == 4 and all(np.isfinite(losses))


def test_an_empty_dataset_is_a_clear_error(host):
    os.makedirs(os.path.join(host.folder_paths.get_input_directory(), "glm_ar_empty"), exist_ok=True)
    g = train_graph("loras/glm_ar_empty", steps=2)
    g["2"]["inputs"]["folder"] = "glm_ar_empty"
    ok, _ = host.run(g)
    assert not ok
    msg = host.execution_error()["exception_message"]
    assert "no valid images" in msg.lower() or "no images" in msg, msg
