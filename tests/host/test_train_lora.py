"""DiT LoRAs trained with ComfyUI's own Train LoRA node on the GLM-Image MODEL (issue 25, items 2, 3, 6),
on both hosts: a dataset folder (stock LoadImageTextDataSetFromFolder) -> Image → Semantic Tokens ->
GLM-Image Conditioning + stock VAE Encode -> stock TrainLoraNode -> SaveLoRA, loaded back with stock
LoraLoaderModelOnly. The evidence that it learns (glmtest_train's measurements, tiny checkpoint, CPU):
- the flow-matching loss of the training set at fixed (noise, sigma) pairs falls by at least half;
- the LoRA at strength 1 reconstructs the training images (img2img from sigma 0.6) with a latent MSE at
  least 30% below the base model's; at strength 0 it gives the base model's latent bit for bit;
- Plot Loss Graph draws the loss.
Modes: gradient checkpointing (same losses as without), mixed sizes (0.3.75's and 0.33's per-image
path; 0.33's bucket mode with ResolutionBucket), and 0.33's bypass and offloading modes.
"""
import os

import pytest
import torch

import glmtest_host
import glmtest_train as T

SIZE = (64, 64)
TRAIN = dict(steps=150, learning_rate=0.01, rank=8, batch_size=1, seed=3)


def host_has(host, name: str) -> bool:
    """Whether this host's Train LoRA has an input. 0.3.75's lacks bucket, bypass and offloading modes
    (what the docs say each host offers): there the test checks that it is 0.3.75 that lacks it."""
    spec = host.node_class("TrainLoraNode").INPUT_TYPES()
    has = name in spec.get("required", {}) or name in spec.get("optional", {})
    if not has:
        assert glmtest_host.comfy_version() < (0, 4), f"ComfyUI {glmtest_host.comfy_version()} lacks {name}"
    return has


@pytest.fixture(scope="module")
def dataset(host):
    return T.write_dataset(host.folder_paths.get_input_directory(), [SIZE] * 3)


@pytest.fixture(scope="module")
def base(host, dataset):
    host.run_ok(T.dataset_graph())
    model, decoder, pos, neg, lat = T.dataset_outputs(host, "1")
    assert len(pos) == len(neg) == len(lat) == 3, "one conditioning and one latent per dataset image"
    return dict(model=model, decoder=decoder, pos=pos, neg=neg, lat=lat,
                flow=T.flow_loss(model, decoder, pos, neg, lat), i2i=T.img2img_mse(model, decoder, pos, neg, lat))


@pytest.fixture(scope="module")
def trained(host, base):
    res = host.run_ok(T.train_graph(host, "loras/glm_tiny_lora", **TRAIN))
    loss = glmtest_train_loss(host)
    return dict(result=res, loss=loss, name=T.saved_lora(host, "loras/glm_tiny_lora"))


def glmtest_train_loss(host) -> list:
    return T.raw_output(host, "6", T.output_index(host, "TrainLoraNode", "LOSS_MAP"))[0]["loss"]


def lora_outputs(host, name, strength):
    host.run_ok(T.lora_model_graph(name, strength))
    return T.dataset_outputs(host, "9")


def test_training_runs_every_step_and_saves_a_lora_for_every_dit_layer(host, trained):
    from safetensors.torch import load_file
    assert len(trained["loss"]) == TRAIN["steps"] and all(torch.isfinite(torch.tensor(trained["loss"])))
    sd = load_file(os.path.join(host.folder_paths.get_output_directory(), "loras", trained["name"]))
    ups = [k for k in sd if k.endswith(".lora_up.weight")]
    assert ups and all(k.startswith("diffusion_model.") for k in sd), sorted(sd)[:5]
    # every Linear of every transformer block got an adapter, and training moved them off zero
    assert any(".transformer_blocks.1." in k for k in ups)
    assert sum(float(sd[k].abs().max()) > 0 for k in ups) == len(ups)


def test_flow_loss_at_fixed_noise_and_sigmas_falls_by_half(host, base, trained):
    model, decoder, pos, neg, lat = lora_outputs(host, trained["name"], 1.0)
    after = T.flow_loss(model, decoder, pos, neg, lat)
    print(f"flow-matching loss at fixed (noise, sigma): base {base['flow']:.4f} -> LoRA {after:.4f} "
          f"({after / base['flow']:.3f}x)")
    assert after <= 0.5 * base["flow"]


def test_lora_reconstructs_training_images_better_and_strength_zero_is_the_base(host, base, trained):
    model, decoder, pos, neg, lat = lora_outputs(host, trained["name"], 1.0)
    after = T.img2img_mse(model, decoder, pos, neg, lat)
    print(f"img2img latent MSE from sigma {T.IMG2IMG_SIGMAS[0]}: base {base['i2i']:.4f} -> LoRA {after:.4f} "
          f"({after / base['i2i']:.3f}x)")
    assert after <= 0.7 * base["i2i"]
    model0, *_ = lora_outputs(host, trained["name"], 0.0)
    s = list(T.IMG2IMG_SIGMAS)
    for p, ng, x in zip(base["pos"], base["neg"], base["lat"]):
        assert torch.equal(T._sample(model0, p, ng, x, s, 5), T._sample(base["model"], p, ng, x, s, 5))


