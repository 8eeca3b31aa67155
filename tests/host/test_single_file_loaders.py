"""Single-file loaders in the real ComfyUI host: the tiny checkpoint converted by
scripts/convert_to_single_file.py, put into models/diffusion_models, text_encoders and vae, loaded
by the four single-file nodes, gives bit-identical tokens, latents and images to the folder loader
(full text-to-image through Text → Tokens → Latent → stock VAEDecode); wrong files are refused at
validation with a message naming the file, what it looks like and what was expected."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import glmtest_host

ROOT = glmtest_host.ROOT
PROMPT = 'a shop sign that says "OPEN" and "24h"'
W, H, STEPS = 320, 256, 2


def convert(folder: str, out: str, dtype: str = "as_stored") -> None:
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_to_single_file.py"), folder,
                    "--out", out, "--dtype", dtype, "--prefix", "tiny"], check=True, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def model_dirs(host, tiny_ckpt, tmp_path_factory):
    """models/{diffusion_models,text_encoders,vae} of the host, holding the converted tiny checkpoint
    (as stored, and the DiT/AR converted to fp8_e4m3fn) plus the wrong files the error tests use."""
    out = str(tmp_path_factory.mktemp("converted"))
    convert(tiny_ckpt, out)
    convert(tiny_ckpt, out, "fp8_e4m3fn")
    dirs = {}
    for sub in ("diffusion_models", "text_encoders", "vae"):
        d = os.path.join(host.models_dir, sub)
        os.makedirs(d, exist_ok=True)
        host.folder_paths.add_model_folder_path(sub, d, is_default=True)
        dirs[sub] = d
    place = {"tiny_dit.safetensors": "diffusion_models", "tiny_dit_fp8_e4m3fn.safetensors": "diffusion_models",
             "tiny_ar.safetensors": "text_encoders", "tiny_ar_fp8_e4m3fn.safetensors": "text_encoders",
             "tiny_glyph_encoder.safetensors": "text_encoders", "tiny_vae.safetensors": "vae"}
    for name, sub in place.items():
        shutil.copy(os.path.join(out, name), os.path.join(dirs[sub], name))
    return dirs


def t2i_graph(ar_loader: dict, decoder_ref: list, vae_ref: list, ar_ref: list, extra: dict, seed: int = 3) -> dict:
    g = {
        "2": {"class_type": "GLMImageTextToTokens", "inputs": {"ar": ar_ref, "prompt": PROMPT, "width": W,
              "height": H, "seed": seed, "temperature": 0.9, "top_p": 0.75, "top_k": 0, "batch_size": 1}},
        "3": {"class_type": "GLMImageTokensToLatent", "inputs": {"decoder": decoder_ref, "tokens": ["2", 0],
              "seed": seed, "steps": STEPS, "cfg": 1.5}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": vae_ref}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    g.update(ar_loader)
    g.update(extra)
    return g


def folder_graph(weight_dtype="default", seed=3) -> dict:
    loader = {"1": {"class_type": "GLMImageLoader", "inputs": {"model": "GLM-Image-tiny", "weight_dtype": weight_dtype}}}
    return t2i_graph(loader, ["1", 1], ["1", 2], ["1", 0], {}, seed)


def stock_sampler_graph(weight_dtype="default", seed=3) -> dict:
    """folder_graph with the DiT run by SamplerCustomAdvanced on the loader's MODEL (node "3")."""
    g = folder_graph(weight_dtype, seed)
    g["3"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["6", 0], "guider": ["7", 0],
              "sampler": ["8", 0], "sigmas": ["9", 0], "latent_image": ["14", 0]}}
    g.update({
        "6": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "7": {"class_type": "CFGGuider", "inputs": {"model": ["1", 3], "positive": ["15", 0], "negative": ["15", 1],
              "cfg": 1.5}},
        "8": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "9": {"class_type": "GLMImageScheduler", "inputs": {"model": ["1", 3], "tokens": ["2", 0], "steps": STEPS}},
        "14": {"class_type": "EmptySD3LatentImage", "inputs": {"width": W, "height": H, "batch_size": 1}},
        "15": {"class_type": "GLMImageConditioning", "inputs": {"decoder": ["1", 1], "tokens": ["2", 0]}},
    })
    return g


