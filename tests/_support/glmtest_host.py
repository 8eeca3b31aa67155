"""The real ComfyUI host (0.3.75 or 0.33.0, chosen by COMFYUI_DIR), driven in-process (no server): import it once per test run,
load this pack through ComfyUI's own custom-node loader, and run API-format prompts through
`execution.validate_prompt` + `execution.PromptExecutor`. Nothing of ComfyUI is faked; only the
object the executor reports progress to (normally the aiohttp PromptServer) is a small recorder.
See docs/architecture.md, "Design notes".
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMFY_DIR = os.environ.get("COMFYUI_DIR", os.path.join(ROOT, ".host", "ComfyUI"))
PACK_DIR = os.path.join(COMFY_DIR, "custom_nodes", "ComfyUI-GLM-Image")
SCRIPTS = os.path.join(ROOT, "scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)
from comfy_server import PACK_NODE_IDS  # noqa: E402  (every node of the pack: one list, in scripts/comfy_server.py)


def has_dynamic_vram() -> bool:
    """True when the host has ComfyUI's dynamic VRAM (>= 0.16), read from its source (no import)."""
    mm_file = os.path.join(COMFY_DIR, "comfy", "memory_management.py")
    return os.path.isfile(mm_file) and "aimdo_enabled" in open(mm_file, encoding="utf-8").read()


def init_aimdo() -> None:
    """comfy-aimdo's process-wide start, as ComfyUI 0.33's main.py does it when dynamic VRAM is on
    (every protocol version it knows)."""
    import comfy_aimdo.control
    from comfy.cli_args import args
    headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024 ** 3)
    try:
        comfy_aimdo.control.init(simple_vram_headroom=headroom, nvml_pressure=not args.disable_nvml_pressure)
    except TypeError:
        try:
            comfy_aimdo.control.init(simple_vram_headroom=headroom)
        except TypeError:
            comfy_aimdo.control.init()


def enable_dynamic_vram(gpu: bool = False) -> None:
    """Switch dynamic VRAM on in this process with ComfyUI's own switches, exactly as its main.py
    does on NVIDIA (``--enable-dynamic-vram`` itself cannot start without a GPU; on a GPU the
    devices are registered with comfy-aimdo first, as main.py does). Must run before any model is
    built: comfy.ops layers read it when they are constructed."""
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher
    if gpu:
        import comfy_aimdo.control
        from comfy.cli_args import args
        devices = mm.get_all_torch_devices()
        try:
            ok = comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * 1024 ** 3)) for d in devices)
        except TypeError:
            ok = comfy_aimdo.control.init_devices(d.index for d in devices)
        if not ok:
            raise RuntimeError("comfy-aimdo could not start on this GPU: dynamic VRAM is not available")
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True


def _host_source(rel: str) -> str:
    with open(os.path.join(COMFY_DIR, rel), encoding="utf-8") as f:
        return f.read()


def frontend_version() -> str:
    """The frontend package version the host pins in its requirements.txt (1.32.9 for 0.3.75)."""
    import re
    return re.search(r"comfyui-frontend-package==([0-9.]+)", _host_source("requirements.txt")).group(1)


def host_throttles_progress() -> bool:
    """True when the host's ProgressBar drops updates closer than 100 ms / 0.5% (ComfyUI >= 0.2x)."""
    return "PROGRESS_THROTTLE_MIN_INTERVAL" in _host_source(os.path.join("comfy", "utils.py"))


def comfy_version() -> tuple:
    """The host's ComfyUI version as a tuple, read from its comfyui_version.py (no import)."""
    from comfy_server import comfyui_version
    return comfyui_version(COMFY_DIR)


class ProgressRecorder:
    """Stands in for server.PromptServer: records what the executor sends to the frontend."""

    def __init__(self):
        self.client_id = self.last_node_id = self.last_prompt_id = None
        self.sockets_metadata, self.events = {}, []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))

    def queue_updated(self):
        pass


