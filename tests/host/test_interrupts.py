"""Interrupts in the real ComfyUI host: `comfy.model_management.interrupt_current_processing()` (what
the UI's Cancel button calls) at a chosen point of each long phase. The run stops at the pack's next
check, leaves no output of the interrupted node (or anything after it) in ComfyUI's cache, and the
next run gives exactly the result of an uninterrupted run (torch.equal on CPU).

Interrupt points: AR prefill, AR decode, the Reference Edit node's per-image loop, the DiT's
reference KV-cache write and the DiT's denoising steps. Decode and steps are hit from ComfyUI's
progress hook (`comfy.utils.set_progress_bar_global_hook`); prefill and cache write report no
progress while they compute, so the interrupt is raised from a forward pre-hook on our own module
that runs during that phase (the real user clicks Cancel at an arbitrary moment). Inside a forward,
ComfyUI's own `comfy.ops` layers check the flag before every layer; between phases and tokens/steps
the pack checks it (AR: after the prefill and each token; DiT: after each reference write and step;
Reference Edit: before each image).
"""
import contextlib

import pytest
import torch

import glmtest_host

LOADER = {"class_type": "GLMImageLoader", "inputs": {"model": "GLM-Image-tiny", "weight_dtype": "default"}}
STEPS = 3


def graph(seed: int, with_reference: bool) -> dict:
    g = {"1": LOADER,
         "2": {"class_type": "GLMImageTextToTokens", "inputs": {"ar": ["1", 0], "prompt": 'a "STOP" sign', "width": 256,
               "height": 256, "seed": seed, "temperature": 0.9, "top_p": 0.75, "top_k": 0, "batch_size": 1}},
         "3": {"class_type": "GLMImageTokensToLatent", "inputs": {"decoder": ["1", 1], "tokens": ["2", 0],
               "seed": seed, "steps": STEPS, "cfg": 1.5}},
         "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
         "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}}
    if with_reference:
        # two references in one batch (the node loops over them; the DiT writes two cache entries)
        g["6"] = {"class_type": "EmptyImage", "inputs": {"width": 256, "height": 192, "batch_size": 2,
                                                         "color": 0x4080C0 + seed}}
        g["7"] = {"class_type": "GLMImageReferenceEdit", "inputs": {"ar": ["1", 0], "decoder": ["1", 1],
                                                                    "vae": ["1", 2], "image": ["6", 0]}}
        g["2"]["inputs"]["reference"] = ["7", 0]
        g["3"]["inputs"]["reference"] = ["7", 0]
    return g


def results(host, g) -> dict:
    out = {"tokens": glmtest_host.node_output(host, "2").grid.clone(),
           "latent": glmtest_host.node_output(host, "3")["samples"].clone(),
           "image": glmtest_host.node_output(host, "4").clone()}
    if "7" in g:
        out["ref_latents"] = torch.cat([r.latent for r in glmtest_host.node_output(host, "7").items])
    return out


@contextlib.contextmanager
def progress_hook(fn):
    import comfy.utils
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(fn)
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(old)


@contextlib.contextmanager
def interrupt_on_first_call(module: torch.nn.Module):
    """Interrupt while `module` computes (its first forward in the run)."""
    import comfy.model_management as mm
    fired = []

    def pre_hook(mod, args):
        if not fired:
            fired.append(True)
            mm.interrupt_current_processing()
    handle = module.register_forward_pre_hook(pre_hook)
    try:
        yield fired
    finally:
        handle.remove()


def models(host):
    ar = glmtest_host.node_output(host, "1", 0)
    decoder = glmtest_host.node_output(host, "1", 1)
    return ar, decoder.dit.network


CASES = ["ar_prefill", "ar_decode", "reference_images", "reference_cache_write", "dit_steps"]


@pytest.mark.parametrize("case", CASES)
def test_interrupt_leaves_nothing_behind_and_the_rerun_is_exact(host, case):
    with_ref = case in ("reference_images", "reference_cache_write")
    target = {"ar_prefill": "2", "ar_decode": "2", "reference_images": "7", "reference_cache_write": "3",
              "dit_steps": "3"}[case]
    g, other = graph(5, with_ref), graph(6, with_ref)

    baseline = results(host, g) if host.run_ok(g) else None
    ar, dit = models(host)
    host.run_ok(other)        # the cache now holds another seed's outputs: the next run of g recomputes

    seen = []                 # (node, value, total) progress reports
    interrupted_at = []       # the progress value at which the hook interrupted

    def hook(value, total, preview, node_id=None):
        import comfy.model_management as mm
        seen.append((node_id, value, total))
        # ">=": ComfyUI >= 0.2x throttles progress reports, so not every token reaches the hook
        if not interrupted_at and ((case == "ar_decode" and node_id == "2" and 7 <= value < total) or
                                   (case == "dit_steps" and node_id == "3" and value == 1)):
            interrupted_at.append(value)
            mm.interrupt_current_processing()

    module = {"ar_prefill": lambda: ar.model.patcher.model, "reference_images": lambda: ar.vision.patcher.model.model.visual,
              "reference_cache_write": lambda: dit.transformer_blocks[0]}
    with progress_hook(hook), (interrupt_on_first_call(module[case]()) if case in module
                               else contextlib.nullcontext([True])) as fired:
        ok, res = host.run(g)
    assert fired, "the interrupt point was never reached"
    assert not ok, "the run was not interrupted"
    events = [e for e, _ in host.server.events]
    assert "execution_interrupted" in events and "execution_error" not in events, events
    interrupted = [d for e, d in host.server.events if e == "execution_interrupted"][0]
    assert interrupted["node_id"] == target, (interrupted, case)

    # where it stopped: at the pack's next check after the interrupt
    ar_tokens = [v for n, v, _ in seen if n == "2"]
    dit_steps = [v for n, v, _ in seen if n == "3"]
    if case == "ar_prefill":
        assert not ar_tokens, "tokens were sampled after an interrupt during the prefill"
    elif case == "ar_decode":
        total = [t for n, _, t in seen if n == "2"][-1]
        assert interrupted_at and max(ar_tokens) == interrupted_at[0] < total, (max(ar_tokens), interrupted_at, total)
    elif case == "reference_cache_write":
        assert not dit_steps, "DiT steps ran after an interrupt during the reference cache write"
    elif case == "dit_steps":
        assert max(dit_steps) == 1 < STEPS, dit_steps

    # nothing partial is cached: the interrupted node and everything after it have no output
    for node in {"2": ("2", "3", "4", "5"), "7": ("7", "2", "3", "4", "5"), "3": ("3", "4", "5")}[target]:
        assert host.cached_output(node) is None, f"node {node} kept an output after the interrupt"
    assert "5" not in (res.get("outputs") or {})

    # the next run is exactly the uninterrupted result
    host.run_ok(g)
    again = results(host, g)
    for k, v in baseline.items():
        assert torch.equal(again[k], v), f"{k} differs from the uninterrupted run after an interrupt ({case})"
