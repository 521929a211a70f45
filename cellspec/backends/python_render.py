"""Python renderer: the sequence program as NumPy or PyTorch code.

Input: a :class:`~cellspec.program.ir.Program`, the printer's name map and a dialect
(:data:`NUMPY` or :data:`TORCH`). Output: the source of ``_forward``, ``_inference`` and
``_backward`` (the module templates wrap them into the public API).

The two dialects differ only by a table of spellings (how to allocate, how to multiply into a
buffer, how to copy into a view): the ops, their order and where every value lives are the
program's. Buffers are locals named ``_<buffer>`` (spec names never start with ``_``); a
pointwise block binds the views it reads to the spec's names, runs its statements as array
expressions, and copies what it exports into its slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp
from sympy.printing.c import C99CodePrinter
from sympy.printing.pycode import PythonCodePrinter

from cellspec.program import ir


@dataclass(frozen=True)
class Dialect:
    name: str
    empty: str  # format with the shape
    zeros: str
    cat: str  # format with the list of arrays
    mm_into: str  # a, b, out
    mm_add_into: str  # a, b, out (out += a @ b)
    copy_into: str  # dest, value
    add_into: str  # dest, value
    zero: str  # buffer
    transpose_contiguous: str  # array -> contiguous transpose
    rows: bool  # split timed buffers into per-step row views once per call


NUMPY = Dialect(
    name="numpy",
    empty="np.empty({}, _dtype)",
    zeros="np.zeros({}, _dtype)",
    cat="np.concatenate([{}])",
    mm_into="np.matmul({}, {}, out={})",
    mm_add_into="{2}[...] += {0} @ {1}",
    copy_into="{}[...] = {}",
    add_into="{}[...] += {}",
    zero="{}[...] = 0",
    transpose_contiguous="np.ascontiguousarray({}.T)",
    rows=False,
)

TORCH = Dialect(
    name="torch",
    empty="torch.empty({}, dtype=_dtype, device=_device)",
    zeros="torch.zeros({}, dtype=_dtype, device=_device)",
    cat="torch.cat([{}])",
    mm_into="torch.mm({}, {}, out={})",
    mm_add_into="{2}.addmm_({0}, {1})",
    copy_into="{}.copy_({})",
    add_into="{}.add_({})",
    zero="{}.zero_()",
    transpose_contiguous="{}.T.contiguous()",
    rows=True,
)


class _SizePrinter(C99CodePrinter):
    def _print_Symbol(self, expr):
        return f"_{expr.name}"


def pysize(e) -> str:
    return _SizePrinter().doprint(sp.sympify(e))


def _shape(shape) -> str:
    dims = [pysize(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


class _Function:
    """Renders one program function."""

    def __init__(self, prog: ir.Program, fn: ir.Function, names: dict[str, str], printer, d: Dialect):
        self.p, self.fn, self.names, self.pr, self.d = prog, fn, names, printer, d
        self.lines: list[str] = []
        self.row_views: list[str] = []  # timed buffers split into rows before the loop
        self.grads_seen: set[str] = set()

    # -------------------------------------------------------------------- views
    def buf(self, name: str) -> str:
        return f"_{name}"

    def full_width(self, sl: ir.Slot) -> bool:
        buf = self.fn.buffers[sl.buffer]
        return sl.col == 0 and sp.expand(ir.size(sl.size) - buf.shape[-1]) == 0

    def cols(self, sl: ir.Slot) -> str:
        if self.full_width(sl):
            return ""
        return f"[:, {pysize(sl.col)}:{pysize(sl.col + ir.size(sl.size))}]"

    def step_view(self, name: str) -> str:
        """[B, n] view of a slot at step _t (or the param vector itself)."""
        sl = self.fn.slots[name]
        buf = self.fn.buffers[sl.buffer]
        if len(buf.shape) == 1:  # a vector param: bound to its name already
            return self.names[name]
        if not buf.timed:
            return self.buf(buf.name) + self.cols(sl)
        t = "_t" if not sl.time else f"_t + {sl.time}"
        if self.d.rows:
            if buf.name not in self.row_views:
                self.row_views.append(buf.name)
            return f"{self.buf(buf.name)}_rows[{t}]" + self.cols(sl)
        return f"{self.buf(buf.name)}[{t}]" + self.cols(sl)

    def all_view(self, name: str, flat: bool = True) -> str:
        """[T*B, n] (or [T, B, n]) view of a slot over the whole sequence."""
        sl = self.fn.slots[name]
        buf = self.fn.buffers[sl.buffer]
        if len(buf.shape) == 1:
            return self.names[name]
        b = self.buf(buf.name)
        start = sl.time or 0
        if sp.expand(buf.shape[0] - ir.T - start) == 0:
            b = f"{b}[{start}:]" if start else b
        else:
            b = f"{b}[{start}:{start} + _T]" if start else f"{b}[:_T]"
        width = pysize(buf.shape[-1])
        if flat:
            b = f"{b}.reshape(_T * _B, {width})"
            return b + self.cols(sl)
        if self.full_width(sl):
            return b
        return f"{b}[..., {pysize(sl.col)}:{pysize(sl.col + ir.size(sl.size))}]"

    def buffer_rows(self, name: str, rows: str) -> str:
        buf = self.fn.buffers[name]
        if buf.timed and rows == "step":
            if self.d.rows:
                if name not in self.row_views:
                    self.row_views.append(name)
                return f"{self.buf(name)}_rows[_t]"
            return f"{self.buf(name)}[_t]"
        if buf.timed:
            return f"{self.buf(name)}.reshape(_T * _B, {pysize(buf.shape[-1])})"
        return self.buf(name)

    # -------------------------------------------------------------------- ops
    def emit(self, op, ind: str) -> None:
        L, d = self.lines, self.d
        if isinstance(op, ir.Loop):
            L.append(f"{ind}for _t in {'reversed(range(_T))' if op.reverse else 'range(_T)'}:")
            for o in op.body:
                self.emit(o, ind + "    ")
        elif isinstance(op, ir.Pointwise):
            n = self.names
            L.append(f"{ind}# {op.title}")
            view = self.step_view if op.rows == "step" else (lambda k: self.all_view(k, flat=False))
            for r in op.reads:
                if view(r) != n[r]:
                    L.append(f"{ind}{n[r]} = {view(r)}")
            for st in op.statements:
                comment = f"  # {st.comment}" if st.comment else ""
                L.append(f"{ind}{n[st.target]} = {self.pr.doprint(st.expr)}{comment}")
            for w in op.writes:
                L.append(f"{ind}{d.copy_into.format(view(w), n[w])}")
        elif isinstance(op, ir.Project):
            w = self.p.weights[op.weight]
            a = self.step_view(op.operand) if op.rows == "step" else self.all_view(op.operand)
            out = self.buffer_rows(op.out, op.rows)
            L.append(f"{ind}# {op.comment}")
            L.append(f"{ind}{d.mm_into.format(a, f'_wt_{w.name}', out)}")
        elif isinstance(op, ir.ProjectBack):
            w = self.p.weights[op.weight]
            g = self.buffer_rows(op.d_out, op.rows)
            c = self.step_view(op.d_operand) if op.rows == "step" else self.all_view(op.d_operand)
            fmt = d.mm_add_into if op.accumulate else d.mm_into
            L.append(f"{ind}{fmt.format(g, f'_w_{w.name}', c)}")
        elif isinstance(op, ir.WeightGrad):
            w = self.p.weights[op.weight]
            g = self.buffer_rows(op.d_out, "all")
            x = self.all_view(op.operand)
            L.append(f"{ind}# dW of {op.comment}: one GEMM over all T*B rows")
            for (col, sz), mat in zip(w.offsets(), w.matrices):
                block = f"{g}[:, {pysize(col)}:{pysize(col + ir.size(sz))}]"
                self.grad(ind, mat, f"{block}.T @ {x}")
        elif isinstance(op, ir.RowSum):
            src = self.all_view(op.source)
            L.append(f"{ind}_sum = {src}.sum(0)")
            for prm in op.param:
                self.grad(ind, prm, "_sum")
        elif isinstance(op, ir.AddRows):
            dst = self.all_view(f"grad_input:{op.input}", flat=False)
            L.append(f"{ind}{d.add_into.format(dst, self.all_view(op.source, flat=False))}")
        elif isinstance(op, ir.Zero):
            L.append(f"{ind}{d.zero.format(self.buf(op.buffer))}")
        else:  # pragma: no cover
            raise TypeError(op)

    def grad(self, ind: str, param: str, value: str) -> None:
        if param in self.grads_seen:
            self.lines.append(f'{ind}_grads["{param}"] += {value}')
        else:
            self.grads_seen.add(param)
            self.lines.append(f'{ind}_grads["{param}"] = {value}')


def render(prog: ir.Program, names: dict[str, str], printer, d: Dialect) -> dict:
    """Context entries for ``sequence.py.j2``: per function, its allocation lines, its op lines
    and the row views it splits before the loop; plus the weights and results."""
    out: dict = {"dialect": d.name}
    for fn in prog.functions:
        r = _Function(prog, fn, names, printer, d)
        for op in fn.ops:
            r.emit(op, "    ")
        allocs = []
        for b in fn.buffers.values():
            if b.init == "arg":
                continue
            if b.role in ("input", "param", "d_output", "d_state", "state"):
                continue
            make = d.zeros if b.init == "zeros" else d.empty
            allocs.append(f"{r.buf(b.name)} = {make.format(_shape(b.shape))}")
        rows = [f"{r.buf(n)}_rows = {r.buf(n)}.unbind(0)" for n in r.row_views]
        grads_zero = [prm.key for prm in prog.params if prm.key not in r.grads_seen]
        out[fn.name] = {
            "allocs": allocs,
            "rows": rows,
            "lines": r.lines,
            "grads_zero": grads_zero,
            "outputs": [r.all_view(v.name, flat=False) for v in prog.outputs] if fn.name != "backward" else [],
        }
    out["weights"] = [
        {"name": w.name, "cat": (d.cat.format(", ".join(w.matrices)) if len(w.matrices) > 1 else w.matrices[0])}
        for w in prog.weights.values()
    ]
    out["transpose"] = d.transpose_contiguous
    return out


class _CoefPrinter(PythonCodePrinter):
    """Coefficients of prepared params: a const is ``_consts["name"]``; a placeholder symbol
    is the code of a term's source."""

    def __init__(self, sources: dict[str, str], sizes: tuple[str, ...] = ()):
        super().__init__({"fully_qualified_modules": False})
        self.sources = sources
        self.sizes = sizes

    def _print_Symbol(self, expr):
        if expr.name in self.sizes:
            return f'_sizes["{expr.name}"]'
        return self.sources.get(expr.name, f'_consts["{expr.name}"]')