class Host:
    """A live in-process ComfyUI with this pack loaded."""

    def __init__(self, base_dir: str, cpu: bool = True, dynamic_vram: bool = False, lowvram: bool = False):
        if not os.path.isfile(os.path.join(COMFY_DIR, "main.py")):
            raise RuntimeError(f"ComfyUI host not found at {COMFY_DIR}: run `make host` first")
        if COMFY_DIR not in sys.path:
            sys.path.insert(0, COMFY_DIR)
        from comfy.cli_args import args
        args.cpu = cpu                       # must precede the first import of comfy.model_management
        args.lowvram = lowvram
        if dynamic_vram:
            init_aimdo()                     # as main.py: before torch touches the GPU (its file maps too)
        import folder_paths
        self.base_dir = base_dir
        for sub in ("output", "input", "temp", "models/diffusers", "models/upscale_models"):
            os.makedirs(os.path.join(base_dir, sub), exist_ok=True)
        folder_paths.set_output_directory(os.path.join(base_dir, "output"))
        folder_paths.set_input_directory(os.path.join(base_dir, "input"))
        folder_paths.set_temp_directory(os.path.join(base_dir, "temp"))
        folder_paths.add_model_folder_path("diffusers", os.path.join(base_dir, "models", "diffusers"), is_default=True)
        folder_paths.add_model_folder_path("upscale_models", os.path.join(base_dir, "models", "upscale_models"), is_default=True)
        import nodes
        import execution
        self.folder_paths, self.nodes, self.execution = folder_paths, nodes, execution
        if dynamic_vram:
            enable_dynamic_vram(gpu=not cpu)

        async def load():
            await nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
            ok = await nodes.load_custom_node(PACK_DIR, module_parent="custom_nodes")
            if not ok:
                raise RuntimeError("IMPORT FAILED: ComfyUI could not load the GLM-Image pack (see log above)")
        asyncio.run(load())
        self.server = ProgressRecorder()
        self.preview_method = None           # see previews()
        # "ram_inactive": ComfyUI >= 0.2x reads it in execute(); older hosts ignore it.
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})

    @contextlib.contextmanager
    def previews(self, method: str = "latent2rgb"):
        """Latent previews on ("latent2rgb", "auto") or off ("none") for the runs inside, on every host:
        ComfyUI >= 0.2x resets ``args.preview_method`` per prompt from the prompt's extra data (what the
        frontend sends), older hosts read ``args.preview_method`` (the --preview-method flag)."""
        from comfy.cli_args import LatentPreviewMethod, args
        old = args.preview_method, self.preview_method
        args.preview_method, self.preview_method = LatentPreviewMethod(method), method
        try:
            yield
        finally:
            args.preview_method, self.preview_method = old

    def cached_output(self, node_id: str):
        """The executor's cache entry of a node (None when it has none), on every host."""
        entry = self.executor.caches.outputs.get(node_id)
        if asyncio.iscoroutine(entry):       # ComfyUI >= 0.2x: the cache's get is async
            entry = asyncio.run(entry)
        return entry

    @property
    def models_dir(self) -> str:
        return os.path.join(self.base_dir, "models")

    def node_class(self, node_id: str):
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]

    def validate(self, prompt: dict):
        pid = str(uuid.uuid4())
        return asyncio.run(self.execution.validate_prompt(pid, prompt, None)), pid

    def run(self, prompt: dict):
        """Validate and execute an API-format prompt. Returns (success, result) where result is the
        executor's history_result ({"outputs": ...}) or, on validation failure, the errors. An output
        that fails validation fails the run (ComfyUI itself runs the other outputs and drops it)."""
        (ok, err, outs, node_errors), pid = self.validate(prompt)
        if not ok or node_errors:
            return False, {"error": err, "node_errors": node_errors}
        self.server.events.clear()
        extra = {"client_id": "pytest"}
        if self.preview_method is not None:
            extra["preview_method"] = self.preview_method
        self.executor.execute(prompt, pid, extra, outs)
        return self.executor.success, self.executor.history_result

    def run_ok(self, prompt: dict) -> dict:
        ok, res = self.run(prompt)
        if not ok:
            errs = [d for e, d in self.server.events if e == "execution_error"]
            raise AssertionError(f"prompt failed: {res if not errs else errs[-1].get('exception_message')}\n"
                                 f"{errs[-1].get('traceback') if errs else ''}")
        return res

    def execution_error(self) -> dict | None:
        errs = [d for e, d in self.server.events if e == "execution_error"]
        return errs[-1] if errs else None

    def output_images(self, result: dict, node_id: str):
        """Paths of the images a SaveImage/PreviewImage node wrote."""
        imgs = result["outputs"][node_id]["images"]
        return [os.path.join(self.folder_paths.get_directory_by_type(i["type"]), i.get("subfolder", ""), i["filename"])
                for i in imgs]


def host_with_checkpoint(folder: str, name: str | None = None, prefix: str = "glm-host-", **host_kwargs):
    """(Host, model name): a live host on a temporary base folder (removed at exit) in which ``folder`` is
    the diffusers model ``name`` (default: the folder's own name), for benches and heavy jobs."""
    import atexit
    import shutil
    import tempfile
    base = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, base, True)
    name = name or os.path.basename(os.path.normpath(folder))
    os.makedirs(os.path.join(base, "models", "diffusers"))
    os.symlink(os.path.abspath(folder), os.path.join(base, "models", "diffusers", name))
    return Host(base, **host_kwargs), name


def node_output(host: "Host", node_id: str, index: int = 0):
    """The value a node produced in the last run (read from the executor's output cache)."""
    entry = host.cached_output(node_id)
    if entry is None:
        raise KeyError(f"node {node_id} has no cached output")
    outs = entry.outputs if hasattr(entry, "outputs") else entry
    val = outs[index]
    return val[0] if isinstance(val, list) and len(val) == 1 else val
