"""``cellspec.load``: a spec from a path or from text, compiled through the cache, imported in
process; errors as SpecError with the usual rendering."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

import cellspec
from cellspec import api, driver
from cellspec.errors import SpecError

ROOT = Path(__file__).resolve().parent.parent

TINY = """\
cell Tiny {
  input x[I]
  state h[H]
  param W[H, I], U[H, H]
  h' = tanh(W @ x + U @ h)
}
"""
TWO = TINY + TINY.replace("Tiny", "Other").replace("tanh", "sigmoid")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty on-disk cache and an empty in-memory one."""
    monkeypatch.setenv("CELLSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(api, "_COMPILED", {})
    return tmp_path


def _no_compile(*args, **kwargs):
    raise AssertionError("compiled again: the cache missed")


def test_text_is_compiled_and_runs_like_the_equations(fresh_cache):
    mod = cellspec.load(TINY)
    assert mod.__name__.endswith("_tiny")
    rng = np.random.default_rng(0)
    params = {"W": rng.normal(size=(4, 3)), "U": rng.normal(size=(4, 4))}
    x, h = rng.normal(size=(2, 3)), rng.normal(size=(2, 4))
    out, h1 = mod.numpy_cell.forward(params, x, h)
    expected = np.tanh(x @ params["W"].T + h @ params["U"].T)  # the spec, by hand
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    np.testing.assert_allclose(h1, expected, rtol=1e-12)
    layer = mod.Tiny(3, 4)
    assert layer.state_dict()["W"].shape == (4, 3)


def test_path_str_and_pathlib_give_the_package_of_the_file(fresh_cache):
    a = cellspec.load(
        "specs/gru.cell" if Path("specs/gru.cell").exists() else str(ROOT / "specs/gru.cell")
    )
    b = cellspec.load(ROOT / "specs" / "gru.cell")
    assert a.GRU.__name__ == "GRU" and b.GRU.__name__ == "GRU"
    assert "cell GRU {" in b.__doc__  # the package's docstring shows the spec


def test_text_vs_path_rule():
    assert api.is_spec_text("cell A { }")
    assert api.is_spec_text("line one\nline two")
    assert not api.is_spec_text("specs/gru.cell")
    assert not api.is_spec_text(Path("weird{name}.cell"))  # a Path is always a path


def test_missing_path_is_a_spec_error(fresh_cache):
    with pytest.raises(SpecError) as e:
        cellspec.load("no/such/file.cell")
    assert str(e.value).startswith("no/such/file.cell: cannot read")


def test_error_in_text_renders_with_position_line_and_caret(fresh_cache):
    bad = TINY.replace("U @ h", "U @ q")
    with pytest.raises(SpecError) as e:
        cellspec.load(bad)
    text = str(e.value)
    assert text.splitlines() == [
        "<text>:5:25: unknown name 'q'",
        "      h' = tanh(W @ x + U @ q)",
        "                            ^",
    ]
    assert e.value.line == 5 and e.value.col == 25

    class Printer:  # what IPython hands to _repr_pretty_ when a notebook displays the error
        shown = ""

        def text(self, s):
            self.shown += s

    p = Printer()
    e.value._repr_pretty_(p, False)
    assert p.shown == text
    # nothing was cached for the bad text: the fixed text compiles
    assert cellspec.load(TINY).Tiny


def test_several_cells_need_cell_and_name_them(fresh_cache):
    with pytest.raises(SpecError) as e:
        cellspec.load(TWO)
    assert "2 cells" in str(e.value) and "Tiny" in str(e.value) and "Other" in str(e.value)
    assert "cell=" in str(e.value)
    other = cellspec.load(TWO, cell="Other")
    tiny = cellspec.load(TWO, cell="Tiny")
    assert other.Other.__name__ == "Other" and tiny.Tiny.__name__ == "Tiny"
    with pytest.raises(SpecError, match="no cell named 'Nope'.*Tiny, Other"):
        cellspec.load(TWO, cell="Nope")


def test_second_load_is_a_cache_hit(fresh_cache, monkeypatch):
    t0 = time.perf_counter()
    first = cellspec.load(TINY)
    t1 = time.perf_counter()
    monkeypatch.setattr(driver, "compile_source", _no_compile)
    second = cellspec.load(TINY)
    t2 = time.perf_counter()
    assert second is first
    assert t2 - t1 < (t1 - t0) / 10, (t1 - t0, t2 - t1)
    # a later process: the in-memory cache is empty, the disk cache still has the package
    monkeypatch.setattr(api, "_COMPILED", {})
    assert cellspec.load(TINY) is first


def test_changed_text_is_compiled_again(fresh_cache):
    a = cellspec.load(TINY)
    b = cellspec.load(TINY.replace("tanh", "sigmoid"))
    assert a is not b
    params = {"W": np.zeros((2, 1)), "U": np.zeros((2, 2))}
    out, _ = b.numpy_cell.forward(params, np.zeros((1, 1)), np.zeros((1, 2)))
    np.testing.assert_allclose(out, 0.5)  # sigmoid(0), not tanh(0)
