"""cellspec: a compiler for recurrent neural network cells.

A ``.cell`` file states a cell's equations; cellspec parses it, lowers it to SymPy gate
equations split into projections (GEMMs) and pointwise stages, derives the backward pass
symbolically, and renders NumPy, PyTorch and CUDA implementations from one schedule.

From Python, ``cellspec.load(path_or_text, cell=None)`` compiles a spec and returns its
generated package (see :mod:`cellspec.api`).
"""

__version__ = "0.1.0"

from cellspec.errors import SpecError


def load(path_or_text, cell=None):
    """Compile a spec (a path to a ``.cell`` file, or the spec text itself: a ``str`` with a
    newline or a ``{``) and return the generated package of its cell; ``cell=`` picks one of
    several. Cached: the same text compiles once. See :func:`cellspec.api.load`."""
    from cellspec.api import load as _load  # imported on use: `import cellspec` stays light

    return _load(path_or_text, cell)


__all__ = ["SpecError", "__version__", "load"]
