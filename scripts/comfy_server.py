#!/usr/bin/env python3
"""Run the real ComfyUI server with this pack, on loopback, and talk to it over HTTP.

Used by the server and browser tests, by `make demo` and by the benchmarks. Standard library only,
so any Python can drive it; the server itself runs under the host's venv (`make host`).

    server = ComfyServer(base_dir, diffusers={"GLM-Image-tiny": ".cache/models/diffusers/GLM-Image-tiny"})
    with server:                                   # start(): main.py --cpu --listen 127.0.0.1 --port <free>
        server.check_pack()                        # /object_info lists every pack node, no IMPORT FAILED line
        entry = server.run(api_prompt)             # POST /prompt, poll /history/<id>; raises on errors
        paths = server.download_images(entry, "out/")   # GET /view

The base directory (`--base-directory`) gets `custom_nodes/ComfyUI-GLM-Image` -> this checkout and
`models/diffusers/<name>` -> each model folder (symlinks); ComfyUI writes output/, input/, temp/, user/
and the server log (comfyui.log) there. ComfyUI's own folder is never written to.

CLI:
    python scripts/comfy_server.py check                      # start, check the pack loads, stop (exit 1 if not)
    python scripts/comfy_server.py serve [--port 8188]        # start and keep running (Ctrl-C stops)
    python scripts/comfy_server.py run WORKFLOW_API.json [--out DIR]   # queue one API-format prompt
`--url URL` makes `run` use a server that is already running instead of starting one.

Never rely on `main.py --quick-test-for-ci`: it exits 0 even when this pack fails to import.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY_DIR = os.environ.get("COMFYUI_DIR", os.path.join(ROOT, ".host", "ComfyUI"))
PYTHON = os.environ.get("COMFY_PYTHON", os.path.join(ROOT, ".venv", "bin", "python"))
TINY_CKPT = os.path.join(ROOT, ".cache", "models", "diffusers", "GLM-Image-tiny")
PACK_NAME = "ComfyUI-GLM-Image"
# Every node of the pack and its category (a category may also be a subcategory "GLM-Image/...").
PACK_NODES = {
    "GLMImageLoader": "GLM-Image",
    "GLMImageTextToTokens": "GLM-Image",
    "GLMImageImageToTokens": "GLM-Image",
    "GLMImageGlyphText": "GLM-Image",
    "GLMImageReferenceEdit": "GLM-Image",
    "GLMImageTokensToLatent": "GLM-Image",
    "GLMImageSaveTokens": "GLM-Image",
    "GLMImageLoadTokens": "GLM-Image",
    "GLMImageARLoader": "GLM-Image",
    "GLMImageGlyphEncoderLoader": "GLM-Image",
    "GLMImageDiTLoader": "GLM-Image",
    "GLMImageVAELoader": "GLM-Image",
    "GLMImageConditioning": "GLM-Image",
    "GLMImageScheduler": "GLM-Image",
}
PACK_NODE_IDS = tuple(PACK_NODES)


class ServerError(RuntimeError):
    """The server did not start, died, or does not have the pack loaded."""


class PromptRejected(RuntimeError):
    """POST /prompt answered an error (validation: HTTP 400 with `error` and `node_errors`)."""

    def __init__(self, status: int, body: dict):
        self.status, self.body = status, body
        self.error = body.get("error", {}) if isinstance(body, dict) else {}
        self.node_errors = body.get("node_errors", {}) if isinstance(body, dict) else {}
        super().__init__(f"POST /prompt -> HTTP {status}: {summarize_rejection(body)}")


class ExecutionFailed(RuntimeError):
    """The prompt was accepted but a node raised while it ran (the history's execution_error)."""

    def __init__(self, entry: dict, prompt: dict | None = None):
        self.entry = entry
        self.error = execution_error(entry) or {}
        self.node_id = self.error.get("node_id")
        self.node_type = self.error.get("node_type")
        self.exception_type = self.error.get("exception_type", "")
        self.exception_message = (self.error.get("exception_message") or "").strip()
        title = None
        if prompt and self.node_id in prompt:
            title = prompt[self.node_id].get("_meta", {}).get("title")
        self.stage = title or self.node_type or "?"
        super().__init__(f"node {self.node_id} ({self.stage}, {self.node_type}) failed: "
                         f"{self.exception_type}: {self.exception_message}")

    @property
    def traceback(self) -> str:
        return "".join(self.error.get("traceback") or [])


def comfyui_version(comfy_dir: str = COMFY_DIR) -> tuple:
    """A ComfyUI tree's version as a tuple, read from its comfyui_version.py (no import)."""
    with open(os.path.join(comfy_dir, "comfyui_version.py"), encoding="utf-8") as f:
        m = re.search(r'__version__\s*=\s*"([0-9.]+)"', f.read())
    return tuple(int(x) for x in m.group(1).split("."))


def summarize_rejection(body) -> str:
    if not isinstance(body, dict):
        return str(body)
    parts = []
    err = body.get("error") or {}
    if isinstance(err, dict):
        parts.append(f"{err.get('message', '')} {err.get('details', '')}".strip())
    for nid, ne in (body.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            parts.append(f"node {nid} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "; ".join(p for p in parts if p) or json.dumps(body)[:2000]


def execution_error(entry: dict) -> dict | None:
    for msg in (entry.get("status") or {}).get("messages") or []:
        if isinstance(msg, (list, tuple)) and len(msg) == 2 and msg[0] == "execution_error":
            return msg[1]
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the server child (Linux): get SIGTERM when the process that started it dies, so a killed
    test run or demo never leaves a server behind (it runs in its own session otherwise)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except Exception:
        pass


def _symlink(target: str, link: str) -> None:
    target = os.path.abspath(target)
    if os.path.islink(link):
        if os.readlink(link) == target:
            return
        os.unlink(link)
    elif os.path.exists(link):
        raise ServerError(f"{link} exists and is not a symlink; choose another base directory")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(target, link)


class Client:
    """HTTP calls to a running ComfyUI server (no process management)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self._object_info = None

    def request(self, method: str, path: str, body=None, timeout: float = 60.0):
        """Returns (status, bytes, content_type). HTTP errors are returned, not raised."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers.get("Content-Type", "")

    def get_json(self, path: str, timeout: float = 60.0):
        status, raw, _ = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ServerError(f"GET {path} -> HTTP {status}: {raw[:500]!r}")
        return json.loads(raw)

    def post_json(self, path: str, body, timeout: float = 60.0):
        status, raw, _ = self.request("POST", path, body, timeout=timeout)
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return status, parsed

    def object_info(self, refresh: bool = False) -> dict:
        if self._object_info is None or refresh:
            self._object_info = self.get_json("/object_info", timeout=120)
        return self._object_info

    def queue(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt id or raises PromptRejected."""
        status, body = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200 or not isinstance(body, dict) or "prompt_id" not in body:
            raise PromptRejected(status, body if isinstance(body, dict) else {"error": body})
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0, poll: float = 0.25, prompt: dict | None = None) -> dict:
        """Poll /history/<id> until the prompt finished; returns its history entry. Raises
        ExecutionFailed when a node raised, TimeoutError when it does not finish in time."""
        deadline = time.monotonic() + timeout
        while True:
            hist = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}")
            entry = hist.get(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "error" or execution_error(entry):
                    raise ExecutionFailed(entry, prompt)
                if status.get("completed", True):
                    return entry
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f}s")
            self._check_alive()
            time.sleep(poll)

    def _check_alive(self) -> None:
        pass

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        return self.wait(self.queue(prompt), timeout=timeout, prompt=prompt)

    @staticmethod
    def images(entry: dict, node_id: str | None = None) -> list[dict]:
        out = []
        for nid, o in (entry.get("outputs") or {}).items():
            if node_id is None or nid == node_id:
                out.extend(o.get("images") or [])
        return out

    def view(self, image: dict) -> bytes:
        q = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                    "type": image.get("type", "output")})
        status, raw, ctype = self.request("GET", f"/view?{q}")
        if status != 200:
            raise ServerError(f"GET /view?{q} -> HTTP {status}")
        return raw

    def download_images(self, entry: dict, dest_dir: str, node_id: str | None = None) -> list[str]:
        os.makedirs(dest_dir, exist_ok=True)
        paths = []
        for img in self.images(entry, node_id):
            path = os.path.join(dest_dir, os.path.basename(img["filename"]))
            with open(path, "wb") as f:
                f.write(self.view(img))
            paths.append(path)
        return paths

    def pack_problems(self, log_text: str = "") -> list[str]:
        """Why the pack is not (fully) loaded; [] when every node is registered and no IMPORT FAILED
        line names the pack. The log check matters: ComfyUI keeps running when a pack fails."""
        problems = [f"IMPORT FAILED in the server log: {line.strip()}" for line in log_text.splitlines()
                    if "IMPORT FAILED" in line and PACK_NAME in line]
        info = self.object_info(refresh=True)
        missing = [n for n in PACK_NODE_IDS if n not in info]
        if missing:
            problems.append(f"/object_info lacks {', '.join(missing)}")
        for n, cat in PACK_NODES.items():
            got = info.get(n, {}).get("category")
            if n in info and not (got == cat or str(got).startswith(cat + "/")):
                problems.append(f"{n} has category {got!r}, expected {cat!r}")
        return problems

    def check_pack(self, log_text: str = "") -> dict:
        problems = self.pack_problems(log_text)
        if problems:
            raise ServerError("the GLM-Image pack is not loaded correctly:\n  " + "\n  ".join(problems))
        return self.object_info()


class ComfyServer(Client):
    """A real `main.py --cpu` process on 127.0.0.1 with this pack under `<base_dir>/custom_nodes`."""

    def __init__(self, base_dir: str | None = None, port: int | None = None,
                 diffusers: dict[str, str] | None = None, comfy_dir: str = COMFY_DIR, python: str = PYTHON,
                 extra_args: tuple[str, ...] = (), env: dict | None = None, pack_dir: str = ROOT,
                 device_args: tuple[str, ...] = ("--cpu",)):
        self.port = port or free_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        self._own_base = base_dir is None
        self.base_dir = os.path.abspath(base_dir or tempfile.mkdtemp(prefix="comfy-base-"))
        if diffusers is None:
            diffusers = {"GLM-Image-tiny": TINY_CKPT} if os.path.isdir(TINY_CKPT) else {}
        self.diffusers = dict(diffusers)
        self.comfy_dir, self.python, self.pack_dir = comfy_dir, python, pack_dir
        self.extra_args, self.env = tuple(extra_args), env
        # ComfyUI's device/memory flags (--cpu, or e.g. --lowvram on a GPU machine: they exclude each other)
        self.device_args = tuple(device_args)
        self.log_path = os.path.join(self.base_dir, "comfyui.log")
        self.proc: subprocess.Popen | None = None
        self.start_seconds = None

    # -- setup -------------------------------------------------------------------------
    def prepare_base_dir(self) -> None:
        if not os.path.isfile(os.path.join(self.comfy_dir, "main.py")):
            raise ServerError(f"ComfyUI host not found at {self.comfy_dir}: run `make host` first")
        if not os.path.exists(self.python):
            raise ServerError(f"host python {self.python} not found: run `make host` first")
        _symlink(self.pack_dir, os.path.join(self.base_dir, "custom_nodes", PACK_NAME))
        for name, path in self.diffusers.items():
            if not os.path.isfile(os.path.join(path, "model_index.json")):
                raise ServerError(f"model folder {path} has no model_index.json (run `make tiny`?)")
            _symlink(path, os.path.join(self.base_dir, "models", "diffusers", name))

    # -- process -----------------------------------------------------------------------
    def start(self, timeout: float = 300.0) -> "ComfyServer":
        self.prepare_base_dir()
        cmd = [self.python, "main.py", *self.device_args, "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", self.base_dir, *self.extra_args]
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
        env.pop("COMFYUI_DIR", None)
        t0 = time.monotonic()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        atexit.register(self.stop)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                status, _, _ = self.request("GET", "/system_stats", timeout=5)
                if status == 200:
                    return
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"ComfyUI did not answer /system_stats within {timeout:.0f}s\n{self.log_tail()}")
            time.sleep(0.25)

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerError(f"ComfyUI exited with code {self.proc.returncode}\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the server's process group, then SIGKILL what is left after `timeout`."""
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        """Stop and, when the base directory was a temporary one, delete it."""
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()

    # -- logs and checks ---------------------------------------------------------------
    def log_text(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_text().splitlines()[-n:]
        return f"--- last {len(lines)} lines of {self.log_path} ---\n" + "\n".join(lines)

    def pack_problems(self, log_text: str | None = None) -> list[str]:
        return super().pack_problems(self.log_text() if log_text is None else log_text)

    def check_pack(self, log_text: str | None = None) -> dict:
        try:
            return super().check_pack(self.log_text() if log_text is None else log_text)
        except ServerError as e:
            raise ServerError(f"{e}\n{self.log_tail()}") from None


# -- CLI ---------------------------------------------------------------------------------

def _parse_models(items: list[str]) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for it in items:
        name, sep, path = it.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(it)), it
        out[name] = os.path.abspath(path)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-dir", help="ComfyUI --base-directory (default: a temporary folder)")
    common.add_argument("--port", type=int, help="default: a free port")
    common.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="link PATH as models/diffusers/NAME (default: GLM-Image-tiny from .cache)")
    common.add_argument("--start-timeout", type=float, default=300.0)
    sub.add_parser("check", parents=[common], help="start, check that the pack loaded, stop")
    sub.add_parser("serve", parents=[common], help="start and keep running until Ctrl-C")
    r = sub.add_parser("run", parents=[common], help="queue an API-format workflow and fetch its images")
    r.add_argument("workflow")
    r.add_argument("--out", default="comfy-output", help="folder for the fetched images")
    r.add_argument("--timeout", type=float, default=900.0)
    r.add_argument("--url", help="use this running server instead of starting one")
    a = ap.parse_args(argv)

    if a.cmd == "run" and a.url:
        client: Client = Client(a.url)
        server = None
    else:
        server = client = ComfyServer(a.base_dir, a.port, diffusers=_parse_models(a.model))
        print(f"[comfy] starting ComfyUI on {server.url} (base {server.base_dir})", flush=True)
        server.start(a.start_timeout)
        print(f"[comfy] ready in {server.start_seconds:.1f}s", flush=True)
    try:
        client.check_pack() if server is None else server.check_pack()
        print(f"[comfy] pack loaded: {len(PACK_NODE_IDS)} GLM-Image nodes in /object_info, no IMPORT FAILED",
              flush=True)
        if a.cmd == "check":
            return 0
        if a.cmd == "serve":
            print(f"[comfy] serving {server.url} — Ctrl-C (or SIGTERM) stops it; log: {server.log_path}", flush=True)

            def _interrupt(signum, frame):
                raise KeyboardInterrupt
            signal.signal(signal.SIGTERM, _interrupt)
            signal.signal(signal.SIGINT, _interrupt)
            try:
                while True:
                    time.sleep(1)
                    server._check_alive()
            except KeyboardInterrupt:
                return 0
        with open(a.workflow, encoding="utf-8") as f:
            prompt = json.load(f)
        t0 = time.monotonic()
        try:
            entry = client.run(prompt, timeout=a.timeout)
        except PromptRejected as e:
            print(f"[comfy] prompt rejected: {e}", file=sys.stderr)
            return 1
        except ExecutionFailed as e:
            print(f"[comfy] {e}", file=sys.stderr)
            return 1
        paths = client.download_images(entry, a.out)
        print(f"[comfy] done in {time.monotonic() - t0:.1f}s", flush=True)
        for p in paths:
            print(p)
        return 0
    except ServerError as e:
        print(f"[comfy] {e}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.cleanup() if a.base_dir is None else server.stop()


if __name__ == "__main__":
    sys.exit(main())
