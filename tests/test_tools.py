"""The GPU report tool, run as on a GPU box but on the CPU (small model, one config): every step
it runs leaves its figures in report.json and report.md."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_report_on_cpu_writes_the_tables(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_report.py"), "--device", "cpu", "--out", str(out),
                           "--configs", "zero2", "--skip", "tests", "loader", "--images", "120"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["machine"]["torch"] and report["tests"]["status"] == "skipped"
    trained = report["train"]["results"]["vit-tiny"]
    assert set(trained) == {"dali", "baseline", "synthetic"}
    assert all(r["images_per_sec"] > 0 and 0 <= r["data_wait"] < 1 for r in trained.values())
    assert [(r["config"], r["gc"], r["status"]) for r in report["matrix"]] == [("zero2", False, "ok"), ("zero2", True, "ok")]
    assert all(r["images_per_sec"] > 0 for r in report["matrix"])
    assert report["largest_micro"] == {"off": None, "on": None}  # no GPU memory to measure on a CPU
    markdown = (out / "report.md").read_text()
    assert "| vit-tiny | " in markdown and "| zero2 | on | " in markdown
