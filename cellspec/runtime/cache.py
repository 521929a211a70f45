"""A content-addressed cache directory for generated and compiled artifacts.

An entry is keyed by a hash of everything that determines it (sources, compiler, flags,
cellspec version). It is built in a temporary folder next to its final place and renamed into
place under a file lock, so concurrent processes never see a half-written entry and never
build the same entry twice at once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from cellspec import __version__


def cache_root() -> Path:
    root = os.environ.get("CELLSPEC_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cellspec"


def key_of(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    h.update(__version__.encode())
    for p in parts:
        h.update(b"\0")
        h.update(p if isinstance(p, bytes) else p.encode())
    return h.hexdigest()[:24]


def entry(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """Return the folder of cache entry kind/key, building it with build(tmpdir) if absent."""
    final = cache_root() / kind / key
    if (final / ".complete").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / ".complete").exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
        try:
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
            if final.exists():  # a stale, incomplete entry from a killed process
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final
