"""GGUF single files in the real ComfyUI host: scripts/convert_to_single_file.py --dtype gguf_q8_0 /
gguf_q5_k / gguf_q4_k writes the DiT and the AR as .gguf; the single-file loaders list them (from
models/diffusion_models, models/unet and models/text_encoders), keep the blocks quantized in memory
(uint8 in the layers, the patcher sized by them) and dequantize per layer at compute: a whole
text-to-image runs, and equals the same file dequantized at load (weight_dtype fp32) bit for bit; a
lowvram partial load streams the blocks and changes nothing; the stock MODEL samples; a LoRA on the
quantized weights is applied to the dequantized weight in the forward (within the format's own error of
the LoRA on the float DiT; the same under a lowvram partial load); a GGUF that is not GLM-Image is
refused with a clear message.

The checkpoint is the tiny one widened where the blocks need it (AR 256 wide, DiT 4 heads x 64), so
every block matrix holds whole Q8_0 (32) and K-quant (256) blocks."""
import importlib
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import glmtest_host
from glm_image_core.quantization import gguf_file, gguf_ops
from glm_image_core.testing import tiny_checkpoint

ROOT = glmtest_host.ROOT
SIZE = "tiny-gguf"
TYPES = ["gguf_q8_0", "gguf_q5_k", "gguf_q4_k"]
PROMPT = 'a shop sign that says "OPEN"'
W = H = 256
# relative L2 of the latent (same tokens, 2 steps) against the safetensors DiT; Q4_K's own weight
# error is ~0.07 (tests/core/test_gguf_quant.py), a random network passes it on almost unchanged
MAX_LATENT_REL = {"gguf_q8_0": 0.01, "gguf_q5_k": 0.06, "gguf_q4_k": 0.12}


def pack_module(name: str):
    return importlib.import_module(f"{glmtest_host.PACK_DIR.replace('.', '_x_')}.{name}")


def name_of(component: str, dtype: str) -> str:
    return f"tg_{component}_{dtype}.gguf"


@pytest.fixture(scope="module")
def models(host, tmp_path_factory):
    """The widened tiny checkpoint converted as stored and to each GGUF type, in the host's models/
    folders (the Q4_K DiT in models/unet, ComfyUI's older name for diffusion models)."""
    sizes = tiny_checkpoint.SIZES
    sizes[SIZE] = dict(sizes["tiny"],
                       text=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, mrope_section=[8, 4, 4]),
                       dit=dict(num_layers=2, attention_head_dim=64, num_attention_heads=4, time_embed_dim=64,
                                condition_dim=32))
    try:
        folder = tiny_checkpoint.write_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "GLM-Image-tg"), SIZE)
    finally:
        sizes.pop(SIZE)
    out = str(tmp_path_factory.mktemp("converted"))
    for dtype in ["as_stored"] + TYPES:
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_to_single_file.py"), folder, "--out", out,
                        "--dtype", dtype, "--prefix", "tg"], check=True, capture_output=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    dirs = {}
    for sub in ("diffusion_models", "text_encoders", "vae", "loras"):
        d = os.path.join(host.models_dir, sub)
        os.makedirs(d, exist_ok=True)
        host.folder_paths.add_model_folder_path(sub, d, is_default=True)
        dirs[sub] = d
    dirs["unet"] = os.path.join(host.models_dir, "unet")
    os.makedirs(dirs["unet"], exist_ok=True)
    host.folder_paths.add_model_folder_path("diffusion_models", dirs["unet"])
    place = {"tg_dit.safetensors": "diffusion_models", "tg_ar.safetensors": "text_encoders",
             "tg_glyph_encoder.safetensors": "text_encoders", "tg_vae.safetensors": "vae"}
    for dtype in TYPES:
        place[name_of("dit", dtype)] = "unet" if dtype == "gguf_q4_k" else "diffusion_models"
        place[name_of("ar", dtype)] = "text_encoders"
    for name, sub in place.items():
        os.symlink(os.path.join(out, name), os.path.join(dirs[sub], name))      # no second copy on disk
    return dirs


@pytest.fixture(autouse=True)
def clean_model_management(host):
    import comfy.model_management as mm
    mm.unload_all_models()
    yield
    mm.unload_all_models()