def test_training_on_fp8_stored_weights_learns(host, dataset):
    """The DiT stored in fp8 (Load GLM-Image's weight_dtype fp8_e4m3fn: half the bf16 memory): the trainer's
    adapters apply to the weights comfy.ops casts up per layer, and the LoRA learns as on float weights."""
    fp8 = {"weight_dtype": "fp8_e4m3fn"}
    host.run_ok(T.dataset_graph(**fp8))
    model, decoder, pos, neg, lat = T.dataset_outputs(host, "1")
    blocks = [p for n, p in model.model.named_parameters() if ".transformer_blocks." in n and n.endswith(".weight")
              and p.dim() == 2]
    assert blocks and all(p.dtype == torch.float8_e4m3fn for p in blocks)
    before = T.flow_loss(model, decoder, pos, neg, lat), T.img2img_mse(model, decoder, pos, neg, lat)
    torch.manual_seed(0)
    host.run_ok(T.train_graph(host, "loras/glm_fp8_lora", loader=fp8, **TRAIN))
    host.run_ok(T.lora_model_graph(T.saved_lora(host, "loras/glm_fp8_lora"), 1.0, **fp8))
    model, decoder, pos, neg, lat = T.dataset_outputs(host, "9")
    after = T.flow_loss(model, decoder, pos, neg, lat), T.img2img_mse(model, decoder, pos, neg, lat)
    print(f"fp8 storage: flow loss {before[0]:.4f} -> {after[0]:.4f}, img2img {before[1]:.4f} -> {after[1]:.4f}")
    assert after[0] <= 0.5 * before[0] and after[1] <= 0.7 * before[1]


def test_bypass_mode_learns(host, dataset, base):
    """0.33's bypass mode (adapters as forward hooks, the base weights never touched: the trainer's path
    for weights it cannot patch) learns like the default mode; the saved LoRA loads as usual."""
    if not host_has(host, "bypass_mode"):
        return
    torch.manual_seed(0)
    host.run_ok(T.train_graph(host, "loras/glm_bypass_lora", **dict(TRAIN, bypass_mode=True)))
    model, decoder, pos, neg, lat = lora_outputs(host, T.saved_lora(host, "loras/glm_bypass_lora"), 1.0)
    flow, i2i = T.flow_loss(model, decoder, pos, neg, lat), T.img2img_mse(model, decoder, pos, neg, lat)
    print(f"bypass mode: flow loss {base['flow']:.4f} -> {flow:.4f}, img2img {base['i2i']:.4f} -> {i2i:.4f}")
    assert flow <= 0.5 * base["flow"] and i2i <= 0.7 * base["i2i"]


def test_loss_graph_is_drawn(host, trained):
    imgs = host.output_images(trained["result"], "8")
    assert len(imgs) == 1 and os.path.getsize(imgs[0]) > 0


def short_run(host, steps=3, **train) -> list:
    # the stock trainer draws image indices and sigmas from torch's global generator
    torch.manual_seed(0)
    host.run_ok(T.train_graph(host, "loras/glm_short", **dict(TRAIN, steps=steps, **train)))
    return glmtest_train_loss(host)


def test_gradient_checkpointing_gives_the_same_losses(host, dataset):
    with_ckpt = short_run(host, gradient_checkpointing=True)
    without = short_run(host, gradient_checkpointing=False)
    assert torch.allclose(torch.tensor(with_ckpt), torch.tensor(without), rtol=1e-5, atol=1e-6), (with_ckpt, without)


def test_mixed_sizes_train_per_image(host):
    """Images of two sizes without bucket mode: the stock trainer's per-image path (each image its own
    forward at its own size, its own conditioning)."""
    T.write_dataset(host.folder_paths.get_input_directory(), [(64, 64), (96, 64), (64, 64)], folder="glm_mixed")
    g = T.train_graph(host, "loras/glm_mixed", **dict(TRAIN, steps=4))
    g["2"]["inputs"]["folder"] = "glm_mixed"
    host.run_ok(g)
    loss = glmtest_train_loss(host)
    assert len(loss) == 4 and all(torch.isfinite(torch.tensor(loss)))