def _prepare_lines(prog: ir.Program, d: Dialect) -> dict:
    """``_prepare`` (spec params and consts -> engine params), ``_unprepare`` (engine gradients ->
    spec gradients, NumPy: PyTorch differentiates ``_prepare`` with autograd) and
    ``_spec_sizes`` (the sizes from the spec params and the inputs)."""
    numpy = d.name == "numpy"
    direct = [prm.key for prm in prog.params if prm.key not in {p.key for p in prog.prepared}]
    lines = []
    for pr in prog.prepared:
        sources: dict[str, str] = {}
        expr = sp.S.Zero
        for i, t in enumerate(pr.terms):
            name = f"_src{i}"
            if t.source is None and len(pr.shape) == 2:
                sources[name] = (f'np.eye(_sizes["{pr.shape[0]}"], dtype=_dt)' if numpy else
                                 f'torch.eye(_sizes["{pr.shape[0]}"], dtype=_dt, device=_dev)')
            elif t.source is None:
                expr += t.coef
                continue
            else:
                sources[name] = f'_params["{t.source}"]' + (".T" if t.transpose else "")
            expr += t.coef * sp.Symbol(name)
        code = _CoefPrinter(sources, prog.sizes).doprint(expr)
        if len(pr.shape) == 2:
            made = f"np.ascontiguousarray({code}, dtype=_dt)" if numpy else f"({code}).contiguous()"
        else:
            n = f'_sizes["{pr.shape[0]}"]'
            made = (f"np.full(({n},), {code}, dtype=_dt)" if numpy else
                    f"({code}) * torch.ones({n}, dtype=_dt, device=_dev)")
        lines.append(f'_p["{pr.key}"] = {made}  # {pr.text}')
    back = []
    for prm in prog.spec_params:
        start = f'_grads["{prm.key}"]' if prm.key in direct else f'np.zeros(np.shape(_params["{prm.key}"]), _dt)'
        back.append(f'_g["{prm.key}"] = {start}')
    for pr in prog.prepared:
        for t in pr.terms:
            if t.source is None or t.source not in {p.key for p in prog.spec_params}:
                continue
            g = f'_grads["{pr.key}"]' + (".T" if t.transpose else "")
            if len(pr.shape) == 1:
                g = f"{g}.sum()"
            coef = _CoefPrinter({}).doprint(t.coef)
            back.append(f'_g["{t.source}"] = _g["{t.source}"] + {g}' + ("" if t.coef == 1 else f" * ({coef})"))
    sizes = []
    for i, v in enumerate(prog.inputs):
        sizes.append((v.size, f"_arrays(_x)[{i}].shape[-1]"))
    for prm in prog.spec_params:
        for k, s in enumerate(prm.shape):
            sizes.append((s, f'np.shape(_params["{prm.key}"])[{k}]' if numpy else f'_params["{prm.key}"].shape[{k}]'))
    seen: dict[str, str] = {}
    for s, src in sizes:
        seen.setdefault(s, src)
    return {"prepare": lines, "unprepare": back, "direct": direct, "spec_sizes": list(seen.items())}


