"""Shared pieces of the benchmarks (bench/run.py, bench/bench_*.py): the prompt, memory probes,
timing and statistics helpers, the cached benchmark checkpoint, and the small wrappers that time
calls inside a model without touching its numerics.
"""

from __future__ import annotations

import functools
import os
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SUPPORT = os.path.join(ROOT, "tests", "_support")
for _p in (ROOT, SUPPORT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# reference-oracle.md §5: the t2i prompt of every oracle run (its glyph text is "hello")
PROMPT = 'A photo of a cat holding a sign that says "hello"'
GUIDANCE = 1.5
CACHE_MODELS = os.path.join(ROOT, ".cache", "models", "diffusers")


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------

def _status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """Peak RSS of this process image (VmHWM). Not ru_maxrss: that survives fork+exec, so a child
    started from a big parent would report the parent's peak."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm == hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    return _status_mb("VmRSS")


# --------------------------------------------------------------------------------------
# Timing and statistics
# --------------------------------------------------------------------------------------

def timed(fn):
    """(seconds, result) of ``fn()``."""
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def median_best(xs: Sequence[float], better: str = "lower") -> Dict[str, float]:
    """{"median", "best"}: best = the minimum of times (better="lower"), the maximum of rates ("higher")."""
    xs = [x for x in xs if x == x]
    if not xs:
        return {"median": float("nan"), "best": float("nan")}
    return {"median": statistics.median(xs), "best": min(xs) if better == "lower" else max(xs)}


def paired_ratio(ours: Sequence[float], theirs: Sequence[float]) -> float:
    """Median over repetitions i of ours[i] / theirs[i] (rep i of each side ran back to back, so
    machine load affects both terms of one ratio alike)."""
    rs = [a / b for a, b in zip(ours, theirs) if a == a and b == b and b > 0]
    return statistics.median(rs) if rs else float("nan")


def machine_bandwidth_gbs(mb: int = 256) -> float:
    """Streaming-read bandwidth of this machine (torch.sum over ``mb`` MB), GB/s, best of 5."""
    import torch
    big = torch.ones(mb * 1024 * 1024 // 4)
    best = min(timed(big.sum)[0] for _ in range(5))
    return big.numel() * 4 / best / 1e9


TIMERS = {"wall": time.perf_counter, "cpu": time.process_time}


class ClockView:
    """One timer's records: ``total[name]`` seconds, ``calls[name]``, ``first_start[name]`` /
    ``last_end[name]`` (timer stamps) and ``durations[name]`` (each call)."""

    def __init__(self):
        self.total: Dict[str, float] = {}
        self.calls: Dict[str, int] = {}
        self.first_start: Dict[str, float] = {}
        self.last_end: Dict[str, float] = {}
        self.durations: Dict[str, List[float]] = {}

    def record(self, name: str, start: float, end: float) -> None:
        self.total[name] = self.total.get(name, 0.0) + (end - start)
        self.calls[name] = self.calls.get(name, 0) + 1
        self.first_start.setdefault(name, start)
        self.last_end[name] = end
        self.durations.setdefault(name, []).append(end - start)


class CallClock:
    """Times wrapped calls per stage name with every timer in :data:`TIMERS` at once: wall clock
    (``perf_counter``) and this process's CPU time (``process_time``: far less sensitive to other
    processes on a shared machine). ``view("wall" | "cpu")`` gives one timer's records."""

    def __init__(self):
        self.views = {k: ClockView() for k in TIMERS}
        self.results: Dict[str, object] = {}

    def view(self, kind: str) -> ClockView:
        return self.views[kind]

    @staticmethod
    def stamp() -> Dict[str, float]:
        return {k: t() for k, t in TIMERS.items()}

    def record(self, name: str, start: Dict[str, float], end: Dict[str, float], result=None) -> None:
        for k, v in self.views.items():
            v.record(name, start[k], end[k])
        if result is not None:
            self.results[name] = result

    def wrap(self, fn: Callable, name: str, sync: Callable[[], None] = lambda: None,
             keep_result: bool = False) -> Callable:
        """``fn`` timed under ``name`` (``sync`` runs before each stamp, e.g. cuda.synchronize)."""
        @functools.wraps(fn)
        def timed_call(*args, **kwargs):
            sync()
            t0 = self.stamp()
            out = fn(*args, **kwargs)
            sync()
            self.record(name, t0, self.stamp(), out if keep_result else None)
            return out
        return timed_call

    def hook_module(self, module, name: str, sync: Callable[[], None] = lambda: None) -> list:
        """Forward pre/post hooks timing every call of ``module`` (its outputs are left untouched)."""
        start: List[Dict[str, float]] = []

        def pre(_m, _args):
            sync()
            start.append(self.stamp())

        def post(_m, _args, _out):
            sync()
            self.record(name, start.pop(), self.stamp())

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


