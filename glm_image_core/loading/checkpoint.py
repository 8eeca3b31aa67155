"""Reading GLM-Image folders: configs (JSON) and weights (safetensors only, sharded or not).

Nothing here ever unpickles: ``.bin``/``.pt``/``.ckpt`` files are refused with a clear error.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from safetensors import safe_open

from ..errors import CheckpointError  # noqa: F401  (re-exported: ckpt.CheckpointError)
from ..quantization import gguf_file, gguf_quant

PIPELINE_CLASS = "GlmImagePipeline"
OFFICIAL_FOLDERS = ("vision_language_encoder", "processor", "text_encoder", "tokenizer", "transformer", "vae", "scheduler")
UNSAFE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# component folder -> its config file (the components with weights, and the scheduler)
CONFIG_FILES = {"vision_language_encoder": "config.json", "text_encoder": "config.json",
                "transformer": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json"}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# safetensors header dtype names (read by the header checks, written by the single-file converter)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
# ... of the floating types a GLM-Image checkpoint may hold
SAFETENSORS_FLOAT_DTYPES = {k: v for k, v in SAFETENSORS_DTYPES.items() if v.is_floating_point}

# How a loader stores each tensor: one dtype for every floating tensor, or ``fn(key, tensor) -> dtype``
# (None keeps the file's dtype), see :func:`storage_dtypes`.
StorageDtype = Union[None, torch.dtype, Callable[[str, torch.Tensor], Optional[torch.dtype]]]


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"missing file: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def is_glm_image_folder(folder: str) -> bool:
    """True when ``folder/model_index.json`` names ``GlmImagePipeline``."""
    p = os.path.join(folder, "model_index.json")
    if not os.path.isfile(p):
        return False
    try:
        return read_json(p).get("_class_name") == PIPELINE_CLASS
    except CheckpointError:
        return False


def check_glm_image_folder(folder: str, needed: Iterable[str] = OFFICIAL_FOLDERS) -> dict:
    """Validate the top-level layout; return model_index. Raises CheckpointError naming what is missing."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"GLM-Image folder not found: {folder}")
    index = read_json(os.path.join(folder, "model_index.json"))
    if index.get("_class_name") != PIPELINE_CLASS:
        raise CheckpointError(f"{folder}/model_index.json names {index.get('_class_name')!r}, expected {PIPELINE_CLASS!r}")
    missing = [c for c in needed if not os.path.isdir(os.path.join(folder, c))]
    if missing:
        raise CheckpointError(f"GLM-Image folder {folder} is missing component folder(s): {', '.join(missing)} "
                              f"(the official layout has {', '.join(OFFICIAL_FOLDERS)})")
    # Fail at the loader, not deep inside a later stage: every slot holds the class model_index.json
    # names, and every weight file has a complete safetensors header (only headers are read here).
    for comp, cfg_name in CONFIG_FILES.items():
        if comp not in needed:
            continue
        expected = (index.get(comp) or [None, None])[-1]
        cfg = read_json(os.path.join(folder, comp, cfg_name))
        found = cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]
        if expected and found and found != expected:
            raise CheckpointError(f"{folder}/{comp} holds {found} (per its {cfg_name}), but model_index.json expects "
                                  f"{expected} in the {comp!r} slot: put each component in its own folder")
        if comp != "scheduler":
            for path in weight_files(os.path.join(folder, comp)):
                safetensors_header(path)
    return index


