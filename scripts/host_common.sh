# Steps shared by scripts/install_host.sh (ComfyUI 0.3.75) and scripts/install_host33.sh (0.33.0);
# sourced, with ROOT, VENV, HOST_DIR, PY and TAG (log prefix) set. Every step is idempotent.

PIP="$VENV/bin/python -m pip"

stamp_ok() { # stamp_ok STAMP INPUT... : true when STAMP exists and is newer than every INPUT
  local s=$1; shift
  [ -f "$s" ] || return 1
  for f in "$@"; do [ "$f" -nt "$s" ] && return 1; done
  return 0
}

# The venv with torch 2.14.1 + torchvision 0.29.1 (the pair available here; see comfyui-host.md).
make_venv_with_torch() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[$TAG] creating venv $VENV"
    "$PY" -m venv "$VENV"
    $PIP install -q --upgrade pip
  fi
  if ! stamp_ok "$VENV/.torch-stamp"; then
    # TORCH_FROM: another venv of this checkout whose torch pair is already installed; its files are
    # hard-linked (scripts/link_dists.py) so the two hosts share ~5.5 GB of disk instead of twice that.
    # pip below then finds the pair installed; it installs it itself when linking is not possible.
    if [ -n "${TORCH_FROM:-}" ] && [ -f "$TORCH_FROM/.torch-stamp" ] \
       && "$TORCH_FROM/bin/python" "$ROOT/scripts/link_dists.py" \
            "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" torch torchvision; then
      echo "[$TAG] torch 2.14.1 + torchvision 0.29.1 linked from $TORCH_FROM"
    else
      echo "[$TAG] installing torch 2.14.1 + torchvision 0.29.1"
    fi
    $PIP install -q torch==2.14.1 torchvision==0.29.1
    "$@"   # extra install commands for this host, run once with torch
    touch "$VENV/.torch-stamp"
  fi
}

# install_requirements EXCLUDE_REGEX [EXTRA_LINE...]: the host's requirements.txt without the lines
# EXCLUDE_REGEX matches (plus EXTRA_LINEs), the pack's requirements and requirements-dev, under one
# constraints file (torch pair, transformers pinned to the parity reference 5.17.0).
install_requirements() {
  local exclude=$1; shift
  local req="$HOST_DIR/requirements-host.txt" cons="$HOST_DIR/constraints-host.txt"
  { grep -vE "$exclude" "$HOST_DIR/ComfyUI/requirements.txt"; for l in "$@"; do echo "$l"; done; } > "$req.new"
  cmp -s "$req.new" "$req" 2>/dev/null && rm "$req.new" || mv "$req.new" "$req"
  printf 'torch==2.14.1\ntorchvision==0.29.1\ntransformers==5.17.0\n' > "$cons.new"
  cmp -s "$cons.new" "$cons" 2>/dev/null && rm "$cons.new" || mv "$cons.new" "$cons"
  if ! stamp_ok "$VENV/.deps-stamp" "$req" "$cons" "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt"; then
    echo "[$TAG] installing ComfyUI, pack and dev requirements"
    $PIP install -q -r "$req" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt" -c "$cons"
    touch "$VENV/.deps-stamp"
  fi
}

# This checkout linked into the host's custom_nodes/.
link_pack() {
  mkdir -p "$HOST_DIR/ComfyUI/custom_nodes"
  local link="$HOST_DIR/ComfyUI/custom_nodes/ComfyUI-GLM-Image"
  if [ "$(readlink "$link" 2>/dev/null)" != "$ROOT" ]; then
    rm -rf "$link"; ln -s "$ROOT" "$link"
  fi
}
