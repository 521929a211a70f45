"""The fused CPU kernel as the PyTorch layer's CPU path (``backend="auto"`` / ``"fused"``).

The generated ``.cu`` file builds with g++ into a shared library of fused pointwise functions
(:func:`cellspec.runtime.native.build_host`, vectorised with libmvec where available, cached on
disk); :class:`cellspec.runtime.cuda_sequence.SequenceRunner` drives the time loop (GEMMs by
torch, one ctypes call per fused stage), wrapped here in a plain ``torch.autograd.Function``
(:class:`_FusedSequence`; under ``torch.compile`` the custom ops of
:mod:`cellspec.runtime.cuda_ops` instead, which it can trace).

:func:`use_fused` is what a generated module's ``backend="auto"`` asks on the CPU: float32 or
float64 CPU tensors of one dtype, at least :data:`MIN_STEPS` steps (so not the single-step
``NAMECell`` modules), at least :data:`MIN_ELEMENTS` elements per step (B times the
widest input or state; 0: no threshold, the fused kernel measured as fast or faster at every
shape, docs/performance.md), not while ``torch.compile`` traces, and a library that builds and
loads here. The build is tried once per ``.cu`` file, dtype and process; where there is no C++
compiler or the build fails, the answer is False from then on and the pure-torch engine runs,
with one debug-level log line per ``.cu`` file.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger("cellspec")

#: B * max(size) from which backend="auto" picks the fused kernel on the CPU; 0 = always
#: (measured with benchmarks/cpu_bench.py, docs/performance.md)
MIN_ELEMENTS = 0
#: sequence length from which backend="auto" picks the fused kernel on the CPU: below it (and
#: for the NAMECell modules, T = 1) the per-call set-up of the runner outweighs the fused steps
#: (measured at T = 1, 2, 4, 8; docs/performance.md)
MIN_STEPS = 8
DTYPES = (torch.float32, torch.float64)
_NOTED: set[str] = set()


@functools.cache
def _available(module_file: str, cu_name: str, dtype: torch.dtype) -> bool:
    from cellspec.runtime import cuda_ops, native

    path = Path(module_file).with_name(cu_name)
    try:
        if native.which_cxx() is None and native.which_nvcc() is None:
            raise native.NativeBuildError("no C++ compiler (g++, c++, clang++ or $CXX)")
        source = path.read_text()
        cuda_ops.ops_for(source)
        cuda_ops._runner(source, "cpu", None, dtype)  # builds (or finds in the cache) and loads
    except Exception as e:  # noqa: BLE001 - any failure means: use the torch engine
        if path.name not in _NOTED:  # one note per .cu file and process
            _NOTED.add(path.name)
            log.debug("cellspec: fused CPU kernel of %s not used (%s: %s); running the PyTorch engine",
                      path.name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return False
    return True


def use_fused(module_file: str, cu_name: str, xs, state, params) -> bool:
    """Whether backend="auto" should run the fused CPU kernel for these tensors."""
    x = xs[0]
    dtype = x.dtype
    if x.device.type != "cpu" or dtype not in DTYPES:
        return False
    if torch.compiler.is_compiling() or int(x.shape[0]) < MIN_STEPS:
        return False
    for t in (*xs, *state, *params.values()):
        if t.dtype != dtype or t.device.type != "cpu":
            return False
    if MIN_ELEMENTS:
        width = max(int(t.shape[-1]) for t in (*xs, *state))
        if int(x.shape[1]) * width < MIN_ELEMENTS:
            return False
    return _available(module_file, cu_name, dtype)


@functools.cache
def _kernel(module_file: str, cu_name: str, dtype: torch.dtype):
    """(CellOps, SequenceRunner) of the .cu file next to a generated module, for one dtype."""
    from cellspec.runtime import cuda_ops

    source = Path(module_file).with_name(cu_name).read_text()
    return cuda_ops.ops_for(source), cuda_ops._runner(source, "cpu", None, dtype)


class _FusedSequence(torch.autograd.Function):
    """The whole sequence on the fused CPU kernel, as a plain autograd.Function: the same
    runner as the custom ops of cellspec.runtime.cuda_ops, without their per-call dispatch
    (~0.1 ms per op call, which at small shapes is a large part of a forward+backward)."""

    @staticmethod
    def forward(ctx, ops, runner, *args):
        n_in, n_state = ops.n_in, ops.n_state
        xs, states, plist = args[:n_in], args[n_in : n_in + n_state], args[n_in + n_state :]
        outs, finals, saved = runner.forward(xs, states, dict(zip(ops.param_keys, plist)))
        ctx.ops, ctx.runner, ctx.n_params = ops, runner, len(plist)
        ctx.save_for_backward(*xs, *plist, *(saved[k] for k in ops.saved_keys))
        return (*outs, *(f.clone() for f in finals))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        ops, n_in = ctx.ops, ctx.ops.n_in
        t = ctx.saved_tensors
        xs, plist, saved = t[:n_in], t[n_in : n_in + ctx.n_params], t[n_in + ctx.n_params :]
        d_params, d_xs, d_states = ctx.runner.backward(
            xs, dict(zip(ops.param_keys, plist)), dict(zip(ops.saved_keys, saved)),
            grads[: ops.n_out], grads[ops.n_out :],
        )
        return (None, None, *d_xs, *d_states, *(d_params[k] for k in ops.param_keys))


def run_sequence(module_file: str, cu_name: str, xs, state, params):
    """backend="fused" on CPU tensors: (tuple of outputs, tuple of final states). Under
    torch.compile, the custom ops of cellspec.runtime.cuda_ops (which it traces) instead."""
    from cellspec.runtime import cuda_ops

    x = xs[0]
    if torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype not in DTYPES:
        return cuda_ops.run_sequence(module_file, cu_name, xs, state, params)
    try:
        ops, runner = _kernel(module_file, cu_name, x.dtype)
    except native_errors() as e:
        raise cuda_ops.CudaBackendError(str(e)) from None
    dtype = x.dtype
    args = (*xs, *(s.to(dtype) for s in state), *(params[k].to(dtype) for k in ops.param_keys))
    res = _FusedSequence.apply(ops, runner, *args)
    return tuple(res[: ops.n_out]), tuple(res[ops.n_out :])


def native_errors() -> tuple[type[BaseException], ...]:
    from cellspec.runtime import native

    return (native.NativeBuildError, OSError)
