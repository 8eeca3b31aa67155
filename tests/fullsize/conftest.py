import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "bench", "results")


@pytest.fixture(scope="session")
def fullsize_report():
    """Figures the full-size tests collect; written to bench/results/fullsize.{json,md} at the end,
    merged into the previous report (a run of some tests keeps the others' last figures)."""
    path = os.path.join(RESULTS, "fullsize.json")
    old = json.load(open(path)) if os.path.isfile(path) else {}
    report: dict = {}
    yield report
    import platform
    import time
    merged = dict(old)
    merged.update(report)
    if "load" in report and "load" in old:       # keep the rows of loads not re-run
        seen = {(r["component"], r["dtype"]) for r in report["load"]}
        merged["load"] = report["load"] + [r for r in old["load"] if (r["component"], r["dtype"]) not in seen]
    if "gguf" in report and "gguf" in old:       # a partial GGUF run keeps the other GGUF figures
        merged["gguf"] = {**old["gguf"], **report["gguf"]}
    for kind in ("t2i", "train", "ar_train"):               # rows per storage dtype: keep the others' last figures
        if kind in report and kind in old:
            seen = {r["dtype"] for r in report[kind]}
            merged[kind] = report[kind] + [r for r in old[kind] if r["dtype"] not in seen]
    merged["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                         "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    os.makedirs(RESULTS, exist_ok=True)
    with open(path, "w") as f:
        json.dump(merged, f, indent=2)
    import sys
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import fullsize_report as fr
    with open(os.path.join(RESULTS, "fullsize.md"), "w") as f:
        f.write(fr.markdown(merged))
