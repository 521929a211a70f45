"""Shared fixtures: compile a shipped spec in memory (through the cache) and import it."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
TEST_SPECS = ROOT / "tests" / "specs"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CELLSPEC_CACHE", str(ROOT / ".pytest_cache" / "cellspec"))

from cellspec.driver import compile_file
from cellspec.runtime.loader import load_package


def spec_paths(tests: bool = False) -> list[Path]:
    """The shipped specs, and with tests=True also the test specs under tests/specs/."""
    paths = sorted(SPECS.glob("*.cell"))
    if tests:
        paths += sorted(TEST_SPECS.glob("*.cell"))
    return paths


@functools.cache
def compiled_cells(path: str):
    return compile_file(path)


@functools.cache
def load_module(module_name: str):
    """The generated package of the shipped cell with this module name, from the current compiler."""
    for path in spec_paths(tests=True):
        for cc in compiled_cells(str(path)):
            if cc.module_name == module_name:
                return load_package(cc.module_name, cc.files)
    raise LookupError(f"no shipped or test spec defines a cell with module name {module_name!r}")


@pytest.fixture
def compiled():
    """compiled(module_name) -> the imported generated package (e.g. compiled("lstm").LSTM)."""
    return load_module
