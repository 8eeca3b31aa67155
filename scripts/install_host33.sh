#!/usr/bin/env bash
# Installs the second test host, ComfyUI 0.33.0 (what users run today), beside the 0.3.75 one, into
# project-local folders that git ignores:
#   .venv33/            its own Python 3.11 venv: torch 2.14.1 + torchvision 0.29.1, 0.33's requirements
#                       (comfy-kitchen, comfy-aimdo, frontend 1.49.6, av, ...), the pack's requirements
#                       and requirements-dev (pytest, the diffusers/transformers oracle)
#   .host33/ComfyUI/    ComfyUI 0.33.0 source, with this checkout linked into custom_nodes/
# Where the source comes from, first that works:
#   1. ../shared/hosts/comfyui-0.33.0.tar.gz (a source snapshot beside the checkout; GLM_HOST33_TARBALL overrides)
#   2. git clone of the upstream release tag v0.33.0
# When neither works, .host33/UNAVAILABLE holds the reason and this script exits 0: scripts/run_tests.sh
# then skips the 0.33 tiers with that reason, and fails the run under CI=true.
# Idempotent: every step is skipped when its stamp is newer than its inputs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV33:-$ROOT/.venv33}
HOST_DIR=${HOST33_DIR:-$ROOT/.host33}
PY=${PYTHON:-python3.11}
VERSION=0.33.0
TARBALL=${GLM_HOST33_TARBALL:-$ROOT/../shared/hosts/comfyui-$VERSION.tar.gz}
GIT_URL=https://github.com/comfyanonymous/ComfyUI.git
TORCHAUDIO=2.11.1   # 0.33 imports torchaudio unconditionally; only its Python part is needed (see below)
TAG=host33
t0=$(date +%s)
# shellcheck source=host_common.sh
source "$ROOT/scripts/host_common.sh"

mkdir -p "$HOST_DIR"
if [ ! -f "$HOST_DIR/ComfyUI/main.py" ]; then
  rm -rf "$HOST_DIR/ComfyUI.tmp" "$HOST_DIR/UNAVAILABLE"; mkdir -p "$HOST_DIR/ComfyUI.tmp"
  if [ -f "$TARBALL" ]; then
    echo "[host33] unpacking ComfyUI $VERSION from $TARBALL"
    tar xzf "$TARBALL" -C "$HOST_DIR/ComfyUI.tmp"
    mv "$HOST_DIR/ComfyUI.tmp/ComfyUI" "$HOST_DIR/ComfyUI"
  elif command -v git >/dev/null && timeout 120 git clone -q --depth 1 --branch "v$VERSION" "$GIT_URL" "$HOST_DIR/ComfyUI.tmp/ComfyUI" 2>/dev/null; then
    echo "[host33] cloned ComfyUI v$VERSION"
    mv "$HOST_DIR/ComfyUI.tmp/ComfyUI" "$HOST_DIR/ComfyUI"
  else
    echo "ComfyUI $VERSION source not available: no $TARBALL and git clone of tag v$VERSION failed" > "$HOST_DIR/UNAVAILABLE"
    rm -rf "$HOST_DIR/ComfyUI.tmp"
    echo "[host33] SKIPPED: $(cat "$HOST_DIR/UNAVAILABLE")"
    exit 0
  fi
  rm -rf "$HOST_DIR/ComfyUI.tmp"
fi
grep -q "__version__ = \"$VERSION\"" "$HOST_DIR/ComfyUI/comfyui_version.py" \
  || { echo "[host33] $HOST_DIR/ComfyUI is not ComfyUI $VERSION" >&2; exit 1; }

# torchaudio: 0.33's comfy/ldm and nodes import it at module level. No torchaudio on the registry
# matches torch 2.14.1's C ABI, but its Python part imports without the C extension, which is all
# that the code paths GLM-Image touches need; --no-deps keeps it from replacing torch.
# The torch pair is shared with the 0.3.75 host's venv when that one is installed (make test installs it first).
TORCH_FROM=${TORCH_FROM-$ROOT/.venv}
make_venv_with_torch $PIP install -q --no-deps "torchaudio==$TORCHAUDIO"

# torch/torchvision/torchaudio are installed above.
install_requirements '^(torch|torchvision|torchaudio)\s*$'
link_pack
echo "[host33] ready in $(( $(date +%s) - t0 ))s: $HOST_DIR/ComfyUI (venv $VENV)"
