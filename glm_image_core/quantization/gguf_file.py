"""GGUF files (version 3) read and written in plain Python + PyTorch, so loading a ``.gguf`` needs no
package beyond torch (the ``gguf`` package is only the tests' reference).

Layout (little-endian): ``b"GGUF"``, version u32, tensor count u64, metadata count u64; the metadata
(key string, value type u32, value); the tensor infos (name, n_dims u32, dims u64 innermost first,
ggml type u32, data offset u64); padding to ``general.alignment`` (32 by default); the tensor data,
each tensor aligned. Strings are a u64 length + UTF-8 bytes.

Tensors come out as views of the file mapped copy-on-write (like ``checkpoint.iter_safetensors``):
F32 / F16 / BF16 as tensors of that dtype, quantized ones as their raw ggml blocks, uint8
``[rows, row_bytes]`` (``gguf_quant`` dequantizes them). Nothing is unpickled or executed.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from . import gguf_quant

MAGIC = b"GGUF"
VERSION = 3
DEFAULT_ALIGNMENT = 32

# ggml tensor types read and written as plain tensors; the block-quantized ones are gguf_quant's.
GGML_F32, GGML_F16, GGML_BF16 = 0, 1, 30
FLOAT_TYPES: Dict[int, torch.dtype] = {GGML_F32: torch.float32, GGML_F16: torch.float16, GGML_BF16: torch.bfloat16}
GGML_TYPE_OF_DTYPE = {v: k for k, v in FLOAT_TYPES.items()}

# metadata value types
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_SCALARS = {_UINT8: "<B", _INT8: "<b", _UINT16: "<H", _INT16: "<h", _UINT32: "<I", _INT32: "<i", _FLOAT32: "<f",
            _BOOL: "<?", _UINT64: "<Q", _INT64: "<q", _FLOAT64: "<d"}


class GGUFError(ValueError):
    """A file that is not a readable GGUF, or a tensor this reader cannot hand out."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: Tuple[int, ...]      # torch order (outermost first)
    ggml_type: int
    offset: int                 # from the start of the data section
    nbytes: int


def tensor_nbytes(shape: Sequence[int], ggml_type: int) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    if ggml_type in FLOAT_TYPES:
        return n * torch.empty((), dtype=FLOAT_TYPES[ggml_type]).element_size()
    qt = gguf_quant.BY_GGML_TYPE.get(ggml_type)
    if qt is None:
        raise GGUFError(f"ggml tensor type {ggml_type} is not supported (supported: F32, F16, BF16, "
                        f"{', '.join(gguf_quant.QUANT_TYPES)})")
    if not shape or int(shape[-1]) % qt.block:
        raise GGUFError(f"a {qt.name} tensor needs rows of whole {qt.block}-weight blocks, got shape {tuple(shape)}")
    return gguf_quant.nbytes(shape, qt)


def type_name(ggml_type: int) -> str:
    if ggml_type in FLOAT_TYPES:
        return {GGML_F32: "F32", GGML_F16: "F16", GGML_BF16: "BF16"}[ggml_type]
    qt = gguf_quant.BY_GGML_TYPE.get(ggml_type)
    return qt.name if qt else f"type {ggml_type}"


# ---- reading --------------------------------------------------------------------------------------

class _Cursor:
    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated GGUF header (needs {self.pos + n} bytes, file has {len(self.buf)})")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > 1 << 30:
            raise GGUFError(f"{self.path}: implausible string length {n} in the GGUF header")
        return self.take(n).decode("utf-8")

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY and depth < 2:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if count > 1 << 28:
                raise GGUFError(f"{self.path}: implausible array length {count} in the GGUF header")
            return [self.value(etype, depth + 1) for _ in range(count)]
        raise GGUFError(f"{self.path}: unknown GGUF metadata value type {vtype}")


