"""CPU benchmark of the generated PyTorch sequence layers (issue #4).

For every spec in ``specs/`` and every shape (T, B, H) (input size I = H; a projection size P =
H // 2), float32, this times, in one process and interleaved (one run of every variant per
round, several rounds, the median reported):

* ``generated``  the generated sequence layer (``backend="generated"``: the ``_Sequence``
  autograd.Function with the derived backward);
* ``native``     ``torch.nn.LSTM`` / ``GRU`` / ``RNN`` / ``LSTM(proj_size=P)`` where one computes
  the same cell (lstm, torch_gru, elman, lstmp);
* ``eager``      a Python loop over the generated ``step`` function in plain torch ops, as a user
  would write it, differentiated by autograd;
* ``compiled``   the same loop with ``torch.compile(step)`` (compile time excluded: the first
  calls are warm-up; fwd+bwd only);
* ``numpy``      the generated NumPy engine (``forward_sequence`` / ``backward_sequence``, whose
  backward reruns the forward, as the NumPy API does);
* ``cuda-host``  the ``.cu`` file built for the CPU with g++: the native library's whole-sequence
  functions (fused kernels and the C++ host loop with MKL's sgemm_) called directly, no autograd
  around them;
* ``auto``       the layer with ``backend="auto"``, the default: on the CPU the native library
  through autograd (``_NativeSequence``) where it builds;
  omitted where it resolves to ``generated``;
* ``gemm floor`` only the GEMMs of the schedule (hoisted, per-step, d_operand, dW), each into a
  preallocated output: the time no engine with these GEMMs can beat.

``fwd`` is the forward under ``torch.no_grad()``; ``fwd+bwd`` is a training step: forward with
``x`` and the params requiring grad, then ``torch.autograd.backward`` with a fixed output
gradient (both ``dx`` and every ``dW`` are computed, for every variant).

Memory, two measures:

* ``saved``: bytes autograd holds between forward and backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (every tensor saved for backward, each storage
  once, params and the input excluded). The same hook sees ``save_for_backward`` of the
  generated Function, the per-op saves of the eager loop and the workspace of torch.nn.LSTM.
* ``peak RSS``: in a fresh subprocess per measurement, the kernel's resident high-water mark
  (``VmHWM``, reset through ``/proc/self/clear_refs`` just before the run) after one fwd+bwd
  minus the resident size before it (module, input and output gradient already built): the
  peak extra resident memory of one training step (``ru_maxrss`` where /proc cannot reset). Only at the first shape (``--rss``, on by default for
  full runs): a subprocess costs an interpreter and a torch import.

Usage::

    python benchmarks/cpu_bench.py              # full run, writes benchmarks/results/cpu_bench.{md,json}
    python benchmarks/cpu_bench.py --quick      # lstm, torch_gru, elman at two shapes, fewer rounds
    python benchmarks/cpu_bench.py --specs lstm --shapes 64x32x256 --repeats 9
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _threads_from_argv(argv: list[str]) -> str | None:
    """--threads N, read before numpy and torch are imported: OpenBLAS (NumPy), OpenMP (the
    g++ -fopenmp kernels) and torch all size their thread pools at import."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return os.environ.get("CELLSPEC_BENCH_THREADS")


_THREADS = _threads_from_argv(sys.argv)
if _THREADS and _THREADS != "0":
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "CELLSPEC_BENCH_THREADS"):
        os.environ[_var] = _THREADS

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellspec.driver import compile_file
from cellspec.runtime.loader import load_package

SHAPES = [(64, 32, 256), (256, 64, 512), (16, 1, 128)]
QUICK_SPECS = ["lstm", "torch_gru", "elman"]
QUICK_SHAPES = [(64, 32, 256), (16, 1, 128)]
NATIVE = {"lstm": "LSTM", "torch_gru": "GRU", "elman": "RNN", "lstmp": "LSTM"}


# --------------------------------------------------------------------------- set-up

_PACKAGES: dict[str, tuple[object, object, float]] = {}


def load(spec: str):
    """(package, compiled cell, compile seconds) of specs/<spec>.cell, compiled in memory."""
    if spec not in _PACKAGES:
        path = ROOT / "specs" / f"{spec}.cell"
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            t0 = time.perf_counter()
            try:
                cells = compile_file(path.relative_to(ROOT))
            except Exception:  # noqa: BLE001 - the CUDA back end may be mid-work: time the others
                cells = compile_file(path.relative_to(ROOT), ("numpy", "torch"))
            seconds = time.perf_counter() - t0
        finally:
            os.chdir(cwd)
        cc = cells[0]
        # the .cu file too: backend="auto" finds it next to torch_cell.py (the fused CPU kernel)
        files = dict(cc.files)
        _PACKAGES[spec] = (load_package(cc.module_name, files), cc, seconds)
    return _PACKAGES[spec]


