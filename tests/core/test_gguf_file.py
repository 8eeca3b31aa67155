"""glm_image_core.quantization.gguf_file: GGUF v3 written and read in plain Python + PyTorch, checked against the
`gguf` package's own reader and writer (the reference llama.cpp's and ComfyUI-GGUF's files come from)."""
import json
import os

import gguf  # the reference (requirements-dev.txt; make host installs it)
import numpy as np
import pytest
import torch


from glm_image_core.quantization import gguf_file as G
from glm_image_core.quantization import gguf_quant as Q

META = {"glm_image.format": "glm-image-single-file", "glm_image.component": "dit",
        "glm_image.files": json.dumps({"transformer/config.json": {"num_layers": 2}}), "note": "ünïcode ✓"}


def entries():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "blocks.0.attn.to_q.weight": (torch.randn(64, 512, generator=g), Q.Q4_K.ggml_type),
        "blocks.0.ff.weight": (torch.randn(32, 256, generator=g), Q.Q5_K.ggml_type),
        "blocks.0.attn.to_k.weight": (torch.randn(16, 64, generator=g), Q.Q8_0.ggml_type),
        "norm.weight": (torch.randn(33, generator=g), G.GGML_F32),
        "embed.weight": (torch.randn(7, 24, generator=g), G.GGML_BF16),
        "proj.bias": (torch.randn(5, generator=g), G.GGML_F16),
        "scalar_like": (torch.randn(1, 1, 3, generator=g), G.GGML_F32),
    }
    return tensors, [G.Entry(k, tuple(v.shape), t, (lambda v=v: v)) for k, (v, t) in tensors.items()]


def test_a_file_we_write_reads_back_the_same_here_and_in_the_gguf_package(tmp_path):
    tensors, es = entries()
    path = str(tmp_path / "x.gguf")
    G.write_gguf(path, es, META)
    assert not os.path.exists(path + ".tmp")
    ref = gguf.GGUFReader(path)
    ref_tensors = {t.name: t for t in ref.tensors}
    with G.GGUFFile(path) as f:
        assert f.strings() == META
        assert list(f.tensors) == list(tensors)
        for name, (w, typ) in tensors.items():
            info, r = f.tensors[name], ref_tensors[name]
            assert info.shape == tuple(w.shape) and info.ggml_type == typ == int(r.tensor_type)
            assert tuple(int(d) for d in reversed(r.shape.tolist())) == tuple(w.shape)
            got = f.tensor(name)
            raw = np.asarray(r.data).reshape(-1).view(np.uint8)
            assert np.array_equal(got.contiguous().view(torch.uint8).numpy().reshape(-1), raw), name
            if typ in G.FLOAT_TYPES:
                assert got.dtype == G.FLOAT_TYPES[typ] and torch.equal(got, w.to(got.dtype))
            else:
                qt = Q.BY_GGML_TYPE[typ]
                deq = Q.dequantize(got, qt, w.shape)
                assert torch.equal(deq, Q.dequantize(Q.quantize(w, qt), qt, w.shape))
    for k, v in META.items():
        field = ref.fields[k]
        assert bytes(field.parts[field.data[0]]).decode("utf-8") == v


def test_we_read_what_the_gguf_package_writes(tmp_path):
    path = str(tmp_path / "ref.gguf")
    w = gguf.GGUFWriter(path, arch="glm_image_test")
    w.add_uint32("test.count", 7)
    w.add_array("test.list", [1, 2, 3])
    w.add_string("test.name", "hello")
    a = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    w.add_tensor("a", a)
    w.add_tensor("b", a.astype(np.float16))
    q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with G.GGUFFile(path) as f:
        assert f.metadata["test.count"] == 7 and f.metadata["test.list"] == [1, 2, 3]
        assert f.metadata["test.name"] == "hello" and f.metadata["general.architecture"] == "glm_image_test"
        assert torch.equal(f.tensor("a"), torch.from_numpy(a))
        assert torch.equal(f.tensor("b"), torch.from_numpy(a.astype(np.float16)))
        assert f.tensors["c"].shape == (8, 64)
        deq = Q.dequantize(f.tensor("c"), Q.Q8_0, (8, 64))
        assert torch.equal(deq, torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))


@pytest.mark.parametrize("damage,message", [
    (lambda b: b"GGML" + b[4:], "not a GGUF file"),
    (lambda b: b[:40], "truncated"),
    (lambda b: b[:-100], "past the end"),
])
def test_a_damaged_file_gives_a_clear_error(tmp_path, damage, message):
    _, es = entries()
    path = str(tmp_path / "x.gguf")
    G.write_gguf(path, es, META)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(damage(data))
    with pytest.raises(G.GGUFError, match=message):
        G.GGUFFile(path)


def test_a_failed_write_leaves_no_file(tmp_path):
    path = str(tmp_path / "x.gguf")
    bad = [G.Entry("w", (4, 32), Q.Q8_0.ggml_type, lambda: torch.zeros(4, 31))]
    with pytest.raises(ValueError, match="declared"):
        G.write_gguf(path, bad, {})
    assert os.listdir(tmp_path) == []


def test_tensors_outlive_the_file_object(tmp_path):
    """Tensors handed out view the mapping; closing the file (or dropping it) must not unmap them."""
    import gc
    tensors, es = entries()
    path = str(tmp_path / "x.gguf")
    G.write_gguf(path, es, META)
    got = dict((k, t) for k, t, _ in G.iter_gguf(path))
    gc.collect()
    w, _ = tensors["norm.weight"]
    assert torch.equal(got["norm.weight"], w)
    q, _ = tensors["blocks.0.attn.to_q.weight"]
    assert torch.equal(got["blocks.0.attn.to_q.weight"], Q.quantize(q, Q.Q4_K))


def test_quantizing_in_row_chunks_writes_the_same_bytes(tmp_path, monkeypatch):
    """write_gguf quantizes a big matrix a few rows at a time (bounded memory): the file is byte for
    byte the one a single pass writes."""
    w = torch.randn(40, 512, generator=torch.Generator().manual_seed(0))
    entries = [G.Entry("m.weight", (40, 512), Q.Q4_K.ggml_type, lambda: w),
               G.Entry("n.weight", (40, 512), Q.Q8_0.ggml_type, lambda: w)]
    G.write_gguf(str(tmp_path / "one.gguf"), entries, {})
    monkeypatch.setattr(G, "QUANTIZE_CHUNK", 3 * 512)           # 3 rows per pass, a remainder at the end
    G.write_gguf(str(tmp_path / "chunked.gguf"), entries, {})
    assert (tmp_path / "one.gguf").read_bytes() == (tmp_path / "chunked.gguf").read_bytes()
    with G.GGUFFile(str(tmp_path / "chunked.gguf")) as g:
        assert torch.equal(g.tensor("m.weight"), Q.quantize(w, Q.Q4_K))
