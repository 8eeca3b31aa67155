"""Test-side access to scripts/comfy_server.py: the real ComfyUI server (main.py --cpu) on loopback
with this pack linked under <base>/custom_nodes and the tiny checkpoint as
models/diffusers/GLM-Image-tiny. Used by the server and browser tiers."""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "scripts")
WORKFLOWS = os.path.join(ROOT, "workflows")
# per host when both hosts run (scripts/run_tests.sh sets GLM_ARTIFACTS)
ARTIFACTS = os.environ.get("GLM_ARTIFACTS", os.path.join(ROOT, "test-artifacts"))
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

import comfy_server  # noqa: E402
import workflow_to_api  # noqa: E402

from comfy_server import (ComfyServer, ExecutionFailed, PromptRejected, ServerError,  # noqa: E402,F401
                          PACK_NAME, PACK_NODE_IDS, PACK_NODES)

TINY_NAME = "GLM-Image-tiny"


def start(base_dir: str, tiny_ckpt: str, name: str, device_args: tuple = ("--cpu",),
          extra_args: tuple = ()) -> ComfyServer:
    """Start a server for a test module; fails the module (not skips) when it does not come up.
    `name` names the server log copied to test-artifacts/ when it stops; `device_args`: ComfyUI's
    device/memory flags (--cpu, or --lowvram etc. on a GPU machine); `extra_args`: other main.py flags."""
    import glmtest_upscale
    server = ComfyServer(str(base_dir), diffusers={TINY_NAME: tiny_ckpt}, device_args=tuple(device_args),
                         extra_args=tuple(extra_args))
    copy_example_inputs(os.path.join(str(base_dir), "input"))
    copy_example_loras(os.path.join(str(base_dir), "models", "loras"))   # --base-directory's loras folder
    # The chain workflow's UpscaleModelLoader needs an upscale model, as a user would have one.
    glmtest_upscale.write_tiny_upscale_model(os.path.join(str(base_dir), "models", "upscale_models"))
    server.artifact_name = name
    try:
        server.start(timeout=300)
    except ServerError as e:
        stop(server)
        pytest.fail(f"ComfyUI server did not start: {e}", pytrace=False)
    return server


def copy_example_inputs(input_dir: str) -> list[str]:
    """The example images, token files and dataset folders the committed workflows load (LoadImage,
    Load Tokens and the dataset loaders read the input folder)."""
    import shutil
    os.makedirs(input_dir, exist_ok=True)
    names = sorted(f for f in os.listdir(WORKFLOWS) if f.lower().endswith((".png", ".glmtokens.safetensors")))
    for f in names:
        shutil.copyfile(os.path.join(WORKFLOWS, f), os.path.join(input_dir, f))
    for d in sorted(os.listdir(WORKFLOWS)):          # dataset folders (LoadImageTextDataSetFromFolder)
        if d.endswith("_dataset") and os.path.isdir(os.path.join(WORKFLOWS, d)):
            shutil.copytree(os.path.join(WORKFLOWS, d), os.path.join(input_dir, d), dirs_exist_ok=True)
            names.append(d)
    return names


def copy_example_loras(loras_dir: str, folder_paths=None) -> list[str]:
    """The example LoRA the LoRA workflow loads (workflows/glm_image_lora_*.safetensors, trained on the tiny
    checkpoint) into a loras folder, as a user puts a LoRA into models/loras; registered with an in-process
    host's ``folder_paths`` when given."""
    import shutil
    os.makedirs(loras_dir, exist_ok=True)
    names = sorted(f for f in os.listdir(WORKFLOWS) if f.startswith("glm_image_lora_") and f.endswith(".safetensors"))
    for f in names:
        shutil.copyfile(os.path.join(WORKFLOWS, f), os.path.join(loras_dir, f))
    if folder_paths is not None:
        if loras_dir not in folder_paths.get_folder_paths("loras"):
            folder_paths.add_model_folder_path("loras", loras_dir)
        getattr(folder_paths, "filename_list_cache", {}).clear()
    return names


def stop(server: ComfyServer) -> None:
    server.stop()
    os.makedirs(ARTIFACTS, exist_ok=True)
    # Keep the server log next to the other artifacts for CI post-mortems.
    name = getattr(server, "artifact_name", "server")
    try:
        with open(os.path.join(ARTIFACTS, f"comfyui-{name}.log"), "w", encoding="utf-8") as f:
            f.write(server.log_text())
    except OSError:
        pass


def ui_workflow_paths(this_host: bool = False) -> list[str]:
    """Every UI workflow in workflows/ (what the template browser lists); ``this_host``: only those that
    run in the ComfyUI under test (workflow_to_api.min_comfyui)."""
    return workflow_to_api.ui_workflows(WORKFLOWS, comfy_server.comfyui_version() if this_host else None)


def load_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# The folder name the workflow for the official weights loads (workflows/glm_image_t2i_official.json).
OFFICIAL_NAME = "GLM-Image"


def load_workflow_for_tiny(path: str) -> dict:
    """An API workflow as the tests run it: a loader of the official folder loads the tiny checkpoint
    instead (everything else, 1024² and 50 steps included, as committed)."""
    prompt = load_json(path)
    for node in prompt.values():
        if node["class_type"] == "GLMImageLoader" and node["inputs"].get("model") == OFFICIAL_NAME:
            node["inputs"]["model"] = TINY_NAME
    return prompt


def run_prompt(server: ComfyServer, prompt: dict, timeout: float = 600.0) -> dict:
    """Run a prompt; an execution error fails the test with ComfyUI's traceback and the log's tail."""
    try:
        return server.run(prompt, timeout=timeout)
    except ExecutionFailed as e:
        raise AssertionError(f"{e}\n{e.traceback}\n{server.log_tail(40)}") from None