def sizes_for(tc, H: int) -> dict[str, int]:
    """Size symbol -> value: I = H, H, any other size H // 2."""
    return {s: (H if s in ("I", "H") else max(H // 2, 1)) for s in tc.SIZES}


class Case:
    """Modules, inputs and output gradients of one spec at one shape."""

    def __init__(self, spec: str, T: int, B: int, H: int, seed: int = 0):
        pkg, cc, _ = load(spec)
        self.spec, self.T, self.B, self.H = spec, T, B, H
        self.tc = tc = pkg.torch_cell
        self.np_cell = pkg.numpy_cell
        self.cc = cc
        self.sz = sz = sizes_for(tc, H)
        torch.manual_seed(seed)
        extra = {a: sz[s] for s, a in tc.SIZES.items() if s not in ("I", "H")}
        cls = getattr(tc, tc.CELL)
        self.module = cls(sz["I"], sz["H"], backend="generated", **extra)
        self.params = dict(self.module.named_parameters())
        self.x = torch.randn(T, B, sz["I"], requires_grad=True)
        self.state0 = tuple(torch.zeros(B, sz[s]) for _, s in tc.STATES)
        with torch.no_grad():  # output sizes from a one-step run (no full-size allocation)
            out, _ = self.module(self.x[:1])
        outs = out if isinstance(out, tuple) else (out,)
        self.d_out = tuple(torch.randn(T, *o.shape[1:]) for o in outs)
        self.native = None
        if spec in NATIVE:
            kw = {"proj_size": sz["P"]} if spec == "lstmp" else {}
            if spec == "elman":
                kw["nonlinearity"] = "tanh"
            self.native = getattr(torch.nn, NATIVE[spec])(sz["I"], sz["H"], **kw)
        self.compiled_step = None
        self.compile_error = ""
        self.auto = None

    def prepare_auto(self) -> str:
        """The same layer with backend="auto", the default (same parameter values); returns
        the backend it resolves to here ("fused" where the fused CPU kernel builds)."""
        tc, sz = self.tc, self.sz
        extra = {a: sz[s] for s, a in tc.SIZES.items() if s not in ("I", "H")}
        self.auto = getattr(tc, tc.CELL)(sz["I"], sz["H"], backend="auto", **extra)
        self.auto.load_state_dict(self.module.state_dict())
        self.auto_fb()
        return self.auto._resolve_backend((self.x,), self.state0)

    def auto_fwd(self):
        with torch.no_grad():
            self.auto(self.x)

    def auto_fb(self):
        self._clear(self.auto.parameters())
        out, _ = self.auto(self.x)
        torch.autograd.backward(out if isinstance(out, tuple) else (out,), self.d_out)

    # ---- the variants: each a function of no arguments --------------------------------------

    def _clear(self, params):
        for p in params:
            p.grad = None
        self.x.grad = None

    def generated_fwd(self):
        with torch.no_grad():
            self.module(self.x)

    def generated_fb(self):
        self._clear(self.params.values())
        out, _ = self.module(self.x)
        torch.autograd.backward(out if isinstance(out, tuple) else (out,), self.d_out)

    def native_fwd(self):
        with torch.no_grad():
            self.native(self.x)

    def native_fb(self):
        self._clear(self.native.parameters())
        out, _ = self.native(self.x)
        torch.autograd.backward((out,), self.d_out)

    def _loop(self, step):
        state = self.state0[0] if len(self.state0) == 1 else self.state0
        outs = []
        for t in range(self.T):
            o, state = step(self.params, self.x[t], state)
            outs.append(o if isinstance(o, tuple) else (o,))
        return tuple(torch.stack(o) for o in zip(*outs)), state

    def eager_fwd(self):
        with torch.no_grad():
            self._loop(self.tc.step)

    def eager_fb(self):
        self._clear(self.params.values())
        outs, _ = self._loop(self.tc.step)
        torch.autograd.backward(outs, self.d_out)

    def compiled_fb(self):
        self._clear(self.params.values())
        outs, _ = self._loop(self.compiled_step)
        torch.autograd.backward(outs, self.d_out)

    def prepare_compiled(self) -> float:
        """torch.compile the step and warm it up; the seconds it took (or raise)."""
        t0 = time.perf_counter()
        self.compiled_step = torch.compile(self.tc.step)
        for _ in range(2):
            self.compiled_fb()
        return time.perf_counter() - t0

    def prepare_numpy(self):
        self.np_params = {k: v.detach().numpy().copy() for k, v in self.params.items()}
        self.np_x = self.x.detach().numpy().copy()
        self.np_d = self.d_out[0].numpy().copy() if len(self.d_out) == 1 else tuple(d.numpy().copy() for d in self.d_out)

    def numpy_fwd(self):
        self.np_cell.forward_sequence(self.np_params, self.np_x, None)

    def numpy_fb(self):
        self.np_cell.backward_sequence(self.np_params, self.np_x, None, self.np_d, None)

    def prepare_host(self) -> None:
        """The .cu file built for the CPU: the native library's whole-sequence functions called
        directly (no autograd around them; cellspec.runtime.kernels). Raises where it cannot be
        built."""
        tc = self.tc
        self.host_params = {k: v.detach() for k, v in self.params.items()}
        self.host_x = (self.x.detach(),)
        self.lib = tc._native_library(self.host_x[0], self.state0, self.host_params, required="fused")
        self.host_fb()

    def host_fwd(self):
        self.tc._native_inference(self.lib, self.host_x, self.state0, self.host_params)

    def host_fb(self):
        _, _, saved = self.tc._native_forward(self.lib, self.host_x, self.state0, self.host_params)
        self.tc._native_backward(self.lib, self.host_x, self.host_params, saved, list(self.d_out),
                                 [None] * len(self.state0))

    # ---- the GEMM floor ----------------------------------------------------------------------

    def prepare_floor(self):
        """Preallocated operands of every GEMM of the schedule, forward and backward."""
        s, T, B = self.cc.schedule, self.T, self.B
        n = lambda sym: self.sz[sym]
        self.floor_fwd_ops, self.floor_bwd_ops = [], []

        def mm(rows, inner, cols, count, into):
            a, b = torch.randn(rows, inner), torch.randn(inner, cols)
            into.append((a, b, torch.empty(rows, cols), count))

        for g in s.hoisted_gemms:
            width, k = sum(n(p.out_size) for p in g.projections), n(g.projections[0].in_size)
            mm(T * B, k, width, 1, self.floor_fwd_ops)  # forward
            mm(width, T * B, k, 1, self.floor_bwd_ops)  # dW
            mm(T * B, width, k, 1, self.floor_bwd_ops)  # d operand
        for g in s.step_gemms:
            width, k = sum(n(p.out_size) for p in g.projections), n(g.projections[0].in_size)
            mm(B, k, width, T, self.floor_fwd_ops)  # forward, per step
            mm(B, width, k, T, self.floor_bwd_ops)  # d operand, per step
            mm(width, T * B, k, 1, self.floor_bwd_ops)  # dW, after the loop

    @staticmethod
    def _run_ops(ops):
        for a, b, c, count in ops:
            for _ in range(count):
                torch.mm(a, b, out=c)

    def floor_fwd(self):
        self._run_ops(self.floor_fwd_ops)

    def floor_fb(self):
        self._run_ops(self.floor_fwd_ops)
        self._run_ops(self.floor_bwd_ops)

    def gemm_flops(self) -> float:
        return sum(2.0 * a.shape[0] * a.shape[1] * b.shape[1] * c for a, b, _, c in self.floor_fwd_ops + self.floor_bwd_ops)

    # ---- memory --------------------------------------------------------------------------------

    def saved_bytes(self, variant: str) -> int:
        """Bytes of the tensors autograd saves for the backward of one forward (params and x
        excluded), each storage once."""
        exclude = {p.untyped_storage().data_ptr() for p in self.params.values()}
        if self.native is not None:
            exclude |= {p.untyped_storage().data_ptr() for p in self.native.parameters()}
        exclude.add(self.x.untyped_storage().data_ptr())
        seen: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in exclude:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if variant == "generated":
                out, _ = self.module(self.x)
            elif variant == "native":
                out, _ = self.native(self.x)
            elif variant == "eager":
                out, _ = self._loop(self.tc.step)
            else:
                raise ValueError(variant)
        del out
        return sum(seen.values())


def generated_saved_per_step(case: Case) -> dict:
    """What the generated forward keeps for its backward, from the generated module itself."""
    tc = case.tc
    _, _, saved = tc._forward({k: v.detach() for k, v in case.params.items()}, case.x.detach(),
                              case.state0[0] if len(case.state0) == 1 else case.state0)
    return {
        "saved_per_step": list(tc.SAVED),
        "schedule_saved": list(case.cc.backward.saved),
        "sequences": {k: list(v.shape) for k, v in saved.items()},
        "bytes": int(sum(v.numel() * v.element_size() for v in saved.values())),
    }


# --------------------------------------------------------------------------- timing

def time_round_robin(fns: dict[str, callable], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds of each function, runs interleaved so that load changes hit all alike
    (the minimum is kept too, under ``_min`` keys of the JSON)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    out = {k: statistics.median(v) for k, v in times.items()}
    out.update({f"{k}_min": min(v) for k, v in times.items()})
    return out


def rss_child(spec: str, variant: str, T: int, B: int, H: int) -> None:
    case = Case(spec, T, B, H)
    fn = getattr(case, f"{variant}_fb")
    if variant == "numpy":
        case.prepare_numpy()
    # Reset the kernel's high-water mark (VmHWM) so that set-up (imports, compiling the spec)
    # does not hide the run; where /proc cannot do that, fall back to ru_maxrss.
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_status_kib("VmRSS")
        fn()
        after = _proc_status_kib("VmHWM")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rss_kib": after - before}))


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def peak_rss(spec: str, variant: str, shape: tuple[int, int, int]) -> float | None:
    """MiB: peak extra RSS of one fwd+bwd, in a fresh process."""
    cmd = [sys.executable, __file__, "--rss-child", spec, variant, *map(str, shape)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ), check=False)
        return json.loads(out.stdout.strip().splitlines()[-1])["rss_kib"] / 1024.0
    except Exception:  # noqa: BLE001 - a failed measurement is reported as missing
        return None


# --------------------------------------------------------------------------- the run

def bench_case(spec: str, shape, repeats: int, warmup: int, do_compile: bool, do_numpy: bool, do_host: bool, log,
               do_fwd: bool = True) -> dict:
    T, B, H = shape
    case = Case(spec, T, B, H)
    case.prepare_floor()
    rec: dict = {"spec": spec, "T": T, "B": B, "H": H, "sizes": case.sz, "gemm_gflop": case.gemm_flops() / 1e9}
    fwd = {"generated": case.generated_fwd, "eager": case.eager_fwd, "floor": case.floor_fwd}
    fb = {"generated": case.generated_fb, "eager": case.eager_fb, "floor": case.floor_fb}
    if case.native is not None:
        fwd["native"] = case.native_fwd
        fb["native"] = case.native_fb
    if do_numpy:
        case.prepare_numpy()
        fwd["numpy"] = case.numpy_fwd
        fb["numpy"] = case.numpy_fb
    rec["auto_backend"] = case.prepare_auto()
    if rec["auto_backend"] != "generated":
        fwd["auto"] = case.auto_fwd
        fb["auto"] = case.auto_fb
    if do_host:
        try:
            case.prepare_host()
            fwd["cuda-host"] = case.host_fwd
            fb["cuda-host"] = case.host_fb
        except Exception as e:  # noqa: BLE001 - no compiler, no .cu file, ...: say so in the table
            rec["host_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if do_compile:
        try:
            rec["compile_s"] = case.prepare_compiled()
            fb["compiled"] = case.compiled_fb
        except Exception as e:  # noqa: BLE001 - torch.compile may be unavailable (no C compiler, ...)
            rec["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    rec["fwd_s"] = time_round_robin(fwd, repeats, warmup) if do_fwd else {}
    rec["fwd_bwd_s"] = time_round_robin(fb, repeats, warmup)
    rec["repeats"] = repeats
    rec["saved_bytes"] = {v: case.saved_bytes(v) for v in ["generated", "eager"] + (["native"] if case.native else [])}
    rec["generated_saved"] = generated_saved_per_step(case)
    log(f"  {spec:14s} T={T} B={B} H={H}  " + "  ".join(f"{k}={v * 1e3:.2f}ms" for k, v in rec["fwd_bwd_s"].items() if not k.endswith("_min")))
    return rec


def machine_info() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "load_avg_start": os.getloadavg(),
    }


def _ms(v):
    return "-" if v is None else f"{v * 1e3:.2f}"


def _mib(v):
    return "-" if v is None else f"{v / 2**20:.2f}"


def _ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:.2f}"


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# cellspec CPU benchmark",
        "",
        f"`{result['command']}`",
        "",
        (
            f"{m['date_utc']}; {m['cpu']}; {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
            f"numpy {m['numpy']}, Python {m['python']}; load average at start "
            f"{', '.join(f'{x:.1f}' for x in m['load_avg_start'])}, at end "
            f"{', '.join(f'{x:.1f}' for x in m['load_avg_end'])} (the machine is shared: numbers are noisy)."
        ),
        "",
        (
            "float32, median of interleaved rounds. **fwd** under `torch.no_grad()`; **fwd+bwd** = forward + "
            "backward with dx and every dW. Times in ms. Ratios: generated time / other time (< 1: generated "
            "faster), except eager/gen, numpy/gen and host/gen (> 1: generated faster). *floor* = the "
            "schedule's GEMMs alone. *saved* = MiB autograd keeps between forward and backward."
        ),
        "",
        "## fwd+bwd",
        "",
        "| spec | T,B,H | generated | floor | gen/floor | native | gen/native | eager | eager/gen | compiled | gen/compiled | numpy | numpy/gen | cuda-host | host/gen | auto | auto/gen | eager/auto | auto/native | saved gen | saved native | saved eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["cases"]:
        f = r["fwd_bwd_s"]
        g = f["generated"]
        comp = f.get("compiled")
        comp_s = _ms(comp) if comp is not None else ("failed" if "compile_error" in r else "-")
        sb = r["saved_bytes"]
        lines.append(
            f"| {r['spec']} | {r['T']},{r['B']},{r['H']} | {_ms(g)} | {_ms(f['floor'])} | {_ratio(g, f['floor'])} | "
            f"{_ms(f.get('native'))} | {_ratio(g, f.get('native'))} | {_ms(f['eager'])} | {_ratio(f['eager'], g)} | "
            f"{comp_s} | {_ratio(g, comp)} | {_ms(f.get('numpy'))} | {_ratio(f.get('numpy'), g)} | "
            f"{_ms(f.get('cuda-host'))} | {_ratio(f.get('cuda-host'), g)} | "
            f"{_ms(f.get('auto'))} | {_ratio(f.get('auto'), g)} | {_ratio(f['eager'], f.get('auto'))} | "
            f"{_ratio(f.get('auto'), f.get('native'))} | "
            f"{_mib(sb['generated'])} | {_mib(sb.get('native'))} | {_mib(sb['eager'])} |"
        )
    lines += [
        "",
        "## fwd (no_grad)",
        "",
        "| spec | T,B,H | generated | floor | gen/floor | native | gen/native | eager | eager/gen | numpy | numpy/gen | cuda-host | host/gen | auto | auto/gen |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["cases"]:
        f = r["fwd_s"]
        if not f:
            continue
        g = f["generated"]
        lines.append(
            f"| {r['spec']} | {r['T']},{r['B']},{r['H']} | {_ms(g)} | {_ms(f['floor'])} | {_ratio(g, f['floor'])} | "
            f"{_ms(f.get('native'))} | {_ratio(g, f.get('native'))} | {_ms(f['eager'])} | {_ratio(f['eager'], g)} | "
            f"{_ms(f.get('numpy'))} | {_ratio(f.get('numpy'), g)} | {_ms(f.get('cuda-host'))} | {_ratio(f.get('cuda-host'), g)} | "
            f"{_ms(f.get('auto'))} | {_ratio(f.get('auto'), g)} |"
        )
    errors = {r["spec"]: r["compile_error"] for r in result["cases"] if "compile_error" in r}
    if errors:
        lines += ["", "torch.compile failed on this machine:", ""]
        lines += [f"- {k}: `{v}`" for k, v in sorted(errors.items())]
    if result.get("rss"):
        lines += ["", f"## Peak extra RSS of one fwd+bwd (MiB, fresh process each, {result['rss_shape']})", "",
                  "| spec | generated | native | eager |", "|---|---|---|---|"]
        for spec, d in result["rss"].items():
            lines.append(f"| {spec} | " + " | ".join("-" if d.get(k) is None else f"{d[k]:.1f}" for k in ("generated", "native", "eager")) + " |")
    lines += ["", "## Saved for the backward, per step (generated)", "",
              "| spec | saved per step (forward values) | schedule's Backward.saved | saved MiB at first shape |", "|---|---|---|---|"]
    done = set()
    for r in result["cases"]:
        if r["spec"] in done:
            continue
        done.add(r["spec"])
        gs = r["generated_saved"]
        lines.append(f"| {r['spec']} | {', '.join(gs['saved_per_step']) or '-'} | {', '.join(gs['schedule_saved']) or '-'} | {gs['bytes'] / 2**20:.2f} |")
    lines += ["", "## `cellspec compile` time per spec (in process, all back ends)", "", "| spec | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result["compile_s"].items()]
    lines.append("")
    return "\n".join(lines)


def parse_shape(s: str) -> tuple[int, int, int]:
    T, B, H = (int(a) for a in s.lower().split("x"))
    return T, B, H


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="lstm, torch_gru, elman at two shapes, 5 rounds, no RSS")
    ap.add_argument("--specs", nargs="*", help="spec names (default: every spec in specs/)")
    ap.add_argument("--shapes", nargs="*", type=parse_shape, help="TxBxH (default: 64x32x256 256x64x512 16x1x128)")
    ap.add_argument("--repeats", type=int, default=7,
                    help="rounds per case; the big shape uses a fifth, no warm-up round, fwd+bwd only; the small one 3x")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--no-numpy", action="store_true", help="skip the NumPy engine")
    ap.add_argument("--no-host", action="store_true", help="skip the CPU build of the CUDA kernels")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the .md and .json")
    ap.add_argument("--name", default=None, help="file stem (default cpu_bench or cpu_bench_quick)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the .md next to a results .json")
    ap.add_argument("--rss-only", metavar="JSON", help="only redo the peak-RSS measurements of a results .json")
    ap.add_argument("--rss-child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["CELLSPEC_BENCH_THREADS"] = str(args.threads)  # for the RSS subprocesses
    elif os.environ.get("CELLSPEC_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["CELLSPEC_BENCH_THREADS"]))
    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(to_markdown(json.loads(path.read_text())))
        return 0
    if args.rss_only:
        path = Path(args.rss_only)
        result = json.loads(path.read_text())
        shape = tuple(result["cases"][0][k] for k in ("T", "B", "H"))
        result["rss_shape"] = "T,B,H = {},{},{}".format(*shape)
        specs = list(dict.fromkeys(c["spec"] for c in result["cases"]))
        result["rss"] = {s: {v: peak_rss(s, v, shape) for v in ["generated", "eager"] + (["native"] if s in NATIVE else [])}
                         for s in specs}
        path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        path.with_suffix(".md").write_text(to_markdown(result))
        return 0
    if args.rss_child:
        spec, variant, T, B, H = args.rss_child
        rss_child(spec, variant, int(T), int(B), int(H))
        return 0

    specs = args.specs or (QUICK_SPECS if args.quick else sorted(p.stem for p in (ROOT / "specs").glob("*.cell")))
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    repeats = 5 if args.quick and args.repeats == 7 else args.repeats
    log = lambda s: print(s, flush=True)
    t_start = time.perf_counter()
    result = {"command": "python benchmarks/cpu_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine_info(), "cases": [], "compile_s": {}}
    for spec in specs:
        result["compile_s"][spec] = load(spec)[2]
    for shape in shapes:
        big = shape[0] * shape[1] * shape[2] ** 2 > 64 * 32 * 256**2
        small = shape[0] * shape[1] * shape[2] ** 2 < 64 * 32 * 256**2 // 16
        reps = max(1, repeats // 5) if big else (3 * repeats if small else repeats)
        log(f"shape T,B,H = {shape}, {reps} rounds")
        for spec in specs:
            result["cases"].append(
                bench_case(spec, shape, reps, 0 if big else 1, not args.no_compile, not args.no_numpy and not big, not args.no_host, log,
                           do_fwd=not big)
            )
    if not args.quick and not args.no_rss:
        shape = shapes[0]
        result["rss_shape"] = "T,B,H = {},{},{}".format(*shape)
        result["rss"] = {}
        for spec in specs:
            variants = ["generated", "eager"] + (["native"] if spec in NATIVE else [])
            result["rss"][spec] = {v: peak_rss(spec, v, shape) for v in variants}
    result["machine"]["load_avg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("cpu_bench_quick" if args.quick else "cpu_bench")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    (out / f"{stem}.md").write_text(to_markdown(result))
    log(f"wrote {out / stem}.md and .json in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
