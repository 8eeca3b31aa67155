#!/usr/bin/env python
"""The one script to run the day a CUDA GPU is lent (`make gpu-check`): the pack against the official
pipeline in the same run, on random full-size weights, and writes ``bench/results/gpu-<device>.{md,json}``.

    python bench/gpu_check.py             # CUDA: full-size random bf16 weights written on the GPU (~35 GB)
    python bench/gpu_check.py --dry-run   # every code path on the CPU with the medium checkpoint (make test)

On the lent GPU machine (offline, its image's own python3 and torch; docs/gpu-check.md): first
`make gpu-bundle` here, then one call of the device tool's ``run`` with

    command:   bash scripts/gpu_check_device.sh --out $OUT 2>&1 | tee $OUT/gpu-check.log
    carry:     [".gpu-bundle"]
    timeout_s: 540

scripts/gpu_check_device.sh (what `make gpu-check` runs) installs the bundle with --no-index and runs this
script; `make gpu-rehearsal` runs the same on this CPU machine in a twin of the device image.

Jobs, each in a fresh process (one after the other; the official pipeline needs ~38 GB):
* official pipeline (diffusers + transformers), bf16, at 1024² and 512²;
* the pack through the real ComfyUI host in-process, **with dynamic VRAM on** as ComfyUI >= 0.16 does
  on NVIDIA (comfy-aimdo started as its main.py starts it; the 0.33 host when installed), bf16 and
  fp8_e4m3fn storage at 1024² and 512²;
* the pack on GGUF Q4_K single files (AR and DiT converted on the device from the random bf16 folder by
  the pack's own converter) under an 8 GiB cap: the 8 GB card plan;
* the pack under a 24 GiB and a 12 GiB cap (``torch.cuda.set_per_process_memory_fraction``) with
  ``--lowvram``;
* the pack twice with the same seed: tokens and image must be equal;
* the AR decode modes alone (``glm_image_core`` on the GPU, bf16, no ComfyUI): ms per token of the exact
  step, the static step and the static step replayed as a CUDA graph, at 1024² and at 768² (a size
  not seen before), with the tokens of each mode compared to the exact one's;
* a few DiT LoRA training steps at 512² with ComfyUI's own Train LoRA node (docs/training.md).
Per job: seconds per image, AR ms per token, DiT seconds per step, and per stage (AR, glyph, DiT loop,
VAE decode) the peak of ``torch.cuda.max_memory_allocated``, plus what ``nvidia-smi`` reports for the
process at the end. A job that fails is reported as failed; the others still run. ``--budget-s`` stops
starting new jobs when the time is used up (default 360 s) and ``--deadline-s`` stops a running one
(default budget + 90 s), so that a call ends inside 8 minutes; the report is written after every job.
On ``--dry-run`` memory figures are the process's peak RSS and the images are 256²/288² with 2 steps.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (HERE, ROOT, os.path.join(ROOT, "tests", "_support")):
    if p not in sys.path:
        sys.path.insert(0, p)

GIB = 1024 ** 3
STAGES = ("ar", "glyph", "dit", "vae")


def plan(dry: bool) -> list:
    """The jobs, most important first (what runs when the budget is short)."""
    big, small = (256, 288) if dry else (1024, 512)
    steps_big, steps_small, steps_cap = (2, 2, 2) if dry else (50, 30, 10)
    jobs = [
        dict(name=f"official bf16 {big}²", side="official", res=big, steps=steps_big),
        dict(name=f"pack bf16 {big}²", side="pack", res=big, steps=steps_big, weight_dtype="bf16"),
        dict(name=f"pack fp8 {big}²", side="pack", res=big, steps=steps_big, weight_dtype="fp8_e4m3fn"),
        dict(name=f"AR decode modes {'fp32' if dry else 'bf16'} {big}² / {small + (64 if dry else 256)}²", side="ar-modes",
             res=big, res2=small + (64 if dry else 256)),
        dict(name=f"pack gguf_q4_k {big}², 8 GiB cap", side="pack", res=big, steps=steps_cap,
             weight_dtype="gguf_q4_k", cap_gib=8),
        dict(name=f"pack bf16 {small}², twice (determinism)", side="pack", res=small, steps=steps_small,
             weight_dtype="bf16", repeat=True),
        dict(name=f"official bf16 {small}²", side="official", res=small, steps=steps_small),
        dict(name=f"pack fp8 {small}²", side="pack", res=small, steps=steps_small, weight_dtype="fp8_e4m3fn"),
        dict(name=f"pack bf16 {big}², 24 GiB cap, --lowvram", side="pack", res=big, steps=steps_cap,
             weight_dtype="bf16", cap_gib=24, lowvram=True),
        dict(name=f"pack fp8 {big}², 12 GiB cap, --lowvram", side="pack", res=big, steps=steps_cap,
             weight_dtype="fp8_e4m3fn", cap_gib=12, lowvram=True),
        dict(name=f"DiT LoRA training, stock Train LoRA, bf16, {small}²", side="train", res=small,
             steps=2 if dry else 6, weight_dtype="bf16"),
    ]
    return jobs


# ---- one job, in its own process ----------------------------------------------------------

class StagePeaks:
    """Peak memory per stage: CUDA ``max_memory_allocated`` reset when a stage's call starts and read
    when it ends (the max over repeated calls); on the CPU the process's peak RSS when it ends."""

    def __init__(self, cuda: bool):
        self.cuda, self.peaks, self._undo = cuda, {}, []

    def _read(self) -> int:
        import torch
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        import _common as C
        return int(C.peak_rss_mb() * 2 ** 20)

    def wrap(self, owner, attr: str, stage: str) -> None:
        import torch
        fn = getattr(owner, attr)

        def wrapped(*a, **k):
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            try:
                return fn(*a, **k)
            finally:
                self.peaks[stage] = max(self.peaks.get(stage, 0), self._read())
        setattr(owner, attr, wrapped)
        self._undo.append((owner, attr, fn))

    def restore(self) -> None:
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        self._undo.clear()


