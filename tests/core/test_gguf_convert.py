"""scripts/convert_to_single_file.py --dtype gguf_*: the DiT of an official folder as one GGUF file,
streamed tensor by tensor: the block Linear weights (what fp8 would store in fp8) as ggml blocks, every
other tensor byte for byte as stored, and the safetensors single file's metadata as GGUF strings."""
import json

import pytest
import torch
from safetensors import safe_open

from glm_image_core import dit as dit_mod
from glm_image_core import gguf_file, gguf_quant
from glm_image_core import single_file as sf
from glm_image_core import tiny_checkpoint

# A DiT 256 wide (4 heads × 64), so its block matrices hold whole 256-weight K-quant blocks; the rest tiny.
SIZE = "tiny-dit256"
MAX_REL = {"gguf_q8_0": 0.006, "gguf_q5_k": 0.04, "gguf_q4_k": 0.08}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    sizes = dict(tiny_checkpoint.SIZES)
    geometry = dict(sizes["tiny"], dit=dict(num_layers=2, attention_head_dim=64, num_attention_heads=4,
                                            time_embed_dim=64, condition_dim=32))
    tiny_checkpoint.SIZES[SIZE] = geometry
    try:
        return tiny_checkpoint.write_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "GLM-Image-dit256"), SIZE)
    finally:
        tiny_checkpoint.SIZES.pop(SIZE)


@pytest.mark.parametrize("dtype_name", list(sf.GGUF_TYPES))
def test_dit_converts_to_gguf(folder, tmp_path, dtype_name):
    qt = sf.GGUF_TYPES[dtype_name]
    out = str(tmp_path / f"dit_{dtype_name}.gguf")
    info = sf.convert_component(folder, "dit", out, None, dtype_name)
    st = str(tmp_path / "dit.safetensors")
    sf.convert_component(folder, "dit", st)
    with safe_open(st, framework="pt") as ref:
        ref_meta = dict(ref.metadata())
        ref_meta.pop("format")
        ref_meta[sf.META_DTYPE] = dtype_name
        with gguf_file.GGUFFile(out) as g:
            assert g.strings() == ref_meta
            assert set(g.tensors) == set(ref.keys()) and info["tensors"] == len(g.tensors)
            quantized = 0
            for key, t in g.tensors.items():
                src = ref.get_tensor(key)
                blocks = src.dim() == 2 and dit_mod.FP8_WEIGHT_KEYS.match(key) and src.shape[-1] % qt.block == 0
                if blocks:
                    quantized += 1
                    assert t.ggml_type == qt.ggml_type
                    w = gguf_quant.dequantize(g.tensor(key), qt, t.shape)
                    assert ((w - src).norm() / src.norm()).item() < MAX_REL[dtype_name], key
                else:
                    assert t.ggml_type == gguf_file.GGML_F32
                    assert torch.equal(g.tensor(key), src), key
            # per block: q, k, v, out and the two feed-forward matrices, and the AdaLN matrix (64 inputs)
            # where the format's block divides it (Q8_0's 32, not the K-quants' 256)
            assert quantized == info["dtypes"][qt.name] == 2 * (7 if 64 % qt.block == 0 else 6)
    files = json.loads(ref_meta[sf.META_FILES])
    assert json.loads(files["transformer/config.json"])["attention_head_dim"] == 64


def test_the_small_components_are_refused_clearly(folder, tmp_path):
    with pytest.raises(Exception, match="DiT and the AR"):
        sf.convert_component(folder, "vae", str(tmp_path / "vae.gguf"), None, "gguf_q8_0")