def single_file_graph(dit="tiny_dit.safetensors", ar="tiny_ar.safetensors", weight_dtype="default", seed=3,
                      compute_dtype="auto") -> dict:
    nodes = {
        "10": {"class_type": "GLMImageARLoader", "inputs": {"ar_name": ar, "weight_dtype": weight_dtype,
                                                            "compute_dtype": compute_dtype}},
        "11": {"class_type": "GLMImageGlyphEncoderLoader", "inputs": {"glyph_encoder_name": "tiny_glyph_encoder.safetensors",
                                                                     "weight_dtype": "default"}},
        "12": {"class_type": "GLMImageDiTLoader", "inputs": {"dit_name": dit, "glyph_encoder": ["11", 0],
                                                             "weight_dtype": weight_dtype, "compute_dtype": compute_dtype}},
        "13": {"class_type": "GLMImageVAELoader", "inputs": {"vae_name": "tiny_vae.safetensors", "weight_dtype": "default"}},
    }
    return t2i_graph(nodes, ["12", 0], ["13", 0], ["10", 0], {})


def outputs(host) -> tuple:
    tokens = glmtest_host.node_output(host, "2")
    latent = glmtest_host.node_output(host, "3")["samples"]
    image = glmtest_host.node_output(host, "4")
    return tokens.grid.clone(), latent.clone(), image.clone()


def test_single_file_t2i_is_bit_identical_to_folder_loader(host, model_dirs):
    host.run_ok(folder_graph())
    ref = outputs(host)
    host.run_ok(single_file_graph())
    ours = outputs(host)
    for name, a, b in zip(("tokens", "latent", "image"), ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name} differs between the single-file loaders and the folder loader"
    assert ref[2].shape == (1, H, W, 3)


def test_fp8_converted_file_equals_fp8_storage_of_the_original(host, model_dirs):
    """A file converted to fp8 and loaded as stored ('default') runs the same network as the
    as-stored file loaded with weight_dtype=fp8_e4m3fn, and as the folder loaded in fp8."""
    host.run_ok(single_file_graph(dit="tiny_dit_fp8_e4m3fn.safetensors", ar="tiny_ar_fp8_e4m3fn.safetensors"))
    converted = outputs(host)
    host.run_ok(single_file_graph(weight_dtype="fp8_e4m3fn"))
    on_load = outputs(host)
    host.run_ok(folder_graph(weight_dtype="fp8_e4m3fn"))
    folder = outputs(host)
    for name, a, b, c in zip(("tokens", "latent", "image"), converted, on_load, folder):
        assert torch.equal(a, b) and torch.equal(a, c), name


def test_node_schemas(host, model_dirs):
    info = {n: host.node_class(n).INPUT_TYPES() for n in
            ("GLMImageARLoader", "GLMImageGlyphEncoderLoader", "GLMImageDiTLoader", "GLMImageVAELoader", "GLMImageLoader")}
    assert list(host.node_class("GLMImageARLoader").RETURN_TYPES) == ["GLM_AR"]
    assert list(host.node_class("GLMImageDiTLoader").RETURN_TYPES) == ["GLM_DECODER", "MODEL"]
    assert list(host.node_class("GLMImageGlyphEncoderLoader").RETURN_TYPES) == ["GLM_GLYPH_ENCODER"]
    assert list(host.node_class("GLMImageVAELoader").RETURN_TYPES) == ["VAE"]
    assert info["GLMImageDiTLoader"]["required"]["glyph_encoder"][0] == "GLM_GLYPH_ENCODER"

    def options(node, name, section="required"):
        spec = info[node][section][name]
        return spec[1]["options"] if isinstance(spec[0], str) and spec[0] == "COMBO" else spec[0]
    for node in ("GLMImageLoader", "GLMImageARLoader", "GLMImageDiTLoader"):
        assert {"fp8_e4m3fn", "fp8_e5m2", "default", "bf16", "fp16", "fp32"} <= set(options(node, "weight_dtype"))
        assert set(options(node, "compute_dtype", "optional")) == {"auto", "bf16", "fp16", "fp32"}
    assert set(options("GLMImageVAELoader", "weight_dtype")) == {"default", "bf16", "fp32"}
    assert "tiny_dit.safetensors" in options("GLMImageDiTLoader", "dit_name")
    assert "tiny_vae.safetensors" in options("GLMImageVAELoader", "vae_name")


# ---- wrong files -------------------------------------------------------------------------

def write_foreign(path: str, tensors: dict) -> None:
    save_file({k: torch.zeros(s) for k, s in tensors.items()}, path)


