"""glm_image_core.quantization.gguf_quant: ggml's Q8_0 / Q5_K / Q4_K (and Q5_0 / Q5_1) block formats in plain PyTorch, checked bit for
bit against the `gguf` package (the reference llama.cpp's and ComfyUI-GGUF's files are made with)."""
import gguf  # the reference (requirements-dev.txt; make host installs it)
import numpy as np
import pytest
import torch

from gguf import quants as gq

from glm_image_core.quantization import gguf_quant as Q

TYPES = [(Q.Q8_0, gguf.GGMLQuantizationType.Q8_0), (Q.Q5_K, gguf.GGMLQuantizationType.Q5_K),
         (Q.Q4_K, gguf.GGMLQuantizationType.Q4_K), (Q.Q5_0, gguf.GGMLQuantizationType.Q5_0),
         (Q.Q5_1, gguf.GGMLQuantizationType.Q5_1)]
# relative L2 error on Gaussian weights (measured 0.0047 / 0.032 / 0.066 / 0.035 / 0.030): a bound each
# format meets
MAX_REL = {"Q8_0": 0.006, "Q5_K": 0.04, "Q4_K": 0.08, "Q5_0": 0.045, "Q5_1": 0.04}
REFERENCE_QUANTIZERS = [Q.Q8_0, Q.Q5_0, Q.Q5_1]      # ggml's reference rounding, reproduced exactly


def weights(rows=64, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[3, :40] += 1.0                    # an outlier run, as trained weights have
    w[5] = 0.0                          # an all-zero row: scales of 0 must not divide
    return w


def test_the_block_geometry_is_ggmls():
    for qt, t in TYPES:
        assert (qt.block, qt.type_size) == gguf.GGML_QUANT_SIZES[t] and qt.ggml_type == int(t)
    assert [qt.bits_per_weight for qt, _ in TYPES] == [8.5, 5.5, 4.5, 5.5, 6.0]


@pytest.mark.parametrize("qt", REFERENCE_QUANTIZERS, ids=lambda q: q.name)
def test_reference_quantization_is_ggmls_bit_for_bit(qt):
    w = weights()
    ours = Q.quantize(w, qt).numpy()
    assert np.array_equal(ours, gq.quantize(w.numpy(), gguf.GGMLQuantizationType[qt.name]))


def test_rows_the_k_quants_do_not_divide_fall_back_to_32_weight_blocks():
    """llama.cpp's choice: Q4_K -> Q5_0, Q5_K -> Q5_1 where a row is no multiple of 256 (the AR's
    13696-wide down projection), Q8_0 needs none; rows no format divides stay as stored."""
    assert Q.block_type_for((4096, 13696), Q.Q4_K) is Q.Q5_0
    assert Q.block_type_for((4096, 13696), Q.Q5_K) is Q.Q5_1
    assert Q.block_type_for((4096, 4096), Q.Q4_K) is Q.Q4_K
    assert Q.block_type_for((4096, 13696), Q.Q8_0) is Q.Q8_0
    assert Q.block_type_for((8, 100), Q.Q4_K) is None and Q.block_type_for((8, 100), Q.Q8_0) is None


@pytest.mark.parametrize("qt,t", TYPES, ids=lambda x: getattr(x, "name", str(x)))
def test_dequantization_is_ggmls_and_the_error_is_bounded(qt, t):
    w = weights()
    raw = Q.quantize(w, qt)
    assert raw.dtype == torch.uint8 and raw.shape == (64, 512 // qt.block * qt.type_size)
    assert raw.numel() == Q.nbytes(w.shape, qt)
    ours = Q.dequantize(raw, qt, w.shape)
    ref = torch.from_numpy(gq.dequantize(raw.numpy(), t)).reshape(w.shape)
    assert torch.equal(ours, ref)
    assert torch.equal(ours[5], torch.zeros(512))
    rel = ((ours - w).norm() / w.norm()).item()
    assert rel < MAX_REL[qt.name], rel
    assert Q.dequantize(raw, qt, w.shape, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("qt,t", TYPES, ids=lambda x: getattr(x, "name", str(x)))
def test_dequantization_of_arbitrary_blocks_is_ggmls(qt, t):
    """Any block a GGUF file may hold (random bytes, finite f16 scales), not only our quantizer's."""
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (32, qt.type_size), dtype=torch.uint8, generator=g)
    n_f16 = 1 if qt in (Q.Q8_0, Q.Q5_0) else 2
    scales = (torch.rand(32, n_f16, generator=g) * 2 - 1).to(torch.float16)
    raw[:, :2 * n_f16] = scales.view(torch.uint8).reshape(32, 2 * n_f16)
    ours = Q.dequantize(raw, qt, (32, qt.block))
    ref = torch.from_numpy(gq.dequantize(raw.numpy(), t)).reshape(32, qt.block)
    assert torch.equal(ours, ref)


def test_rows_must_hold_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        Q.quantize(torch.zeros(4, 100), Q.Q4_K)
