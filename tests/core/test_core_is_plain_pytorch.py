"""glm_image_core is plain PyTorch: importing every one of its modules in a fresh interpreter, with no
ComfyUI on the path, imports no ComfyUI module (comfy*, folder_paths, nodes, execution, server,
comfy_api, comfy_extras)."""
import json
import os
import pkgutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMFY_MODULES = ("comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "execution",
                 "server", "latent_preview", "comfyui_version")

CHILD = """
import importlib, json, pkgutil, sys
import glm_image_core
mods = sorted(m.name for m in pkgutil.walk_packages(glm_image_core.__path__, "glm_image_core."))
for m in mods:
    importlib.import_module(m)
print(json.dumps({"imported": mods, "modules": sorted(sys.modules)}))
"""


def test_glm_image_core_imports_no_comfyui_module():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMFYUI_DIR")}
    r = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {ROOT!r})\n" + CHILD],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    expected = sorted("glm_image_core." + os.path.relpath(os.path.join(d, f), os.path.join(ROOT, "glm_image_core"))[:-3]
                      .replace(os.sep, ".").removesuffix(".__init__")
                      for d, _, fs in os.walk(os.path.join(ROOT, "glm_image_core")) for f in fs
                      if f.endswith(".py") and (f != "__init__.py" or d != os.path.join(ROOT, "glm_image_core")))
    assert out["imported"] == expected and len(expected) >= 25, out["imported"]
    leaked = [m for m in out["modules"] if m.split(".")[0] in COMFY_MODULES]
    assert leaked == [], leaked