def nvidia_smi_used_mib() -> int | None:
    """What nvidia-smi reports as used by this process (MiB), or None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return int(used.strip())
    return None


def run_ar_modes(spec: dict, folder: str, dry: bool) -> dict:
    """ms/token of each ``generate_tokens(decode=...)`` mode on the plain-PyTorch AR (weights resident)."""
    import torch
    from glm_image_core.generation import ar_generate, ar_prompt
    from glm_image_core.loading.registry import NETWORKS
    device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    m = NETWORKS["ar"].load(os.path.join(folder, "vision_language_encoder"), dtype=dtype, device=device,
                            parts=("text",))
    tok = ar_prompt.GlmTokenizer.from_folder(os.path.join(folder, "processor"))
    from _common import PROMPT
    modes, out = ("exact", "static", "graphs"), {}
    for res in (spec["res"], spec["res2"]):
        grids = {}
        for mode in modes:
            if res == spec["res"]:
                ar_generate.generate_tokens(m, tok, PROMPT, 256, 256, 1, decode=mode)       # warm-up
            r = ar_generate.generate_tokens(m, tok, PROMPT, res, res, 7, decode=mode)
            out[f"{mode} {res}"] = 1e3 * r.decode_seconds / r.num_generated
            grids[mode] = r.grid
        out[f"tokens equal {res}"] = {k: bool(torch.equal(grids["exact"], v)) for k, v in grids.items()}
    return {"name": spec["name"], "spec": spec, "ok": True, "ar_modes_ms_per_token": out}


def run_train(spec: dict, folder: str, dry: bool) -> dict:
    """Stock Train LoRA on the DiT's MODEL (docs/training.md's graph, one training image of res², rank 16,
    bf16, gradient checkpointing per block): seconds per step and the device's peak memory."""
    import torch
    import glmtest_host
    import glmtest_train as T
    import run as R
    cuda = not dry
    work = tempfile.mkdtemp(prefix="glm-gpu-check-")
    atexit.register(shutil.rmtree, work, True)
    side = R.PackSide(folder, "cpu" if dry else "cuda", spec["weight_dtype"], os.path.join(work, "comfy_base"),
                      host_kwargs=dict(dynamic_vram=glmtest_host.has_dynamic_vram()))
    host = side.host
    T.write_dataset(host.folder_paths.get_input_directory(), [(spec["res"], spec["res"])], folder="check_ds")
    loader = {"weight_dtype": "default", "compute_dtype": "fp32" if dry else "bf16"}
    host.run_ok(T.dataset_graph(side.model_name, folder="check_ds", **loader))
    extra = {"checkpoint_depth": 2} if "checkpoint_depth" in host.node_class("TrainLoraNode").INPUT_TYPES()["required"] \
        else {}
    g = T.train_graph(host, "loras/gpu_check", model=side.model_name, loader=loader, steps=spec["steps"],
                      learning_rate=1e-4, rank=16, batch_size=1, seed=0, training_dtype="fp32" if dry else "bf16",
                      lora_dtype="bf16", gradient_checkpointing=True, **extra)
    g["2"]["inputs"]["folder"] = "check_ds"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    host.run_ok(g)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    loss = T.raw_output(host, "6", T.output_index(host, "TrainLoraNode", "LOSS_MAP"))[0]["loss"]
    import _common as C
    peak = torch.cuda.max_memory_allocated() if cuda else int(C.peak_rss_mb() * 2 ** 20)
    return {"name": spec["name"], "spec": spec, "ok": all(x == x for x in loss), "train_s": seconds,
            "s_per_step_with_setup": seconds / spec["steps"], "loss": loss, "stage_peak_gib": {"train": peak / GIB},
            "memory_kind": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS",
            "nvidia_smi_used_mib": nvidia_smi_used_mib() if cuda else None,
            "comfyui": ".".join(map(str, glmtest_host.comfy_version()))}


