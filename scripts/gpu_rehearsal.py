#!/usr/bin/env python3
"""The GPU day, rehearsed on this CPU machine: `make gpu-check` as the lent machine will run it, so that
an import missing from the bundle fails here, not on the device's 15 minutes.

    python scripts/gpu_rehearsal.py prepare        # (network) the device twin and its bundle
    python scripts/gpu_rehearsal.py run [ARGS]     # offline: scripts/gpu_check_device.sh --dry-run ARGS in it

The **device twin** (.cache/gpu-rehearsal/venv) is a venv holding only packages of the device image's
list (scripts/device_image.txt, from the device tool's KINDS.md), at the image's versions where the
package index has them for this Python: TWIN_PACKAGES, what the pack, ComfyUI, the oracle and the test
support could import. torch is linked from the host venv (the CPU machine's torch, from its local disk)
instead of the image's CUDA build. Anything pip pulls in that the image lacks is removed again, so the
twin never hides a missing wheel. The bundle is `scripts/gpu_bundle.py` for the twin's Python (3.11
here: the same versions as the device's 3.12 wheels).

`run` executes the device's own script, scripts/gpu_check_device.sh, with the twin's python: the bundle
is installed with --no-index into a --target folder, ComfyUI unpacked from the bundle, and
bench/gpu_check.py --dry-run runs every job on the CPU. It runs in a network namespace of its own
(`unshare -n`: no network at all, as on the device) where the kernel allows it; elsewhere it says so
and relies on --no-index and the hub's offline switches.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWIN = os.path.join(ROOT, ".cache", "gpu-rehearsal")
VENV = os.path.join(TWIN, "venv")
BUNDLE = os.path.join(TWIN, "bundle")
IMAGE_LIST = os.path.join(ROOT, "scripts", "device_image.txt")

# The image's packages the run could import (versions: the image's, where the index has them for this Python;
# numpy 2.5 needs Python 3.12, so the twin takes the newest numpy for 3.11).
TWIN_PACKAGES = [
    "transformers==5.17.0", "tokenizers==0.23.2", "safetensors==0.8.0", "huggingface-hub==1.33.0",
    "accelerate==1.15.0", "sentencepiece==0.2.2", "peft", "numpy<2.6", "einops", "pillow", "scipy", "aiohttp",
    "yarl", "pyyaml", "psutil", "requests", "tqdm", "jinja2", "protobuf", "filelock", "packaging", "regex",
    "typing-extensions", "sympy", "networkx", "fsspec", "pytest", "pytest-timeout", "hypothesis",
]
# What of the host venv stands for the image's torch (linked, not installed): these top-level names and their
# dist-info, and the nvidia-* libraries (never torchsde & co., which the image lacks).
TORCH_PARTS = {"torch", "torch.libs", "functorch", "torchgen", "torchvision", "torchvision.libs", "torchaudio",
               "torchaudio.libs", "triton"}


def is_torch_part(entry: str) -> bool:
    base = entry.split("-")[0]
    return base in TORCH_PARTS or base.startswith("nvidia")


def norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def image_packages() -> set:
    with open(IMAGE_LIST, encoding="utf-8") as f:
        return {norm(line.split("==")[0].strip()) for line in f if line.strip() and not line.startswith("#")}


def host_site_packages() -> str:
    for venv in (".venv33", ".venv"):
        found = glob.glob(os.path.join(ROOT, venv, "lib", "python3*", "site-packages"))
        if found and os.path.isdir(os.path.join(found[0], "torch")):
            return found[0]
    raise SystemExit("gpu-rehearsal: no host venv with torch (make host first)")


def py(*args, **kw):
    return subprocess.run([os.path.join(VENV, "bin", "python"), *args], check=True, **kw)


def prepare() -> None:
    shutil.rmtree(TWIN, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    site = glob.glob(os.path.join(VENV, "lib", "python3*", "site-packages"))[0]
    torch_dir = os.path.join(TWIN, "torch")
    os.makedirs(torch_dir)
    host = host_site_packages()
    linked = set()
    for entry in sorted(os.listdir(host)):
        if is_torch_part(entry):
            os.symlink(os.path.join(host, entry), os.path.join(torch_dir, entry))
            if entry.endswith(".dist-info"):
                linked.add(norm(entry[:-len(".dist-info")].rsplit("-", 1)[0]))
    with open(os.path.join(site, "device-torch.pth"), "w") as f:
        f.write(torch_dir + "\n")
    py("-m", "pip", "install", "-q", "--disable-pip-version-check", *TWIN_PACKAGES)
    installed = py("-m", "pip", "list", "--format=freeze", "--disable-pip-version-check", capture_output=True,
                   text=True).stdout.split()
    image = image_packages()
    extra = sorted({norm(line.split("==")[0]) for line in installed} - image - linked)   # never the host venv's
    if extra:              # pulled in by a newer release than the image's (typer -> pydantic): not on the device
        print(f"gpu-rehearsal: removing what the device image lacks: {', '.join(extra)}")
        py("-m", "pip", "uninstall", "-q", "-y", *extra)
    version = py("-c", "import sys; print('%d.%d' % sys.version_info[:2])", capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_bundle.py"), "--python-version", version,
                    "--out", BUNDLE], check=True)


def offline_prefix() -> list:
    try:
        if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
            return ["unshare", "-n"]
    except OSError:
        pass
    print("gpu-rehearsal: no network namespace here (unshare -n); offline by --no-index and HF_HUB_OFFLINE only")
    return []


def run(args: list) -> int:
    if not os.path.isfile(os.path.join(BUNDLE, "PYTHON_VERSION")):
        raise SystemExit("gpu-rehearsal: no twin (python scripts/gpu_rehearsal.py prepare, or make gpu-rehearsal)")
    env = dict(os.environ, PYTHON=os.path.join(VENV, "bin", "python"), GPU_BUNDLE=BUNDLE,
               GPU_WORK=os.path.join(TWIN, "work"))
    for k in ("PYTHONPATH", "COMFYUI_DIR", "VIRTUAL_ENV"):     # nothing of this machine's environments leaks in
        env.pop(k, None)
    cmd = offline_prefix() + ["bash", os.path.join(ROOT, "scripts", "gpu_check_device.sh"), "--dry-run", *args]
    return subprocess.run(cmd, env=env, cwd=ROOT).returncode


def main(argv: list) -> int:
    if not argv or argv[0] not in ("prepare", "run"):
        print(__doc__)
        return 2
    if argv[0] == "prepare":
        prepare()
        return 0
    return run(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
