"""Single-file checkpoints (glm_image_core.loading.single_file) and the conversion script, in plain PyTorch:
detection from tensors, metadata, streamed conversion (as stored and fp8), round trip to the same
networks as the official folder, and the refusals (foreign models, wrong component, pickle
formats, truncated files, files without metadata)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from glm_image_core.loading import checkpoint as ckpt
from glm_image_core.loading import single_file as sf
from glm_image_core.loading import sources
from glm_image_core.loading.registry import NETWORKS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FOLDERS = {"dit": "transformer", "ar": "vision_language_encoder", "glyph_encoder": "text_encoder", "vae": "vae"}


@pytest.fixture(scope="module")
def converted(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint converted by the script, as stored and with --dtype fp8_e4m3fn."""
    out = str(tmp_path_factory.mktemp("single"))
    for dtype in ("as_stored", "fp8_e4m3fn"):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_to_single_file.py"), tiny_ckpt,
                            "--out", out, "--dtype", dtype, "--prefix", "t"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    files = {c: os.path.join(out, f"t_{c}.safetensors") for c in NETWORKS}
    fp8 = {c: os.path.join(out, f"t_{c}_fp8_e4m3fn.safetensors") for c in ("dit", "ar")}
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in list(files.values()) + list(fp8.values()))
    return files, fp8


def folder_tensors(tiny_ckpt, component):
    return ckpt.load_safetensors(ckpt.weight_files(os.path.join(tiny_ckpt, FOLDERS[component])))


def test_official_components_are_identified_from_their_tensors(tiny_ckpt):
    for comp, folder in FOLDERS.items():
        (path,) = ckpt.weight_files(os.path.join(tiny_ckpt, folder))
        found, desc = sf.identify(ckpt.safetensors_header(path)[1])
        assert found == comp, (comp, desc)


@pytest.mark.parametrize("tensors,words", [
    ({"model.diffusion_model.input_blocks.0.0.weight": (4, 4, 3, 3)}, "SDXL"),
    ({"double_blocks.0.img_attn.qkv.weight": (12, 4)}, "Flux"),
    ({"single_transformer_blocks.0.attn.to_q.weight": (4, 4), "transformer_blocks.0.attn.to_q.weight": (4, 4)}, "Flux"),
    ({"decoder.up.0.block.0.conv1.weight": (4, 4, 3, 3)}, "LDM-layout VAE"),
    ({"text_model.encoder.layers.0.mlp.fc1.weight": (4, 4)}, "CLIP"),
    ({"encoder.block.0.layer.0.SelfAttention.q.weight": (8, 8), "encoder.final_layer_norm.weight": (8,),
      "shared.weight": (32128, 8)}, "32128-token"),
    ({"foo.weight": (3,)}, "not a GLM-Image file"),
])
def test_foreign_models_are_described(tensors, words):
    found, desc = sf.identify({k: ("F32", s) for k, s in tensors.items()})
    assert found is None and words in desc, desc


def test_conversion_round_trip_as_stored(tiny_ckpt, converted):
    files, _ = converted
    for comp, path in files.items():
        ours = load_file(path)
        ref = folder_tensors(tiny_ckpt, comp)
        assert ours.keys() == ref.keys(), comp
        for k in ref:
            assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), (comp, k)
        meta, _ = ckpt.safetensors_header(path)
        assert meta[sf.META_FORMAT] == sf.FORMAT and meta[sf.META_VERSION] == sf.FORMAT_VERSION
        assert meta[sf.META_COMPONENT] == comp and meta[sf.META_DTYPE] == "as_stored"
        assert "GlmImagePipeline" in meta[sf.META_SOURCE]
        embedded = json.loads(meta[sf.META_FILES])
        for rel, text in embedded.items():       # the official files, byte for byte
            with open(os.path.join(tiny_ckpt, rel), encoding="utf-8") as f:
                assert f.read() == text, rel
        assert set(NETWORKS[comp].single_file_required) <= set(embedded)


def test_fp8_conversion_rounds_only_block_linears(tiny_ckpt, converted):
    _, fp8 = converted
    for comp, path in fp8.items():
        ours, ref = load_file(path), folder_tensors(tiny_ckpt, comp)
        keys = NETWORKS[comp].fp8_keys
        n = 0
        for k, t in ref.items():
            if t.dim() == 2 and keys.match(k):
                assert ours[k].dtype == torch.float8_e4m3fn, k
                assert torch.equal(ours[k].view(torch.uint8), t.to(torch.float8_e4m3fn).view(torch.uint8)), k
                n += 1
            else:
                assert ours[k].dtype == t.dtype and torch.equal(ours[k], t), k   # as stored
        assert n > 0
        assert ckpt.safetensors_header(path)[0][sf.META_DTYPE] == "fp8_e4m3fn"
    # the DiT's norms, timestep MLPs, embeddings and heads never go fp8
    dit = load_file(fp8["dit"])
    for k in ("time_condition_embed.timestep_embedder.linear_1.weight", "prior_token_embedding.weight",
              "proj_out.weight", "norm_out.linear.weight", "transformer_blocks.0.attn1.to_q.bias"):
        assert dit[k].dtype == torch.float32, k


