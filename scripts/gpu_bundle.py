#!/usr/bin/env python3
"""`make gpu-bundle`: everything `make gpu-check` needs on the lent GPU machine beyond its image, in one
git-ignored folder small enough to travel with the working tree (the device tool carries 64 MiB in all).

The lent machine is offline. Its image has Python 3.12 with torch 2.11+cu130, transformers 5.17, peft,
accelerate, safetensors, tokenizers, numpy, pillow, scipy, aiohttp, pyyaml, psutil, requests, tqdm and
pytest (scripts/device_image.txt, from the device tool's KINDS.md), but not ComfyUI, nor what ComfyUI and
the official pipeline import beyond that. The bundle holds:
- ``wheels/``: those packages (WHEELS), for ``--python-version`` (3.12 for the device; the rehearsal,
  scripts/gpu_rehearsal.py, takes the 3.11 twins of the same versions), manylinux x86_64, no dependencies
  resolved: the list is the closure, checked by the rehearsal's offline run;
- ``comfyui-<version>.tar.gz``: the ComfyUI source the host runs (the 0.33 snapshot from ../shared/hosts),
  without what a headless in-process host never reads (LEFT_OUT).

    python scripts/gpu_bundle.py [--python-version 3.12] [--out .gpu-bundle]

Prints each part's size and the total; fails when the bundle and the working tree exceed the carry limit.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI_VERSION = "0.33.0"
COMFYUI_TARBALL = os.path.join(ROOT, "..", "shared", "hosts", f"comfyui-{COMFYUI_VERSION}.tar.gz")
CARRY_LIMIT = 64 * 2 ** 20          # the device tool's limit for the working tree and the carried paths
MIB = 2 ** 20

# (distribution, version, who imports it). Versions: those the 0.33 host is tested with here (.venv33).
WHEELS = [
    ("comfy-aimdo", "0.4.13", "comfy.memory_management (dynamic VRAM)"),
    ("comfy-kitchen", "0.2.31", "comfy.quant_ops"),
    ("diffusers", "0.42.1", "the official pipeline, the oracle the pack is timed against"),
    ("torchsde", "0.2.6", "comfy.k_diffusion.sampling"),
    ("trampoline", "0.1.2", "torchsde"),
    ("av", "18.1.0", "comfy_api.latest (video inputs; 34 MiB, the largest part, imported by every V3 node)"),
]

# Files taken out of a wheel: (distribution, path prefix inside it, why).
STRIPPED = [
    ("comfy-kitchen", "comfy_kitchen/backends/cuda/_C", "its compiled CUDA kernels (the wheel is 58 MiB, nearly all of "
     "it these and the HIP ones): comfy_kitchen loads them only if present and falls back to its eager backend; the "
     "jobs use none of them (fp8 storage is cast per layer by comfy.ops; the kernels serve --fast "
     "fp8_matrix_mult, nvfp4/int8 checkpoints and fp8 LoRA merges)"),
    ("comfy-kitchen", "comfy_kitchen/backends/hip/_C", "its compiled ROCm kernels (an NVIDIA device)"),
]

# Deliberately not in the bundle: a headless in-process host and the jobs never import them.
LEFT_OUT = {
    "comfyui-frontend-package": "the web frontend (no browser on the device)",
    "comfyui-workflow-templates": "the frontend's template browser",
    "comfyui-embedded-docs": "the frontend's node docs",
    "kornia, spandrel, sqlalchemy/alembic, pydantic(-settings), simpleeval, blake3, PyOpenGL, comfy-angle":
        "only comfy_extras nodes and the server's asset database import them: ComfyUI logs those extras as not "
        "imported and the jobs use none of their nodes",
    "gguf": "the pack reads and writes GGUF with its own code (only the tests compare against the gguf package)",
    "ComfyUI 0.3.75": "the device runs the host users run today (0.33, dynamic VRAM); 0.3.75's source would fit "
                      "(about 6 MiB) but doubles no GPU figure worth the minutes",
}


def download(out: str, python_version: str) -> list:
    wheels = os.path.join(out, "wheels")
    os.makedirs(wheels, exist_ok=True)
    platforms = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + \
        ["manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", wheels]
    for p in platforms:
        cmd += ["--platform", p]
    subprocess.run(cmd + [f"{name}=={version}" for name, version, _ in WHEELS], check=True)
    for name in os.listdir(wheels):
        drop = tuple(prefix for dist, prefix, _ in STRIPPED if name.startswith(dist.replace("-", "_") + "-"))
        if drop:
            strip_wheel(os.path.join(wheels, name), drop)
    return sorted(os.listdir(wheels))


def strip_wheel(path: str, drop: tuple) -> None:
    """Rewrite a wheel without the files under ``drop`` (and their RECORD lines)."""
    import zipfile
    tmp = path + ".tmp"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            if info.filename.startswith(drop):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                dropped = tuple(d.encode() for d in drop)
                data = b"".join(line for line in data.splitlines(keepends=True) if not line.startswith(dropped))
            dst.writestr(info, data)
    os.replace(tmp, path)


SKIPPED_SOURCE = ("ComfyUI/tests/", "ComfyUI/tests-unit/", "ComfyUI/.github/", "ComfyUI/.ci/", "ComfyUI/.git/",
                  "ComfyUI/blueprints/", "ComfyUI/custom_nodes/", "ComfyUI/models/", "ComfyUI/user/",
                  "ComfyUI/output/", "ComfyUI/input/", "ComfyUI/temp/")


def comfyui_source(out: str) -> str:
    """The ComfyUI snapshot (../shared/hosts; where it is absent, the 0.33 host installed from it or from git),
    repacked without what a headless host never reads (tests, CI files, blueprints) and without any
    custom node or model: the device script links the pack in itself."""
    dst = os.path.join(out, f"comfyui-{COMFYUI_VERSION}.tar.gz")
    installed = os.path.join(ROOT, ".host33", "ComfyUI")
    with tarfile.open(dst, "w:gz", compresslevel=9) as tar:
        if os.path.isfile(COMFYUI_TARBALL):
            with tarfile.open(COMFYUI_TARBALL) as src:
                for m in src.getmembers():
                    if not (m.name + "/").startswith(SKIPPED_SOURCE) and "__pycache__" not in m.name:
                        tar.addfile(m, src.extractfile(m) if m.isfile() else None)
        elif os.path.isfile(os.path.join(installed, "main.py")):
            tar.add(installed, "ComfyUI", filter=lambda m: None if (m.name + "/").startswith(SKIPPED_SOURCE)
                    or "__pycache__" in m.name else m)
        else:
            raise SystemExit(f"gpu-bundle: no ComfyUI {COMFYUI_VERSION} source ({COMFYUI_TARBALL} nor {installed}; "
                             "make host33 installs it)")
        for d in ("custom_nodes", "models"):          # the empty folders ComfyUI expects
            info = tarfile.TarInfo(f"ComfyUI/{d}")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
    return dst


def tree_bytes() -> int:
    """What the device tool sends of the working tree: tracked and untracked-not-ignored files."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum(os.path.getsize(os.path.join(ROOT, f.decode())) for f in files
               if f and os.path.isfile(os.path.join(ROOT, f.decode())))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python-version", default="3.12")
    ap.add_argument("--out", default=os.path.join(ROOT, ".gpu-bundle"))
    a = ap.parse_args(argv)
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    names = download(a.out, a.python_version)
    src = comfyui_source(a.out)
    with open(os.path.join(a.out, "PYTHON_VERSION"), "w") as f:
        f.write(a.python_version + "\n")
    wheel_bytes = {n: os.path.getsize(os.path.join(a.out, "wheels", n)) for n in names}
    total = sum(wheel_bytes.values()) + os.path.getsize(src)
    tree = tree_bytes()
    for n, b in sorted(wheel_bytes.items(), key=lambda kv: -kv[1]):
        print(f"  {b / MIB:6.2f} MiB  {n}")
    print(f"  {os.path.getsize(src) / MIB:6.2f} MiB  {os.path.basename(src)}")
    print(f"bundle {a.out}: {total / MIB:.2f} MiB for Python {a.python_version}; working tree {tree / MIB:.2f} MiB; "
          f"together {(total + tree) / MIB:.2f} of {CARRY_LIMIT / MIB:.0f} MiB")
    print("left out: " + "; ".join(f"{k} ({v})" for k, v in LEFT_OUT.items()))
    if total + tree > CARRY_LIMIT:
        print("too large for one device call", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
