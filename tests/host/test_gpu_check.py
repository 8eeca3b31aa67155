"""The GPU day, rehearsed (issue 28): bench/gpu_check.py --dry-run through the device's own script
(scripts/gpu_check_device.sh) in a twin of the device image (scripts/gpu_rehearsal.py; `make test`
prepares it): a venv holding only the image's packages, the bundle installed with --no-index into a
--target folder, ComfyUI from the bundle, no network (its own network namespace). Every code path of
the GPU check runs on the CPU with the medium checkpoint: the official pipeline, the pack with dynamic
VRAM, fp8, memory caps with --lowvram, the determinism repeat, the AR decode modes, Train LoRA, the
report. An import missing from the bundle fails here. Run once per `make test` (in the pass of the
newest host installed)."""
import json
import os
import subprocess
import sys

import glmtest_host

ROOT = glmtest_host.ROOT
NEWEST = glmtest_host.has_dynamic_vram() or os.path.isfile(os.path.join(ROOT, ".host33", "UNAVAILABLE"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_rehearsal as R  # noqa: E402

if NEWEST:
    def test_the_device_twin_holds_only_the_device_images_packages():
        assert os.path.isfile(os.path.join(R.BUNDLE, "PYTHON_VERSION")), \
            "no device twin: make gpu-rehearsal-env (make test prepares it)"
        out = subprocess.run([os.path.join(R.VENV, "bin", "python"), "-m", "pip", "list", "--format=freeze",
                              "--disable-pip-version-check"], capture_output=True, text=True, check=True).stdout
        have = {R.norm(line.split("==")[0]) for line in out.split()}
        assert "torch" in have and "transformers" in have
        assert not have - R.image_packages(), sorted(have - R.image_packages())
        wheels = os.listdir(os.path.join(R.BUNDLE, "wheels"))
        assert wheels and not any(R.norm(w.split("-")[0]) in R.image_packages() for w in wheels), wheels

    def test_gpu_check_dry_run(tmp_path):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_rehearsal.py"), "run", "--out",
                            str(tmp_path), "--budget-s", "100000"], capture_output=True, text=True, env=env, timeout=1800)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        assert "wheels from" in r.stdout and "Python 3." in r.stdout, r.stdout[-2000:]
        res = json.loads((tmp_path / "gpu-dry-run.json").read_text())
        names = [j["name"] for j in res["jobs"]]
        assert len(names) == 11 and not res["not_run"], names
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
        assert any(j["spec"].get("weight_dtype") == "gguf_q4_k" and j["setup_s"] > 0 for j in res["jobs"])
        assert res["meta"]["dynamic_vram"] and res["meta"]["comfyui"] == "0.33.0", res["meta"]   # the bundle's host
        md = (tmp_path / "gpu-dry-run.md").read_text()
        assert "| pack fp8 256²" in md and "| DiT LoRA training, stock Train LoRA, bf16, 288²" in md