def weight_files(component_dir: str) -> List[str]:
    """The safetensors files of one component folder, in shard order. Refuses pickle-based weights."""
    if not os.path.isdir(component_dir):
        raise CheckpointError(f"component folder not found: {component_dir}")
    names = sorted(os.listdir(component_dir))
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if indexes:
        index = read_json(os.path.join(component_dir, indexes[0]))
        shards = sorted(set(index.get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{component_dir}/{indexes[0]} has an empty weight_map")
        paths = [os.path.join(component_dir, s) for s in shards]
        for p in paths:
            if not os.path.isfile(p):
                raise CheckpointError(f"shard listed in {indexes[0]} is missing: {p}")
        return paths
    st = [os.path.join(component_dir, n) for n in names if n.endswith(".safetensors")]
    if st:
        return st
    unsafe = [n for n in names if n.endswith(UNSAFE_WEIGHT_SUFFIXES)]
    if unsafe:
        raise CheckpointError(f"{component_dir} holds only pickle-based weights ({', '.join(unsafe)}); "
                              "this pack reads safetensors only and never unpickles files. "
                              "Convert them to .safetensors first.")
    raise CheckpointError(f"no .safetensors weights found in {component_dir}")


def is_fp8(dtype: Optional[torch.dtype]) -> bool:
    return dtype in FP8_DTYPES


def storage_dtypes(dtype: Optional[torch.dtype], fp8_keys: Optional[re.Pattern] = None,
                   other_dtype: Optional[torch.dtype] = None) -> StorageDtype:
    """The per-tensor storage rule for a requested weight dtype.

    ``None`` keeps every tensor as stored; a 16/32/64-bit dtype applies to every floating tensor.
    An fp8 dtype applies only to the 2-D weights whose key matches ``fp8_keys`` (the Linear layers
    of the repeated blocks, which hold almost all parameters); biases, norms, embeddings, the
    timestep/condition MLPs and output heads stay in ``other_dtype`` (the compute dtype; None: as
    stored), as the reference keeps its numerically sensitive parts in higher precision.
    """
    if dtype is None or not is_fp8(dtype):
        return dtype

    def pick(key: str, t: torch.Tensor) -> Optional[torch.dtype]:
        if fp8_keys is not None and t.dim() == 2 and fp8_keys.match(key):
            return dtype
        return other_dtype
    return pick


def storage_dtype_of(dtype: StorageDtype, key: str, t: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype ``key`` is stored in under ``dtype`` (None: as it is)."""
    if not t.is_floating_point():
        return None
    return dtype(key, t) if callable(dtype) else dtype


def check_safetensors_path(path: str, what: str = "weights") -> None:
    """Refuse, before opening it, a file that is not a .safetensors file (pickle-based formats are
    never opened: unpickling can run arbitrary code)."""
    low = path.lower()
    if low.endswith(UNSAFE_WEIGHT_SUFFIXES):
        raise CheckpointError(f"{path}: pickle-based {what} ({os.path.splitext(path)[1]}) are refused; this pack "
                              "reads safetensors only and never unpickles files. Convert the file to .safetensors "
                              "first (scripts/convert_to_single_file.py writes GLM-Image single files).")
    if not low.endswith((".safetensors", ".sft")):
        raise CheckpointError(f"{path}: not a .safetensors file; {what} must be safetensors")
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} file not found: {path}")


def safetensors_header(path: str) -> Tuple[Dict[str, str], Dict[str, Tuple[str, Tuple[int, ...]]]]:
    """(metadata, {key: (safetensors dtype name, shape)}) of a safetensors file, reading only its
    header. A truncated, corrupt or non-safetensors file gives a CheckpointError naming it."""
    check_safetensors_path(path)
    try:   # safe_open validates the header and that the data section covers the whole file
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {}
            for k in f.keys():
                sl = f.get_slice(k)
                tensors[k] = (sl.get_dtype(), tuple(int(x) for x in sl.get_shape()))
    except Exception as e:  # SafetensorError, OSError on garbage input
        raise CheckpointError(f"cannot read safetensors file {path}: {e} (truncated or not a safetensors file?)") from None
    return meta, tensors


# fp32 tensors are used in place only when their data start on this boundary in the file (the alignment
# of a fresh torch allocation): CPU fp32 GEMMs round differently on unaligned data, which would break
# the bit-exact CPU parity with the official pipeline (it copies). 16- and 8-bit tensors only need their
# natural alignment: the official safetensors files align the data section to 8 bytes, not 64.
FP32_MAP_ALIGNMENT = 64


def _mappable(offset: int, dtype: torch.dtype) -> bool:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return offset % (FP32_MAP_ALIGNMENT if itemsize >= 4 else itemsize) == 0


def iter_safetensors(paths: Iterable[str], device: str | torch.device = "cpu", dtype: StorageDtype = None,
                     keep: Optional[Callable[[str], bool]] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """(key, tensor) of safetensors files, one tensor at a time: each is read, cast to its storage
    dtype (``dtype``: one dtype or a per-key rule, :func:`storage_dtypes`), placed on ``device`` and
    handed out before the next is read, so loading never holds more than the network being filled.

    A tensor kept in the file's dtype on the CPU is not copied: it is a view of the file mapped
    copy-on-write, so its pages are file-backed (the OS can drop and re-read them under memory
    pressure instead of swapping) and cost no RAM until touched — unless its data is not aligned in
    the file (see ``FP32_MAP_ALIGNMENT``). Anything else is cast from the mapping into a
    new tensor, and the pages it was read from are released at once (they do not stay in the process).
    ``keep``: the keys to read (others are never read from disk). A truncated or corrupt file gives
    a CheckpointError naming it.
    """
    device = torch.device(device)
    for path in paths:
        _, header = safetensors_header(path)            # validates the whole file first
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            base = 8 + n
            offsets = json.loads(f.read(n).decode("utf-8"))
            mapped = None
            for key in sorted(header, key=lambda k: offsets[k]["data_offsets"][0]):   # file order
                if keep is not None and not keep(key):
                    continue
                st_dtype, shape = header[key]
                file_dtype = SAFETENSORS_DTYPES.get(st_dtype)
                if file_dtype is None:
                    raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {st_dtype}")
                start, end = offsets[key]["data_offsets"]
                probe = torch.empty(shape, dtype=file_dtype, device="meta")   # what the storage rule looks at
                want = storage_dtype_of(dtype, key, probe) or file_dtype
                if end == start:
                    t = torch.empty(shape, dtype=want, device=device)
                elif (base + start) % probe.element_size():     # not even element-aligned: plain read
                    t = torch.empty(shape, dtype=file_dtype)
                    f.seek(base + start)
                    f.readinto(memoryview(t.view(torch.uint8).numpy()).cast("B"))
                    t = t.to(device=device, dtype=want)
                else:
                    if mapped is None:
                        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                    t = torch.frombuffer(mapped, dtype=file_dtype, count=(end - start) // probe.element_size(),
                                         offset=base + start).view(shape)
                    if want != file_dtype or device.type != "cpu" or not _mappable(base + start, file_dtype):
                        t = t.to(device=device, dtype=want, copy=True)
                        # the pages only read to be cast leave this process now (unmodified copy-on-write
                        # pages: the OS re-reads them from the file should a neighbour need them)
                        lo = (base + start) // mmap.PAGESIZE * mmap.PAGESIZE
                        mapped.madvise(mmap.MADV_DONTNEED, lo, base + end - lo)
                yield key, t
                del t


# --------------------------------------------------------------------------------------
# GGUF single files (the DiT and the AR with block-quantized matrices; gguf_file, gguf_quant)
# --------------------------------------------------------------------------------------

# A quantized tensor handed to the loader: (ggml blocks uint8 [rows, row_bytes], format, logical shape)
# -> what its layer takes (``gguf_ops.QuantizedWeight``, the blocks kept as they are). None: dequantized
# at load into the storage dtype (float32 when kept "as stored").
QuantizedFactory = Callable[[torch.Tensor, "gguf_quant.QuantType", Tuple[int, ...]], object]


def is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def weights_header(path: str) -> Tuple[Dict[str, str], Dict[str, Tuple[str, Tuple[int, ...]]]]:
    """(string metadata, {key: (dtype or ggml type name, logical shape)}) of a safetensors or GGUF file,
    from its header only."""
    if not is_gguf(path):
        return safetensors_header(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with gguf_file.GGUFFile(path) as g:
            return g.strings(), {k: (gguf_file.type_name(t.ggml_type), t.shape) for k, t in g.tensors.items()}
    except gguf_file.GGUFError as e:
        raise CheckpointError(str(e)) from None


def iter_weights(paths: Iterable[str], device: str | torch.device = "cpu", dtype: StorageDtype = None,
                 keep: Optional[Callable[[str], bool]] = None,
                 quantized: Optional[QuantizedFactory] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """:func:`iter_safetensors` for safetensors and GGUF files alike. GGUF float tensors follow the
    same rules (mapped when kept as stored on the CPU); a block-quantized tensor goes through
    ``quantized`` when given (its layer keeps the blocks), otherwise it is dequantized into the rule's
    dtype (float32 when the rule keeps tensors as stored)."""
    device = torch.device(device)
    for path in paths:
        if not is_gguf(path):
            yield from iter_safetensors([path], device=device, dtype=dtype, keep=keep)
            continue
        try:
            g = gguf_file.GGUFFile(path)
        except gguf_file.GGUFError as e:
            raise CheckpointError(str(e)) from None
        with g:
            for key, info in sorted(g.tensors.items(), key=lambda kv: kv[1].offset):
                if keep is not None and not keep(key):
                    continue
                raw = g.tensor(key)
                qt = gguf_quant.BY_GGML_TYPE.get(info.ggml_type)
                file_dtype = torch.float32 if qt is not None else raw.dtype
                want = storage_dtype_of(dtype, key, torch.empty(info.shape, dtype=file_dtype, device="meta"))
                if qt is None:
                    t = raw if (want in (None, raw.dtype) and device.type == "cpu") else raw.to(device, want or raw.dtype)
                elif quantized is not None:        # the namespace keeps blocks: whatever the float rule
                    t = quantized(raw if device.type == "cpu" else raw.to(device), qt, info.shape)
                else:
                    t = gguf_quant.dequantize(raw, qt, info.shape, want or torch.float32).to(device)
                yield key, t
                del t, raw


def load_safetensors(paths: Iterable[str], device: str | torch.device = "cpu",
                     dtype: StorageDtype = None, keep: Optional[Callable[[str], bool]] = None) -> Dict[str, torch.Tensor]:
    """Load and merge safetensors files into one dict (see :func:`iter_safetensors`; networks are
    loaded tensor by tensor by ``loading.build.build_loaded`` instead)."""
    return dict(iter_safetensors(paths, device=device, dtype=dtype, keep=keep))


def load_component(folder: str, component: str, device="cpu", dtype=None):
    """(config dict, state dict) of one component of an official GLM-Image folder."""
    cdir = os.path.join(folder, component)
    cfg_name = "scheduler_config.json" if component == "scheduler" else "config.json"
    cfg = read_json(os.path.join(cdir, cfg_name))
    return cfg, load_safetensors(weight_files(cdir), device=device, dtype=dtype)


def check_state_dict_keys(own: Dict[str, object], sd: Dict[str, object], what: str,
                          ignore_unexpected: Iterable[str] = ()) -> None:
    """Raise a readable CheckpointError when ``sd`` (a file's {key: tensor or shape}) does not fit ``own``
    ({key: shape or tensor}, what the network declares): missing, unexpected and mis-shaped keys. ``ignore_unexpected``: key
    prefixes present in official files but unused at inference (e.g. the VQ ``post_quant_conv``)."""
    ign = tuple(ignore_unexpected)
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in own.items()}
    got = {k: tuple(getattr(v, "shape", v)) for k, v in sd.items()}
    missing = sorted(k for k in shapes if k not in got)
    unexpected = sorted(k for k in got if k not in shapes and not k.startswith(ign))
    shape_bad = sorted(f"{k}: file {got[k]} vs model {shapes[k]}"
                       for k in shapes if k in got and got[k] != shapes[k])
    if missing or unexpected or shape_bad:
        def show(xs):
            return ", ".join(xs[:8]) + (f" … (+{len(xs) - 8} more)" if len(xs) > 8 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {show(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {show(unexpected)}")
        if shape_bad:
            parts.append(f"{len(shape_bad)} shape mismatch(es): {show(shape_bad)}")
        raise CheckpointError(f"weights do not match the {what}: " + "; ".join(parts))

