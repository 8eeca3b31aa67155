"""scripts/convert_to_single_file.py --dtype gguf_*: the DiT of an official folder as one GGUF file,
streamed tensor by tensor: the block Linear weights (what fp8 would store in fp8) as ggml blocks, every
other tensor byte for byte as stored, and the safetensors single file's metadata as GGUF strings."""
import functools
import json

import pytest
import torch
from safetensors import safe_open

from glm_image_core.quantization import gguf_file, gguf_quant
from glm_image_core.loading import single_file as sf
from glm_image_core.loading.registry import NETWORKS
from glm_image_core.testing import tiny_checkpoint

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
                eligible = src.dim() == 2 and NETWORKS["dit"].fp8_keys.match(key)
                bt = gguf_quant.block_type_for(src.shape, qt) if eligible else None
                if bt:
                    quantized += 1
                    assert t.ggml_type == bt.ggml_type
                    w = gguf_quant.dequantize(g.tensor(key), bt, t.shape)
                    assert ((w - src).norm() / src.norm()).item() < MAX_REL[dtype_name], key
                else:
                    assert t.ggml_type == gguf_file.GGML_F32
                    assert torch.equal(g.tensor(key), src), key
            # per block: q, k, v, out and the two feed-forward matrices, and the AdaLN matrix (64 inputs:
            # Q8_0 blocks, or the K-quants' 32-weight fallback, Q5_0 / Q5_1)
            block_types = {n: c for n, c in info["dtypes"].items() if n in gguf_quant.QUANT_TYPES}
            assert quantized == sum(block_types.values()) == 2 * 7
            assert block_types == ({qt.name: 14} if qt.fallback is None else {qt.name: 12, qt.fallback: 2})
    files = json.loads(ref_meta[sf.META_FILES])
    assert json.loads(files["transformer/config.json"])["attention_head_dim"] == 64


def test_the_small_components_are_refused_clearly(folder, tmp_path):
    with pytest.raises(Exception, match="DiT and the AR"):
        sf.convert_component(folder, "vae", str(tmp_path / "vae.gguf"), None, "gguf_q8_0")


