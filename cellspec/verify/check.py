"""``cellspec check``: run every available backend on random inputs and compare.

Input: a compiled cell. Output: a :class:`Report`, a table of the largest relative error of
every output, final state and gradient, per comparison:

* ``torch``    — PyTorch with the generated backward vs NumPy (float64)
* ``autograd`` — PyTorch autograd through the generated forward (``step``) vs NumPy (float64)
* ``fd``       — central finite differences of the NumPy forward vs the NumPy backward (float64)
* ``np-f32`` / ``torch-f32`` — the float32 runs vs the float64 NumPy run
* ``cuda-host`` / ``cuhost-f32`` — the ``.cu`` file's CPU build (fused kernels, C++ host loop),
  float64 and float32, vs NumPy; ``gpu`` — the same kernels on a GPU, where there is one

The relative error of arrays a (tested) and b (reference) is max|a - b| / max(max|b|, FLOOR * M),
where M is the largest magnitude among all the reference's quantities of the same kind (forward
values, or gradients): a quantity that cancels to (nearly) zero, such as the gradient of a bias
whose terms alternate in sign, is judged against the problem's scale rather than against its own
round-off.

A non-finite result is never a small error: a quantity with a NaN (or an infinity) anywhere, in
the tested run or the reference, shows as ``nan`` (``inf``) in its cell and fails.

The float32 tolerances account for the problem's conditioning: the same float64 run with every
input, param, state and adjoint first rounded to float32 (what float32 storage alone perturbs)
differs from the reference by some relative amount c; a float32 column's tolerance is
``max(2e-5, F32_CONDITIONING * c)`` (shown in the tolerance row). A well-conditioned cell keeps
2e-5; one whose outputs amplify input round-off (long exponential memory, a nearly constant row
under layer_norm) gets a tolerance that says so instead of a spurious failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cellspec.driver import CompiledCell
from cellspec.runtime.loader import load_package

#: tolerance per comparison
TOLERANCES: dict[str, float] = {
    "torch": 1e-9,
    "autograd": 1e-9,
    "fd": 1e-6,
    "np-f32": 2e-5,
    "torch-f32": 2e-5,
    "cuda-host": 1e-9,
    "cuhost-f32": 2e-5,
    "gpu": 1e-9,
}
FD_EPS = 1e-6

#: float32 columns: tolerance = max(TOLERANCES[col], F32_CONDITIONING * conditioning error)
F32_CONDITIONING = 30.0
F32_COLUMNS = ("np-f32", "torch-f32", "cuhost-f32")


@dataclass
class Problem:
    """One random instance: params, inputs, initial states and the adjoints fed to backward."""

    pkg: object
    sizes: dict[str, int]
    params: dict[str, np.ndarray]
    xs: tuple[np.ndarray, ...]
    states: tuple[np.ndarray, ...]
    d_outputs: tuple[np.ndarray, ...]
    d_final: tuple[np.ndarray, ...]
    #: fixed training-mode masks of the random ops ([T, B, size] each), fed to every backend
    masks: dict[str, np.ndarray] = field(default_factory=dict)

    def pack(self, items):
        return items[0] if len(items) == 1 else tuple(items)

    @property
    def mask_kwargs(self) -> dict:
        """Keywords of the NumPy functions that run the cell in training mode with these masks."""
        return {"training": True, "masks": self.masks} if self.masks else {}


@dataclass
class Results:
    """Forward results and gradients of one backend, keyed by quantity label."""

    values: dict[str, np.ndarray]


@dataclass
class Report:
    cell: str
    filename: str
    sizes: dict[str, int]
    T: int
    B: int
    columns: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    #: tolerance per column where it differs from TOLERANCES (float32 columns, by conditioning)
    tolerances: dict[str, float] = field(default_factory=dict)
    #: the random ops' masks, fixed for every column (training mode)
    masks: list[str] = field(default_factory=list)

    def tolerance(self, column: str) -> float:
        return self.tolerances.get(column, TOLERANCES[column])

    @property
    def quantities(self) -> list[str]:
        seen: list[str] = []
        for col in self.columns.values():
            for q in col:
                if q not in seen:
                    seen.append(q)
        return seen

    def failures(self) -> list[str]:
        out = list(self.problems)
        for name, col in self.columns.items():
            tol = self.tolerance(name)
            for q, err in col.items():
                if not (err <= tol):
                    out.append(f"{name}: {q} relative error {err:.1e} > {tol:.0e}")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures()

    def table(self) -> str:
        cols = list(self.columns)
        qs = self.quantities
        width = max([len(q) for q in qs] + [8])
        sizes = " ".join(f"{k}={v}" for k, v in self.sizes.items())
        lines = [f"{self.cell} ({self.filename})  T={self.T} B={self.B} {sizes}"
                 + (f"  masks {', '.join(self.masks)} fixed (training mode)" if self.masks else "")]
        head = "  " + "quantity".ljust(width) + "".join(c.rjust(11) for c in cols)
        lines.append(head)
        tols = "  " + "tolerance".ljust(width) + "".join(
            f"{self.tolerance(c):.0e}".rjust(11) for c in cols
        )
        lines.append(tols)
        for q in qs:
            row = "  " + q.ljust(width)
            for c in cols:
                err = self.columns[c].get(q)
                row += ("-" if err is None else f"{err:.1e}").rjust(11)
            lines.append(row)
        for name, why in self.skipped.items():
            lines.append(f"  ({name}: skipped, {why})")
        fails = self.failures()
        lines.append("  " + ("OK" if not fails else "FAILED: " + "; ".join(fails)))
        return "\n".join(lines)


#: see the module docstring: the scale below which a quantity counts as zero, relative to M
FLOOR = 1e-2


def rel_err(a: np.ndarray, b: np.ndarray, floor: float = 0.0) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan") if (np.isnan(a).any() or np.isnan(b).any()) else float("inf")
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, floor, 1e-30)
    return float(np.max(np.abs(a - b))) / scale if a.size else 0.0


def default_sizes(pkg) -> dict[str, int]:
    sizes = {}
    picks = [5, 3, 2, 4, 6, 7]
    for i, sym in enumerate(pkg.numpy_cell.SIZES):
        sizes[sym] = {"I": 3, "H": 4}.get(sym, picks[i % len(picks)])
    return sizes


def make_problem(pkg, T: int, B: int, seed: int = 0, sizes: dict[str, int] | None = None, scale: float = 0.5) -> Problem:
    np_cell = pkg.numpy_cell
    sizes = sizes or default_sizes(pkg)
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(0, scale, [sizes[d] for d in shape]) for k, shape in np_cell.PARAMS.items()}
    xs = tuple(rng.normal(0, 1, (T, B, sizes[s])) for _, s in np_cell.INPUTS)
    states = tuple(rng.normal(0, 0.5, (B, sizes[s])) for _, s in np_cell.STATES)
    p = Problem(pkg, sizes, params, xs, states, (), (), draw_masks(np_cell, T, B, sizes, rng))
    outs, final = np_cell.forward_sequence(params, p.pack(xs), p.pack(states), **p.mask_kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    final = final if isinstance(final, tuple) else (final,)
    p.d_outputs = tuple(rng.normal(0, 1, o.shape) for o in outs)
    p.d_final = tuple(rng.normal(0, 1, f.shape) for f in final)
    return p


def draw_masks(np_cell, T: int, B: int, sizes: dict[str, int], rng) -> dict[str, np.ndarray]:
    """Training-mode masks of the cell's random ops, drawn once: dropout keeps with probability
    1 - p (0.5 where the spec's rate is a const or 0 or 1) scaled by 1 / (1 - p), the
    variational mask the same at every step, zoneout Bernoulli(p) (p = 0.5 likewise)."""
    masks = {}
    for key, (kind, size, rate) in getattr(np_cell, "MASKS", {}).items():
        p = rate if isinstance(rate, float) and 0.0 < rate < 1.0 else 0.5
        n = sizes[size]
        if kind == "zoneout":
            masks[key] = (rng.random((T, B, n)) < p).astype(np.float64)
        else:
            keep = (rng.random((1 if kind == "variational" else T, B, n)) >= p) / (1.0 - p)
            masks[key] = np.broadcast_to(keep, (T, B, n)).copy()
    return masks


def rounded_to_float32(p: Problem) -> Problem:
    """The problem with every array rounded to float32 (and kept in float64)."""

    def r(a):
        return np.asarray(a, np.float32).astype(np.float64)

    return Problem(p.pkg, p.sizes, {k: r(v) for k, v in p.params.items()}, tuple(map(r, p.xs)),
                   tuple(map(r, p.states)), tuple(map(r, p.d_outputs)), tuple(map(r, p.d_final)),
                   {k: r(v) for k, v in p.masks.items()})


def _labels(pkg) -> tuple[list[str], list[str], list[str], list[str], list[str]]:
    c = pkg.numpy_cell
    outs = [f"out {o}" for o in c.OUTPUTS]
    finals = [f"final {s}'" for s, _ in c.STATES]
    dps = [f"d {k}" for k in c.PARAMS]
    dxs = [f"d {n}" for n, _ in c.INPUTS]
    dss = [f"d {s}0" for s, _ in c.STATES]
    return outs, finals, dps, dxs, dss


def _tuple(v):
    return v if isinstance(v, tuple) else (v,)


def run_numpy(p: Problem, dtype=np.float64) -> Results:
    c = p.pkg.numpy_cell
    cast = lambda a: np.asarray(a, dtype)
    params = {k: cast(v) for k, v in p.params.items()}
    xs = p.pack([cast(a) for a in p.xs])
    st = p.pack([cast(a) for a in p.states])
    outs, final = c.forward_sequence(params, xs, st, **p.mask_kwargs)
    dp, dx, ds = c.backward_sequence(
        params, xs, st, p.pack([cast(a) for a in p.d_outputs]), p.pack([cast(a) for a in p.d_final]),
        **p.mask_kwargs,
    )
    return _collect(p, _tuple(outs), _tuple(final), dp, _tuple(dx), _tuple(ds))


def _collect(p: Problem, outs, final, dp, dx, ds) -> Results:
    lo, lf, lp, lx, ls = _labels(p.pkg)
    vals: dict[str, np.ndarray] = {}
    for label, v in zip(lo, outs):
        vals[label] = v
    for label, v in zip(lf, final):
        vals[label] = v
    for label, k in zip(lp, p.pkg.numpy_cell.PARAMS):
        vals[label] = dp[k]
    for label, v in zip(lx, dx):
        vals[label] = v
    for label, v in zip(ls, ds):
        vals[label] = v
    return Results({k: np.asarray(_np(v), np.float64) for k, v in vals.items()})


def _np(v):
    try:
        import torch

        if isinstance(v, torch.Tensor):
            return v.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover
        pass
    return v


def run_torch(p: Problem, backend: str = "generated", dtype_name: str = "float64", device: str = "cpu") -> Results:
    import torch

    dtype = getattr(torch, dtype_name)
    mod = p.pkg.torch_cell
    first, second = list(mod.SIZES.values())[:2]
    sym = list(mod.SIZES)
    kwargs = {a: p.sizes[s] for s, a in list(mod.SIZES.items())[2:]}
    layer = p.pkg.torch_cell.__dict__[mod.CELL](p.sizes[sym[0]], p.sizes[sym[1]], **kwargs, backend=backend)
    del first, second
    layer = layer.to(device=device, dtype=dtype)
    with torch.no_grad():
        for k, v in p.params.items():
            layer._parameters[k].copy_(torch.as_tensor(v))
    if p.masks:  # the fixed masks instead of the layer's draw (the layer is in training mode)
        fixed = tuple(torch.as_tensor(p.masks[k], dtype=dtype, device=device) for k in mod.MASKS)
        layer._masks = lambda T, B, like, layer=0: fixed
    xs = [torch.tensor(a, dtype=dtype, device=device, requires_grad=True) for a in p.xs]
    st = [torch.tensor(a, dtype=dtype, device=device, requires_grad=True) for a in p.states]
    # states in and out as torch.nn shapes them: [num_layers * num_directions = 1, B, size]
    outs, final = layer(p.pack(xs), p.pack([s.unsqueeze(0) for s in st]))
    outs, final = _tuple(outs), tuple(f[0] for f in _tuple(final))
    grads_out = [torch.as_tensor(a, dtype=dtype, device=device) for a in p.d_outputs + p.d_final]
    params = [layer._parameters[k] for k in mod.PARAMS]
    # an output no input, state or param reaches (a constant) does not require grad
    pairs = [(y, d) for y, d in zip(list(outs) + list(final), grads_out) if y.requires_grad]
    wrt = params + xs + st
    g = torch.autograd.grad([y for y, _ in pairs], wrt, [d for _, d in pairs], allow_unused=True) if pairs else [None] * len(wrt)
    g = [torch.zeros_like(t) if gi is None else gi for gi, t in zip(g, params + xs + st)]
    n = len(params)
    dp = dict(zip(mod.PARAMS, g[:n]))
    return _collect(p, outs, final, dp, g[n : n + len(xs)], g[n + len(xs) :])


def run_fd(p: Problem) -> Results:
    """Central differences of the scalar <outputs, d_outputs> + <final, d_final>, NumPy float64."""
    c = p.pkg.numpy_cell

    def loss() -> float:
        outs, final = c.forward_sequence(p.params, p.pack(p.xs), p.pack(p.states), **p.mask_kwargs)
        return sum(float((o * d).sum()) for o, d in zip(_tuple(outs), p.d_outputs)) + sum(
            float((f * d).sum()) for f, d in zip(_tuple(final), p.d_final)
        )

    def grad(arr: np.ndarray) -> np.ndarray:
        g = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + FD_EPS
            lp = loss()
            arr[i] = old - FD_EPS
            lm = loss()
            arr[i] = old
            g[i] = (lp - lm) / (2 * FD_EPS)
        return g

    ref = run_numpy(p)
    vals = {k: v for k, v in ref.values.items() if k.startswith(("out ", "final "))}
    _, _, lp, lx, ls = _labels(p.pkg)
    for label, k in zip(lp, c.PARAMS):
        vals[label] = grad(p.params[k])
    for label, a in zip(lx, p.xs):
        vals[label] = grad(a)
    for label, a in zip(ls, p.states):
        vals[label] = grad(a)
    return Results(vals)


def compare(tested: Results, ref: Results, grads_only: bool = False) -> dict[str, float]:
    out = {}
    magnitude = {True: 0.0, False: 0.0}  # gradients, forward values
    for k, v in ref.values.items():
        if v.size and np.all(np.isfinite(v)):
            magnitude[k.startswith("d ")] = max(magnitude[k.startswith("d ")], float(np.max(np.abs(v))))
    for k, v in ref.values.items():
        if grads_only and not k.startswith("d "):
            continue
        out[k] = rel_err(tested.values[k], v, FLOOR * magnitude[k.startswith("d ")])
    return out


def check_cell(cc: CompiledCell, T: int = 4, B: int = 3, seed: int = 0, fd: bool = True) -> Report:
    pkg = load_package(cc.module_name, cc.files)
    p = make_problem(pkg, T, B, seed)
    report = Report(cc.checked.name, cc.checked.filename, p.sizes, T, B, masks=list(p.masks))
    ref = run_numpy(p)
    bad = [k for k, v in ref.values.items() if not np.all(np.isfinite(v))]
    if bad:
        report.problems.append(
            "non-finite values on random inputs (" + ", ".join(bad[:4]) + "); keep log/sqrt/division arguments in their domain"
        )
    try:
        import torch  # noqa: F401

        has_torch = True
    except ImportError:
        has_torch = False
        report.skipped["torch"] = "PyTorch is not installed"
    if has_torch:
        report.columns["torch"] = compare(run_torch(p, "generated"), ref)
        report.columns["autograd"] = compare(run_torch(p, "autograd"), ref)
    if fd:
        report.columns["fd"] = compare(ref, run_fd(p), grads_only=True)
    conditioning = max(compare(run_numpy(rounded_to_float32(p)), ref).values(), default=0.0)
    if np.isfinite(conditioning):
        for col in F32_COLUMNS:
            report.tolerances[col] = max(TOLERANCES[col], F32_CONDITIONING * conditioning)
    report.columns["np-f32"] = compare(run_numpy(p, np.float32), ref)
    if has_torch:
        report.columns["torch-f32"] = compare(run_torch(p, "generated", "float32"), ref)
    for name, fn in (("cuda-host", lambda: run_native(p, cc, "float64")),
                     ("cuhost-f32", lambda: run_native(p, cc, "float32")),
                     ("gpu", lambda: run_gpu(p, cc))):
        try:
            res = fn()
        except SkipColumn as e:
            report.skipped[name] = str(e)
            continue
        report.columns[name] = compare(res, ref)
    return report


def run_native(p: Problem, cc: CompiledCell, dtype_name: str) -> Results:
    """The .cu file built for the CPU (the fused kernels and the C++ host loop), through the
    generated module's backend="fused"."""
    if f"{cc.module_name}.cu" not in cc.files:
        raise SkipColumn("no .cu file was generated")
    try:
        import torch  # noqa: F401
    except ImportError:  # pragma: no cover
        raise SkipColumn("PyTorch is not installed") from None
    from cellspec.runtime import native

    if native.which_cxx() is None and native.which_nvcc() is None:
        raise SkipColumn("no C++ compiler")
    return run_torch(p, "fused", dtype_name)


def run_gpu(p: Problem, cc: CompiledCell) -> Results:
    """The same kernels on a GPU (backend="cuda", float64), where there is one."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        raise SkipColumn("PyTorch is not installed") from None
    if not torch.cuda.is_available():
        raise SkipColumn("no GPU")
    return run_torch(p, "cuda", "float64", "cuda")


class SkipColumn(Exception):
    """Raised by an extra column that cannot run here (no compiler, no GPU); says why."""
