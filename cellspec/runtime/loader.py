"""Import generated packages from memory (through the cache) under a private module name."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from cellspec.runtime.cache import entry, key_of


def write_package(dest: Path, files: dict[str, str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name, text in sorted(files.items()):
        (dest / name).write_text(text)


def load_package(module_name: str, files: dict[str, str]) -> ModuleType:
    """Import a generated package (files: name -> text) and return it. The same files always
    map to the same cached folder and the same private package name."""
    key = key_of(module_name, *(f"{k}\n{v}" for k, v in sorted(files.items())))
    folder = entry("py", key, lambda tmp: write_package(tmp / module_name, files))
    pkg_name = f"_cellspec_{key}_{module_name}"
    if pkg_name in sys.modules:
        return sys.modules[pkg_name]
    init = folder / module_name / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        pkg_name, init, submodule_search_locations=[str(init.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[pkg_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[pkg_name]
        raise
    return module
