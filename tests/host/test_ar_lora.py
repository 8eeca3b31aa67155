"""Load GLM-Image AR LoRA in the real ComfyUI host, against transformers + peft on the tiny checkpoint.

A PEFT adapter is made by peft itself on transformers' GlmImageForConditionalGeneration (random A and B,
so it changes the tokens) and saved with save_pretrained; the reference is the same model with the
adapter merged (merge_and_unload) in the official pipeline. Same prompt, size and seed, CPU fp32: the
pack's tokens equal the reference's. Also: ComfyUI's, diffusers' and kohya's names of the same tensors,
strength 0, stacking, unpatching, fp8 storage, GGUF blocks, and the refusals."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import glmtest_ar_train as A
import glmtest_host
import glmtest_oracle


PROMPT = "a red cube on a wooden table"
W, H, SEED = 256, 256, 7
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_up_proj", "down_proj"]
VISION = r".*visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


def sibling(name: str):
    """Another test module of this folder, for its helpers (the test folders are no packages)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"_ar_lora_{name}", os.path.join(os.path.dirname(__file__), f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def hf_ar(tiny_ckpt):
    from transformers import GlmImageForConditionalGeneration
    return GlmImageForConditionalGeneration.from_pretrained(os.path.join(tiny_ckpt, "vision_language_encoder"),
                                                            dtype=torch.float32).train(False)


def make_adapter(tiny_ckpt, out_dir, target_modules, seed, **config):
    """A PEFT LoRA (random A and B) on transformers' AR, saved with save_pretrained into ``out_dir``."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    model = get_peft_model(hf_ar(tiny_ckpt), LoraConfig(target_modules=target_modules, init_lora_weights=False,
                                                        **{"r": 4, "lora_alpha": 8, **config}))
    with torch.no_grad():              # the tiny weights are ~0.02: keep the change large but finite
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.5)
    model.save_pretrained(out_dir)
    return out_dir


def merged(tiny_ckpt, *adapter_dirs):
    """transformers' AR with the adapters merged one after the other (peft's merge_and_unload)."""
    from peft import PeftModel
    model = hf_ar(tiny_ckpt)
    for d in adapter_dirs:
        model = PeftModel.from_pretrained(model, d).merge_and_unload()
    return glmtest_oracle.realign(model.train(False))


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return glmtest_oracle.load_reference_pipeline(tiny_ckpt)


@pytest.fixture(scope="module")
def loras(host):
    d = os.path.join(host.models_dir, "loras")
    os.makedirs(d, exist_ok=True)
    host.folder_paths.add_model_folder_path("loras", d, is_default=True)
    return d


@pytest.fixture(scope="module")
def adapters(tiny_ckpt, loras, tmp_path_factory):
    """name -> PEFT adapter folder (also copied to models/loras/<name>/)."""
    root = tmp_path_factory.mktemp("peft")
    made = {
        "attn_mlp": make_adapter(tiny_ckpt, str(root / "attn_mlp"), ATTENTION + MLP, 1),
        "rslora": make_adapter(tiny_ckpt, str(root / "rslora"), ATTENTION, 2, use_rslora=True, r=8, lora_alpha=4),
        "mlp": make_adapter(tiny_ckpt, str(root / "mlp"), MLP, 3, lora_alpha=16),
        "vision": make_adapter(tiny_ckpt, str(root / "vision"), VISION + r"|.*language_model\.layers\.\d+\.self_attn\.q_proj", 4),
    }
    for name, src in made.items():
        shutil.copytree(src, os.path.join(loras, name), dirs_exist_ok=True)
    return made


def lora_node(ar, name, strength=1.0):
    return {"class_type": "GLMImageARLoraLoader", "inputs": {"ar": ar, "lora_name": name, "strength": strength}}


def tokens_graph(*loras_and_strengths, weight_dtype="default"):
    g = {"1": {"class_type": "GLMImageLoader", "inputs": {"model": "GLM-Image-tiny", "weight_dtype": weight_dtype}}}
    ar = ["1", 0]
    for i, (name, strength) in enumerate(loras_and_strengths):
        g[f"l{i}"] = lora_node(ar, name, strength)
        ar = [f"l{i}", 0]
    g["2"] = {"class_type": "GLMImageTextToTokens", "inputs": {
        "ar": ar, "prompt": PROMPT, "width": W, "height": H, "seed": SEED, "temperature": 0.9, "top_p": 0.75,
        "top_k": 0, "batch_size": 1}}
    g["3"] = {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}
    return g


def pack_tokens(host, *loras_and_strengths, **kw):
    host.run_ok(tokens_graph(*loras_and_strengths, **kw))
    return glmtest_host.node_output(host, "2").grid


def reference_tokens(pipe, model):
    base = pipe.vision_language_encoder
    pipe.vision_language_encoder = model
    try:
        ids, _, _ = pipe.generate_prior_tokens(prompt=PROMPT, height=H, width=W,
                                               generator=torch.Generator().manual_seed(SEED))
    finally:
        pipe.vision_language_encoder = base
    return ids.cpu().view(1, -1)


def upsampled(grid):
    from glm_image_core.generation.tokens import upsample_grid
    return upsample_grid(grid)


@pytest.fixture(scope="module")
def base_tokens(host):
    return pack_tokens(host)


@pytest.mark.parametrize("name", ["attn_mlp", "rslora", "mlp"])
def test_peft_adapter_gives_the_tokens_of_transformers_with_it_merged(host, pipe, tiny_ckpt, adapters, base_tokens, name):
    ours = pack_tokens(host, (f"{name}/adapter_model.safetensors", 1.0))
    want = reference_tokens(pipe, merged(tiny_ckpt, adapters[name]))
    assert torch.equal(upsampled(ours), want), f"{name}: AR tokens differ from transformers + merged adapter"
    assert not torch.equal(ours, base_tokens), f"{name}: the adapter changed nothing"


def test_an_adapter_on_the_vision_tower_gives_the_edit_tokens_of_the_merged_model(host, pipe, tiny_ckpt, adapters):
    """Reference Edit tokenises the reference with the vision tower: its LoRA reaches it (used in edits)."""
    edit = sibling("test_edit_parity")
    EDIT_PROMPT = edit.PROMPT
    pil = [edit.synthetic_rgb(256, 256)]
    names = [edit.put_input(host, "ar_lora_edit.png", pil[0])]
    g, ref_node = edit.edit_graph(names, 256, 256, 0)
    for n in (k for k in g if g[k]["class_type"] in ("GLMImageReferenceEdit", "GLMImageTextToTokens")):
        g[n]["inputs"]["ar"] = ["l0", 0]
    g["l0"] = lora_node(["1", 0], "vision/adapter_model.safetensors")
    for k in ("3", "4", "5"):
        del g[k]
    g["6"] = {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}
    host.run_ok(g)
    tokens, refs = glmtest_host.node_output(host, "2"), glmtest_host.node_output(host, ref_node)
    def edit_tokens(model):
        base = pipe.vision_language_encoder
        pipe.vision_language_encoder = model
        try:
            return pipe.generate_prior_tokens(prompt=EDIT_PROMPT, height=256, width=256, image=[pil],
                                              generator=torch.Generator().manual_seed(0))
        finally:
            pipe.vision_language_encoder = base
    ref_ids, src_ids, _ = edit_tokens(merged(tiny_ckpt, adapters["vision"]))
    _, plain_src, _ = edit_tokens(pipe.vision_language_encoder)
    ours_src = upsampled(refs.items[0].ar_ids[None]).view(-1)
    assert torch.equal(ours_src, src_ids[0].cpu().view(-1)), "reference tokens differ from the merged model's"
    assert not torch.equal(ours_src, plain_src[0].cpu().view(-1)), "the vision adapter changed no reference token"
    assert torch.equal(upsampled(tokens.grid), ref_ids.cpu().view(1, -1)), "AR tokens differ from the merged model's"


def other_names(peft_file: str, out: str, form: str) -> str:
    """The PEFT file's tensors under ComfyUI's / diffusers' / kohya's names, alpha in the file."""
    cfg = json.load(open(os.path.join(os.path.dirname(peft_file), "adapter_config.json")))
    sd = load_file(peft_file)
    out_sd = {}
    for k, v in sd.items():
        module, _, kind = k[len("base_model.model."):].rpartition(".lora_")
        kind = kind.split(".")[0]              # "A" / "B"
        name = {"comfy": module, "diffusers": f"vision_language_encoder.{module}",
                "kohya": "lora_te_" + module.replace(".", "_")}[form]
        if form == "diffusers":
            out_sd[f"{name}.lora_{kind}.weight"] = v
        else:
            out_sd[f"{name}.lora_{'down' if kind == 'A' else 'up'}.weight"] = v
        out_sd[f"{name}.alpha"] = torch.tensor(float(cfg["lora_alpha"]))
    save_file(out_sd, out)
    return out


@pytest.mark.parametrize("form", ["comfy", "diffusers", "kohya"])
def test_comfyui_diffusers_and_kohya_names_give_the_peft_tokens(host, loras, adapters, form):
    name = f"attn_mlp_{form}.safetensors"
    other_names(os.path.join(adapters["attn_mlp"], "adapter_model.safetensors"), os.path.join(loras, name), form)
    assert torch.equal(pack_tokens(host, (name, 1.0)), pack_tokens(host, ("attn_mlp/adapter_model.safetensors", 1.0)))


def test_strength_zero_is_the_base_and_the_base_comes_back_after_a_lora(host, adapters, base_tokens):
    lora = "attn_mlp/adapter_model.safetensors"
    assert torch.equal(pack_tokens(host, (lora, 0.0)), base_tokens)
    assert not torch.equal(pack_tokens(host, (lora, 1.0)), base_tokens)
    assert torch.equal(pack_tokens(host), base_tokens)          # the base patcher was unpatched
    assert not torch.equal(pack_tokens(host, (lora, 0.5)), pack_tokens(host, (lora, 1.0)))


def test_chained_loaders_stack_like_merging_both(host, pipe, tiny_ckpt, adapters):
    ours = pack_tokens(host, ("rslora/adapter_model.safetensors", 1.0), ("mlp/adapter_model.safetensors", 1.0))
    want = reference_tokens(pipe, merged(tiny_ckpt, adapters["rslora"], adapters["mlp"]))
    assert torch.equal(upsampled(ours), want)
    assert not torch.equal(ours, pack_tokens(host, ("mlp/adapter_model.safetensors", 1.0)))


def test_the_lora_applies_to_fp8_storage(host, adapters):
    """fp8-stored weights are patched as ComfyUI patches any fp8 weight (in fp32, rounded back to fp8):
    the stored change is the adapter's delta to fp8 precision."""
    key, module = "model.language_model.layers.0.self_attn.q_proj.weight", "model.language_model.layers.0.self_attn.q_proj"
    base = pack_tokens(host, weight_dtype="fp8_e4m3fn")
    w0 = glmtest_host.node_output(host, "1").model.patcher.model.state_dict()[key]
    assert w0.dtype == torch.float8_e4m3fn
    w0 = w0.float().clone()
    with_lora = pack_tokens(host, ("attn_mlp/adapter_model.safetensors", 1.0), weight_dtype="fp8_e4m3fn")
    w1 = glmtest_host.node_output(host, "l0").model.patcher.model.state_dict()[key]
    assert w1.dtype == torch.float8_e4m3fn
    sd = load_file(os.path.join(adapters["attn_mlp"], "adapter_model.safetensors"))
    cfg = json.load(open(os.path.join(adapters["attn_mlp"], "adapter_config.json")))
    a, b = (sd[f"base_model.model.{module}.lora_{x}.weight"] for x in "AB")
    delta = (b @ a) * (cfg["lora_alpha"] / cfg["r"])
    change = w1.float() - w0
    # ComfyUI rounds the patched weight back to fp8 stochastically (unbiased): the change projects onto
    # the delta with coefficient ~1 (a wrong scale would give alpha's ratio, a missing patch 0), and the
    # rest is fp8 rounding noise (e4m3: 3 mantissa bits, ~12% per weight)
    scale = (change * delta).sum() / (delta * delta).sum()
    noise = (change - delta).norm() / delta.norm()
    assert 0.95 < scale < 1.05 and noise < 0.25, (scale, noise)
    assert not torch.equal(base, with_lora)