@pytest.mark.parametrize("name", ["bf16", "fp16", "fp32"])
def test_16_and_32_bit_conversion_casts_every_float(tiny_ckpt, tmp_path, name):
    dtype = sf.CONVERT_DTYPES[name]
    for comp in NETWORKS:
        out = str(tmp_path / f"{comp}.safetensors")
        sf.convert_component(tiny_ckpt, comp, out, dtype, name)
        ours, ref = load_file(out), folder_tensors(tiny_ckpt, comp)
        want = NETWORKS[comp].storage_dtype(dtype)       # the VAE / glyph encoder stay as stored for fp16
        for k, t in ref.items():
            expected = t.to(want) if want is not None and t.is_floating_point() else t
            assert ours[k].dtype == expected.dtype and torch.equal(ours[k], expected), (comp, k)


def test_sharded_folder_converts_to_the_same_file_contents(tiny_ckpt, tiny_ckpt_sharded, converted, tmp_path):
    files, _ = converted
    for comp in ("dit", "ar"):
        out = str(tmp_path / f"{comp}.safetensors")
        sf.convert_component(tiny_ckpt_sharded, comp, out)
        a, b = load_file(out), load_file(files[comp])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_networks_from_single_files_equal_the_folder_ones(tiny_ckpt, converted):
    files, _ = converted
    folder = sources.FolderSource(tiny_ckpt)
    for comp, path in files.items():
        src = sf.open_single_file(path, comp)
        a = sources.build_network(src, comp, torch.float32, "cpu", torch.nn).state_dict()
        b = sources.build_network(folder, comp, torch.float32, "cpu", torch.nn).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), comp
    ar_a, ar_b = sources.ar_assets(sf.open_single_file(files["ar"], "ar")), sources.ar_assets(folder)
    assert ar_a.config == ar_b.config and ar_a.processor_config == ar_b.processor_config
    assert ar_a.generation_config == ar_b.generation_config
    assert ar_a.tokenizer.encode("a red fox <|image|>") == ar_b.tokenizer.encode("a red fox <|image|>")
    d_a, d_b = sources.decoder_assets(sf.open_single_file(files["dit"], "dit")), sources.decoder_assets(folder)
    assert d_a.dit_config == d_b.dit_config and d_a.scheduler_config == d_b.scheduler_config
    assert torch.equal(d_a.latents_mean, d_b.latents_mean) and torch.equal(d_a.latents_std, d_b.latents_std)
    g_a, g_b = sources.glyph_tokenizer(sf.open_single_file(files["glyph_encoder"], "glyph_encoder")), sources.glyph_tokenizer(folder)
    assert g_a(["Hi <extra_id_0>"]) == g_b(["Hi <extra_id_0>"])


def test_fp8_single_file_builds_with_fp8_block_weights(converted):
    _, fp8 = converted
    src = sf.open_single_file(fp8["dit"], "dit")
    model = sources.build_network(src, "dit", torch.float8_e4m3fn, "cpu", torch.nn, torch.float32)
    assert model.transformer_blocks[0].ff.net[2].weight.dtype == torch.float8_e4m3fn
    assert model.transformer_blocks[0].ff.net[2].bias.dtype == torch.float32
    assert model.time_condition_embed.timestep_embedder.linear_1.weight.dtype == torch.float32
    assert model.compute_dtype == torch.float32


def test_wrong_component_is_refused_with_where_it_belongs(converted):
    files, _ = converted
    with pytest.raises(ckpt.CheckpointError) as e:
        sf.open_single_file(files["dit"], "vae")
    msg = str(e.value)
    assert "t_dit.safetensors" in msg and "GLM-Image VAE" in msg and "GLM-Image DiT" in msg
    assert "models/diffusion_models/" in msg and "models/vae/" in msg
    with pytest.raises(ckpt.CheckpointError, match="glyph encoder"):
        sf.open_single_file(files["glyph_encoder"], "ar")


