"""benchmarks/gpu_check.py on the CPU: a dry run writes a complete report (every section, its wall
time, JSON that parses) even when one spec's check subprocess crashes, a Python error in a spec
is reported with its traceback, and a machine without a GPU still gets a report."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("cellspec_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    env.update(extra)
    return env


def test_dry_run_reports_everything_when_a_spec_crashes(tmp_path):
    """elman's check subprocess aborts (as a sticky CUDA error or a segfault would end it); lstm is
    still checked and benchmarked, and the report has every section."""
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--only", "elman",
         "--only", "lstm", "--compile-backend", "aot_eager"],
        env=_env(CELLSPEC_GPU_CHECK_FAIL="elman:crash"), capture_output=True, text=True,
        timeout=300, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a failure, reported
    doc = json.loads((out / "gpu_check_dryrun.json").read_text())
    md = (out / "gpu_check_dryrun.md").read_text()
    sections = {s["name"]: s for s in doc["sections"]}
    assert list(sections) == ["environment", "build", "check", "benchmark"]
    for name, s in sections.items():
        assert s["seconds"] is not None and s["seconds"] >= 0, name
        assert f"## {name} (" in md
    assert doc["meta"]["finished"] and doc["ok"] is False
    assert sections["environment"]["status"] == "ok"
    assert sections["build"]["status"] == "ok"
    assert set(sections["build"]["data"]["results"]) == {"elman", "lstm"}

    check = sections["check"]
    assert check["status"] == "failed"
    elman, lstm = check["data"]["specs"]["elman"], check["data"]["specs"]["lstm"]
    assert not elman["ok"] and "killed by SIGABRT" in elman["error"]
    assert lstm["ok"], lstm
    assert [r["dtype"] for r in lstm["rows"]] == ["float64", "float32", "bfloat16", "float16"]
    assert all(r["vs_numpy"][1] <= r["tol"] for r in lstm["rows"])
    assert lstm["compile"]["ok"] and lstm["compile"]["backend"] == "aot_eager"
    assert "killed by SIGABRT" in md and "| lstm | float32 | fused |" in md

    bench = sections["benchmark"]
    assert bench["status"] == "ok", bench
    rows = bench["data"]["cells"]["lstm"]["rows"]
    impls = {r["impl"] for r in rows}
    assert impls == {"cellspec fused", "torch.nn (CPU)", "cellspec generated", "eager step loop",
                     "compiled step loop"}
    assert len(rows) == len(gpu_check.DRY_SHAPES) * len(impls)
    assert all(r["fwd_bwd_ms"] > 0 for r in rows), rows
    loop = bench["data"]["cells"]["lstm"]["compiled_loop"]
    # one compile with dynamic shapes serves every shape: no-grad, first step, later steps
    assert loop["recompile_limit_hit"] is False and loop["graphs"] <= 4
    assert "recompile limit (8) not hit" in md


def test_python_error_in_a_spec_is_reported_with_its_traceback(tmp_path):
    path = ROOT / "specs" / "elman.cell"
    os.environ["CELLSPEC_GPU_CHECK_FAIL"] = "elman"
    try:
        res = gpu_check.run_check_subprocess(path, "elman", "cpu", True, "aot_eager", 120, tmp_path)
    finally:
        del os.environ["CELLSPEC_GPU_CHECK_FAIL"]
    assert not res["ok"] and res["rc"] == 1
    assert "exit status 1" in res["error"]
    assert "Traceback" in res["error"] and "the failure this test hook injects" in res["error"]
    assert res["rows"] == []  # the partial result written before the failure was read back


def test_section_failure_is_recorded_and_the_run_goes_on(tmp_path):
    report = gpu_check.Report(tmp_path, "test", True, ["--dry-run"])

    def broken(sec):
        sec["lines"] = ["started"]
        raise ValueError("section exploded")

    gpu_check.run_section(report, "build", broken)
    gpu_check.run_section(report, "check", lambda sec: sec["lines"].append("fine"))
    doc = json.loads(report.json_path.read_text())
    build, check = doc["sections"][1], doc["sections"][2]
    assert build["status"] == "failed" and "section exploded" in build["error"]
    assert "Traceback" in build["error"] and build["seconds"] is not None
    assert check["status"] == "ok" and check["lines"] == ["fine"]
    assert doc["sections"][3]["status"] == "pending"  # not run yet, but listed
    md = report.md_path.read_text()
    assert "section exploded" in md and "| benchmark | pending |" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_without_a_gpu_the_report_says_so(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path), "--skip-bench"]) == 2
    doc = json.loads((tmp_path / "gpu_check_no_GPU.json").read_text())
    status = {s["name"]: s["status"] for s in doc["sections"]}
    assert status == {"environment": "failed", "build": "skipped", "check": "skipped",
                      "benchmark": "skipped"}
    env = doc["sections"][0]["data"]
    assert env["cuda_backend_usable"]["ok"] is False and env["cuda_available"] is False


def test_sixteen_bit_tolerance_follows_the_measured_rounding():
    assert gpu_check.tolerance("float32", 0.5) == 2e-5
    assert gpu_check.tolerance("bfloat16", 0.01) == pytest.approx(gpu_check.TOL_FACTOR * 0.01)
    floor = gpu_check.TOL_FLOOR_EPS * torch.finfo(torch.float16).eps
    assert gpu_check.tolerance("float16", 1e-6) == pytest.approx(floor)


def test_storage_rounding_error_grows_with_coarser_dtypes(compiled):
    from cellspec.verify import check

    p = check.make_problem(compiled("gru"), T=4, B=2, seed=1)
    bf16 = gpu_check.storage_rounding_error(p, "bfloat16")
    fp16 = gpu_check.storage_rounding_error(p, "float16")
    assert 1e-4 < fp16 < bf16 < 0.1  # bfloat16 has 3 fewer mantissa bits than float16


def test_unknown_only_names_the_choices():
    with pytest.raises(SystemExit, match="no such spec; choose from .*lstm"):
        gpu_check.compiled_specs(["no_such_cell"])


def test_a_hanging_spec_is_killed_at_its_timeout(tmp_path):
    path = ROOT / "specs" / "elman.cell"
    res = gpu_check.run_check_subprocess(path, "elman", "cpu", True, "aot_eager", 0.5, tmp_path)
    assert res["rc"] == "timeout" and not res["ok"]
    assert "killed after" in res["error"]


def test_out_of_budget_is_reported_not_hidden(tmp_path):
    """With no time left the checks are not started, and the report says why."""
    code = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--only", "elman", "--skip-bench",
                           "--budget-s", "0"])
    assert code == 1
    doc = json.loads((tmp_path / "gpu_check_dryrun.json").read_text())
    sections = {s["name"]: s for s in doc["sections"]}
    assert sections["check"]["status"] == "failed"
    assert "out of the time budget" in sections["check"]["data"]["specs"]["elman"]["error"]
    assert sections["benchmark"]["status"] == "skipped"