class Patches:
    """Attribute replacements undone on ``restore()`` (timing wrappers on objects/modules/classes)."""

    def __init__(self):
        self._saved: list = []

    def set(self, obj, attr: str, value) -> None:
        had = attr in vars(obj) if hasattr(obj, "__dict__") else True
        self._saved.append((obj, attr, vars(obj).get(attr) if had else None, had))
        setattr(obj, attr, value)

    def wrap(self, obj, attr: str, clock: CallClock, name: str, **kw) -> None:
        self.set(obj, attr, clock.wrap(getattr(obj, attr), name, **kw))

    def restore(self) -> None:
        while self._saved:
            obj, attr, old, had = self._saved.pop()
            if had:
                setattr(obj, attr, old)
            else:
                delattr(obj, attr)


class NodeTimer:
    """Wall time of each node of a prompt run in a ``glmtest_host.Host``: from the ``executing`` event
    of a node to the next one (ComfyUI sends one as each node starts, and a last one at the end)."""

    def __init__(self, host):
        self.stamps: list = []
        record = host.server.send_sync

        def send_sync(event, data, sid=None):
            if event == "executing":
                self.stamps.append((time.perf_counter(), (data or {}).get("node")))
            record(event, data, sid)
        host.server.send_sync = send_sync

    def clear(self) -> None:
        self.stamps.clear()

    def seconds(self, node: str) -> float:
        i = next(k for k, (_, n) in enumerate(self.stamps) if n == node)
        return self.stamps[i + 1][0] - self.stamps[i][0]


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------

def cached_checkpoint(size: str, seed: int = 0, bf16: bool = False) -> str:
    """``.cache/models/diffusers/GLM-Image-<size>`` (``-bf16``: weights in bf16, like the official
    files) written by ``glm_image_core.testing.tiny_checkpoint``, rewritten when the writer (or the configs it
    writes) is newer than the folder (the rule ``make tiny`` uses); written to a temporary folder first so
    a half-written checkpoint is never picked up."""
    import shutil

    import torch
    from glm_image_core.loading import configs
    from glm_image_core.testing import tiny_checkpoint
    folder = os.path.join(CACHE_MODELS, f"GLM-Image-{size}{'-bf16' if bf16 else ''}")
    stamp = os.path.join(folder, "model_index.json")
    writer = max(os.path.getmtime(m.__file__) for m in (tiny_checkpoint, configs))
    if os.path.isfile(stamp) and os.path.getmtime(stamp) >= writer:
        return folder
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tiny_checkpoint.write_checkpoint(tmp, size, seed=seed, dtype=torch.bfloat16 if bf16 else torch.float32)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


# --------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------

def psnr(a, b) -> float:
    """PSNR in dB of two images in [0, 1] (inf when equal)."""
    import math
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def write_report(out: str, res: dict, md: List[str]) -> None:
    """``out``.json (the figures) and ``out``.md (the table), and the table on stdout."""
    import json
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=2)
    with open(out + ".md", "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))


def training_bench_args(doc: str, px: int, steps: int, lr: float, out: str):
    """The arguments of a LoRA-training bench (bench_train.py, bench_ar_train.py), parsed: checkpoint
    size, square image side, image count, steps, learning rate, rank and the report's path stem."""
    import argparse
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="medium")
    ap.add_argument("--px", type=int, default=px, help="side of the square training images")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", out))
    return ap.parse_args()
