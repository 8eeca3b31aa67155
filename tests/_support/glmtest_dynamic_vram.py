"""Child process of tests/host/test_dynamic_vram.py: a fresh ComfyUI 0.33 host in-process with
dynamic VRAM switched on by ComfyUI's own switches (see glmtest_host.enable_dynamic_vram), the pack
loaded, and the API prompts of a JSON file run one after the other. Writes, per prompt, the tokens'
grid, the latent and the image of nodes "2", "3", "4" (when the prompt has them: a training prompt only
saves its LoRA) to OUT.safetensors and what it saw of ComfyUI's state to OUT.json. Usage: glmtest_dynamic_vram.py BASE_DIR PROMPTS.json OUT"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import glmtest_host  # noqa: E402


def main(base: str, prompts_file: str, out: str) -> None:
    host = glmtest_host.Host(base, dynamic_vram=True)
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops
    for sub in ("diffusion_models", "text_encoders", "vae", "loras"):
        host.folder_paths.add_model_folder_path(sub, os.path.join(base, "models", sub), is_default=True)
    host.folder_paths.add_model_folder_path("diffusion_models", os.path.join(base, "models", "unet"))
    probe = comfy.ops.disable_weight_init.Linear(4, 4)       # how this host now builds a Linear
    report = {"aimdo_enabled": bool(comfy.memory_management.aimdo_enabled),
              "core_model_patcher": comfy.model_patcher.CoreModelPatcher.__name__,
              "fresh_linear_weight_is_none": probe.weight is None, "runs": {}}
    tensors = {}
    with open(prompts_file, encoding="utf-8") as f:
        prompts = json.load(f)
    for name, prompt in prompts.items():
        host.run_ok(prompt)
        if "2" in prompt:
            tensors[f"{name}.tokens"] = glmtest_host.node_output(host, "2").grid.contiguous()
            tensors[f"{name}.latent"] = glmtest_host.node_output(host, "3")["samples"].contiguous()
            tensors[f"{name}.image"] = glmtest_host.node_output(host, "4").contiguous()
        report["runs"][name] = sorted({type(lm.model).__name__ for lm in mm.current_loaded_models})
        # every loaded GLM network holds real weights of its declared dtype record
        for lm in mm.current_loaded_models:
            for mod in lm.model.model.modules():
                w = getattr(mod, "weight", None)
                if isinstance(w, __import__("torch").Tensor):
                    if w.is_meta:
                        raise AssertionError(f"{type(mod).__name__} still has a meta weight after {name}")
                    rec = getattr(mod, "weight_comfy_model_dtype", None)
                    if rec is not None and rec != w.dtype:
                        raise AssertionError(f"{type(mod).__name__}: recorded dtype {rec} != weight {w.dtype}")
    from safetensors.torch import save_file
    save_file(tensors, out + ".safetensors")
    with open(out + ".json", "w", encoding="utf-8") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