def test_the_lora_applies_to_gguf_blocks_as_to_their_dequantized_weights(host, tiny_ckpt, adapters, tmp_path):
    """A GGUF AR keeps its blocks; the LoRA is added to each dequantized weight in the forward. That
    equals patching the weights dequantized at load (weight_dtype fp32) bit for bit."""
    name = A.gguf_ar(host, tiny_ckpt)

    def run(weight_dtype, lora):
        g = tokens_graph(*([(lora, 1.0)] if lora else []))
        g["1"] = {"class_type": "GLMImageARLoader", "inputs": {"ar_name": name, "weight_dtype": weight_dtype}}
        host.run_ok(g)
        return glmtest_host.node_output(host, "2").grid
    lora = "attn_mlp/adapter_model.safetensors"
    kept, dequantized = run("default", lora), run("fp32", lora)
    assert torch.equal(kept, dequantized)
    assert not torch.equal(kept, run("default", None))


# ---- refusals ---------------------------------------------------------------------------------------

def execution_message(host, graph) -> str:
    ok, _ = host.run(graph)
    assert not ok, "expected the AR LoRA loader to fail"
    err = host.execution_error()
    assert err["node_type"] == "GLMImageARLoraLoader", err
    assert not err["exception_type"].startswith(("torch", "safetensors", "RuntimeError")), err["exception_type"]
    return err["exception_message"]


