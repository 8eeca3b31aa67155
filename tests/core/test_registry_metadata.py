"""pyproject.toml is ready for the Comfy Registry (issue 26, item 6): the [project] and [tool.comfy] fields
the registry's specification requires, each in its allowed form, and consistent with what the tests run
(the oldest ComfyUI host, the frontends of the browser tier). `make registry-check` (part of make test)
runs the registry's own `comfy node validate` beside this."""
import os
import re
import subprocess
import tomllib

import pytest

pytestmark = pytest.mark.core
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RAW = "https://raw.githubusercontent.com/comfyui-glm-image/ComfyUI-GLM-Image/main/"


@pytest.fixture(scope="module")
def meta():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_project_fields_follow_the_registry_rules(meta):
    p = meta["project"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", p["name"]) and len(p["name"]) < 100
    assert "comfyui" not in p["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", p["version"])
    assert p["license"] == {"file": "LICENSE"} and os.path.isfile(os.path.join(ROOT, "LICENSE"))
    assert p["urls"]["Repository"].startswith("https://github.com/")
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
        reqs = {re.split(r"[<>=\s#]", line.strip())[0].lower() for line in f if line.strip() and not line.startswith("#")}
    deps = {re.split(r"[<>=\s]", d)[0].lower() for d in p["dependencies"]}
    assert deps - {"comfyui-frontend-package"} == reqs, "pyproject's dependencies and requirements.txt differ"


def test_tool_comfy_table_is_complete(meta):
    c = meta["tool"]["comfy"]
    assert c["PublisherId"] and re.fullmatch(r"[a-z0-9][a-z0-9-]*", c["PublisherId"])
    assert c["DisplayName"]
    assert c["Icon"].startswith(RAW), c["Icon"]
    icon = c["Icon"][len(RAW):]
    tracked = subprocess.run(["git", "ls-files", icon], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert tracked == icon, f"the icon {icon} is not committed"
    from PIL import Image
    with Image.open(os.path.join(ROOT, icon)) as im:
        assert im.format in ("PNG", "JPEG", "GIF") and im.width <= 800 and im.height <= 400
    assert isinstance(c["includes"], list)
    with open(os.path.join(ROOT, "scripts", "install_host.sh"), encoding="utf-8") as f:
        oldest = re.search(r"ComfyUI (\d+\.\d+\.\d+)", f.read()).group(1)
    assert c["requires-comfyui"] == f">={oldest}"


def test_the_frontend_range_covers_the_tested_frontends(meta):
    (dep,) = [d for d in meta["project"]["dependencies"] if d.startswith("comfyui-frontend-package")]
    low = re.search(r">=([0-9.]+)", dep).group(1)
    assert low == "1.32.9"          # ComfyUI 0.3.75's frontend, the oldest the browser tier runs
    with open(os.path.join(ROOT, "tests", "browser", "NEWEST_FRONTEND"), encoding="utf-8") as f:
        newest = f.read().strip()
    assert tuple(map(int, newest.split("."))) >= tuple(map(int, low.split(".")))