def test_bucket_mode_with_resolution_bucket(host):
    if not host_has(host, "bucket_mode"):
        return
    T.write_dataset(host.folder_paths.get_input_directory(), [(64, 64), (96, 64), (64, 64), (96, 64)],
                    folder="glm_buckets")
    g = T.train_graph(host, "loras/glm_buckets", positive=("13", 1), latents=("13", 0),
                      **dict(TRAIN, steps=4, batch_size=1, bucket_mode=True))
    g["2"]["inputs"]["folder"] = "glm_buckets"
    g["13"] = {"class_type": "ResolutionBucket", "inputs": {"latents": ["5", 0], "conditioning": ["4", 0]}}
    host.run_ok(g)
    loss = glmtest_train_loss(host)
    assert len(loss) == 4 and all(torch.isfinite(torch.tensor(loss)))


@pytest.mark.parametrize("mode", ["bypass_mode", "offloading"])
def test_033_modes_train(host, dataset, mode):
    if not host_has(host, mode):
        return
    loss = short_run(host, steps=3, **{mode: True})
    assert len(loss) == 3 and all(torch.isfinite(torch.tensor(loss)))
    name = T.saved_lora(host, "loras/glm_short")
    model, decoder, pos, neg, lat = lora_outputs(host, name, 1.0)
    base_model = T.dataset_outputs(host, "1")[0]
    s = list(T.IMG2IMG_SIGMAS)
    assert not torch.equal(T._sample(model, pos[0], neg[0], lat[0], s, 5),
                           T._sample(base_model, pos[0], neg[0], lat[0], s, 5)), "the trained LoRA changes nothing"


# ---- bad input ----------------------------------------------------------------------------------

def failure(host, g) -> str:
    ok, _ = host.run(g)
    assert not ok
    err = host.execution_error()
    assert err is not None
    return err["exception_message"]


def test_empty_dataset_is_a_clear_error(host):
    os.makedirs(os.path.join(host.folder_paths.get_input_directory(), "glm_empty"), exist_ok=True)
    g = T.train_graph(host, "loras/glm_empty", **dict(TRAIN, steps=2))
    g["2"]["inputs"]["folder"] = "glm_empty"
    msg = failure(host, g)
    assert "no valid images" in msg.lower() or "no images" in msg, msg


def test_captions_that_do_not_pair_with_images_are_a_clear_error(host, dataset):
    """Three images, captions from another folder of two: refused before any tokenisation."""
    T.write_dataset(host.folder_paths.get_input_directory(), [SIZE] * 2, folder="glm_two")
    g = T.dataset_graph()
    g["20"] = {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": "glm_two"}}
    g["3"]["inputs"]["caption"] = ["20", 1]
    msg = failure(host, g)
    assert "2 captions for 3 images" in msg, msg


def test_interrupt_during_training_leaves_the_server_serving_and_the_next_run_normal(host, dataset):
    """Cancel at a training step (from ComfyUI's progress hook, where the UI's Cancel lands): the run
    stops, and the same training run again gives exactly the losses of an uninterrupted run."""
    import comfy.model_management as mm
    import comfy.utils
    clean = short_run(host, steps=4, seed=11)
    fired = []

    def hook(value, total, preview, node_id=None):
        if total == 40 and value >= 2 and not fired:      # the trainer's bar (40 steps)
            fired.append(value)
            mm.interrupt_current_processing()
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        torch.manual_seed(0)
        ok, _ = host.run(T.train_graph(host, "loras/glm_short", **dict(TRAIN, steps=40, seed=11)))
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
    assert fired and not ok, "the training run was not interrupted"
    assert host.cached_output("6") is None, "an interrupted Train LoRA left an output in the cache"
    assert short_run(host, steps=4, seed=11) == clean


@pytest.mark.parametrize("keys,what", [
    (("base_model.model.model.language_model.layers.0.self_attn.q_proj", (32, 32)), "autoregressive model (the AR)"),
    (("lora_unet_down_blocks_0_attentions_0_proj_in", (64, 32)), "another diffusion model"),
    (("encoder.block.0.layer.0.SelfAttention.q", (32, 32)), "another model"),
])
def test_a_lora_for_another_model_or_the_ar_is_refused_clearly_on_the_dit(host, dataset, keys, what):
    from safetensors.torch import save_file
    name, (out_f, in_f) = keys
    loras = T.loras_folder(host)
    fname = f"glm_foreign_{abs(hash(name)) % 10000}.safetensors"
    sep = "." if "." in name else "_"
    save_file({f"{name}{sep}lora_A.weight" if sep == "." else f"{name}.lora_down.weight": torch.zeros(4, in_f),
               f"{name}{sep}lora_B.weight" if sep == "." else f"{name}.lora_up.weight": torch.zeros(out_f, 4)},
              os.path.join(loras, fname))
    T.loras_folder(host)                         # the new file in the folder list
    msg = failure(host, T.lora_model_graph(fname, 1.0))
    assert "fits none of the GLM-Image DiT's layers" in msg and what in msg, msg
    host.run_ok(T.lora_model_graph(fname, 0.0))  # strength 0: the stock loader does not read it at all
