"""The ``cuda`` backend of the generated PyTorch modules: kernels compiled on first use,
registered as PyTorch custom ops.

For one generated ``.cu`` source (keyed by its hash) :func:`ops_for` registers

* ``cellspec::<module>_<hash>_fwd(Tensor[] xs, Tensor[] states, Tensor[] params) -> (outputs...,
  finals..., saved...)`` and
* ``cellspec::<module>_<hash>_bwd(Tensor[] xs, Tensor[] params, Tensor[] saved, Tensor[] d_outputs,
  Tensor[] d_finals) -> (d_xs..., d_states..., d_params...)``

with ``torch.library.custom_op``, ``register_fake`` (shapes from the plan, so ``torch.compile``
traces through them) and ``register_autograd`` (the forward op's backward is the backward op).
CUDA tensors run the nvcc build (compiled for the GPU's architecture into the cache on first
use); CPU tensors run the CPU build of the same file (float32/float64). Problems (no GPU, no
nvcc, a driver older than nvcc's toolkit, an unsupported dtype, tensors on different devices)
raise :class:`CudaBackendError` with what to do — before any kernel is launched.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
from pathlib import Path

import torch

from cellspec.runtime import native
from cellspec.runtime.cuda_sequence import (
    CUDA_DTYPES,
    HOST_DTYPES,
    CudaKernels,
    HostKernels,
    SequenceRunner,
    read_plan,
)


class CudaBackendError(RuntimeError):
    """The CUDA backend cannot run here; the message says why and what to do."""


_ALT = "pass backend='generated' to the module to run the PyTorch implementation instead"


@functools.cache
def driver_version() -> int | None:
    """The CUDA driver's version as 1000*major + 10*minor (e.g. 12080), or None if unknown."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        v = ctypes.c_int(0)
        try:
            if lib.cuDriverGetVersion(ctypes.byref(v)) == 0:
                return v.value
        except AttributeError:  # pragma: no cover
            return None
    return None


def check_gpu_environment(device: torch.device) -> tuple[str, ...]:
    """Raise CudaBackendError unless the kernels can be built and run on device; return the
    architectures to build for (e.g. ('90',))."""
    if not torch.cuda.is_available():
        raise CudaBackendError(
            f"CUDA tensors were given but torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}); check the driver and CUDA_VISIBLE_DEVICES, or {_ALT}"
        )
    nvcc = native.which_nvcc()
    if nvcc is None:
        raise CudaBackendError(
            "nvcc not found: the CUDA backend compiles its kernels on first use. Install the CUDA toolkit "
            f"(torch was built for CUDA {torch.version.cuda}) and put nvcc on PATH or set $NVCC / $CUDA_HOME, or {_ALT}"
        )
    tk = native.nvcc_cuda_version(nvcc)
    drv = driver_version()
    if tk is not None and drv is not None and drv < tk[0] * 1000 + tk[1] * 10:
        raise CudaBackendError(
            f"nvcc is from CUDA {tk[0]}.{tk[1]} but the installed driver supports CUDA {drv // 1000}.{drv % 1000 // 10}: "
            f"kernels built by it cannot run. Use an nvcc from a toolkit no newer than the driver "
            f"(torch uses CUDA {torch.version.cuda}; set $NVCC), or update the driver, or {_ALT}"
        )
    major, minor = torch.cuda.get_device_capability(device)
    return (f"{major}{minor}",)


@functools.cache
def _cuda_library(source: str, module: str, archs: tuple[str, ...]) -> ctypes.CDLL:
    try:
        return native.load_library(str(native.build_cuda(source, module, archs)))
    except native.NativeBuildError as e:
        raise CudaBackendError(f"{e}\n({_ALT})") from None