def graph(dit: str, ar: str, weight_dtype: str = "default", seed: int = 3) -> dict:
    return {
        "10": {"class_type": "GLMImageARLoader", "inputs": {"ar_name": ar, "weight_dtype": weight_dtype}},
        "11": {"class_type": "GLMImageGlyphEncoderLoader", "inputs": {"glyph_encoder_name": "tg_glyph_encoder.safetensors",
                                                                     "weight_dtype": "default"}},
        "12": {"class_type": "GLMImageDiTLoader", "inputs": {"dit_name": dit, "glyph_encoder": ["11", 0],
                                                             "weight_dtype": weight_dtype}},
        "13": {"class_type": "GLMImageVAELoader", "inputs": {"vae_name": "tg_vae.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "GLMImageTextToTokens", "inputs": {"ar": ["10", 0], "prompt": PROMPT, "width": W,
              "height": H, "seed": seed, "temperature": 0.9, "top_p": 0.75, "top_k": 0, "batch_size": 1}},
        "3": {"class_type": "GLMImageTokensToLatent", "inputs": {"decoder": ["12", 0], "tokens": ["2", 0],
              "seed": seed, "steps": 2, "cfg": 1.5}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["13", 0]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }


def outputs(host) -> tuple:
    return (glmtest_host.node_output(host, "2").grid.clone(), glmtest_host.node_output(host, "3")["samples"].clone(),
            glmtest_host.node_output(host, "4").clone())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_the_loaders_list_gguf_files_where_comfyui_users_put_them(host, models):
    def options(node, name):
        spec = host.node_class(node).INPUT_TYPES()["required"][name]
        return spec[1]["options"] if spec[0] == "COMBO" else spec[0]
    dit = options("GLMImageDiTLoader", "dit_name")
    assert {name_of("dit", t) for t in TYPES} | {"tg_dit.safetensors"} <= set(dit)     # Q4_K from models/unet
    assert {name_of("ar", t) for t in TYPES} | {"tg_ar.safetensors"} <= set(options("GLMImageARLoader", "ar_name"))
    assert not any(n.endswith(".gguf") for n in options("GLMImageGlyphEncoderLoader", "glyph_encoder_name"))
    assert not any(n.endswith(".gguf") for n in options("GLMImageVAELoader", "vae_name"))
    # ComfyUI's own lists leave .gguf out, so the stock loaders never offer our files
    assert not any(n.endswith(".gguf") for n in host.folder_paths.get_filename_list("diffusion_models"))


@pytest.mark.parametrize("dtype", TYPES)
def test_a_gguf_t2i_keeps_blocks_quantized_and_equals_the_file_dequantized_at_load(host, models, dtype):
    dit, ar = name_of("dit", dtype), name_of("ar", dtype)
    host.run_ok(graph(dit, ar))
    kept = outputs(host)
    decoder = glmtest_host.node_output(host, "12")
    ar_payload = glmtest_host.node_output(host, "10")
    for what, comp in (("DiT", decoder.dit), ("AR", ar_payload.model)):
        layers = gguf_ops.quantized_layers(comp.network)
        assert layers, f"the {what} holds no quantized layer"
        assert all(m.weight.dtype == torch.uint8 for _, m in layers), what
        if what == "AR":                                # the token table too (rows dequantized on lookup)
            assert "language_model.embed_tokens" in {n.replace("model.", "", 1) for n, _ in layers}
        # ComfyUI sizes the patcher by what it holds: the blocks, not their float size
        floats = sum(4 * math.prod(m.logical_weight_shape) for _, m in layers)
        blocks = sum(m.weight.numel() for _, m in layers)
        assert blocks < floats / 3
        size_q = comp.patcher.model_size()
        # ComfyUI is asked for room to dequantize the widest Linear (fp32 formulas + an fp32 compute copy)
        widest = max(m.out_features * m.in_features for _, m in layers if hasattr(m, "in_features"))
        assert comp.patcher.glm_scratch_bytes == widest * 12, what
    assert all(torch.isfinite(t).all() for t in kept[1:]) and kept[2].shape == (1, H, W, 3)

    host.run_ok(graph(dit, ar, weight_dtype="fp32"))                # the same file, dequantized at load
    whole = outputs(host)
    assert not gguf_ops.quantized_layers(glmtest_host.node_output(host, "12").dit.network)
    assert glmtest_host.node_output(host, "12").dit.patcher.glm_scratch_bytes == 0
    assert glmtest_host.node_output(host, "10").model.patcher.model_size() > size_q
    for name, a, b in zip(("tokens", "latent", "image"), kept, whole):
        assert torch.equal(a, b), f"{name}: blocks dequantized per layer differ from the file dequantized at load"


@pytest.mark.parametrize("dtype", TYPES)
def test_the_gguf_dit_stays_close_to_the_safetensors_dit(host, models, dtype):
    host.run_ok(graph("tg_dit.safetensors", "tg_ar.safetensors"))
    ref = outputs(host)
    host.run_ok(graph(name_of("dit", dtype), "tg_ar.safetensors"))
    got = outputs(host)
    assert torch.equal(got[0], ref[0])                               # same AR, same tokens
    err = rel(got[1], ref[1])
    assert 0 < err < MAX_LATENT_REL[dtype], (dtype, err)


def test_a_lowvram_partial_load_streams_the_blocks_and_changes_nothing(host, models):
    """The Q4_K DiT loaded whole vs partially (ComfyUI's lowvram: layers streamed per call through
    comfy.ops' cast path, blocks moved as uint8): identical latents."""
    import comfy.model_management as mm
    from glm_image_core.generation import denoise as dn
    from glm_image_core.generation.tokens import upsample_grid
    sfn, loader, glyph = pack_module("nodes.single_file"), pack_module("nodes.loader"), pack_module("nodes.glyph")
    enc = loader.glyph_encoder_handle(sfn.open_component("text_encoders", "tg_glyph_encoder.safetensors",
                                                         "glyph_encoder"), "default")
    decoder = loader.decoder_handle(sfn.open_component("diffusion_models", name_of("dit", "gguf_q4_k"), "dit"), enc,
                                    "default")
    cond = glyph.encode_glyph(decoder, PROMPT, mode="prompt").embeds
    uncond = glyph.encode_glyph(decoder, "", mode="regions").embeds
    patcher = decoder.dit.patcher
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, decoder.latent_channels, 16, 16, generator=g)
    grid = torch.randint(0, decoder.codebook_size, (1, 4, 4), generator=g)

    def run():
        dtype = decoder.dit.compute_dtype
        return dn.denoise(decoder.dit.network, noise, upsample_grid(grid), cond.to(dtype), uncond.to(dtype), (128, 128),
                          2, 1.5, decoder.scheduler_config, compute_dtype=dtype)

    decoder.dit.load()
    full = run()
    mm.unload_all_models()
    largest = max(mm.module_size(m) for m in patcher.model.modules() if hasattr(m, "comfy_cast_weights"))
    loaded = mm.LoadedModel(patcher)
    loaded.model_load(lowvram_model_memory=int(largest + 0.3 * (patcher.model_size() - largest)))
    mm.current_loaded_models.insert(0, loaded)
    assert 0 < patcher.loaded_size() < patcher.model_size()
    streamed = [m for _, m in gguf_ops.quantized_layers(patcher.model) if m.comfy_cast_weights]
    assert streamed, "no quantized layer is streamed"
    assert torch.equal(run(), full)


