"""Run a whole sequence, forward and backward, with the kernels of a generated ``.cu`` file.

Input: the JSON plan embedded in the ``.cu`` file (see :mod:`cellspec.backends.cuda_backend`)
and a :class:`Kernels` provider — :class:`HostKernels` (the CPU build through ctypes, CPU
tensors) or :class:`CudaKernels` (the nvcc build, CUDA tensors, launches on the current torch
stream). Output: outputs, final states, the saved buffers, and gradients.

The algorithm mirrors the NumPy engine: the hoisted pointwise kernel and one GEMM over all T·B
rows before the loop; per step, for each stage, its stacked GEMM (``torch.matmul`` into a
preallocated buffer) then its fused pointwise kernel(s); the backward mirrored, with ``dW`` of
every projection accumulated by one GEMM over all T·B rows after the loop. Buffers are torch
tensors; every kernel argument is a pointer and a row stride computed from the plan.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from cellspec.backends.cuda_backend import PLAN_BEGIN, PLAN_END
from cellspec.runtime import native

HOST_DTYPES = {torch.float32: "f32", torch.float64: "f64"}
CUDA_DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}


def read_plan(source: str) -> dict:
    """The JSON plan between the CELLSPEC_PLAN markers of a generated .cu source."""
    try:
        start = source.index(PLAN_BEGIN) + len(PLAN_BEGIN)
        stop = source.index(PLAN_END, start)
    except ValueError:
        raise ValueError("not a cellspec-generated .cu file (no CELLSPEC_PLAN block)") from None
    return json.loads(source[start:stop])


def _dim(coef: dict, env: dict) -> int:
    return sum(int(n) * env[s] for s, n in coef.items())


class Kernels:
    """Calls the element kernels of one library for one dtype."""

    dtype: torch.dtype

    def __call__(self, fn: str, rows: int, cols: int, args: list[int]) -> None:
        raise NotImplementedError


class HostKernels(Kernels):
    """The CPU build: ``<fn>_f32`` / ``<fn>_f64``."""

    def __init__(self, source: str, name: str, dtype: torch.dtype):
        if dtype not in HOST_DTYPES:
            raise TypeError(f"the CPU build of the CUDA kernels runs float32 and float64, not {dtype}")
        self.dtype = dtype
        self.lib = native.load_library(str(native.build_host(source, name)))
        self.suffix = HOST_DTYPES[dtype]
        self._fns: dict[str, ctypes._CFuncPtr] = {}

    def function(self, fn: str, nargs: int):
        """The ctypes function of fn with its prototype set (once per name)."""
        f = self._fns.get(fn)
        if f is None:
            f = getattr(self.lib, f"{fn}_{self.suffix}")
            f.argtypes = [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_int64] * (nargs // 2)
            f.restype = None
            self._fns[fn] = f
        return f

    def __call__(self, fn: str, rows: int, cols: int, args: list[int]) -> None:
        self.function(fn, len(args))(rows, cols, *args)


class CudaKernels(Kernels):
    """The nvcc build: ``<fn>_cuda_<dtype>`` launchers on the current torch stream."""

    def __init__(self, lib: ctypes.CDLL, module: str, dtype: torch.dtype, device: torch.device):
        if dtype not in CUDA_DTYPES:
            raise TypeError(
                f"the CUDA kernels support float32, float64, float16 and bfloat16 tensors, not {dtype}"
            )
        self.dtype, self.device, self.lib, self.module = dtype, device, lib, module
        self.suffix = CUDA_DTYPES[dtype]
        self._fns: dict[str, ctypes._CFuncPtr] = {}
        err = getattr(lib, f"{module}_cuda_error_string")
        err.argtypes, err.restype = [ctypes.c_int], ctypes.c_char_p
        self._err = err

    def __call__(self, fn: str, rows: int, cols: int, args: list[int]) -> None:
        f = self._fns.get(fn)
        if f is None:
            f = getattr(self.lib, f"{fn}_cuda_{self.suffix}")
            f.argtypes = [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_int64] * (len(args) // 2) + [ctypes.c_void_p]
            f.restype = ctypes.c_int
            self._fns[fn] = f
        code = f(rows, cols, *args, torch.cuda.current_stream(self.device).cuda_stream)
        if code != 0:
            msg = self._err(code).decode()
            hint = ""
            if "driver" in msg.lower() or "no kernel image" in msg.lower() or "PTX" in msg:
                hint = (" — the kernels were built by an nvcc newer than the installed driver supports or "
                        "for another GPU architecture: install a driver at least as new as the CUDA "
                        "toolkit of nvcc, or point $NVCC at a toolkit matching torch.version.cuda")
            raise RuntimeError(f"CUDA kernel {fn} failed: {msg}{hint}")


@dataclass
class _Arg:
    buf: torch.Tensor
    base: int  # byte address of row 0, column start, time 0
    tstep: int  # bytes between time steps (0 for per-step or param buffers)
    ld: int


class SequenceRunner:
    """Forward and backward of a whole sequence for one plan and one kernel provider."""

    def __init__(self, plan: dict, kernels: Kernels):
        self.plan = plan
        self.k = kernels
        self.dtype = kernels.dtype
        self._layouts: dict = {}  # (name, sizes) -> where the name lives, in elements

    # -------------------------------------------------------------- sizes and buffers
    def sizes(self, xs, params) -> dict[str, int]:
        out = {}
        for s, src in self.plan["size_sources"].items():
            if src[0] == "input":
                out[s] = int(xs[src[1]].shape[-1])
            elif src[0] == "param":
                out[s] = int(params[src[1]].shape[src[2]])
        return out

    def shape(self, buf: str, env: dict) -> list[int]:
        return [_dim(c, env) for c in self.plan["buffers"][buf]["shape"]]

    def timed(self, buf: str) -> bool:
        shape = self.plan["buffers"][buf]["shape"]
        return len(shape) == 3 and "T" in shape[0]

    def arg(self, bufs: dict, name: str, env: dict) -> _Arg:
        h = self.plan["home"][name]
        t = bufs[h["buf"]]
        es = t.element_size()
        col = _dim(h["col"], env)
        if t.dim() == 1:  # a vector param: one row, broadcast
            return _Arg(t, t.data_ptr(), 0, 0)
        if self.timed(h["buf"]):
            return _Arg(t, t.data_ptr() + ((h["t"] or 0) * t.stride(0) + col) * es, t.stride(0) * es, t.stride(1))
        return _Arg(t, t.data_ptr() + col * es, 0, t.stride(0))

    def layout(self, name: str, env: dict) -> tuple[str, int, int, int]:
        """(buffer, element offset of row 0 at time 0, elements per time step, ld) of a name in
        contiguous buffers of the plan's shapes; computed once per name and sizes."""
        key = (name, tuple(sorted(env.items())))
        lay = self._layouts.get(key)
        if lay is None:
            h = self.plan["home"][name]
            shape = self.shape(h["buf"], env)
            col = _dim(h["col"], env)
            if len(shape) == 1:  # a vector param: one row, broadcast
                lay = (h["buf"], 0, 0, 0)
            elif self.timed(h["buf"]):
                step = shape[1] * shape[2]
                lay = (h["buf"], (h["t"] or 0) * step + col, step, shape[2])
            else:
                lay = (h["buf"], col, 0, shape[-1])
            self._layouts[key] = lay
        return lay

    def rows(self, bufs: dict, name: str, env: dict) -> tuple:
        """The T per-step [B, size] views of a name (the same view T times if it is not timed)."""
        h = self.plan["home"][name]
        buf = bufs[h["buf"]]
        col = _dim(h["col"], env)
        n = env[self.size_of(name)]
        if self.timed(h["buf"]):
            off = h["t"] or 0
            return buf[off : off + env["T"], :, col : col + n].unbind(0)
        return (buf[:, col : col + n],) * env["T"]

    def view(self, bufs: dict, name: str, env: dict, t: int | None) -> torch.Tensor:
        """[rows, size] view of a name at step t (None: all T*B rows)."""
        h = self.plan["home"][name]
        buf = bufs[h["buf"]]
        col = _dim(h["col"], env)
        n = env[self.size_of(name)]
        if self.timed(h["buf"]):
            off = h["t"] or 0
            if t is None:
                return buf[off : off + env["T"]].flatten(0, 1)[:, col : col + n]
            return buf[t + off, :, col : col + n]
        return buf[:, col : col + n]

    def size_of(self, name: str) -> str:
        return self.plan["home"][name]["size"]

    def launch(self, call: dict, bufs: dict, env: dict, t: int | None, cache: dict) -> None:
        key = id(call)
        entry = cache.get(key)
        if entry is None:
            # once per call of forward/backward: the pointer/ld pairs at t = 0 and how each
            # advances per step (ld entries do not), so a step is one list comprehension
            es = bufs[next(iter(bufs))].element_size()
            base, step = [], []
            for a in call["args"]:
                buf, off, tstep, ld = self.layout(a["name"], env)
                base += (bufs[buf].data_ptr() + off * es, ld)
                step += (tstep * es, 0)
            rows = env["B"] if t is not None else env["T"] * env["B"]
            fn = self.k.function(call["fn"], len(base)) if hasattr(self.k, "function") else None
            entry = cache[key] = (fn, rows, env[call["size"]], base, list(zip(base, step)), any(step))
        fn, rows, cols, base, pairs, moves = entry
        flat = [b + t * s for b, s in pairs] if (t and moves) else base
        if fn is not None:
            fn(rows, cols, *flat)
        else:
            self.k(call["fn"], rows, cols, flat)

    # -------------------------------------------------------------- forward
    def forward(self, xs, states, params) -> tuple[tuple, tuple, dict]:
        """xs: tuple of [T, B, size]; states: tuple of [B, size]; params: dict name -> tensor.
        Returns (outputs, final states, saved buffers)."""
        p = self.plan
        dt = self.dtype
        dev = xs[0].device
        T, B = int(xs[0].shape[0]), int(xs[0].shape[1])
        params = {k: v.to(dt).contiguous() for k, v in params.items()}
        env = {"T": T, "B": B, "1": 1, **self.sizes(xs, params)}
        bufs: dict[str, torch.Tensor] = {}
        for name, b in p["buffers"].items():
            role = b["role"]
            if role in ("input", "param") or role.startswith("d") or role in ("step_seed", "hoisted_leaf", "hoisted_tmp"):
                continue
            bufs[name] = torch.empty(self.shape(name, env), dtype=dt, device=dev)
        for v, x in zip(p["inputs"], xs):
            bufs[f"x_{v['name']}"] = x.to(dt).contiguous()
        for v in p["params"]:
            if not v["matrix"]:
                bufs[f"p_{v['name']}"] = params[v["key"]]
        for v, s in zip(p["states"], states):
            bufs[f"s_{v['name']}"][0].copy_(s)
        names = {v["name"]: v["key"] for v in p["params"]}
        cache: dict = {}
        for call in p["forward"]["hoisted"]:
            self.launch(call, bufs, env, None, cache)
        for g in p["forward"]["hoisted_gemms"]:
            w = torch.cat([params[names[m]] for m in g["matrices"]]).T
            out = bufs[g["out_buf"]].view(T * B, -1)
            torch.matmul(self.view(bufs, g["operand"], env, None), w, out=out)
        wt = {g["key"]: torch.cat([params[names[m]] for m in g["matrices"]]).T.contiguous()
              for st in p["forward"]["stages"] for g in st["gemms"]}
        # per stage: (operand rows, weight, output rows) of each GEMM, split into T rows once
        stages = []
        for st in p["forward"]["stages"]:
            gemms = []
            for g in st["gemms"]:
                out = bufs[g["out_buf"]]
                outs = out.unbind(0) if self.timed(g["out_buf"]) else (out,) * T
                ops = self.rows(bufs, g["operand"], env)
                gemms.append((ops, wt[g["key"]], outs))
            stages.append((gemms, st["kernels"]))
        for t in range(T):
            for gemms, kernels in stages:
                for ops, w, outs in gemms:
                    torch.mm(ops[t], w, out=outs[t])
                for call in kernels:
                    self.launch(call, bufs, env, t, cache)
        outputs = tuple(self.view(bufs, o["name"], env, None).reshape(T, B, -1) for o in p["outputs"])
        finals = tuple(bufs[f"s_{v['name']}"][T] for v in p["states"])
        saved = {k: bufs[k] for k in p["saved"] if k in bufs}
        return outputs, finals, saved

    # -------------------------------------------------------------- backward
    def backward(self, xs, params, saved: dict, d_outputs, d_finals) -> tuple[dict, tuple, tuple]:
        """Gradients: (d_params dict, d_xs tuple, d_states tuple). None adjoints mean zeros."""
        p = self.plan
        dt = self.dtype
        dev = xs[0].device
        T, B = int(xs[0].shape[0]), int(xs[0].shape[1])
        params = {k: v.to(dt).contiguous() for k, v in params.items()}
        env = {"T": T, "B": B, "1": 1, **self.sizes(xs, params)}
        bufs: dict[str, torch.Tensor] = {k: v.contiguous() for k, v in saved.items()}  # layout() assumes it
        for v, x in zip(p["inputs"], xs):
            bufs[f"x_{v['name']}"] = x.to(dt).contiguous()
        for v in p["params"]:
            if not v["matrix"]:
                bufs[f"p_{v['name']}"] = params[v["key"]]
        for name, b in p["buffers"].items():
            if name in bufs:
                continue
            role = b["role"]
            make = torch.empty if role in ("step",) else torch.zeros
            bufs[name] = make(self.shape(name, env), dtype=dt, device=dev)
        for o, d in zip(p["outputs"], d_outputs):
            if d is not None:
                bufs[f"dout_{o['name']}"].copy_(d.reshape(T, B, -1))
        for v, d in zip(p["states"], d_finals):
            if d is not None:
                bufs[f"ds_{v['name']}"].copy_(d)
        names = {v["name"]: v["key"] for v in p["params"]}
        wb = {gg["d_buf"]: torch.cat([params[names[m]] for m in gg["matrices"]])
              for st in p["backward"]["stages"] for gg in st["gemms"]}
        cache: dict = {}
        stages = []
        for st in p["backward"]["stages"]:
            gemms = [(bufs[g["d_buf"]].unbind(0), wb[g["d_buf"]],
                      self.rows(bufs, g["d_operand"], env))
                     for g in st["gemms"] if g["used"]]
            stages.append((st["kernels"], gemms))
        zero = [bufs[f"ds_{v['name']}"] for v in p["states"] if v["adjoint_zero"]]
        for t in reversed(range(T)):
            for kernels, gemms in stages:
                for call in kernels:
                    self.launch(call, bufs, env, t, cache)
                for ds, w, outs in gemms:
                    torch.mm(ds[t], w, out=outs[t])
            for call in p["backward"]["leaf"]:
                self.launch(call, bufs, env, t, cache)
            for z in zero:
                z.zero_()
        grads = {v["key"]: torch.zeros([env[s] for s in v["shape"]], dtype=dt, device=dev) for v in p["params"]}
        for g in p["dw"]:
            dw = bufs[g["d_buf"]].view(T * B, -1).T @ self.view(bufs, g["operand"], env, None)
            for s in g["slices"]:
                a = _dim(s["start"], env)
                grads[s["key"]] += dw[a : a + env[s["size"]]]
        d_x = {v["name"]: torch.zeros(T, B, env[v["size"]], dtype=dt, device=dev) for v in p["inputs"]}
        for g in p["hoisted_dw"]:
            dg = bufs[g["d_buf"]].view(T * B, -1)
            dw = dg.T @ self.view(bufs, g["operand"], env, None)
            for s in g["slices"]:
                a = _dim(s["start"], env)
                grads[s["key"]] += dw[a : a + env[s["size"]]]
            w = torch.cat([params[names[s["matrix"]]] for s in g["slices"]])
            d_op = self.view(bufs, g["d_operand"], env, None)
            torch.matmul(dg, w, out=d_op) if d_op.is_contiguous() else d_op.copy_(dg @ w)
            if g["operand_is_input"]:
                d_x[g["operand"]] += d_op.view(T, B, -1)
        for call in p["backward"]["hoisted"]:
            self.launch(call, bufs, env, None, cache)
        for v in p["inputs"]:
            for b in p["input_grads"][v["name"]]:
                d_x[v["name"]] += bufs[b]
        for v in p["params"]:
            for src in p["param_grads"].get(v["name"], []):
                buf = bufs[src["buf"]]
                col = _dim(src["col"], env)
                n = grads[v["key"]].shape[0]
                grads[v["key"]] += buf.reshape(-1, buf.shape[-1])[:, col : col + n].sum(0)
        d_states = tuple(bufs[f"ds_{v['name']}"] for v in p["states"])
        return grads, tuple(d_x[v["name"]] for v in p["inputs"]), d_states


def host_runner(source: str, dtype: torch.dtype = torch.float64) -> SequenceRunner:
    """A runner over the CPU build of a generated .cu source."""
    plan = read_plan(source)
    return SequenceRunner(plan, HostKernels(source, plan["module"], dtype))


def read_source(path: str | Path) -> str:
    return Path(path).read_text()