def run_job(spec: dict, folder: str, dry: bool) -> dict:
    import torch
    if spec["side"] == "ar-modes":
        return run_ar_modes(spec, folder, dry)
    if spec["side"] == "train":
        return run_train(spec, folder, dry)
    import run as R
    cuda = not dry
    device = "cuda" if cuda else "cpu"
    work = tempfile.mkdtemp(prefix="glm-gpu-check-")
    atexit.register(shutil.rmtree, work, True)       # each job is its own process: nothing left in /tmp
    peaks = StagePeaks(cuda)
    if spec["side"] == "official":
        side = R.OfficialSide(folder, device, torch.bfloat16, work)
        pipe = side.pipe
        for owner, attr, st in ((pipe, "generate_prior_tokens", "ar"), (pipe, "encode_prompt", "glyph"),
                                (pipe.transformer, "forward", "dit"), (pipe.vae, "decode", "vae")):
            peaks.wrap(owner, attr, st)
    else:
        import glmtest_host
        t_setup = time.perf_counter()       # the host's start, and for gguf_* the conversion of the folder
        side = R.PackSide(folder, device, spec["weight_dtype"], os.path.join(work, "comfy_base"),
                          host_kwargs=dict(dynamic_vram=glmtest_host.has_dynamic_vram(),
                                           lowvram=bool(spec.get("lowvram"))))
        setup_s = time.perf_counter() - t_setup
        m = side.mod
        for owner, attr, st in ((m["glm_image_core.generation.ar_generate"], "generate_tokens", "ar"),
                                (m["glm_image_core.generation.glyph_text"], "encode_glyph_texts", "glyph"),
                                (m["glm_image_core.generation.denoise"], "denoise", "dit"),
                                (m["nodes.vae_adapter"].GlmImageComfyVAE, "decode", "vae")):
            peaks.wrap(owner, attr, st)
    if cuda and spec.get("cap_gib"):           # after the host started (comfy-aimdo hooks CUDA first)
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gib"] * GIB / total))
    if cuda:                                   # warm kernels (and, for the pack, load) cheaply first
        side.run(10_000, 256, 2)
        peaks.peaks.clear()
    seed = 7
    runs = [side.run(seed, spec["res"], spec["steps"])]
    if spec.get("repeat"):
        runs.append(side.run(seed + 1, spec["res"], spec["steps"]))    # other seed between: no cache hit
        runs.append(side.run(seed, spec["res"], spec["steps"]))
    peaks.restore()
    r = runs[0]["wall"]
    out = {"name": spec["name"], "spec": spec, "ok": True, "image_s": r["e2e_s"], "ar_ms_per_token": 1000 / r["ar_decode_tok_s"],
           "ar_tokens": runs[0]["ar_tokens"], "dit_s_per_step": r["dit_step_s"], "vae_s": r["vae_s"],
           "stage_peak_gib": {k: v / GIB for k, v in peaks.peaks.items()},
           "memory_kind": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS",
           "nvidia_smi_used_mib": nvidia_smi_used_mib() if cuda else None, "grid_sha": runs[0]["grid_sha"]}
    if spec.get("repeat"):
        out["repeat_equal"] = {"tokens": runs[0]["grid_sha"] == runs[2]["grid_sha"],
                               "image": runs[0].get("image_sha") == runs[2].get("image_sha")}
    if spec["side"] == "pack":
        import glmtest_host
        out["comfyui"] = ".".join(map(str, glmtest_host.comfy_version()))
        out["dynamic_vram"] = glmtest_host.has_dynamic_vram()
        out["setup_s"] = setup_s
    return out


