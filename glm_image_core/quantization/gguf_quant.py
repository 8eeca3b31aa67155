"""GGUF block quantization in plain PyTorch: Q8_0, Q5_K and Q4_K (the ggml formats llama.cpp and
city96's ComfyUI-GGUF read), for storing the DiT's and AR's block matrices at 8.5 / 5.5 / 4.5 bits
per weight and dequantizing them layer by layer at compute time; Q5_0 / Q5_1 (5.5 / 6 bits, 32-weight
blocks) for the matrices whose rows the K-quants' 256-weight blocks do not divide.

Layouts (ggml-common.h; bytes per block):
* Q8_0, 32 weights, 34 bytes: ``d`` f16, then 32 int8 ``q``; ``w = d * q``.
* Q4_K, 256 weights, 144 bytes: ``d`` f16, ``dmin`` f16, 12 bytes of 6-bit scales and mins of the
  eight 32-weight sub-blocks, 128 bytes of 4-bit ``q`` (byte ``32c + i`` holds weight ``64c + i`` in
  its low nibble and ``64c + 32 + i`` in its high one); ``w = d * sc[s] * q - dmin * m[s]``.
* Q5_K, 256 weights, 176 bytes: as Q4_K with 32 bytes ``qh`` before the 128 bytes of low nibbles;
  bit ``s`` of ``qh[i]`` is the fifth bit of weight ``i`` of sub-block ``s``.
* Q5_0, 32 weights, 22 bytes: ``d`` f16, 4 bytes ``qh``, 16 bytes ``qs``; ``w = d * (q - 16)``.
* Q5_1, 32 weights, 24 bytes: ``d`` f16, ``m`` f16, ``qh``, ``qs``; ``w = d * q + m``.

Dequantization is exactly ggml's (tested bit for bit against the ``gguf`` package's numpy code).
Quantization: Q8_0, Q5_0 and Q5_1 are ggml's reference (bit-exact); the K-quants use a
direct min/max fit per sub-block (ggml's own quantizer searches scales iteratively and lands a little
lower in error); the files are valid ggml either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch


@dataclass(frozen=True)
class QuantType:
    name: str
    ggml_type: int          # gguf.GGMLQuantizationType value
    block: int              # weights per block
    type_size: int          # bytes per block
    fallback: Optional[str] = None   # for rows that hold no whole number of blocks (llama.cpp's choice)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block


Q8_0 = QuantType("Q8_0", 8, 32, 34)
Q5_0 = QuantType("Q5_0", 6, 32, 22)
Q5_1 = QuantType("Q5_1", 7, 32, 24)
Q4_K = QuantType("Q4_K", 12, 256, 144, fallback="Q5_0")
Q5_K = QuantType("Q5_K", 13, 256, 176, fallback="Q5_1")
QUANT_TYPES: Dict[str, QuantType] = {q.name: q for q in (Q8_0, Q5_0, Q5_1, Q4_K, Q5_K)}
BY_GGML_TYPE: Dict[int, QuantType] = {q.ggml_type: q for q in QUANT_TYPES.values()}


def block_type_for(shape: Sequence[int], qt: QuantType) -> Optional[QuantType]:
    """The ggml type a matrix of ``shape`` is stored in when ``qt`` is asked: ``qt`` when its rows hold
    whole blocks, else ``qt``'s 32-weight fallback (the K-quants' 256-weight blocks do not divide e.g.
    the AR's 13696-wide down projection), else None (kept as stored)."""
    for t in (qt, QUANT_TYPES.get(qt.fallback or "")):
        if t is not None and int(shape[-1]) % t.block == 0:
            return t
    return None


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[n] float -> [n, 2] uint8 (little-endian f16)."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _f16_from(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] float32."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """ggml's roundf: half away from zero (torch.round rounds half to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _blocks(w: torch.Tensor, qt: QuantType) -> torch.Tensor:
    if w.shape[-1] % qt.block:
        raise ValueError(f"{qt.name} needs rows that are a multiple of {qt.block} weights, got a row of {w.shape[-1]}")
    return w.reshape(-1, qt.block).to(torch.float32)


def nbytes(shape: Sequence[int], qt: QuantType) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n // qt.block * qt.type_size


# ---- Q8_0 -----------------------------------------------------------------------------------------

def _quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _round_away(x * inv).to(torch.int8)
    return torch.cat([_f16_bytes(d), q.view(torch.uint8)], dim=1)


def _dequantize_q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16_from(b[:, :2])
    q = b[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return d * q


# ---- Q5_0, Q5_1 (32-weight blocks: the K-quants' fallback) ----------------------------------------
# byte j of qs holds weight j (low nibble) and weight 16 + j (high nibble); bit j of the little-endian
# 32-bit qh is weight j's fifth bit.

def _bits32(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] values 0/1 -> [n, 4] uint8 (bit j of the little-endian word = value j)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=q.device)
    return (q.reshape(-1, 4, 8).to(torch.uint8) << shifts).sum(dim=2, dtype=torch.uint8)


def _unbits32(b: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)
    return ((b.reshape(-1, 4, 1) >> shifts) & 1).reshape(-1, 32)


def _pack5(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] values < 32 -> qh [n, 4] + qs [n, 16]."""
    return torch.cat([_bits32(q >> 4), (q[:, :16] & 0x0F) | (q[:, 16:] << 4)], dim=1)