def test_metadata_less_and_inconsistent_files_are_refused(tiny_ckpt, converted, tmp_path):
    files, _ = converted
    bare = os.path.join(tiny_ckpt, "transformer", "diffusion_pytorch_model.safetensors")
    with pytest.raises(ckpt.CheckpointError) as e:
        sf.open_single_file(bare, "dit")
    assert "no GLM-Image metadata" in str(e.value) and "convert_to_single_file.py" in str(e.value)
    assert "GLM-Image DiT" in str(e.value)                     # still says what it is

    tensors = load_file(files["vae"])
    with safe_open(files["vae"], "pt") as f:
        meta = dict(f.metadata())
    for change, words in ((lambda m: m.update({sf.META_VERSION: "99"}), "version '99'"),
                          (lambda m: m.update({sf.META_COMPONENT: "dit"}), "metadata says 'dit'"),
                          (lambda m: m.update({sf.META_FILES: "{not json"}), "malformed"),
                          (lambda m: m.update({sf.META_FILES: "{}"}), "lacks vae/config.json")):
        m = dict(meta)
        change(m)
        p = str(tmp_path / "vae_changed.safetensors")
        save_file(tensors, p, metadata=m)
        with pytest.raises(ckpt.CheckpointError, match=words):
            sf.open_single_file(p, "vae")


def test_pickle_formats_and_truncated_files_are_refused(converted, tmp_path):
    files, _ = converted
    for name in ("glm.ckpt", "glm.pt", "glm.bin", "glm.pth"):
        p = tmp_path / name
        p.write_bytes(b"\x80\x04not really a pickle")
        with pytest.raises(ckpt.CheckpointError, match="never unpickles"):
            sf.open_single_file(str(p), "dit")
    with open(files["dit"], "rb") as f:
        data = f.read()
    p = tmp_path / "cut.safetensors"
    p.write_bytes(data[: len(data) - 100])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        sf.open_single_file(str(p), "dit")
    p = tmp_path / "garbage.safetensors"
    p.write_bytes(b"\x80\x04not really a pickle" * 10)
    with pytest.raises(ckpt.CheckpointError, match="cannot read safetensors"):
        sf.open_single_file(str(p), "dit")


def test_storage_rule():
    rule = ckpt.storage_dtypes(torch.float8_e5m2, NETWORKS["dit"].fp8_keys, torch.bfloat16)
    w2, b1 = torch.zeros(4, 4), torch.zeros(4)
    assert ckpt.storage_dtype_of(rule, "transformer_blocks.3.attn1.to_q.weight", w2) == torch.float8_e5m2
    assert ckpt.storage_dtype_of(rule, "transformer_blocks.3.attn1.to_q.bias", b1) == torch.bfloat16
    assert ckpt.storage_dtype_of(rule, "proj_out.weight", w2) == torch.bfloat16
    assert ckpt.storage_dtype_of(rule, "transformer_blocks.0.x", torch.zeros(4, dtype=torch.int64)) is None
    assert ckpt.storage_dtypes(torch.bfloat16, NETWORKS["dit"].fp8_keys, torch.float32) == torch.bfloat16
    assert NETWORKS["vae"].storage_dtype(torch.float16) is None and NETWORKS["vae"].storage_dtype(torch.bfloat16) == torch.bfloat16
    assert NETWORKS["glyph_encoder"].storage_dtype(torch.float8_e4m3fn) is None
    assert NETWORKS["vae"].fp8_keys is None and NETWORKS["glyph_encoder"].fp8_keys is None


def test_script_reports_a_non_glm_folder(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_to_single_file.py"), str(tmp_path),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "model_index.json" in r.stderr


def test_streamed_writer_holds_one_tensor_at_a_time(tmp_path):
    """Conversion never holds two tensors: each is loaded when written and released before the next."""
    import gc
    import weakref
    alive = []

    def loader(i):
        def load():
            gc.collect()
            assert all(r() is None for r in alive), "a previous tensor is still alive"
            t = torch.full((64, 32), float(i), dtype=torch.bfloat16)
            alive.append(weakref.ref(t))
            return t
        return load
    entries = [(f"t{i}", torch.bfloat16, (64, 32), loader(i)) for i in range(5)]
    path = str(tmp_path / "s.safetensors")
    sf.write_streamed_safetensors(path, entries, {"k": "v"})
    out = load_file(path)
    assert [float(out[f"t{i}"][0, 0]) for i in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert ckpt.safetensors_header(path)[0]["k"] == "v"


def test_script_writes_into_comfy_model_folders(tiny_ckpt, tmp_path):
    models = tmp_path / "models"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_to_single_file.py"), tiny_ckpt,
                        "--out", str(models), "--into-models", "--components", "dit,vae", "--prefix", "g"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(str(p.relative_to(models)) for p in models.rglob("*.safetensors")) == \
        ["diffusion_models/g_dit.safetensors", "vae/g_vae.safetensors"]
