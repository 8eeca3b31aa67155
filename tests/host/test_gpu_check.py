"""bench/gpu_check.py --dry-run: every code path of the GPU check (official pipeline, the pack with
dynamic VRAM where the host has it, fp8, memory caps with --lowvram, the determinism repeat, the
report, the AR decode modes) runs on the CPU with the medium checkpoint. It runs on the newest host installed (ComfyUI
0.33, or 0.3.75 when the 0.33 host could not be installed), once per `make test`."""
import json
import os
import subprocess
import sys

import glmtest_host

ROOT = glmtest_host.ROOT
NEWEST = glmtest_host.has_dynamic_vram() or os.path.isfile(os.path.join(ROOT, ".host33", "UNAVAILABLE"))

if NEWEST:
    def test_gpu_check_dry_run(tmp_path):
        env = dict(os.environ, OMP_NUM_THREADS="1", COMFYUI_DIR=glmtest_host.COMFY_DIR)
        r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--dry-run", "--out",
                            str(tmp_path), "--budget-s", "100000"], capture_output=True, text=True, env=env, timeout=1500)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        res = json.loads((tmp_path / "gpu-dry-run.json").read_text())
        names = [j["name"] for j in res["jobs"]]
        assert len(names) == 10 and not res["not_run"], names
        for j in res["jobs"]:
            assert j["ok"], j
            if j["spec"]["side"] == "ar-modes":          # the AR decode modes alone
                r = j["ar_modes_ms_per_token"]
                assert all(r[f"{m} {s}"] > 0 for m in ("exact", "static", "graphs") for s in (256, 352)), r
                assert r["tokens equal 256"] == r["tokens equal 352"] == {"exact": True, "static": True, "graphs": True}
                continue
            if j["spec"]["side"] == "train":               # stock Train LoRA on the DiT's MODEL
                assert len(j["loss"]) == j["spec"]["steps"] and j["train_s"] > 0 and j["stage_peak_gib"]["train"] > 0, j
                continue
            assert j["image_s"] > 0 and j["ar_tokens"] > 0 and j["dit_s_per_step"] > 0, j
            assert set(j["stage_peak_gib"]) == {"ar", "glyph", "dit", "vae"}, j
        rep = [j for j in res["jobs"] if "repeat_equal" in j]
        assert rep and rep[0]["repeat_equal"] == {"tokens": True, "image": True}
        assert any(j["spec"].get("lowvram") for j in res["jobs"])
        assert res["meta"]["dynamic_vram"] == glmtest_host.has_dynamic_vram()
        md = (tmp_path / "gpu-dry-run.md").read_text()
        assert "| pack fp8 256²" in md and "| DiT LoRA training, stock Train LoRA, bf16, 288²" in md