SDXL_UNET = {"model.diffusion_model.input_blocks.0.0.weight": (4, 4, 3, 3), "model.diffusion_model.out.2.weight": (4, 4, 3, 3)}
FLUX_DIT = {"double_blocks.0.img_attn.qkv.weight": (12, 4), "single_blocks.0.linear1.weight": (8, 4)}
T5_XXL = {"encoder.block.0.layer.0.SelfAttention.q.weight": (8, 8), "encoder.final_layer_norm.weight": (8,),
          "shared.weight": (32128, 8)}


def validation_error(host, graph: dict, node: str) -> str:
    ok, res = host.run(graph)
    assert not ok, "the prompt was accepted"
    errs = res["node_errors"].get(node)
    assert errs, f"no error on node {node}: {res}"
    return " ".join(f"{e['message']} {e.get('details', '')}" for e in errs["errors"])


def dit_only(dit_name: str) -> dict:
    return {
        "11": {"class_type": "GLMImageGlyphEncoderLoader", "inputs": {"glyph_encoder_name": "tiny_glyph_encoder.safetensors",
                                                                     "weight_dtype": "default"}},
        "12": {"class_type": "GLMImageDiTLoader", "inputs": {"dit_name": dit_name, "glyph_encoder": ["11", 0],
                                                             "weight_dtype": "default"}},
        "3": {"class_type": "GLMImageLoadTokens", "inputs": {"token_file": "none.glmtokens.safetensors"}},
        "4": {"class_type": "GLMImageTokensToLatent", "inputs": {"decoder": ["12", 0], "tokens": ["3", 0],
              "seed": 0, "steps": 1, "cfg": 1.0}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "never"}},
    }