def sequence_context(prog: ir.Program, names: dict[str, str], printer, d: Dialect) -> dict:
    """Everything ``sequence.py.j2`` needs (``seq`` in the module templates' context)."""
    ctx = render(prog, names, printer, d)
    for w, rec in zip(prog.weights.values(), ctx["weights"]):
        mats = [names[m] for m in w.matrices]
        rec["cat"] = d.cat.format(", ".join(mats)) if len(mats) > 1 else mats[0]
    sizes = []
    for s in prog.sizes:
        src = prog.size_sources[s]
        if src[0] == "input":
            sizes.append((s, f"_x_{prog.inputs[src[1]].key}.shape[-1]"))
        elif src[0] == "param":
            sizes.append((s, f'_params["{src[1]}"].shape[{src[2]}]'))
    first = prog.inputs[0].key
    if d.name == "numpy":
        ctx.update(
            asarray="np.asarray",
            cast="np.asarray({}, _dtype)",
            copy_of="np.array({}, copy=True)",
            dtype_forward="    _dtype = np.result_type(_arrays(_x)[0], *_params.values())",
            dtype_backward="    _dtype = np.result_type(_arrays(_x)[0], *_params.values())",
        )
    else:
        ctx.update(
            asarray="",
            cast="{}.to(_dtype)",
            copy_of="{}.clone()",
            dtype_forward="    _dtype, _device = _arrays(_x)[0].dtype, _arrays(_x)[0].device",
            dtype_backward="    _dtype, _device = _arrays(_x)[0].dtype, _arrays(_x)[0].device",
        )
    ctx.update(
        empty=d.empty,
        zeros=d.zeros,
        sizes=sizes,
        saved=list(prog.saved),
        saved_backward=[b for b in prog.saved if b in prog.backward.buffers],
        d_inputs=[f"_{prog.d_inputs[v.key]}" for v in prog.inputs],
        d_states=[f"_{prog.d_states[v.key]}" for v in prog.states],
        first_input=first,
        engine_params=[prm.key for prm in prog.params],
        consts=list(prog.consts),
        prepared=bool(prog.prepared) or [prm.key for prm in prog.params] != [prm.key for prm in prog.spec_params],
        **_prepare_lines(prog, d),
    )
    return ctx
