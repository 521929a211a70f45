"""``cellspec.load``: compile a spec from Python and import its generated package, no files.

    import cellspec
    gru = cellspec.load("specs/gru.cell")               # a path
    mine = cellspec.load('''
        cell Mine { input x[I]  state h[H]  param W[H, I], U[H, H]
                    h' = tanh(W @ x + U @ h) }
    ''')                                                 # the spec text itself
    layer = mine.Mine(10, 20)

Text or path: a ``str`` that contains a newline or a ``{`` is spec text (every spec has a
``cell NAME { ... }`` block, and a file name with a newline or a brace is not worth supporting);
any other ``str``, and every ``os.PathLike`` (``pathlib.Path``), is a path. Text is reported in
errors under the name ``<text>``.

Compiled packages are cached twice: in memory for this process, keyed by a hash of the name and
the text, and on disk in cellspec's cache folder (``CELLSPEC_CACHE``), keyed by the same and by a
fingerprint of the compiler's own sources, so a second ``load`` of the same text, in this process
or a later one, skips the SymPy work. The package itself is imported through
:func:`cellspec.runtime.loader.load_package`, so the same text always gives the same module object.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from cellspec.errors import Source, SpecError

# cellspec.driver (SymPy, Lark: seconds to import) is imported only when something is compiled or
# a file is read, so that a cached spec text loads without it

#: the name spec text is reported under in error messages
TEXT_NAME = "<text>"

#: (name the text is reported under, text) hash -> [(cell name, module name, files)]
_COMPILED: dict[str, list[tuple[str, str, dict[str, str]]]] = {}


def is_spec_text(path_or_text: str | os.PathLike) -> bool:
    """The text-vs-path rule: a ``str`` with a newline or a ``{`` is spec text."""
    return isinstance(path_or_text, str) and ("\n" in path_or_text or "{" in path_or_text)


@lru_cache(maxsize=1)
def compiler_fingerprint() -> str:
    """A hash of cellspec's own sources (Python, grammar, templates): a changed compiler never
    reads a package an older one cached."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.suffix in (".py", ".lark", ".j2", ".cu", ".h") and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:24]


def _compile_cached(source: Source) -> list[tuple[str, str, dict[str, str]]]:
    from cellspec.runtime.cache import entry, key_of

    key = hashlib.sha256(f"{source.filename}\0{source.text}".encode()).hexdigest()
    if key in _COMPILED:
        return _COMPILED[key]
    disk_key = key_of("load", compiler_fingerprint(), key)

    def build(tmp: Path) -> None:
        from cellspec import driver

        cells = [(c.checked.name, c.module_name, c.files) for c in driver.compile_source(source)]
        (tmp / "cells.json").write_text(json.dumps(cells, sort_keys=True))

    # a bad spec raises SpecError inside build: nothing is cached for it
    folder = entry("load", disk_key, build)
    cells = [(n, m, f) for n, m, f in json.loads((folder / "cells.json").read_text())]
    _COMPILED[key] = cells
    return cells


def load(path_or_text: str | os.PathLike, cell: str | None = None) -> ModuleType:
    """Compile a spec (a path, or the text itself; see the module docstring for the rule) and
    return the generated package of its cell, as ``import generated.<module>`` would give it.

    ``cell=`` names the cell when the spec holds several; without it a spec with several cells
    is an error that names them. A bad spec raises :class:`~cellspec.errors.SpecError`, whose
    ``str()`` is ``file:line:col: message`` with the line and a caret.
    """
    if is_spec_text(path_or_text):
        source = Source(TEXT_NAME, path_or_text)
    else:
        from cellspec.driver import read_source

        source = read_source(os.fspath(path_or_text))
    try:
        cells = _compile_cached(source)
    except SpecError as e:
        raise e from None  # the position in the spec is the news, not cellspec's stack
    names = [n for n, _, _ in cells]
    if cell is None:
        if len(cells) > 1:
            raise SpecError(
                f"{len(cells)} cells in this spec ({', '.join(names)}); choose one with cell=",
                filename=source.filename,
            )
        chosen = cells[0]
    else:
        match = [c for c in cells if c[0] == cell]
        if not match:
            raise SpecError(
                f"no cell named '{cell}' in this spec; it has {', '.join(names)}",
                filename=source.filename,
            )
        chosen = match[0]
    from cellspec.runtime.loader import load_package

    _, module_name, files = chosen
    return load_package(module_name, files)
