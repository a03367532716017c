"""scripts/gpu_check.py's dry run on the CPU (the command a first GPU run executes, so that it does not fail
on a typo): every row and the report's fields, and a clean stop at the time limit."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

RUNTIMES = ("fp32", "tf32", "bf16", "nchw", "compiled")


@pytest.mark.slow
def test_the_cpu_dry_run_writes_every_row_of_the_report(tmp_path):
    """Into a folder that does not exist yet (made before the work, not after it)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(tmp_path / "new" / "report")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    tmp_path = tmp_path / "new"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["complete"] and report["environment"]["torch"] and report["environment"]["device"] == "cpu"
    assert report["tests"]["exit"] == 0 and "skipped" in report["tests"]["outcome"]  # no GPU: the CUDA tests skip
    cases = {row["case"] for row in report["rows"]}
    for runtime in RUNTIMES:
        assert {f"pipal_82_2crop_{runtime}", f"live_219x146_2crop_{runtime}", f"train_p8_batch4_{runtime}"} <= cases
    rows = {row["case"]: row for row in report["rows"]}
    assert rows["pipal_82_2crop_fp32"]["max_diff"] < 1e-5  # ahiq against the official pattern, same weights
    assert "max_diff_vs_fp32" in rows["pipal_82_2crop_bf16"] and "max_diff_vs_fp32" not in rows["pipal_82_2crop_fp32"]
    # the fp32 and bf16 rows beside the machine's matmul sampled before and after them
    assert rows["train_p8_batch4_fp32"]["of_matmul"] > 0 and rows["pipal_82_2crop_bf16"]["of_matmul"] > 0
    assert "of fp32 matmul" in done.stdout and "matmul at ViT-B/8's shapes, before" in done.stdout
    markdown = (tmp_path / "report.md").read_text()
    assert "| pipal_82_2crop_compiled |" in markdown and "Finished: yes" in markdown


@pytest.mark.slow
def test_the_time_limit_stops_cleanly_with_what_was_measured(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--minutes", "0.2", "--out", str(tmp_path / "report")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["complete"] and report["stopped_during"] and report["seconds"] < 12 + 30  # the limit, then the report
    assert "Finished: no, stopped during" in (tmp_path / "report.md").read_text()