def _unpack5(b: torch.Tensor) -> torch.Tensor:
    """qh [n, 4] + qs [n, 16] -> [n, 32] float32 values 0..31."""
    qs = b[:, 4:20]
    low = torch.cat([qs & 0x0F, qs >> 4], dim=1)
    return (low | (_unbits32(b[:, :4]) << 4)).to(torch.float32)


def _quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    mx = x.gather(1, x.abs().argmax(dim=1, keepdim=True))    # the first largest magnitude, signed
    d = mx / -16
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(x * inv + 16.5).clamp(0, 31).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _pack5(q)], dim=1)


def _dequantize_q5_0(b: torch.Tensor) -> torch.Tensor:
    return _f16_from(b[:, :2]) * (_unpack5(b[:, 2:]) - 16)


def _quantize_q5_1(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    d = (hi - lo) / 31
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc((x - lo) * inv + 0.5).clamp(0, 31).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack5(q)], dim=1)


def _dequantize_q5_1(b: torch.Tensor) -> torch.Tensor:
    return _f16_from(b[:, :2]) * _unpack5(b[:, 4:]) + _f16_from(b[:, 2:4])


# ---- K-quants (Q4_K, Q5_K) ------------------------------------------------------------------------

def _pack_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins per block [n, 8] -> ggml's 12-byte packing [n, 12]."""
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    d = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    m = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    md = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return torch.cat([d, m, md], dim=1)