# ---- the driver ---------------------------------------------------------------------------

def checkpoint(dry: bool) -> tuple:
    import torch
    if dry:
        import _common as C
        return C.cached_checkpoint("medium"), None
    from glm_image_core.testing.tiny_checkpoint import write_checkpoint
    os.makedirs(os.path.join(ROOT, ".cache"), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="glm-gpu-check-full-", dir=os.path.join(ROOT, ".cache"))
    t0 = time.perf_counter()
    folder = write_checkpoint(os.path.join(tmp, "GLM-Image-full"), "full", seed=0, max_shard_bytes=5_000_000_000,
                              dtype=torch.bfloat16, device="cuda")
    torch.cuda.empty_cache()
    return folder, {"tmp": tmp, "write_s": time.perf_counter() - t0}


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# GPU check: {m['device']}", "",
             f"{m['when']}; torch {m['torch']}; ComfyUI host {m.get('comfyui', '?')} with dynamic VRAM "
             f"{'on' if m.get('dynamic_vram') else 'off'}; checkpoint {m['checkpoint']}"
             + (f" (written in {m['write_s']:.0f} s)" if m.get("write_s") else "") + ".",
             f"Memory per stage: {m['memory_kind']} (GiB).", "",
             "| job | s / image | AR ms / token | DiT s / step | peak AR | glyph | DiT | VAE | nvidia-smi MiB | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for j in res["jobs"]:
        if not j.get("ok"):
            lines.append(f"| {j['name']} | failed | | | | | | | | {j.get('error', '')[:120]} |")
            continue
        if "ar_modes_ms_per_token" in j:
            r = j["ar_modes_ms_per_token"]
            cells = "; ".join(f"{k}: {v:.2f} ms/token" if isinstance(v, float) else f"{k}: {v}" for k, v in r.items())
            lines.append(f"| {j['name']} | | | | | | | | | {cells} |")
            continue
        if "train_s" in j:
            cells = (f"{j['spec']['steps']} steps in {j['train_s']:.1f} s with set-up "
                     f"({j['s_per_step_with_setup']:.2f} s/step); peak {j['stage_peak_gib']['train']:.2f} GiB; "
                     f"losses {', '.join(f'{x:.3f}' for x in j['loss'])}")
            lines.append(f"| {j['name']} | | | | | | | | {j['nvidia_smi_used_mib'] or '–'} | {cells} |")
            continue
        p = j["stage_peak_gib"]
        note = f"set-up {j['setup_s']:.0f} s (GGUF conversion included)" if j["spec"].get("weight_dtype", "").startswith("gguf_") \
            else ""
        if "repeat_equal" in j:
            note = "run-to-run: tokens " + ("equal" if j["repeat_equal"]["tokens"] else "DIFFER") + \
                   ", image " + ("equal" if j["repeat_equal"]["image"] else "DIFFERS")
        lines.append(f"| {j['name']} | {j['image_s']:.1f} | {j['ar_ms_per_token']:.1f} | {j['dit_s_per_step']:.3f} | "
                     + " | ".join(f"{p[s]:.2f}" if s in p else "–" for s in STAGES)
                     + f" | {j['nvidia_smi_used_mib'] if j['nvidia_smi_used_mib'] is not None else '–'} | {note} |")
    skipped = res.get("not_run") or []
    if skipped:
        lines += ["", "Not run (time budget): " + ", ".join(skipped)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, medium checkpoint, small images: every code path")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="folder of gpu-<device>.{md,json}")
    ap.add_argument("--budget-s", type=float, default=360.0, help="start no job after this many seconds")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="stop a running job at this many seconds (default: budget + 90), so that the call ends with "
                         "its report inside the device's 8 minutes")
    ap.add_argument("--only", action="append", default=[], metavar="TEXT",
                    help="run only the jobs whose name contains TEXT (repeatable), e.g. to rerun what failed")
    ap.add_argument("--_job", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    import torch
    if a._job:
        spec, folder = json.loads(a._job)
        try:
            r = run_job(spec, folder, a.dry_run)
        except Exception as e:  # reported, not raised: the driver goes on with the other jobs
            import traceback
            r = {"name": spec["name"], "spec": spec, "ok": False, "error": f"{type(e).__name__}: {e}",
                 "traceback": traceback.format_exc()[-4000:]}
        print("RESULT " + json.dumps(r), flush=True)
        return 0
    if not a.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device visible to torch (use --dry-run on a CPU)")
    t0 = time.perf_counter()
    folder, written = checkpoint(a.dry_run)
    import glmtest_host
    device = "cpu (dry run)" if a.dry_run else torch.cuda.get_device_name()
    meta = {"device": device, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "comfyui": ".".join(map(str, glmtest_host.comfy_version())), "dynamic_vram": glmtest_host.has_dynamic_vram(),
            "checkpoint": "medium (random)" if a.dry_run else "full size (random bf16)",
            "memory_kind": "process peak RSS" if a.dry_run else "torch.cuda.max_memory_allocated",
            **({"write_s": written["write_s"]} if written else {})}
    deadline = a.deadline_s if a.deadline_s is not None else a.budget_s + 90
    tag = "dry-run" if a.dry_run else "".join(c if c.isalnum() else "-" for c in device).strip("-").lower()
    jobs, not_run = [], []

    def report() -> str:       # after every job: a call stopped at its limit still brings back what ran
        res = {"meta": meta, "jobs": jobs, "not_run": not_run, "seconds": time.perf_counter() - t0}
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"gpu-{tag}.json"), "w") as f:
            json.dump(res, f, indent=1)
        md = markdown(res)
        with open(os.path.join(a.out, f"gpu-{tag}.md"), "w") as f:
            f.write(md)
        return md
    try:
        for spec in plan(a.dry_run):
            if a.only and not any(t in spec["name"] for t in a.only):
                continue
            if time.perf_counter() - t0 > a.budget_s:
                not_run.append(spec["name"])
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--_job", json.dumps([spec, folder])]
            if a.dry_run:
                cmd.append("--dry-run")
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                   timeout=max(30.0, deadline - (time.perf_counter() - t0)))
                lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                r = json.loads(lines[-1][7:]) if lines else {"name": spec["name"], "spec": spec, "ok": False,
                                                             "error": f"exit {p.returncode}: {p.stderr[-600:]}"}
            except subprocess.TimeoutExpired:
                r = {"name": spec["name"], "spec": spec, "ok": False, "error": f"stopped at the {deadline:.0f} s deadline"}
            print(f"[gpu-check] {r['name']}: " + ("ok" if r.get("ok") else f"FAILED {r.get('error', '')[:300]}"),
                  file=sys.stderr, flush=True)
            jobs.append(r)
            report()
    finally:
        if written:
            shutil.rmtree(written["tmp"], ignore_errors=True)
    print(report())
    return 0 if jobs and all(j.get("ok") for j in jobs) and \
        all(all(j.get("repeat_equal", {}).values()) for j in jobs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