def test_a_dit_lora_is_refused_with_where_it_belongs(host, loras):
    save_file({"transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 4)}, os.path.join(loras, "dit_like.safetensors"))
    msg = execution_message(host, tokens_graph(("dit_like.safetensors", 1.0)))
    assert "DiT" in msg and "LoraLoaderModelOnly" in msg and "transformer_blocks.0.attn1.to_q" in msg


def test_an_ar_lora_on_the_dit_is_refused_with_where_it_belongs(host, adapters):
    g = {"1": {"class_type": "GLMImageLoader", "inputs": {"model": "GLM-Image-tiny", "weight_dtype": "default"}},
         "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 3], "lora_name": "attn_mlp/adapter_model.safetensors",
                                                                "strength_model": 1.0}},
         "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    ok, _ = host.run(g)
    assert not ok
    assert "autoregressive model (the AR)" in host.execution_error()["exception_message"]


def test_an_adapter_for_another_model_size_is_refused_naming_the_shapes(host, loras):
    save_file({"base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 4096),
               "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(4096, 4)},
              os.path.join(loras, "full_size_like.safetensors"))
    msg = execution_message(host, tokens_graph(("full_size_like.safetensors", 1.0)))
    assert "4096" in msg and "model.language_model.layers.0.self_attn.q_proj.weight" in msg and "another model" in msg


def test_a_peft_file_without_its_config_and_a_dora_adapter_are_refused(host, loras, adapters):
    os.makedirs(os.path.join(loras, "no_config"), exist_ok=True)
    shutil.copy(os.path.join(adapters["mlp"], "adapter_model.safetensors"), os.path.join(loras, "no_config"))
    msg = execution_message(host, tokens_graph(("no_config/adapter_model.safetensors", 1.0)))
    assert "adapter_config.json" in msg and "lora_alpha / r" in msg
    shutil.copytree(adapters["mlp"], os.path.join(loras, "dora"), dirs_exist_ok=True)
    cfg_path = os.path.join(loras, "dora", "adapter_config.json")
    cfg = json.load(open(cfg_path))
    json.dump(dict(cfg, use_dora=True), open(cfg_path, "w"))
    assert "DoRA" in execution_message(host, tokens_graph(("dora/adapter_model.safetensors", 1.0)))


def test_a_pickle_lora_is_refused_before_it_is_read(host, loras):
    with open(os.path.join(loras, "evil.pt"), "wb") as f:
        f.write(b"\x80\x04not really a pickle")
    (ok, _, _, node_errors), _ = host.validate(tokens_graph(("evil.pt", 1.0)))
    assert not ok and "safetensors" in json.dumps(node_errors["l0"]["errors"])


def test_after_refusals_the_loader_still_serves(host, base_tokens):
    assert torch.equal(pack_tokens(host), base_tokens)


# ---- model management: lowvram streaming and dynamic VRAM -------------------------------------------

def test_a_partial_lowvram_load_applies_the_lora_to_streamed_layers(host, tiny_ckpt, adapters):
    """--lowvram streams layers with the patch applied per call (ComfyUI's LowVramPatch): the same tokens
    and logits as the fully loaded, patched AR."""
    import comfy.model_management as mm
    lowvram = sibling("test_lowvram")
    cast_flags, pack_module, partial_load = lowvram.cast_flags, lowvram.pack_module, lowvram.partial_load
    from glm_image_core.generation import ar_generate
    loader, ar_lora = pack_module("nodes.loader"), pack_module("nodes.ar_lora")
    base = loader.load_ar_handle(tiny_ckpt, "default")
    path = os.path.join(host.models_dir, "loras", "attn_mlp", "adapter_model.safetensors")
    ar = ar_lora.with_lora(base, ar_lora.ar_patches(base, load_file(path), "attn_mlp", path), 1.0)

    def run(patcher):
        return ar_generate.generate_tokens(patcher.model, ar.tokenizer, PROMPT, width=W, height=H, seed=SEED,
                                           device=ar.model.load_device, dtype=ar.model.compute_dtype,
                                           return_logits=True)
    mm.unload_all_models()
    ar.model.load()
    full = run(ar.model.patcher)
    mm.unload_all_models()
    base.model.load()
    plain = run(base.model.patcher)
    mm.unload_all_models()
    partial_load(ar.model.patcher, 0.5)
    assert any(cast_flags(ar.model.patcher.model)), "expected streamed layers"
    low = run(ar.model.patcher)
    mm.unload_all_models()
    assert torch.equal(full.grid, low.grid) and torch.allclose(full.logits, low.logits, rtol=0, atol=1e-5)
    assert not torch.equal(full.grid, plain.grid)


if glmtest_host.has_dynamic_vram():
    def test_the_lora_gives_the_same_tokens_with_dynamic_vram_on(host, adapters, tmp_path):
        """A fresh 0.33 host process with dynamic VRAM on (weights paged in and out behind the forward)."""
        import subprocess
        import sys
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        g = tokens_graph(("attn_mlp/adapter_model.safetensors", 1.0))
        g["3"] = {"class_type": "GLMImageTokensToLatent", "inputs": {"decoder": ["1", 1], "tokens": ["2", 0],
                                                                     "seed": 1, "steps": 1, "cfg": 1.5}}
        g["4"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}}
        g["5"] = {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}
        (tmp_path / "prompts.json").write_text(json.dumps({"ar_lora": g}))
        child = os.path.join(root, "tests", "_support", "glmtest_dynamic_vram.py")
        r = subprocess.run([sys.executable, child, host.base_dir, str(tmp_path / "prompts.json"), str(tmp_path / "dyn")],
                           capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        assert json.loads((tmp_path / "dyn.json").read_text())["fresh_linear_weight_is_none"]
        dyn = load_file(str(tmp_path / "dyn.safetensors"))["ar_lora.tokens"]
        assert torch.equal(dyn, pack_tokens(host, ("attn_mlp/adapter_model.safetensors", 1.0)))