@functools.cache
def _runner(source: str, device_type: str, device_index: int | None, dtype: torch.dtype) -> SequenceRunner:
    plan = read_plan(source)
    module = plan["module"]
    if device_type == "cuda":
        device = torch.device("cuda", device_index)
        if dtype not in CUDA_DTYPES:
            raise CudaBackendError(f"the CUDA kernels run float32, float64, float16 and bfloat16, not {dtype}")
        archs = check_gpu_environment(device)
        return SequenceRunner(plan, CudaKernels(_cuda_library(source, module, archs), module, dtype, device))
    if device_type == "cpu":
        if dtype not in HOST_DTYPES:
            raise CudaBackendError(f"the CPU build of the CUDA kernels runs float32 and float64, not {dtype}")
        try:
            return SequenceRunner(plan, HostKernels(source, module, dtype))
        except native.NativeBuildError as e:
            raise CudaBackendError(str(e)) from None
    raise CudaBackendError(f"the CUDA backend runs on CUDA (or CPU) tensors, not on {device_type!r}")


def runner_for(source: str, like: torch.Tensor) -> SequenceRunner:
    return _runner(source, like.device.type, like.device.index, like.dtype)


def _check_tensors(tensors, what: str) -> None:
    first = tensors[0]
    for t in tensors:
        if t.device != first.device:
            raise CudaBackendError(f"{what}: all tensors must be on one device, got {first.device} and {t.device}")
        if t.dtype != first.dtype:
            raise CudaBackendError(f"{what}: all tensors must have one dtype, got {first.dtype} and {t.dtype}")


