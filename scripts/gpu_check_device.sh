#!/usr/bin/env bash
# `make gpu-check` on the lent GPU machine as it is: offline, its image's own python3 and torch, no venv,
# no pip from the network. Installs the bundle (make gpu-bundle, carried as .gpu-bundle) with --no-index
# into a --target folder, unpacks the ComfyUI source it holds, points the host at it and runs
# bench/gpu_check.py with the arguments given (e.g. --dry-run). scripts/gpu_rehearsal.py runs this same
# script on a CPU machine in a twin of the device image, offline, before a GPU day.
#   PYTHON       the interpreter (default python3: the image's, which holds torch)
#   GPU_BUNDLE   the bundle folder (default .gpu-bundle)
#   GPU_WORK     where the wheels and ComfyUI are unpacked (default /tmp/glm-gpu-check)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUNDLE=${GPU_BUNDLE:-.gpu-bundle}
WORK=${GPU_WORK:-/tmp/glm-gpu-check}
if [ ! -d "$BUNDLE/wheels" ]; then
    echo "gpu-check: no bundle at $BUNDLE. Run 'make gpu-bundle' on a machine with network first, and carry" \
         "$BUNDLE with the call (docs/gpu-check.md)." >&2
    exit 2
fi
want=$(cat "$BUNDLE/PYTHON_VERSION")
have=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$want" != "$have" ]; then
    echo "gpu-check: the bundle holds wheels for Python $want, $PYTHON is $have (make gpu-bundle GPU_PYTHON=$have)" >&2
    exit 2
fi
rm -rf "$WORK" && mkdir -p "$WORK/site" "$WORK/comfy"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$BUNDLE"/wheels/*.whl
tar xzf "$BUNDLE"/comfyui-*.tar.gz -C "$WORK/comfy"
ln -s "$PWD" "$WORK/comfy/ComfyUI/custom_nodes/ComfyUI-GLM-Image"      # the pack, as make host installs it
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export COMFYUI_DIR="$WORK/comfy/ComfyUI"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
echo "gpu-check: $("$PYTHON" -c 'import sys, torch; print("Python", sys.version.split()[0], "torch", torch.__version__)'),"\
     "ComfyUI from $COMFYUI_DIR, $(ls "$BUNDLE"/wheels | wc -l) wheels from $BUNDLE"
exec "$PYTHON" bench/gpu_check.py "$@"