def test_the_stock_model_of_a_gguf_dit_samples(host, models):
    g = graph(name_of("dit", "gguf_q8_0"), "tg_ar.safetensors")
    g["3"] = {"class_type": "KSampler", "inputs": {"model": ["12", 1], "seed": 3, "steps": 2, "cfg": 1.5,
              "sampler_name": "euler", "scheduler": "simple", "positive": ["15", 0], "negative": ["15", 1],
              "latent_image": ["14", 0], "denoise": 1.0}}
    g["14"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": W, "height": H, "batch_size": 1}}
    g["15"] = {"class_type": "GLMImageConditioning", "inputs": {"decoder": ["12", 0], "tokens": ["2", 0]}}
    host.run_ok(g)
    latent = glmtest_host.node_output(host, "3")["samples"]
    assert latent.shape == (1, 16, H // 8, W // 8) and torch.isfinite(latent).all()


def write_random_lora(path: str, rank: int = 4, scale: float = 3.0) -> int:
    """A diffusers/PEFT-named LoRA on every Linear of the widened tiny DiT's transformer blocks (the
    layers GGUF quantizes), strong enough to change the image; returns how many layers it patches."""
    from safetensors import safe_open
    g = torch.Generator().manual_seed(7)
    sd = {}
    with safe_open(os.path.join(os.path.dirname(path), "..", "diffusion_models", "tg_dit.safetensors"), "pt") as f:
        for k in f.keys():
            if k.startswith("transformer_blocks.") and k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2:
                out_f, in_f = f.get_slice(k).get_shape()
                name = k[:-len(".weight")]
                sd[f"{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * scale / math.sqrt(in_f)
                sd[f"{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * scale / math.sqrt(rank)
    save_file(sd, path)
    return len(sd) // 2


def stock_graph(dit: str, lora: str | None) -> dict:
    """The MODEL of a single-file DiT (+ LoraLoaderModelOnly) through SamplerCustomAdvanced, decoded."""
    g = graph(dit, "tg_ar.safetensors")
    model = ["12", 1]
    if lora is not None:
        g["16"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["12", 1], "lora_name": lora,
                                                                  "strength_model": 1.0}}
        model = ["16", 0]
    g["3"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["6", 0], "guider": ["7", 0],
              "sampler": ["8", 0], "sigmas": ["9", 0], "latent_image": ["14", 0]}}
    g.update({"6": {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
              "7": {"class_type": "CFGGuider", "inputs": {"model": model, "positive": ["15", 0],
                    "negative": ["15", 1], "cfg": 1.5}},
              "8": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
              "9": {"class_type": "GLMImageScheduler", "inputs": {"model": model, "tokens": ["2", 0], "steps": 2}},
              "14": {"class_type": "EmptySD3LatentImage", "inputs": {"width": W, "height": H, "batch_size": 1}},
              "15": {"class_type": "GLMImageConditioning", "inputs": {"decoder": ["12", 0], "tokens": ["2", 0]}}})
    return g


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.fixture(scope="module")
def lora(host, models):
    name = "tg_lora.safetensors"
    assert write_random_lora(os.path.join(models["loras"], name)) > 0
    return name


def image_of(host, g) -> torch.Tensor:
    host.run_ok(g)
    return glmtest_host.node_output(host, "4").clone()


@pytest.mark.parametrize("dtype", ["gguf_q8_0", "gguf_q4_k"])
def test_a_lora_on_gguf_weights_stays_within_the_formats_own_error(host, models, lora, dtype):
    """The patch is applied to the dequantized weight in the forward (never re-quantized): the same LoRA
    on Q8_0 / Q4_K is as close to the safetensors DiT + LoRA as the format is to the safetensors DiT."""
    ref, ref_l = image_of(host, stock_graph("tg_dit.safetensors", None)), image_of(host, stock_graph("tg_dit.safetensors", lora))
    q, q_l = image_of(host, stock_graph(name_of("dit", dtype), None)), image_of(host, stock_graph(name_of("dit", dtype), lora))
    assert psnr(ref_l, ref) < 30, "the LoRA barely changes the image: the comparison would prove nothing"
    fmt, with_lora = psnr(q, ref), psnr(q_l, ref_l)
    print(f"{dtype}: PSNR vs safetensors {fmt:.2f} dB; with the LoRA on both {with_lora:.2f} dB")
    assert with_lora >= fmt - 1.0, (dtype, fmt, with_lora)
    assert psnr(q_l, q) < 30, "the LoRA did not change the GGUF DiT's image"


def test_a_lora_on_gguf_weights_streams_under_lowvram_and_changes_nothing(host, models, lora):
    """LoRA patches on quantized layers: a DiT forward of the LoRA'd MODEL under a lowvram partial load
    (ComfyUI's LowVramPatch on the streamed layers, the kept patch on the others) equals the forward
    under a full load, and differs from the base model's."""
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    from glm_image_core.generation.tokens import upsample_grid
    sfn, loader = pack_module("nodes.single_file"), pack_module("nodes.loader")
    enc = loader.glyph_encoder_handle(sfn.open_component("text_encoders", "tg_glyph_encoder.safetensors",
                                                         "glyph_encoder"), "default")
    decoder = loader.decoder_handle(sfn.open_component("diffusion_models", name_of("dit", "gguf_q4_k"), "dit"), enc,
                                    "default")
    model, _ = comfy.sd.load_lora_for_models(decoder.stock_model(), None,
                                             comfy.utils.load_torch_file(os.path.join(models["loras"], lora)), 1.0, 0)
    assert len(model.patches) > 0
    glyph = pack_module("nodes.glyph").encode_glyph(decoder, PROMPT, mode="prompt").embeds
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 16, 16, generator=g)
    ids = upsample_grid(torch.randint(0, decoder.codebook_size, (1, 4, 4), generator=g))

    def forward(patcher):
        with torch.no_grad():
            return patcher.model.diffusion_model(x, torch.tensor([500.0]), glm_glyph=glyph, glm_prior_ids=ids)

    mm.load_models_gpu([decoder.dit.patcher])
    base = forward(decoder.dit.patcher)
    mm.unload_all_models()
    mm.load_models_gpu([model])
    full = forward(model)
    mm.unload_all_models()
    largest = max(mm.module_size(m) for m in model.model.modules() if hasattr(m, "comfy_cast_weights"))
    loaded = mm.LoadedModel(model)
    loaded.model_load(lowvram_model_memory=int(largest + 0.3 * (model.model_size() - largest)))
    mm.current_loaded_models.insert(0, loaded)
    streamed = [m for _, m in gguf_ops.quantized_layers(model.model) if m.comfy_cast_weights]
    assert streamed and len(streamed) < len(gguf_ops.quantized_layers(model.model)), "not a partial load"
    assert torch.equal(forward(model), full)
    assert rel(full, base) > 0.01, "the LoRA does not change the quantized DiT's output"
    mm.unload_all_models()
    mm.load_models_gpu([decoder.dit.patcher])       # unpatched: the base model again, bit for bit
    assert torch.equal(forward(decoder.dit.patcher), base)


if glmtest_host.has_dynamic_vram():   # ComfyUI 0.3.75 has no dynamic VRAM
    def test_a_lora_on_gguf_weights_under_dynamic_vram_equals_the_same_run_without_it(host, models, lora, tmp_path):
        """A fresh host process with dynamic VRAM on (glmtest_dynamic_vram): the Q8_0 DiT's MODEL with the
        LoRA samples exactly the tokens, latent and image of this process (dynamic VRAM off)."""
        import json
        from safetensors.torch import load_file
        prompts = {"gguf_lora": stock_graph(name_of("dit", "gguf_q8_0"), lora)}
        (tmp_path / "prompts.json").write_text(json.dumps(prompts))
        child = os.path.join(ROOT, "tests", "_support", "glmtest_dynamic_vram.py")
        r = subprocess.run([sys.executable, child, host.base_dir, str(tmp_path / "prompts.json"), str(tmp_path / "dyn")],
                           capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        report = json.loads((tmp_path / "dyn.json").read_text())
        assert report["aimdo_enabled"] and report["fresh_linear_weight_is_none"]
        dyn = load_file(str(tmp_path / "dyn.safetensors"))
        host.run_ok(prompts["gguf_lora"])
        for part, want in zip(("tokens", "latent", "image"), outputs(host)):
            got = dyn[f"gguf_lora.{part}"]
            assert torch.equal(got, want), f"{part} differs with dynamic VRAM"
        host.run_ok(stock_graph(name_of("dit", "gguf_q8_0"), None))
        assert rel(outputs(host)[1], dyn["gguf_lora.latent"]) > 0.01, "the LoRA changed nothing"


def dataset_graph(host, dit: str, weight_dtype: str, lora: str | None = None, strength: float = 1.0) -> dict:
    """The single-file loaders (the DiT as ``weight_dtype``) -> a two-image dataset -> Image → Semantic Tokens
    -> Conditioning + VAE Encode (glmtest_train's dataset graph on single files), + LoraLoaderModelOnly."""
    import glmtest_train as T
    T.write_dataset(host.folder_paths.get_input_directory(), [(64, 64)] * 2, folder="gguf_ds")
    g = {k: v for k, v in graph(dit, "tg_ar.safetensors", weight_dtype=weight_dtype).items() if k not in ("2", "3", "4", "5")}
    g.update({
        "20": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": "gguf_ds"}},
        "21": {"class_type": "GLMImageImageToTokens", "inputs": {"ar": ["10", 0], "image": ["20", 0],
                                                                  "caption": ["20", 1], "fit": "crop"}},
        "22": {"class_type": "GLMImageConditioning", "inputs": {"decoder": ["12", 0], "tokens": ["21", 0]}},
        "23": {"class_type": "VAEEncode", "inputs": {"pixels": ["21", 1], "vae": ["13", 0]}},
        "26": {"class_type": "PreviewAny", "inputs": {"source": ["23", 0]}},
        "27": {"class_type": "PreviewAny", "inputs": {"source": ["22", 1]}},
    })
    if lora is not None:
        g["16"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["12", 1], "lora_name": lora,
                                                                  "strength_model": strength}}
        g["28"] = {"class_type": "PreviewAny", "inputs": {"source": ["16", 0]}}
    return g


def train_graph(host, dit: str, weight_dtype: str, steps: int, prefix: str, **train) -> dict:
    """dataset_graph -> stock Train LoRA (``train``: its widgets) -> Save LoRA."""
    import glmtest_train as T
    g = dataset_graph(host, dit, weight_dtype)
    g.update({
        "24": {"class_type": "TrainLoraNode", "inputs": dict(
            T.train_inputs(host, **dict(dict(steps=steps, learning_rate=0.01, rank=4), **train)),
            model=["12", 1], latents=["23", 0], positive=["22", 0])},
        "25": {"class_type": "SaveLoRA", "inputs": {"lora": ["24", T.output_index(host, "TrainLoraNode", "LORA_MODEL")],
                                                    "prefix": prefix}},
    })
    return g


def measured(host, dit: str, lora: str | None = None, strength: float = 1.0) -> dict:
    """glmtest_train's evidence on the dataset graph: the flow-matching loss at fixed (noise, sigma) pairs,
    the img2img latent MSE, and one img2img latent per image (for bit-for-bit comparisons)."""
    import glmtest_train as T
    host.run_ok(dataset_graph(host, dit, "default", lora, strength))
    model = T.raw_output(host, "16", 0)[0] if lora is not None else T.raw_output(host, "12", 1)[0]
    decoder = T.raw_output(host, "12", 0)[0]
    pos, neg = T.raw_output(host, "22", 0), T.raw_output(host, "22", 1)
    lat = [x["samples"] for x in T.raw_output(host, "23", 0)]
    return dict(flow=T.flow_loss(model, decoder, pos, neg, lat), i2i=T.img2img_mse(model, decoder, pos, neg, lat),
                latents=[T._sample(model, p, n, x, list(T.IMG2IMG_SIGMAS), 5) for p, n, x in zip(pos, neg, lat)])


def trainer_has_bypass(host) -> bool:
    """0.33's Train LoRA (bypass mode, adapters made by ``_create_weight_adapter``) trains on GGUF weights;
    0.3.75's makes its adapters inline from the stored blocks and cannot."""
    spec = host.node_class("TrainLoraNode").INPUT_TYPES()
    return "bypass_mode" in {**spec.get("required", {}), **spec.get("optional", {})}


@pytest.fixture(scope="module")
def gguf_trained(host, models):
    """QLoRA on ComfyUI 0.33: the Q4_K DiT (frozen blocks) trained in bypass mode with a float LoRA, then
    measured through the stock LoRA loader on the same GGUF DiT; None on 0.3.75."""
    import glmtest_train as T
    if not trainer_has_bypass(host):
        return None
    dit = name_of("dit", "gguf_q4_k")
    base = measured(host, dit)
    torch.manual_seed(0)
    host.run_ok(train_graph(host, dit, "default", steps=150, prefix="loras/gguf_q4k_bypass", rank=8,
                            bypass_mode=True))
    name = T.saved_lora(host, "loras/gguf_q4k_bypass")
    return dict(dit=dit, name=name, base=base, after=measured(host, dit, name, 1.0), zero=measured(host, dit, name, 0.0))


def test_a_lora_trained_on_gguf_weights_in_bypass_mode_learns(host, models, gguf_trained):
    """Item 3's evidence on the Q4_K DiT (0.33): the flow loss at fixed (noise, sigma) halves, img2img
    reconstructs 30% better, strength 0 is the GGUF base bit for bit. On 0.3.75: refused clearly."""
    if gguf_trained is None:
        g = train_graph(host, name_of("dit", "gguf_q8_0"), "default", steps=2, prefix="loras/gguf_train")
        ok, _ = host.run(g)
        assert not ok
        msg = host.execution_error()["exception_message"]
        assert "GGUF" in msg and "0.33" in msg and "fp8" in msg and "train" in msg.lower(), msg
        return
    base, after = gguf_trained["base"], gguf_trained["after"]
    print(f"Q4_K, bypass mode: flow loss {base['flow']:.4f} -> {after['flow']:.4f} ({after['flow'] / base['flow']:.3f}x), "
          f"img2img {base['i2i']:.4f} -> {after['i2i']:.4f} ({after['i2i'] / base['i2i']:.3f}x)")
    assert after["flow"] <= 0.5 * base["flow"] and after["i2i"] <= 0.7 * base["i2i"]
    for got, want in zip(gguf_trained["zero"]["latents"], base["latents"]):
        assert torch.equal(got, want)


def test_a_lora_trained_on_gguf_weights_covers_every_block_linear(host, models, gguf_trained):
    """The adapters are sized from the weights the blocks hold (not the uint8 blocks), one per Linear of
    the DiT's blocks, in the DiT's own names; the quantized layers stayed blocks while training."""
    if gguf_trained is None:
        return
    import glmtest_train as T
    from safetensors.torch import load_file
    sd = load_file(os.path.join(T.loras_folder(host), gguf_trained["name"]))
    ups = {k[:-len(".lora_up.weight")]: v for k, v in sd.items() if k.endswith(".lora_up.weight")}
    downs = {k[:-len(".lora_down.weight")]: v for k, v in sd.items() if k.endswith(".lora_down.weight")}
    assert ups and ups.keys() == downs.keys()
    host.run_ok(dataset_graph(host, gguf_trained["dit"], "default"))
    layers = dict(gguf_ops.quantized_layers(T.raw_output(host, "12", 1)[0].model.diffusion_model))
    assert layers, "the Q4_K DiT holds no blocks"
    for name, layer in layers.items():
        key = f"diffusion_model.{name}"
        assert key in ups, f"no adapter for {name}"
        out_f, in_f = layer.ggml[1]
        assert (ups[key].shape[0], downs[key].shape[1]) == (out_f, in_f)
        assert layer.weight.dtype == torch.uint8
        assert float(ups[key].abs().max()) > 0, f"{name}'s adapter never moved"


@pytest.mark.parametrize("bypass", [False, True])
def test_training_on_gguf_weights_in_either_mode_changes_the_image(host, models, bypass):
    """Both of 0.33's modes train on Q8_0 blocks: the default mode as a weight wrapper on the dequantized
    weight, bypass mode as a hook around the layer; the saved LoRA changes the GGUF DiT's image."""
    if not trainer_has_bypass(host):
        return
    import glmtest_train as T
    dit = name_of("dit", "gguf_q8_0")
    prefix = f"loras/gguf_q8_{'bypass' if bypass else 'default'}"
    host.run_ok(train_graph(host, dit, "default", steps=3, prefix=prefix, bypass_mode=bypass))
    name = T.saved_lora(host, prefix)
    ref = image_of(host, stock_graph(dit, None))
    assert not torch.equal(image_of(host, stock_graph(dit, name)), ref)


if glmtest_host.has_dynamic_vram():   # ComfyUI 0.3.75 has no dynamic VRAM
    def test_a_lora_trained_on_gguf_weights_under_dynamic_vram_learns(host, models, gguf_trained, tmp_path):
        """QLoRA in a fresh host process with dynamic VRAM on (glmtest_dynamic_vram): the Q4_K DiT trains in
        bypass mode there, and its LoRA, loaded here, meets item 3's figures like the one trained here."""
        import json
        import glmtest_train as T
        dit = name_of("dit", "gguf_q4_k")
        prompts = {"train": train_graph(host, dit, "default", steps=150, prefix="loras/gguf_q4k_dynamic", rank=8,
                                        bypass_mode=True)}
        (tmp_path / "prompts.json").write_text(json.dumps(prompts))
        child = os.path.join(ROOT, "tests", "_support", "glmtest_dynamic_vram.py")
        r = subprocess.run([sys.executable, child, host.base_dir, str(tmp_path / "prompts.json"), str(tmp_path / "dyn")],
                           capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        assert json.loads((tmp_path / "dyn.json").read_text())["aimdo_enabled"]
        base, after = gguf_trained["base"], measured(host, dit, T.saved_lora(host, "loras/gguf_q4k_dynamic"))
        print(f"Q4_K, bypass mode, dynamic VRAM: flow loss {base['flow']:.4f} -> {after['flow']:.4f}, "
              f"img2img {base['i2i']:.4f} -> {after['i2i']:.4f}")
        assert after["flow"] <= 0.5 * base["flow"] and after["i2i"] <= 0.7 * base["i2i"]


def test_a_gguf_dit_loaded_as_fp8_trains(host, models):
    """fp8 storage, what 0.3.75's refusal points to: the GGUF file loaded with weight_dtype fp8_e4m3fn
    (dequantized to fp8 at load) trains with the stock Train LoRA, and the LoRA it saves loads on the GGUF
    DiT as stored."""
    dit = name_of("dit", "gguf_q8_0")
    g = train_graph(host, dit, "fp8_e4m3fn", steps=3, prefix="loras/gguf_fp8_train")
    host.run_ok(g)
    out = os.path.join(host.folder_paths.get_output_directory(), "loras")
    saved = sorted(f for f in os.listdir(out) if f.startswith("gguf_fp8_train"))
    assert saved
    os.symlink(os.path.join(out, saved[-1]), os.path.join(models["loras"], "tg_trained_fp8.safetensors"))
    getattr(host.folder_paths, "filename_list_cache", {}).clear()      # a new file in a listed folder
    ref = image_of(host, stock_graph(dit, None))
    assert not torch.equal(image_of(host, stock_graph(dit, "tg_trained_fp8.safetensors")), ref)


def test_a_gguf_that_is_not_glm_image_is_refused_like_safetensors(host, models):
    path = os.path.join(models["diffusion_models"], "flux_Q8_0.gguf")
    gguf_file.write_gguf(path, [gguf_file.Entry("double_blocks.0.img_attn.qkv.weight", (12, 32), gguf_file.GGML_F32,
                                                lambda: torch.zeros(12, 32))], {"general.architecture": "flux"})
    g = graph("flux_Q8_0.gguf", "tg_ar.safetensors")
    ok, res = host.run(g)
    assert not ok
    errs = res["node_errors"]["12"]["errors"]
    msg = " ".join(f"{e['message']} {e.get('details', '')}" for e in errs)
    assert "flux_Q8_0.gguf" in msg and "GLM-Image DiT" in msg, msg
    # a GGUF where only safetensors are read (the glyph encoder) is refused by its name, unopened
    shutil.copy(path, os.path.join(models["text_encoders"], "glyph_Q8_0.gguf"))
    g["11"]["inputs"]["glyph_encoder_name"] = "glyph_Q8_0.gguf"
    ok, res = host.run(g)
    msg = " ".join(f"{e['message']} {e.get('details', '')}" for e in res["node_errors"]["11"]["errors"])
    assert not ok and "glyph_Q8_0.gguf" in msg and "safetensors" in msg, msg


def test_a_reference_edit_tokenises_with_the_quantized_vision_tower(host, models):
    """The AR's GGUF file holds the vision tower too: Reference Edit builds it from the blocks and the edit
    equals the same files dequantized at load."""
    import glmtest_server
    glmtest_server.copy_example_inputs(host.folder_paths.get_input_directory())

    def edit(weight_dtype):
        g = graph(name_of("dit", "gguf_q8_0"), name_of("ar", "gguf_q8_0"), weight_dtype)
        g["7"] = {"class_type": "LoadImage", "inputs": {"image": "glm_image_example_reference.png"}}
        g["8"] = {"class_type": "GLMImageReferenceEdit", "inputs": {"ar": ["10", 0], "decoder": ["12", 0],
                  "vae": ["13", 0], "image": ["7", 0]}}
        g["2"]["inputs"]["reference"] = ["8", 0]
        g["3"]["inputs"]["reference"] = ["8", 0]
        host.run_ok(g)
        return outputs(host)

    kept = edit("default")
    vision = glmtest_host.node_output(host, "10").vision.network
    assert gguf_ops.quantized_layers(vision) and glmtest_host.node_output(host, "2").num_references == 1
    whole = edit("fp32")
    for name, a, b in zip(("tokens", "latent", "image"), kept, whole):
        assert torch.equal(a, b), name
