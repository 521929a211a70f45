"""cellspec: a compiler for recurrent neural network cells.

A ``.cell`` file states a cell's equations; cellspec parses it, lowers it to SymPy gate
equations split into projections (GEMMs) and pointwise stages, derives the backward pass
symbolically, and renders NumPy, PyTorch and CUDA implementations from one schedule.
"""

__version__ = "0.1.0"

from cellspec.errors import SpecError

__all__ = ["SpecError", "__version__"]
