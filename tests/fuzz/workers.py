"""Worker functions run in child processes by tests/test_robustness.py (no torch import)."""

from __future__ import annotations

import hashlib
import os


def load_in_child(args: tuple[str, str, int]) -> str:
    """Compile a spec and load it through the cache at `cache`; hash one forward result."""
    cache, text, _ = args
    os.environ["CELLSPEC_CACHE"] = cache
    import numpy as np

    from cellspec.driver import compile_source
    from cellspec.errors import Source
    from cellspec.runtime.loader import load_package

    (cc,) = compile_source(Source("g.cell", text), ("numpy",))
    files = {"__init__.py": "from . import numpy_cell\n", "numpy_cell.py": cc.files["numpy_cell.py"]}
    pkg = load_package(cc.module_name, files)
    x = np.ones((2, 1, 3))
    params = {k: np.full([{"I": 3, "H": 4}[d] for d in s], 0.1) for k, s in pkg.numpy_cell.PARAMS.items()}
    out, _ = pkg.numpy_cell.forward_sequence(params, x)
    return hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest()
