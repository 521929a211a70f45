"""The ``cellspec`` command, run as a user runs it: in a subprocess, through ``python -m
cellspec`` and through the ``cellspec`` entry point.

A bad spec or a bad path gives ``file:line:col: message`` (or ``file: message``), a non-zero
exit status, no traceback and nothing written; good specs give importable packages.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
GENERATED = ROOT / "generated"

BAD_SPEC = """\
# a comment line
cell Bad {
  input x[I]
  state h[H]
  param W[H, I], U[H, H], b[H]
  h' = tanh(W @ x + U @ q + b)
}
"""
TINY_SPEC = "cell Tiny {\n  input x[I]\n  state h[H]\n  param W[H, I]\n  h' = tanh(W @ x + h)\n}\n"
BAD_RENDERED = [
    "bad.cell:6:25: unknown name 'q'",
    "      h' = tanh(W @ x + U @ q + b)",
    "                            ^",
]


def _entry_point() -> str | None:
    here = Path(sys.executable).parent / ("cellspec.exe" if os.name == "nt" else "cellspec")
    return str(here) if here.exists() else shutil.which("cellspec")


def run_cli(*args: str, cwd: Path = ROOT, entry: str = "module", timeout: float = 120) -> subprocess.CompletedProcess:
    if entry == "module":
        cmd = [sys.executable, "-m", "cellspec", *args]
    else:
        exe = _entry_point()
        if exe is None:
            pytest.skip("the cellspec entry point is not installed")
        cmd = [exe, *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def snapshot(folder: Path) -> dict[str, bytes | None] | None:
    """Every file (bytes) and folder (None) under folder, or None if it does not exist."""
    if not folder.exists():
        return None
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
        if "__pycache__" not in p.parts
    }


def assert_refused(proc: subprocess.CompletedProcess, *expected: str) -> None:
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    for text in expected:
        assert text in proc.stderr, f"{text!r} not in stderr:\n{proc.stderr}"


@pytest.fixture
def bad_spec(tmp_path) -> Path:
    p = tmp_path / "bad.cell"
    p.write_text(BAD_SPEC)
    return p


# ---------------------------------------------------------------------------------- bad specs
@pytest.mark.parametrize("entry", ["module", "script"])
def test_bad_spec_is_refused_with_location_and_caret(tmp_path, bad_spec, entry):
    out = tmp_path / "out"
    proc = run_cli("compile", "bad.cell", "-o", str(out), cwd=tmp_path, entry=entry)
    assert_refused(proc, "\n".join(BAD_RENDERED))
    assert proc.stderr.startswith(BAD_RENDERED[0] + "\n")
    assert "nothing written" in proc.stderr
    assert not out.exists()


def test_one_bad_file_among_several_writes_nothing(tmp_path, bad_spec):
    out = tmp_path / "out"
    (out / "gru").mkdir(parents=True)
    (out / "gru" / "__init__.py").write_text("# an earlier package\n")
    (out / "keep.txt").write_text("untouched\n")
    before = snapshot(out)
    proc = run_cli("compile", str(SPECS / "gru.cell"), "bad.cell", str(SPECS / "elman.cell"), "-o", str(out), cwd=tmp_path)
    assert_refused(proc, BAD_RENDERED[0], "1 file(s) with errors; nothing written")
    assert snapshot(out) == before
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no staging folder left behind


def test_every_bad_file_is_reported(tmp_path, bad_spec):
    (tmp_path / "eof.cell").write_text("cell E {\n  input x[I]\n")
    proc = run_cli("compile", "bad.cell", "eof.cell", "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert_refused(
        proc,
        BAD_RENDERED[0],
        "eof.cell:2:13: unexpected end of file; the cell is not closed with '}'",
        "2 file(s) with errors",
    )
    assert not (tmp_path / "out").exists()


def test_bad_spec_in_check_and_show(tmp_path, bad_spec, monkeypatch, capsys):
    proc = run_cli("check", "bad.cell", cwd=tmp_path)
    assert_refused(proc, "\n".join(BAD_RENDERED))
    from cellspec.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["show", "bad.cell", "--stage", "numpy"]) == 1
    captured = capsys.readouterr()
    assert "\n".join(BAD_RENDERED) in captured.err and captured.out == ""


# ---------------------------------------------------------------------------------- bad paths
def test_missing_file(tmp_path):
    proc = run_cli("compile", "nowhere.cell", "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert_refused(proc, "nowhere.cell: cannot read: No such file or directory")
    assert not (tmp_path / "out").exists()


def test_directory_as_input(tmp_path):
    (tmp_path / "specs.cell").mkdir()
    proc = run_cli("compile", "specs.cell", "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert_refused(proc, "specs.cell: cannot read: Is a directory")
    assert not (tmp_path / "out").exists()


def test_non_utf8_file(tmp_path):
    (tmp_path / "latin1.cell").write_bytes("cell C {\n  # caf\u00e9\n}\n".encode("latin-1"))
    proc = run_cli("compile", "latin1.cell", "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert_refused(proc, "latin1.cell:2:8: the file is not UTF-8 text (byte 0xe9 at offset 16)", "\n" + " " * 11 + "^\n")
    assert not (tmp_path / "out").exists()


def _unwritable(tmp_path: Path, kind: str) -> tuple[Path, str]:
    (tmp_path / "tiny.cell").write_text(TINY_SPEC)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder\n")
    if kind == "file as output":
        return blocker, f"cellspec: cannot create output folder {blocker}: File exists"
    if kind == "below a file":
        return blocker / "out", f"cellspec: cannot create output folder {blocker / 'out'}: Not a directory"
    out = tmp_path / "out"
    out.mkdir()
    (out / "tiny").write_text("in the way\n")
    return out, f"cellspec: {out / 'tiny'} exists and is not a folder"


def test_unwritable_output(tmp_path):
    out, message = _unwritable(tmp_path, "below a file")
    before = snapshot(tmp_path)
    proc = run_cli("compile", "tiny.cell", "-o", str(out), cwd=tmp_path)
    assert_refused(proc, message)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["file as output", "package path is a file"])
def test_unwritable_output_in_process(tmp_path, monkeypatch, capsys, kind):
    # the same path as above, without the cost of another interpreter
    from cellspec.cli import main

    out, message = _unwritable(tmp_path, kind)
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["compile", "tiny.cell", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write to read-only folders")
def test_read_only_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        (tmp_path / "tiny.cell").write_text(TINY_SPEC)
        proc = run_cli("compile", "tiny.cell", "-o", str(out), cwd=tmp_path)
        assert_refused(proc, "cellspec: cannot write to")
    finally:
        out.chmod(0o700)
    assert list(out.iterdir()) == []


def test_usage_errors_have_no_traceback(tmp_path):
    for args in ([], ["compile"], ["show", "x.cell", "--stage", "bogus"], ["frobnicate"]):
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc)
        assert "usage: cellspec" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------- good specs
def test_compile_gru_is_importable_and_recompile_replaces(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("compile", "specs/gru.cell", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "GRU ->" in proc.stdout and "Traceback" not in proc.stderr
    pkg = out / "gru"
    for name in ("__init__.py", "numpy_cell.py", "torch_cell.py"):
        assert (pkg / name).is_file(), name
    first = snapshot(pkg)

    code = f"""