def dit_inputs(net) -> tuple:
    """Fixed random inputs of one DiT forward at 64x64 (latent 8x8, 16 prior ids, 3 glyph tokens)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=g)
    glyph = torch.randn(1, 3, net.text_embed_dim, generator=g)
    ids = torch.randint(0, 100, (1, 16), generator=g)
    return x, glyph, ids, False, torch.tensor([500.0]), torch.tensor([[64.0, 64.0]]), torch.zeros(1, 2)


# ---- loading a GGUF single file (plain PyTorch: block-quantized weights dequantized at load) ---------

@pytest.mark.parametrize("dtype_name", list(sf.GGUF_TYPES))
def test_a_gguf_dit_loads_and_runs_close_to_the_original(folder, tmp_path, dtype_name):
    from glm_image_core.loading import sources
    path = str(tmp_path / "dit.gguf")
    sf.convert_component(folder, "dit", path, None, dtype_name)
    src = sf.open_single_file(path, "dit")
    net = sources.build_network(src, "dit", torch.float32, "cpu", torch.nn, torch.float32)
    ref = sources.build_network(sources.FolderSource(folder), "dit", torch.float32, "cpu", torch.nn, torch.float32)
    with gguf_file.GGUFFile(path) as g:
        for key, t in g.tensors.items():
            got = net.state_dict()[key]
            bt = gguf_quant.BY_GGML_TYPE.get(t.ggml_type)
            want = gguf_quant.dequantize(g.tensor(key), bt, t.shape) if bt else g.tensor(key)
            assert got.dtype == torch.float32 and torch.equal(got, want), key
    with torch.no_grad():
        out, want = net(*dit_inputs(ref)), ref(*dit_inputs(ref))
    rel = ((out - want).norm() / want.norm()).item()
    assert torch.isfinite(out).all() and rel < {"gguf_q8_0": 0.02, "gguf_q5_k": 0.1, "gguf_q4_k": 0.2}[dtype_name], rel


@pytest.mark.parametrize("dtype_name", list(sf.GGUF_TYPES))
def test_a_gguf_dit_stays_quantized_in_memory_and_equals_the_dequantized_load(folder, tmp_path, dtype_name):
    """gguf_ops.quantized_ops: the blocks stay uint8 in their layers (the file's bytes, fewer bytes than
    floats) and each forward dequantizes them: the output equals the load that dequantized everything."""
    from glm_image_core.quantization import gguf_ops
    from glm_image_core.loading import sources
    path = str(tmp_path / "dit.gguf")
    sf.convert_component(folder, "dit", path, None, dtype_name)
    src = sf.open_single_file(path, "dit")
    build = functools.partial(sources.build_network, src, "dit")
    eager = build(None, "cpu", torch.nn, torch.float32)
    kept = build(None, "cpu", gguf_ops.quantized_ops(torch.nn), torch.float32)
    layers = dict(gguf_ops.quantized_layers(kept))
    with gguf_file.GGUFFile(path) as g:
        blocks = {k[:-len(".weight")] for k, t in g.tensors.items() if t.ggml_type in gguf_quant.BY_GGML_TYPE}
        assert set(layers) == blocks and len(blocks) == 2 * 7
        for name, layer in layers.items():
            assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight, g.tensor(name + ".weight"))
            assert layer.logical_weight_shape == tuple(g.tensors[name + ".weight"].shape)
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())   # noqa: E731
    assert size(kept) < size(eager)
    with torch.no_grad():
        assert torch.equal(kept(*dit_inputs(eager)), eager(*dit_inputs(eager)))


def test_a_gguf_ar_stays_quantized_in_memory_and_equals_the_dequantized_load(folder, tmp_path):
    from glm_image_core.quantization import gguf_ops
    from glm_image_core.loading import sources
    path = str(tmp_path / "ar.gguf")
    sf.convert_component(folder, "ar", path, None, "gguf_q8_0")
    src = sf.open_single_file(path, "ar")
    eager = sources.build_network(src, "ar", None, "cpu", torch.nn, torch.float32, parts=("text",))
    kept = sources.build_network(src, "ar", None, "cpu", gguf_ops.quantized_ops(torch.nn), torch.float32, parts=("text",))
    layers = dict(gguf_ops.quantized_layers(kept))
    assert "model.language_model.layers.0.self_attn.q_proj" in layers
    # the token table is blocks too; a lookup dequantizes only the rows it reads
    table = layers["model.language_model.embed_tokens"]
    assert table.weight.dtype == torch.uint8 and table.logical_weight_shape == eager.language_model.embed_tokens.weight.shape
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(gguf_ops.embedding_rows(table, ids, torch.float32), eager.language_model.embed_tokens(ids))
    pos = torch.arange(12).view(1, 1, 12).expand(3, 1, 12)
    with torch.no_grad():
        want = eager(ids, pos)
        assert torch.isfinite(want).all() and torch.equal(kept(ids, pos), want)


def test_the_ar_converts_to_q8_0_and_loads(folder, tmp_path):
    from glm_image_core.loading import sources
    path = str(tmp_path / "ar.gguf")
    info = sf.convert_component(folder, "ar", path, None, "gguf_q8_0")
    assert info["dtypes"].get("Q8_0", 0) > 0           # the 64-wide tiny AR's block matrices hold Q8_0 blocks
    src = sf.open_single_file(path, "ar")
    net = sources.build_network(src, "ar", torch.float32, "cpu", torch.nn, torch.float32, parts=("text",))
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_a_gguf_file_of_another_component_is_refused_like_safetensors(folder, tmp_path):
    path = str(tmp_path / "dit.gguf")
    sf.convert_component(folder, "dit", path, None, "gguf_q8_0")
    with pytest.raises(Exception, match=r"is not a GLM-Image AR model .*: it looks like a GLM-Image DiT"):
        sf.open_single_file(path, "ar")


def test_a_gguf_ar_decodes_statically_and_compiles_to_one_graph(folder, tmp_path, tok):
    """The GPU decode path on quantized weights: the static step (what CUDA graphs capture) gives the
    exact step's tokens, and torch.compile(fullgraph=True) takes the per-layer dequantization and the
    row lookup of the token table without a graph break."""
    from torch._dynamo.utils import counters

    from glm_image_core.generation import ar_generate
    from glm_image_core.quantization import gguf_ops
    from glm_image_core.loading import sources
    path = str(tmp_path / "ar.gguf")
    sf.convert_component(folder, "ar", path, None, "gguf_q8_0")
    kept = sources.build_network(sf.open_single_file(path, "ar"), "ar", None, "cpu", gguf_ops.quantized_ops(torch.nn),
                                                                             torch.float32, parts=("text",))
    exact = ar_generate.generate_tokens(kept, tok, "a cat", 256, 256, 0, decode="exact")
    static = ar_generate.generate_tokens(kept, tok, "a cat", 256, 256, 0, decode="static")
    assert torch.equal(static.grid, exact.grid)
    torch._dynamo.reset()
    ar_generate._COMPILED_STEP.clear()
    counters.clear()
    compiled = ar_generate.generate_tokens(kept, tok, "a cat", 256, 256, 0, decode="static", compile="eager")
    assert torch.equal(compiled.grid, exact.grid)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