class GGUFFile:
    """A GGUF file's metadata, tensor infos and (mapped) tensors. Use as a context manager, or close()."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            if f.read(4) != MAGIC:
                raise GGUFError(f"{os.path.basename(path)} is not a GGUF file (it does not start with 'GGUF')")
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except ValueError:
                raise GGUFError(f"{path}: empty file") from None
        try:
            self._parse()
        except (GGUFError, UnicodeDecodeError, struct.error) as e:
            self.close()
            raise GGUFError(f"cannot read GGUF file {path}: {e}") from None

    def _parse(self) -> None:
        c = _Cursor(self._map, self.path)
        c.take(4)
        self.version = c.scalar("<I")
        if self.version not in (2, 3):
            raise GGUFError(f"GGUF version {self.version} (this reader knows 2 and 3)")
        n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
        self.metadata: Dict[str, object] = {}
        for _ in range(n_kv):
            key = c.string()
            self.metadata[key] = c.value(c.scalar("<I"))
        align = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if align <= 0 or align & (align - 1):
            raise GGUFError(f"general.alignment {align} is not a power of two")
        infos: List[TensorInfo] = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.scalar("<I")
            if n_dims > 8:
                raise GGUFError(f"tensor {name} has {n_dims} dimensions")
            dims = [c.scalar("<Q") for _ in range(n_dims)]
            ggml_type, offset = c.scalar("<I"), c.scalar("<Q")
            shape = tuple(int(d) for d in reversed(dims))
            if not shape or 0 in shape:     # no network holds an empty tensor: a damaged header
                raise GGUFError(f"tensor {name} has the empty shape {shape}")
            infos.append(TensorInfo(name, shape, ggml_type, offset, tensor_nbytes(shape, ggml_type)))
        self.data_start = (c.pos + align - 1) // align * align
        self.tensors: Dict[str, TensorInfo] = {}
        for t in infos:
            if t.name in self.tensors:
                raise GGUFError(f"tensor {t.name} appears twice")
            if self.data_start + t.offset + t.nbytes > len(self._map):
                raise GGUFError(f"tensor {t.name} runs past the end of the file (truncated?)")
            self.tensors[t.name] = t

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as stored: a float tensor of its shape, or its ggml blocks (uint8 [rows, row_bytes]),
        a view of the copy-on-write mapping (no read until touched)."""
        t = self.tensors[name]
        start = self.data_start + t.offset
        if t.nbytes == 0:
            raw = torch.empty(0, dtype=torch.uint8)
        else:
            raw = torch.frombuffer(self._map, dtype=torch.uint8, count=t.nbytes, offset=start)
        if t.ggml_type in FLOAT_TYPES:
            dt = FLOAT_TYPES[t.ggml_type]
            if start % raw.element_size() or start % torch.empty((), dtype=dt).element_size():
                raw = raw.clone()
            return raw.view(dt).reshape(t.shape)
        rows = 1
        for s in t.shape[:-1]:
            rows *= s
        return raw.reshape(rows, -1)

    def strings(self) -> Dict[str, str]:
        """The metadata entries that are strings (what GLM-Image single files carry)."""
        return {k: v for k, v in self.metadata.items() if isinstance(v, str)}

    def close(self) -> None:
        # Drop the reference only: tensors handed out view the mapping and keep it alive (torch.frombuffer
        # holds the mmap object); unmapping it under them would leave them pointing at nothing.
        self._map = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- writing --------------------------------------------------------------------------------------

def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


@dataclass
class Entry:
    """One tensor to write: its name, shape, ggml type and a function producing its float values
    (called when its turn comes, so only one tensor is in memory at a time)."""
    name: str
    shape: Tuple[int, ...]
    ggml_type: int
    values: Callable[[], torch.Tensor]


# Weights quantized per pass when writing (16 M: 64 MiB of float32, plus the quantizer's intermediates):
# the 168064 x 4096 token table would otherwise need several float32 copies of itself at once.
QUANTIZE_CHUNK = 1 << 24


def _write(f, data: torch.Tensor) -> int:
    """Write a CPU uint8 tensor's bytes without another copy; returns their number."""
    view = memoryview(data.contiguous().numpy()).cast("B")
    f.write(view)
    return len(view)


def write_gguf(path: str, entries: Iterable[Entry], metadata: Dict[str, str],
               alignment: int = DEFAULT_ALIGNMENT, progress: Optional[Callable[[str], None]] = None) -> None:
    """Write a GGUF file tensor by tensor (the header is computed from the shapes first). Metadata
    values are strings; ``general.alignment`` is written when not the default. Written to a temporary
    name and renamed, so a failed conversion never leaves a half file under the final name."""
    entries = list(entries)
    meta: List[bytes] = []
    kv = dict(metadata)
    for k, v in kv.items():
        if not isinstance(v, str):
            raise TypeError(f"metadata {k!r} must be a string")
        meta.append(_string(k) + struct.pack("<I", _STRING) + _string(v))
    if alignment != DEFAULT_ALIGNMENT:
        meta.append(_string("general.alignment") + struct.pack("<II", _UINT32, alignment))
    infos, offset = [], 0
    for e in entries:
        n = tensor_nbytes(e.shape, e.ggml_type)
        dims = list(reversed([int(s) for s in e.shape]))
        infos.append(_string(e.name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
                     + struct.pack("<IQ", e.ggml_type, offset))
        offset = (offset + n + alignment - 1) // alignment * alignment
    head = MAGIC + struct.pack("<IQQ", VERSION, len(entries), len(meta)) + b"".join(meta) + b"".join(infos)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(b"\0" * (-len(head) % alignment))
            for e in entries:
                w = e.values()
                if tuple(w.shape) != tuple(e.shape):
                    raise ValueError(f"{e.name}: values of shape {tuple(w.shape)}, declared {tuple(e.shape)}")
                n = 0
                if e.ggml_type in FLOAT_TYPES:
                    n += _write(f, w.detach().to("cpu", FLOAT_TYPES[e.ggml_type]).contiguous().view(torch.uint8))
                else:       # whole rows at a time (blocks never cross a row): bounded memory, same bytes
                    qt = gguf_quant.BY_GGML_TYPE[e.ggml_type]
                    rows = w.detach().reshape(-1, w.shape[-1])
                    step = max(1, QUANTIZE_CHUNK // rows.shape[1])
                    for i in range(0, rows.shape[0], step):
                        n += _write(f, gguf_quant.quantize(rows[i:i + step], qt))
                del w
                f.write(b"\0" * (-n % alignment))
                if progress is not None:
                    progress(e.name)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def iter_gguf(path: str) -> Iterator[Tuple[str, torch.Tensor, int]]:
    """(name, tensor as stored, ggml type) of a GGUF file, in file order."""
    with GGUFFile(path) as g:
        for name, t in sorted(g.tensors.items(), key=lambda kv: kv[1].offset):
            yield name, g.tensor(name), t.ggml_type
