"""The ``cuda-host`` engine: the generated ``.cu`` built for the CPU, driven over a sequence.

Registers the ``cuda-host`` (float64, tolerance 1e-9) and ``cuhost-f32`` (float32, tolerance
2e-5) columns of ``cellspec check``: the same arithmetic as the GPU kernels, run through the g++
(or nvcc host) build, against the float64 NumPy reference; and ``gpu`` (float64, 1e-9): the
kernels on the GPU through the generated module's ``backend="cuda"``, where there is one.
"""

from __future__ import annotations

import numpy as np

from cellspec.runtime import native
from cellspec.verify import check


def cu_source(cc) -> str:
    """The generated .cu text of a compiled cell."""
    name = f"{cc.module_name}.cu"
    if name not in cc.files:
        raise check.SkipColumn("no .cu file was generated")
    return cc.files[name]


def run_host(p: check.Problem, cc, dtype_name: str = "float64") -> check.Results:
    """Forward and backward of problem p with the CPU build of the cell's kernels."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        raise check.SkipColumn("PyTorch is not installed (the sequence driver uses torch tensors)") from None
    from cellspec.runtime.cuda_sequence import host_runner

    if native.which_cxx() is None and native.which_nvcc() is None:
        raise check.SkipColumn("no C++ compiler")
    dtype = getattr(torch, dtype_name)
    runner = host_runner(cu_source(cc), dtype)

    def t(a: np.ndarray):
        return torch.as_tensor(np.asarray(a), dtype=dtype)

    xs = tuple(t(a) for a in p.xs)
    states = tuple(t(a) for a in p.states)
    params = {k: t(v) for k, v in p.params.items()}
    outs, finals, saved = runner.forward(xs, states, params)
    dp, dx, ds = runner.backward(xs, params, saved, [t(a) for a in p.d_outputs], [t(a) for a in p.d_final])
    return check._collect(p, outs, finals, dp, dx, ds)


def run_gpu(p: check.Problem, cc) -> check.Results:
    """The generated module with backend="cuda" on the GPU, float64 (kernels and cuBLAS)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        raise check.SkipColumn("PyTorch is not installed") from None
    if not torch.cuda.is_available():
        raise check.SkipColumn("no GPU")
    if native.which_nvcc() is None:
        raise check.SkipColumn("no nvcc")
    return check.run_torch(p, "cuda", "float64", "cuda")


def register() -> None:
    check.EXTRA_COLUMNS.setdefault("cuda-host", (1e-9, lambda p, cc: run_host(p, cc, "float64")))
    check.EXTRA_COLUMNS.setdefault("cuhost-f32", (2e-5, lambda p, cc: run_host(p, cc, "float32")))
    check.EXTRA_COLUMNS.setdefault("gpu", (1e-9, run_gpu))


register()
