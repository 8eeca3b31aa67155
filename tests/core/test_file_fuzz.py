"""Mutation fuzz of the pack's file readers (issue 26, item 4): damaged GGUF and safetensors files (bytes
flipped in the header, length and shape fields set to absurd values, truncations) read the way the
loaders read them (``checkpoint.weights_header`` then every tensor through ``checkpoint.iter_weights``)
in a child process with a memory limit and a time limit per file. Allowed: the file reads, or the
pack's own clear errors (CheckpointError, GGUFError). Anything else fails the test: a raw torch or
Python exception, a crash, a hang, a runaway allocation."""
import json
import os
import random
import struct
import subprocess
import sys

import pytest
import torch

from glm_image_core.quantization import gguf_file, gguf_quant
from glm_image_core.loading.single_file import write_streamed_safetensors

pytestmark = pytest.mark.core
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MUTANTS = 150                   # per format: 300 in all
MEMORY_LIMIT = 6 * 2 ** 30      # address space of the child (torch itself maps ~2 GiB)

CHILD = r"""
import json, resource, signal, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
sys.path.insert(0, {root!r})
from glm_image_core.loading import checkpoint as ckpt
from glm_image_core.quantization import gguf_file
ALLOWED = (ckpt.CheckpointError, gguf_file.GGUFError)
def alarm(*_):
    raise TimeoutError("hang")
signal.signal(signal.SIGALRM, alarm)
for path in sys.argv[1:]:
    print(json.dumps({{"start": path}}), flush=True)
    signal.alarm(20)
    try:
        ckpt.weights_header(path)
        for key, t in ckpt.iter_weights([path]):
            float(t.float().sum())
        out = {{"path": path, "result": "read"}}
    except ALLOWED as e:
        out = {{"path": path, "result": "refused", "error": str(e)[:200]}}
    except BaseException as e:
        out = {{"path": path, "result": "raw", "error": type(e).__name__ + ": " + str(e)[:300]}}
    signal.alarm(0)
    print(json.dumps(out), flush=True)
"""


def valid_files(tmp) -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g)
    gguf = os.path.join(tmp, "ok.gguf")
    gguf_file.write_gguf(gguf, [
        gguf_file.Entry("a.weight", (8, 64), gguf_quant.Q8_0.ggml_type, lambda: w),
        gguf_file.Entry("a.bias", (8,), gguf_file.GGML_TYPE_OF_DTYPE[torch.float32], lambda: w[:, 0].contiguous()),
    ], {"glm_image.component": "dit"})
    st = os.path.join(tmp, "ok.safetensors")
    write_streamed_safetensors(st, [("a.weight", torch.float32, (8, 64), lambda: w),
                                    ("a.bias", torch.bfloat16, (8,), lambda: w[:, 0].to(torch.bfloat16))],
                               {"format": "pt"})
    return {"gguf": gguf, "safetensors": st}


def header_end(path: str, data: bytes) -> int:
    if path.endswith(".safetensors"):
        return 8 + struct.unpack("<Q", data[:8])[0]
    with gguf_file.GGUFFile(path) as f:
        return f.data_start


def mutants(path: str, out_dir: str, n: int, rng: random.Random) -> list:
    data = open(path, "rb").read()
    end = header_end(path, data)
    absurd = [0, 1, 2 ** 31 - 1, 2 ** 32, 2 ** 40, 2 ** 63 - 1, 2 ** 64 - 1]
    paths = []
    for i in range(n):
        b = bytearray(data)
        kind = i % 4
        if kind == 0:                                    # flip a few bytes of the header
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(end)] ^= 1 << rng.randrange(8)
        elif kind == 1:                                  # an absurd 64-bit field somewhere in the header
            at = rng.randrange(0, max(1, end - 8))
            b[at:at + 8] = struct.pack("<Q", rng.choice(absurd))
        elif kind == 2:                                  # an absurd 32-bit field
            at = rng.randrange(0, max(1, end - 4))
            b[at:at + 4] = struct.pack("<I", rng.choice(absurd) & 0xFFFFFFFF)
        else:                                            # truncated anywhere
            b = b[:rng.randrange(len(b))]
        p = os.path.join(out_dir, f"m{i:03d}{os.path.splitext(path)[1]}")
        with open(p, "wb") as f:
            f.write(b)
        paths.append(p)
    return paths


def gguf_with_an_empty_dimension(path: str, out_dir: str) -> str:
    """The case the first 300 mutants found: a GGUF tensor with a zero dimension."""
    data = bytearray(open(path, "rb").read())
    at = data.index(b"a.weight") + len(b"a.weight")          # n_dims u32, then dims u64 (innermost first)
    data[at + 4:at + 12] = struct.pack("<Q", 0)
    p = os.path.join(out_dir, "zero_dim.gguf")
    with open(p, "wb") as f:
        f.write(data)
    return p


@pytest.mark.parametrize("fmt", ["gguf", "safetensors"])
def test_damaged_files_give_only_the_packs_clear_errors(tmp_path, fmt):
    ok = valid_files(str(tmp_path))[fmt]
    rng = random.Random(f"glm-fuzz-{fmt}")
    files = [ok] + mutants(ok, str(tmp_path), MUTANTS, rng)
    if fmt == "gguf":
        files.append(gguf_with_an_empty_dimension(ok, str(tmp_path)))
    code = CHILD.format(limit=MEMORY_LIMIT, root=ROOT)
    results, pending = {}, list(files)
    while pending:                      # a crash ends the child: start a new one after the crashing file
        r = subprocess.run([sys.executable, "-c", code, *pending], capture_output=True, text=True,
                           timeout=60 + 25 * len(pending), env=dict(os.environ, OMP_NUM_THREADS="1"))
        started = None
        for line in r.stdout.splitlines():
            rec = json.loads(line)
            if "start" in rec:
                started = rec["start"]
            else:
                results[rec["path"]] = rec
                started = None
        if started is not None:
            results[started] = {"path": started, "result": "crash", "error": f"exit {r.returncode}: {r.stderr[-300:]}"}
        pending = [p for p in pending if p not in results]
        if r.returncode != 0 and started is None and pending:
            raise AssertionError(f"the child failed before reading: {r.stderr[-2000:]}")
    assert results[ok]["result"] == "read", results[ok]
    bad = {os.path.basename(p): v["error"] for p, v in results.items() if v["result"] in ("raw", "crash")}
    counts = {k: sum(v["result"] == k for v in results.values()) for k in ("read", "refused")}
    print(f"{fmt}: {len(results)} files: {counts}")
    assert not bad, f"{len(bad)} damaged {fmt} files end in something else than a clear error: {bad}"
    if fmt == "gguf":
        assert results[files[-1]]["result"] == "refused" and "empty shape" in results[files[-1]]["error"]