import sys
sys.path.insert(0, {str(out)!r})
from gru import GRU, GRUCell, numpy_cell
import numpy as np, torch
rng = np.random.default_rng(0)
params = {{k: rng.standard_normal([{{'I': 3, 'H': 4}}[s] for s in shape]) for k, shape in numpy_cell.PARAMS.items()}}
out, h = numpy_cell.forward(params, rng.standard_normal((2, 3)), np.zeros((2, 4)))
assert out.shape == (2, 4) and h.shape == (2, 4)
cell = GRUCell(3, 4)
assert isinstance(cell.W_r, torch.nn.Parameter) and tuple(cell.W_r.shape) == (4, 3)
y, s = cell(torch.randn(2, 3))
ys, hs = GRU(3, 4)(torch.randn(5, 2, 3))
assert tuple(ys.shape) == (5, 2, 4) and tuple(hs.shape) == (1, 2, 4)
print("imported")
"""
    check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert check.returncode == 0 and "imported" in check.stdout, check.stderr

    # recompiling over an existing output replaces the package, stale files and edits included
    (pkg / "stale.py").write_text("old\n")
    (pkg / "numpy_cell.py").write_text("edited\n")
    proc = run_cli("compile", "specs/gru.cell", "-o", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert snapshot(pkg) == first
    assert sorted(p.name for p in out.iterdir()) == ["gru"]  # no staging folders left


def test_check_prints_the_table():
    proc = run_cli("check", "specs/elman.cell", "--no-fd", "--steps", "2", "--batch", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Elman (elman.cell)" in proc.stdout
    assert "quantity" in proc.stdout and "tolerance" in proc.stdout and "d W_ih" in proc.stdout
    assert proc.stdout.rstrip().endswith("OK")


@pytest.mark.parametrize(
    "stage, expected",
    [
        ("schedule", ["cell GRU:", "stage 0:", "GEMM:", "saved per step:"]),
        ("backward", ["cell GRU: backward", "leaves:"]),
        ("numpy", ["# ---- numpy_cell.py", "def forward(params, x, state=None)", "def backward("]),
    ],
)
def test_show_stage(stage, expected, monkeypatch, capsys):
    if stage == "numpy":  # one through a subprocess, the others in this process (cheaper)
        proc = run_cli("show", "specs/gru.cell", "--stage", stage)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        stdout = proc.stdout
    else:
        from cellspec.cli import main

        monkeypatch.chdir(ROOT)
        assert main(["show", "specs/gru.cell", "--stage", stage]) == 0
        stdout = capsys.readouterr().out
    for text in expected:
        assert text in stdout, f"{text!r} not in:\n{stdout}"


@pytest.mark.parametrize("entry", ["module", "script"])
def test_version(entry):
    from cellspec import __version__

    proc = run_cli("--version", entry=entry)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"cellspec {__version__}"


# ---------------------------------------------------------------------------------- generated/
def _differences(cmp: filecmp.dircmp, prefix: str = "") -> list[str]:
    out = [f"only in a fresh compile: {prefix}{n}" for n in cmp.left_only]
    out += [f"only in generated/: {prefix}{n}" for n in cmp.right_only]
    out += [f"differs: {prefix}{n}" for n in cmp.diff_files + cmp.funny_files]
    for name, sub in sorted(cmp.subdirs.items()):
        out += _differences(sub, f"{prefix}{name}/")
    return out


def test_generated_folder_is_up_to_date(tmp_path, monkeypatch):
    """generated/ is exactly what the current compiler writes for specs/*.cell."""
    from cellspec.cli import main

    monkeypatch.chdir(ROOT)
    specs = sorted(f"specs/{p.name}" for p in SPECS.glob("*.cell"))
    assert main(["compile", *specs, "-o", str(tmp_path), "-q"]) == 0
    ignore = ["__pycache__", ".DS_Store"]
    diffs = _differences(filecmp.dircmp(tmp_path, GENERATED, ignore=ignore))
    # dircmp compares shallowly (size, mtime) first; confirm byte for byte
    for a in tmp_path.rglob("*"):
        b = GENERATED / a.relative_to(tmp_path)
        if a.is_file() and "__pycache__" not in a.parts and b.is_file() and a.read_bytes() != b.read_bytes():
            diffs.append(f"differs: {a.relative_to(tmp_path)}")
    diffs = sorted(set(diffs))
    assert not diffs, (
        "generated/ is out of date with specs/ and the compiler:\n  "
        + "\n  ".join(diffs)
        + "\nrun `cellspec compile specs/*.cell -o generated` and commit the result"
    )