def vae_only(vae_name: str, weight_dtype="default") -> dict:
    return {
        "13": {"class_type": "GLMImageVAELoader", "inputs": {"vae_name": vae_name, "weight_dtype": weight_dtype}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["13", 0]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }


def test_foreign_models_are_refused(host, model_dirs):
    d = model_dirs["diffusion_models"]
    write_foreign(os.path.join(d, "sdxl_unet.safetensors"), SDXL_UNET)
    write_foreign(os.path.join(d, "flux_dit.safetensors"), FLUX_DIT)
    msg = validation_error(host, dit_only("sdxl_unet.safetensors"), "12")
    assert "sdxl_unet.safetensors" in msg and "SDXL" in msg and "GLM-Image DiT" in msg and "diffusion_models" in msg
    msg = validation_error(host, dit_only("flux_dit.safetensors"), "12")
    assert "flux_dit.safetensors" in msg and "Flux" in msg and "GLM-Image DiT" in msg
    write_foreign(os.path.join(model_dirs["text_encoders"], "t5xxl.safetensors"), T5_XXL)
    g = {"11": {"class_type": "GLMImageGlyphEncoderLoader", "inputs": {"glyph_encoder_name": "t5xxl.safetensors",
                                                                      "weight_dtype": "default"}},
         "12": {"class_type": "GLMImageDiTLoader", "inputs": {"dit_name": "tiny_dit.safetensors",
                                                              "glyph_encoder": ["11", 0], "weight_dtype": "default"}},
         "3": {"class_type": "GLMImageLoadTokens", "inputs": {"token_file": "none.glmtokens.safetensors"}},
         "4": {"class_type": "GLMImageTokensToLatent", "inputs": {"decoder": ["12", 0], "tokens": ["3", 0],
               "seed": 0, "steps": 1, "cfg": 1.0}},
         "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "never"}}}
    msg = validation_error(host, g, "11")
    assert "T5" in msg and "32128" in msg and "glyph encoder" in msg


def test_component_in_the_wrong_loader_is_refused(host, model_dirs):
    shutil.copy(os.path.join(model_dirs["diffusion_models"], "tiny_dit.safetensors"),
                os.path.join(model_dirs["vae"], "dit_in_vae_folder.safetensors"))
    msg = validation_error(host, vae_only("dit_in_vae_folder.safetensors"), "13")
    assert "dit_in_vae_folder.safetensors" in msg and "GLM-Image DiT" in msg and "GLM-Image VAE" in msg
    assert "models/diffusion_models/" in msg          # where it belongs
    g = single_file_graph(ar="tiny_glyph_encoder.safetensors")
    msg = validation_error(host, g, "10")
    assert "glyph encoder" in msg and "AR model" in msg


def test_pickle_formats_truncated_and_metadata_less_files_are_refused(host, model_dirs, tiny_ckpt):
    d = model_dirs["vae"]
    for name in ("glm_vae.ckpt", "glm_vae.pt", "glm_vae.bin"):
        with open(os.path.join(d, name), "wb") as f:
            f.write(b"\x80\x04not really a pickle")      # never opened: refused by its format
        msg = validation_error(host, vae_only(name), "13")
        assert name in msg and "never unpickles" in msg
    with open(os.path.join(d, "tiny_vae.safetensors"), "rb") as f:
        data = f.read()
    with open(os.path.join(d, "truncated_vae.safetensors"), "wb") as f:
        f.write(data[: len(data) // 2])
    msg = validation_error(host, vae_only("truncated_vae.safetensors"), "13")
    assert "truncated_vae.safetensors" in msg and "truncated" in msg
    # The official folder's weight file alone: a GLM-Image VAE, but without its config.
    shutil.copy(os.path.join(tiny_ckpt, "vae", "diffusion_pytorch_model.safetensors"), os.path.join(d, "bare_vae.safetensors"))
    msg = validation_error(host, vae_only("bare_vae.safetensors"), "13")
    assert "bare_vae.safetensors" in msg and "no GLM-Image metadata" in msg and "convert_to_single_file.py" in msg
    msg = validation_error(host, vae_only("tiny_vae.safetensors", "fp16"), "13")
    assert "fp16" in msg and "overflows" in msg


@pytest.mark.parametrize("name", ["../../../../../../etc/passwd", "/etc/passwd", "../diffusers/GLM-Image-tiny/vae/config.json"])
def test_file_names_never_leave_the_models_folder(host, model_dirs, name):
    msg = validation_error(host, vae_only(name), "13")
    assert "not found under models/vae/" in msg, msg


def test_dit_loader_fits_latent_previews_from_an_optional_vae(host, model_dirs):
    with host.previews("auto"):
        _check_previews_fitted(host)


def _check_previews_fitted(host):
    g = single_file_graph()
    host.run_ok(g)
    assert glmtest_host.node_output(host, "12").previewer() is None          # no VAE linked: no previews
    g["12"]["inputs"]["vae"] = ["13", 0]
    host.run_ok(g)
    decoder = glmtest_host.node_output(host, "12")
    assert decoder.previewer() is not None and decoder.preview_factors is not None


# ---- dynamic VRAM (ComfyUI >= 0.16; on by default on NVIDIA) ---------------------------------

DYNAMIC_VRAM_PROMPTS = {"folder": folder_graph(), "single_file": single_file_graph(),
                        "folder_fp8": folder_graph(weight_dtype="fp8_e4m3fn"),
                        "single_file_fp8": single_file_graph(dit="tiny_dit_fp8_e4m3fn.safetensors",
                                                             ar="tiny_ar_fp8_e4m3fn.safetensors"),
                        "stock_sampler": stock_sampler_graph()}

if glmtest_host.has_dynamic_vram():   # ComfyUI 0.3.75 has no dynamic VRAM: nothing to test there
    def test_every_loader_and_t2i_work_with_dynamic_vram_on(host, model_dirs, tmp_path):
        """A fresh host process with dynamic VRAM on (ComfyUI's own switches, as main.py sets them
        on NVIDIA): comfy.ops Linear layers are built without weights there, and every loader (folder,
        four single files, fp8 storage) still loads, and the whole text-to-image (also through the
        stock SamplerCustomAdvanced on the DiT's MODEL) gives exactly the tokens, latent and image of
        this process, where dynamic VRAM is off."""
        import json
        from safetensors.torch import load_file
        prompts = tmp_path / "prompts.json"
        prompts.write_text(json.dumps(DYNAMIC_VRAM_PROMPTS))
        child = os.path.join(ROOT, "tests", "_support", "glmtest_dynamic_vram.py")
        r = subprocess.run([sys.executable, child, host.base_dir, str(prompts), str(tmp_path / "dyn")],
                           capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        report = json.loads((tmp_path / "dyn.json").read_text())
        assert report["aimdo_enabled"] and report["core_model_patcher"] == "ModelPatcherDynamic"
        assert report["fresh_linear_weight_is_none"], "the switch did not reach comfy.ops: nothing was tested"
        dyn = load_file(str(tmp_path / "dyn.safetensors"))
        for name, prompt in DYNAMIC_VRAM_PROMPTS.items():
            host.run_ok(prompt)
            for part, want in zip(("tokens", "latent", "image"), outputs(host)):
                got = dyn[f"{name}.{part}"]
                assert got.dtype == want.dtype and torch.equal(got, want), f"{name}: {part} differs with dynamic VRAM"