class CellOps:
    """The two custom ops of one generated .cu source."""

    def __init__(self, source: str):
        self.source = source
        self.plan = plan = read_plan(source)
        digest = hashlib.sha256(source.encode()).hexdigest()[:12]
        self.name = f"{plan['module']}_{digest}"
        self.param_keys = [p["key"] for p in plan["params"]]
        self.n_in, self.n_state, self.n_out = len(plan["inputs"]), len(plan["states"]), len(plan["outputs"])
        self.saved_keys = [k for k in plan["saved"] if plan["buffers"][k]["role"] != "input"]
        n_fwd = self.n_out + self.n_state + len(self.saved_keys)
        n_bwd = self.n_in + self.n_state + len(self.param_keys)
        fwd_schema = "(Tensor[] xs, Tensor[] states, Tensor[] params) -> (" + ", ".join(["Tensor"] * n_fwd) + ")"
        bwd_schema = ("(Tensor[] xs, Tensor[] params, Tensor[] saved, Tensor[] d_outputs, Tensor[] d_finals) -> ("
                      + ", ".join(["Tensor"] * n_bwd) + ")")
        self.fwd = torch.library.custom_op(f"cellspec::{self.name}_fwd", self._fwd_impl, mutates_args=(), schema=fwd_schema)
        self.bwd = torch.library.custom_op(f"cellspec::{self.name}_bwd", self._bwd_impl, mutates_args=(), schema=bwd_schema)
        self.fwd.register_fake(self._fwd_fake)
        self.bwd.register_fake(self._bwd_fake)
        self.fwd.register_autograd(self._backward, setup_context=self._setup_context)

    # ---------------------------------------------------------------- real implementations
    def _fwd_impl(self, xs, states, params):
        _check_tensors([*xs, *states, *params], f"{self.plan['cell']} (cuda backend)")
        runner = runner_for(self.source, xs[0])
        outs, finals, saved = runner.forward(tuple(xs), tuple(states), dict(zip(self.param_keys, params)))
        return (*[o.clone() for o in outs], *[f.clone() for f in finals], *[saved[k] for k in self.saved_keys])

    def _bwd_impl(self, xs, params, saved, d_outputs, d_finals):
        runner = runner_for(self.source, xs[0])
        grads, d_xs, d_states = runner.backward(
            tuple(xs), dict(zip(self.param_keys, params)), dict(zip(self.saved_keys, saved)), d_outputs, d_finals
        )
        return (*d_xs, *d_states, *[grads[k] for k in self.param_keys])

    # ---------------------------------------------------------------- shapes for tracing
    def _env(self, xs, params) -> dict[str, int]:
        env = {"T": xs[0].shape[0], "B": xs[0].shape[1], "1": 1}
        pk = dict(zip(self.param_keys, params))
        for s, src in self.plan["size_sources"].items():
            env[s] = xs[src[1]].shape[-1] if src[0] == "input" else pk[src[1]].shape[src[2]]
        return env

    def _dims(self, coefs, env):
        return [sum(int(n) * env[s] for s, n in c.items()) for c in coefs]

    def _fwd_fake(self, xs, states, params):
        env = self._env(xs, params)
        x = xs[0]
        outs = [x.new_empty(env["T"], env["B"], env[o["size"]]) for o in self.plan["outputs"]]
        finals = [x.new_empty(env["B"], env[s["size"]]) for s in self.plan["states"]]
        saved = [x.new_empty(self._dims(self.plan["buffers"][k]["shape"], env)) for k in self.saved_keys]
        return (*outs, *finals, *saved)

    def _bwd_fake(self, xs, params, saved, d_outputs, d_finals):
        env = self._env(xs, params)
        x = xs[0]
        return (*[torch.empty_like(a) for a in xs],
                *[x.new_empty(env["B"], env[s["size"]]) for s in self.plan["states"]],
                *[torch.empty_like(p) for p in params])

    # ---------------------------------------------------------------- autograd
    def _setup_context(self, ctx, inputs, output):
        xs, _states, params = inputs
        ctx.n_params = len(params)
        ctx.save_for_backward(*xs, *params, *output[self.n_out + self.n_state :])

    def _backward(self, ctx, *grads):
        t = ctx.saved_tensors
        xs, params, saved = list(t[: self.n_in]), list(t[self.n_in : self.n_in + ctx.n_params]), list(t[self.n_in + ctx.n_params :])
        env = self._env(xs, params)
        d_outputs = [
            g if g is not None else xs[0].new_zeros(env["T"], env["B"], env[o["size"]])
            for g, o in zip(grads[: self.n_out], self.plan["outputs"])
        ]
        d_finals = [
            g if g is not None else xs[0].new_zeros(env["B"], env[s["size"]])
            for g, s in zip(grads[self.n_out : self.n_out + self.n_state], self.plan["states"])
        ]
        res = self.bwd(xs, params, saved, [g.contiguous() for g in d_outputs], [g.contiguous() for g in d_finals])
        n1, n2 = self.n_in, self.n_in + self.n_state
        return list(res[:n1]), list(res[n1:n2]), list(res[n2:])

    # ---------------------------------------------------------------- entry point
    def __call__(self, xs, states, params: dict):
        plist = [params[k] for k in self.param_keys]
        dtype = xs[0].dtype
        res = self.fwd(list(xs), [s.to(dtype) for s in states], [p.to(dtype) for p in plist])
        return tuple(res[: self.n_out]), tuple(res[self.n_out : self.n_out + self.n_state])


_OPS: dict[str, CellOps] = {}


def ops_for(source: str) -> CellOps:
    """The custom ops of a generated .cu source (registered once per process and source)."""
    key = hashlib.sha256(source.encode()).hexdigest()
    if key not in _OPS:
        _OPS[key] = CellOps(source)
    return _OPS[key]


_BY_NAME: dict[str, CellOps] = {}


@torch.compiler.assume_constant_result
def op_name(module_file: str, cu_name: str) -> str:
    """Register the ops of the .cu file next to a generated module; return their name. Run at
    trace time by torch.compile (the file is read once, never traced)."""
    path = Path(module_file).with_name(cu_name)
    if not path.exists():
        raise CudaBackendError(f"{path} is missing: regenerate the package with `cellspec compile` (the cuda backend needs it)")
    ops = ops_for(path.read_text())
    _BY_NAME[ops.name] = ops
    return ops.name


def run_sequence(module_file: str, cu_name: str, xs, state, params):
    """Called by a generated module with backend='cuda': the .cu file next to it, the inputs
    (tuple of [T, B, size]), the state tuple and the params dict.
    Returns (tuple of outputs, tuple of final states)."""
    return _BY_NAME[op_name(module_file, cu_name)](xs, state, params)
