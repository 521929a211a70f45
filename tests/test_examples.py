"""The examples' --quick modes (what CI runs): they train, write their PNG plot and their
Markdown results table, in a subprocess, into a temporary folder."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

for _module, _why in (("tqdm", "progress bars"), ("matplotlib", "the loss plots")):
    try:
        __import__(_module)
    except ImportError:
        pytest.skip(
            f'the examples need {_module} ({_why}): pip install -e ".[examples]"',
            allow_module_level=True,
        )

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(script: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    r = subprocess.run(
        [sys.executable, f"examples/{script}", "--quick", "--no-progress", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _table_rows(md: str) -> list[list[str]]:
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len(rows) >= 3 and re.fullmatch(r"\|[-:|]+\|", rows[1].replace(" ", ""))
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]


def test_adding_problem_quick(tmp_path):
    r = _run("adding_problem.py", tmp_path)
    png = tmp_path / "adding_T12.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    md = (tmp_path / "results.md").read_text()
    rows = _table_rows(md)
    cells = [row[1] for row in rows]
    assert cells == ["Elman", "LSTM", "GRU (TF)", "PeepholeLSTM", "CIFG LSTM", "UGRNN (custom)"]
    for row in rows:
        assert row[0] == "12" and int(row[2]) > 0
        assert all(math.isfinite(float(v)) for v in row[3:5])
    assert md.strip() in r.stdout  # the table is printed too


def test_char_lm_quick(tmp_path):
    r = _run("char_lm.py", tmp_path)
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG_MAGIC
    (row,) = _table_rows((tmp_path / "results.md").read_text())
    assert row[0] == "LSTM"
    train_bpc, held_bpc, uniform = map(float, row[2:5])
    assert 0 < held_bpc < uniform + 1 and math.isfinite(train_bpc)
    sample = (tmp_path / "sample.txt").read_text()
    assert sample.startswith("Return the ") and len(sample.rstrip("\n")) == len("Return the ") + 80
    assert "sample (temperature 0.7):" in r.stdout