def _unpack_scales(s: torch.Tensor):
    """[n, 12] uint8 -> (scales [n, 8], mins [n, 8]) as float32 (gguf.quants.Q4_K.get_scale_min)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.to(torch.float32), mn.to(torch.float32)


def _kquant_fit(x: torch.Tensor, levels: int):
    """Per 32-weight sub-block: w ≈ d*sc*q - dmin*m with q in [0, levels], 6-bit sc and m.
    x [n, 256] -> (d [n,1], dmin [n,1], sc [n,8], m [n,8], q [n,256] int)."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    lo = sub.amin(dim=2).clamp(max=0)                   # ggml keeps the min <= 0 (the offset >= 0)
    hi = sub.amax(dim=2)
    scale = (hi - lo) / levels                           # [n, 8]
    offset = -lo
    d = (scale.amax(dim=1, keepdim=True) / 63).to(torch.float16).to(torch.float32)
    dmin = (offset.amax(dim=1, keepdim=True) / 63).to(torch.float16).to(torch.float32)
    sc = torch.where(d > 0, _round_away(scale / d.clamp(min=1e-30)), torch.zeros_like(scale)).clamp(0, 63)
    m = torch.where(dmin > 0, _round_away(offset / dmin.clamp(min=1e-30)), torch.zeros_like(offset)).clamp(0, 63)
    step = (d * sc).unsqueeze(-1)                        # [n, 8, 1]
    off = (dmin * m).unsqueeze(-1)
    q = torch.where(step > 0, _round_away((sub + off) / step.clamp(min=1e-30)), torch.zeros_like(sub))
    return d, dmin, sc, m, q.clamp(0, levels).to(torch.uint8).reshape(n, 256)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[n, 256] values < 16 -> [n, 128]: byte 32c+i = q[64c+i] | q[64c+32+i] << 4."""
    q = q.reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _from_nibbles(b: torch.Tensor) -> torch.Tensor:
    b = b.reshape(-1, 4, 1, 32)
    return torch.cat([b & 0x0F, b >> 4], dim=2).reshape(-1, 256)


def _quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, sc, m, q = _kquant_fit(x, 15)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_scales(sc, m), _nibbles(q)], dim=1)


def _quantize_q5_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, sc, m, q = _kquant_fit(x, 31)
    n = x.shape[0]
    high = (q >> 4).reshape(n, 8, 32)                    # bit s of qh[i]: weight i of sub-block s
    qh = torch.zeros(n, 32, dtype=torch.uint8)
    for s in range(8):
        qh |= high[:, s] << s
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_scales(sc, m), qh, _nibbles(q & 0x0F)], dim=1)


def _dequantize_k(b: torch.Tensor, five_bit: bool) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16_from(b[:, 0:2]), _f16_from(b[:, 2:4])
    sc, mn = _unpack_scales(b[:, 4:16])
    if five_bit:
        qh, qs = b[:, 16:48], b[:, 48:176]
        shifts = torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)
        high = ((qh.reshape(n, 1, 32) >> shifts) & 1).reshape(n, 256)
        q = _from_nibbles(qs) | (high << 4)
    else:
        q = _from_nibbles(b[:, 16:144])
    step = (d * sc).reshape(n, 8, 1)
    off = (dmin * mn).reshape(n, 8, 1)
    return (step * q.reshape(n, 8, 32).to(torch.float32) - off).reshape(n, 256)


_QUANTIZE = {"Q8_0": _quantize_q8_0, "Q5_0": _quantize_q5_0, "Q5_1": _quantize_q5_1, "Q4_K": _quantize_q4_k,
             "Q5_K": _quantize_q5_k}
_DEQUANTIZE = {"Q8_0": _dequantize_q8_0, "Q5_0": _dequantize_q5_0, "Q5_1": _dequantize_q5_1,
               "Q4_K": lambda b: _dequantize_k(b, False), "Q5_K": lambda b: _dequantize_k(b, True)}


@torch.no_grad()
def quantize(w: torch.Tensor, qt: QuantType) -> torch.Tensor:
    """A float tensor (rows of whole blocks) -> its ggml blocks, uint8 [rows, row_bytes] (the shape
    GGUF files store quantized tensors in)."""
    rows = w.reshape(-1, w.shape[-1]).shape[0] if w.dim() > 1 else 1
    raw = _QUANTIZE[qt.name](_blocks(w.detach().cpu(), qt))
    return raw.reshape(rows, -1)


@torch.no_grad()
def dequantize(raw: torch.Tensor, qt: QuantType, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ggml blocks (uint8, any shape holding whole blocks) -> a tensor of ``shape`` in ``dtype``,
    on the blocks' device."""
    b = raw.reshape(-1, qt.type_size)
    return _DEQUANTIZE[qt.name](b).reshape(tuple(shape)).to(dtype)
