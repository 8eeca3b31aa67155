#!/usr/bin/env bash
# Installs what the browser test tier needs, explicitly and idempotently:
#   /usr/bin/chromium                 Debian's chromium package (apt-get), when missing
#   tests/browser/node_modules/       playwright-core from the committed package-lock.json (npm ci);
#                                     it drives the system Chromium, no browser is downloaded
#   .cache/frontend-<version>/        the newest ComfyUI frontend on the package index
#                                     (tests/browser/NEWEST_FRONTEND), served by the 0.33 host with
#                                     --front-end-root in a second browser pass
# Exits non-zero when a piece cannot be installed, unless GLM_ALLOW_NO_BROWSER=1 (then the browser
# tests skip with the reason; under CI=true they fail instead).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CHROMIUM=${GLM_CHROMIUM:-/usr/bin/chromium}
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 DEBIAN_FRONTEND=noninteractive
t0=$(date +%s)

fail() {
  echo "[browser] ERROR: $*" >&2
  if [ "${GLM_ALLOW_NO_BROWSER:-0}" = 1 ]; then
    echo "[browser] GLM_ALLOW_NO_BROWSER=1: continuing; the browser tests will be skipped" >&2
    exit 0
  fi
  exit 1
}

if [ ! -x "$CHROMIUM" ]; then
  command -v apt-get >/dev/null || fail "$CHROMIUM is missing and apt-get is not available: install Chromium"
  SUDO=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null && sudo -n true 2>/dev/null || fail "installing chromium needs root (or passwordless sudo)"
    SUDO=(sudo -n)
  fi
  echo "[browser] installing Debian chromium (apt-get, about a minute)"
  "${SUDO[@]}" apt-get update -qq || fail "apt-get update failed"
  "${SUDO[@]}" apt-get install -y -qq chromium >/dev/null || fail "apt-get install chromium failed"
  [ -x "$CHROMIUM" ] || fail "chromium installed but $CHROMIUM is missing"
fi
echo "[browser] $("$CHROMIUM" --version 2>/dev/null | head -1)"

command -v node >/dev/null || fail "node (>= 20) is not installed"
command -v npm >/dev/null || fail "npm is not installed"
node -e 'process.exit(parseInt(process.versions.node) >= 20 ? 0 : 1)' || fail "node $(node --version) is too old: playwright-core needs >= 20"

cd "$ROOT/tests/browser"
lock=node_modules/.package-lock.json
if [ ! -f node_modules/playwright-core/package.json ] || [ ! -f "$lock" ] || [ package-lock.json -nt "$lock" ] || [ package.json -nt "$lock" ]; then
  echo "[browser] npm ci (playwright-core, from package-lock.json)"
  npm ci --no-audit --no-fund --loglevel=error || fail "npm ci failed in tests/browser"
fi
echo "[browser] playwright-core $(node -p 'require("./node_modules/playwright-core/package.json").version'); ready in $(( $(date +%s) - t0 ))s"

FRONTEND=$(cat "$ROOT/tests/browser/NEWEST_FRONTEND")
dest="$ROOT/.cache/frontend-$FRONTEND"
if [ ! -f "$dest/static/index.html" ]; then
  echo "[browser] comfyui-frontend-package $FRONTEND (the newest frontend, for the 0.33 host's second pass)"
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "comfyui-frontend-package==$FRONTEND" \
    || { rm -rf "$tmp"; fail "could not download comfyui-frontend-package $FRONTEND"; }
  python3 - "$tmp" "$dest" <<'PY' || { rm -rf "$tmp"; fail "could not unpack comfyui-frontend-package $FRONTEND"; }
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1:3]
with zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0]) as z:
    z.extractall(os.path.join(tmp, "x"), [n for n in z.namelist() if n.startswith("comfyui_frontend_package/static/")])
shutil.rmtree(dest, ignore_errors=True)
shutil.move(os.path.join(tmp, "x", "comfyui_frontend_package"), dest)
PY
  rm -rf "$tmp"
fi
echo "[browser] frontend $FRONTEND in $dest"
