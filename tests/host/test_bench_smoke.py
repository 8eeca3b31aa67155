"""bench/run.py runs end to end on the tiny checkpoint (official pipeline vs the pack in the real
ComfyUI host) and writes its report. No timing assertions: timings live in the report only."""
import json
import math
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = os.path.join(ROOT, "bench", "run.py")
STAGES = ["ar_prefill_s", "ar_decode_tok_s", "ar_total_s", "glyph_s", "dit_step_s", "decode_s", "vae_s", "e2e_s"]


def run_bench(out_dir, *extra):
    cmd = [sys.executable, RUN, "--size", "tiny", "--reps", "1", "--out", str(out_dir), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=540,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, f"bench/run.py failed:\n{p.stderr[-4000:]}"
    with open(os.path.join(out_dir, "latest.json"), encoding="utf-8") as f:
        return json.load(f), p.stdout


def check_table(stages, reps):
    assert list(stages) == STAGES
    for key in STAGES:
        row = stages[key]
        for side in ("official", "pack"):
            assert len(row[f"{side}_all"]) == reps, (key, side)
            for stat in ("median", "best"):
                v = row[side][stat]
                assert isinstance(v, float) and math.isfinite(v) and v > 0, (key, side, stat, v)
        assert math.isfinite(row["ratio_pack_over_official"]), key


def check_report(res, reps=1, same_tokens=True):
    for table in ("stages", "stages_cpu_time"):            # wall clock, process CPU time
        check_table(res[table], reps)
    # fp32: same seed, same settings -> both sides sample the same grid (a real parity check, per rep);
    # bf16 rounds differently in the two implementations, so there only the check's presence is tested
    assert len(res["tokens_equal_per_rep"]) == reps
    if same_tokens:
        assert res["tokens_equal_per_rep"] == [True] * reps
    assert res["ar_tokens"] == {"official": 321, "pack": 320}      # 16x16 preview + 8x8 grid (+ end marker)
    for side in ("official", "pack"):
        mem = res["memory"][side]
        assert mem["peak_rss_mb"] >= mem["import_rss_mb"] > 0, mem


def test_bench_tiny_in_process_with_profile(tmp_path):
    res, stdout = run_bench(tmp_path, "--profile")
    check_report(res)
    assert res["meta"]["mode"] == "both sides in one process, alternating"
    md = (tmp_path / "latest.md").read_text()
    assert "| AR decode |" in md and "| end to end |" in md and "bench/run.py --size tiny" in md
    assert "| end to end |" in stdout
    for part in ("ar", "dit"):
        text = (tmp_path / f"profile_{part}.txt").read_text()
        assert "Self CPU" in text and "aten::" in text, text[:500]
        steps = int(text.split(" steps profiled")[0].rsplit(" ", 1)[-1])
        assert (318 <= steps <= 320) if part == "ar" else steps == 7   # the decode steps after the first token / DiT steps 2..8


def test_bench_tiny_isolated_sides_bf16(tmp_path):
    """The GPU mode's code path (each side in its own process, one after the other, bf16 weights
    loaded with the official pipeline's torch_dtype and the loader's weight_dtype), on the CPU."""
    res, _ = run_bench(tmp_path, "--isolate", "--warmup", "0", "--dtype", "bf16")
    check_report(res, same_tokens=False)
    assert res["meta"]["mode"] == "each side in its own subprocess, one after the other"
    assert res["meta"]["dtype"] == "bfloat16"


def test_stock_path_bench_runs_and_reports(tmp_path):
    """bench/bench_stock.py (own vs stock sampler vs EasyCache) on the tiny checkpoint: it runs, the
    stock path equals the own one within the parity bound, and every EasyCache row is reported."""
    out = tmp_path / "stock"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_stock.py"), "--size", "tiny", "--reps", "1",
                        "--steps", "4", "--px", "256", "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                       timeout=540, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, f"bench/bench_stock.py failed:\n{p.stderr[-4000:]}"
    res = json.loads((tmp_path / "stock.json").read_text())
    assert res["stock_vs_own_max_abs"] <= 1e-5
    assert set(res["seconds"]) == {"own", "stock", "easycache", "easycache-0.5"}
    assert all(v > 0 for v in res["seconds"].values())
    for e in res["easycache"].values():
        assert e["speedup"] > 0 and math.isfinite(e["rel_l2"])
    assert "EasyCache" in (tmp_path / "stock.md").read_text()


def test_gguf_bench_runs_and_reports(tmp_path):
    """bench/bench_gguf.py on the tiny checkpoint with bf16 and one GGUF type: it converts, runs each
    variant in its own process through the single-file loaders, and reports every column."""
    out = tmp_path / "gguf"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_gguf.py"), "--size", "tiny", "--steps", "1",
                        "--variants", "bf16,gguf_q8_0", "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                       timeout=540, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, f"bench/bench_gguf.py failed:\n{p.stderr[-4000:]}"
    res = json.loads((tmp_path / "gguf.json").read_text())
    rows = res["rows"]
    assert list(rows) == ["bf16", "gguf_q8_0"]
    assert rows["bf16"]["dit_rel_l2"] == 0 and rows["bf16"]["token_agreement"] == 1
    q = rows["gguf_q8_0"]
    assert q["quantized_layers"] > 0 and q["files_mib"]["ar"] < rows["bf16"]["files_mib"]["ar"]
    assert all(math.isfinite(q[k]) and q[k] > 0 for k in ("ar_s_per_token", "dit_s_per_step", "peak_rss_mib"))
    assert q["full_size_gib"]["ar_text"] < 0.6 * rows["bf16"]["full_size_gib"]["ar_text"]
    assert "| gguf_q8_0 |" in (tmp_path / "gguf.md").read_text()


def test_ar_train_bench_runs_and_reports(tmp_path):
    """bench/bench_ar_train.py on the tiny checkpoint, a few steps: it trains through the graph, loads the
    saved LoRA back and reports every figure (strength 0 gives the base loss exactly)."""
    out = tmp_path / "ar-train"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_ar_train.py"), "--size", "tiny",
                        "--steps", "3", "--images", "2", "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                       timeout=540, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, f"bench/bench_ar_train.py failed:\n{p.stderr[-4000:]}"
    res = json.loads((tmp_path / "ar-train.json").read_text())
    assert len(res["train_loss"]) == 3 and res["loss"]["strength_0"] == res["loss"]["base"]
    assert all(math.isfinite(res[k]) and res[k] > 0 for k in ("seconds_per_step", "peak_rss_mb"))
    assert "teacher-forced cross-entropy" in (tmp_path / "ar-train.md").read_text()
