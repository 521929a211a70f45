"""Python renderer: the sequence program as NumPy or PyTorch code.

Input: a :class:`~cellspec.program.ir.Program`, the printer's name map and a dialect
(:data:`NUMPY`, :data:`TORCH` or :data:`TORCH_DIFFERENTIABLE`). Output: the source of
``_forward``, ``_inference`` and ``_backward`` (the module templates wrap them into the public
API); the differentiable dialect gives ``_forward_differentiable`` and
``_backward_differentiable``, the same program in functional torch ops that autograd and
``torch.func`` can record (double backward, ``vmap``).

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
    unbind: str  # array -> sequence of its views along the first axis
    #: no writes into tensors: buffers that a function writes are rebound (untimed) or kept as
    #: lists of per-step rows (timed), columns written with ``torch.slice_scatter``
    functional: bool = False


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
    unbind="list({})",
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
    unbind="{}.unbind(0)",
)


#: the backward (and the forward it recomputes) in ops autograd records: what ``create_graph=True``
#: and ``torch.func`` run; never faster than :data:`TORCH`, only differentiable
TORCH_DIFFERENTIABLE = Dialect(
    name="torch_differentiable",
    empty="torch.zeros({}, dtype=_dtype, device=_device)",  # zeros: no garbage reaches a gradient
    zeros="torch.zeros({}, dtype=_dtype, device=_device)",
    cat="torch.cat([{}])",
    mm_into="",
    mm_add_into="",
    copy_into="",
    add_into="",
    zero="",
    transpose_contiguous="{}.T",
    unbind="list({}.unbind(0))",
    functional=True,
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
        self.row_views: list[tuple[str, int | None]] = []  # (buffer, time offset) split into steps
        self.grads_seen: set[str] = set()
        self.in_loop = False

    # -------------------------------------------------------------------- views
    def buf(self, name: str) -> str:
        return f"_{name}"

    def whole(self, name: str) -> str:
        """The whole buffer as one array expression."""
        return self.buf(name)

    def full_width(self, sl: ir.Slot) -> bool:
        buf = self.fn.buffers[sl.buffer]
        return sl.col == 0 and sp.expand(ir.size(sl.size) - buf.shape[-1]) == 0

    def cols(self, sl: ir.Slot) -> str:
        if self.full_width(sl):
            return ""
        return f"[:, {pysize(sl.col)}:{pysize(sl.col + ir.size(sl.size))}]"

    def step_view(self, name: str) -> str:
        """[B_t, n] view of a slot at step _t (or the param vector itself)."""
        sl = self.fn.slots[name]
        buf = self.fn.buffers[sl.buffer]
        if len(buf.shape) == 1:  # a vector param: bound to its name already
            return self.names[name]
        return self.rows_view(buf.name, sl.time or 0) + self.cols(sl)

    def rows_view(self, name: str, time: int) -> str:
        """Step _t's rows of a buffer: per-step views listed once before the loop (``time``: the
        slot's time offset in a timed buffer). With batch sizes they hold the first B_t rows."""
        key = (name, time if self.fn.buffers[name].timed else None)
        if key not in self.row_views:
            self.row_views.append(key)
        return f"{self.list_name(key)}[_t]"

    def list_name(self, key: tuple[str, int | None]) -> str:
        return f"{self.buf(key[0])}_rows" if key[1] is None else f"{self.buf(key[0])}_at{key[1]}"

    def all_view(self, name: str, flat: bool = True) -> str:
        """[T*B, n] (or [T, B, n]) view of a slot over the whole sequence."""
        sl = self.fn.slots[name]
        buf = self.fn.buffers[sl.buffer]
        if len(buf.shape) == 1:
            return self.names[name]
        b = self.whole(buf.name)
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

    def stacked_rows(self, name: str, rows: str, width) -> str:
        """A buffer holding k blocks side by side (a row-stacked GEMM's operands, results or
        adjoints: ``[rows, k * width]``) as the ``[k * rows, width]`` matrix the GEMM runs on
        (a view: the buffer is dense)."""
        buf = self.fn.buffers[name]
        if rows == "step":
            return f"{self.rows_view(name, 0)}.reshape(-1, {pysize(width)})"
        if buf.timed:
            return f"{self.whole(name)}.reshape(-1, {pysize(width)})"
        return f"{self.buf(name)}.reshape(-1, {pysize(width)})"

    def operand_rows(self, op, rows: str) -> str:
        """The operand matrix of a Project: one slot, or the row-stacked operands' buffer."""
        if not op.stacked:
            return self.step_view(op.operands[0]) if rows == "step" else self.all_view(op.operands[0])
        return self.stacked_rows(op.stacked, rows, ir.size(self.p.weights[op.weight].inner))

    def d_rows(self, op, rows: str) -> str:
        """A ProjectBack's or WeightGrad's run of columns of its adjoint buffer (all of it but
        where several groups share the buffer)."""
        g = self.buffer_rows(op.d_out, rows)
        width = self.p.weights[op.weight].width
        if op.d_col == 0 and sp.expand(width - self.fn.buffers[op.d_out].shape[-1]) == 0:
            return g
        return f"{g}[:, {pysize(op.d_col)}:{pysize(op.d_col + width)}]"

    def buffer_rows(self, name: str, rows: str) -> str:
        buf = self.fn.buffers[name]
        if rows == "step":
            return self.rows_view(name, 0)
        if buf.timed:
            return f"{self.whole(name)}.reshape(_T * _B, {pysize(buf.shape[-1])})"
        return self.buf(name)

    # -------------------------------------------------------------------- ops
    def emit(self, op, ind: str) -> None:
        L, d = self.lines, self.d
        if isinstance(op, ir.Loop):
            for o in op.ahead:  # one chunk of all T steps: before the loop
                self.emit(o, ind)
            L.append(f"{ind}for _t in {'reversed(range(_T))' if op.reverse else 'range(_T)'}:")
            self.in_loop = True
            for o in op.body:
                self.emit(o, ind + "    ")
            self.in_loop = False
            for o in op.behind:  # one chunk of all T steps: after the loop
                self.emit(o, ind)
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
            a = self.operand_rows(op, op.rows)
            out = self.stacked_rows(op.out, op.rows, w.width) if op.stacked else self.buffer_rows(op.out, op.rows)
            L.append(f"{ind}# {op.comment}{_stack_note(op.operands)}")
            L.append(f"{ind}{d.mm_into.format(a, f'_wt_{w.name}', out)}")
        elif isinstance(op, ir.ProjectBack):
            w = self.p.weights[op.weight]
            if op.stacked:
                g = self.stacked_rows(op.d_out, op.rows, w.width)
                c = self.stacked_rows(op.stacked, op.rows, ir.size(w.inner))
                L.append(f"{ind}# [{'; '.join(op.d_operands)}] from one GEMM ({op.comment})")
            else:
                g = self.d_rows(op, op.rows)
                c = self.step_view(op.d_operands[0]) if op.rows == "step" else self.all_view(op.d_operands[0])
            fmt = d.mm_add_into if op.accumulate else d.mm_into
            L.append(f"{ind}{fmt.format(g, f'_w_{w.name}', c)}")
        elif isinstance(op, ir.Stack):
            view = self.step_view if op.rows == "step" else (lambda k: self.all_view(k, flat=False))
            L.append(f"{ind}# {op.comment}")
            for src, tgt in zip(op.sources, op.targets):
                L.append(f"{ind}{d.copy_into.format(view(tgt), view(src))}")
        elif isinstance(op, ir.WeightGrad):
            w = self.p.weights[op.weight]
            if op.stacked:
                g = self.stacked_rows(op.d_out, "all", w.width)
                x = self.stacked_rows(op.stacked, "all", ir.size(w.inner))
                L.append(f"{ind}# dW of {op.comment}: one GEMM over all {len(op.operands)}*T*B rows "
                         f"[{'; '.join(op.operands)}]")
            else:
                g = self.d_rows(op, "all")
                x = self.all_view(op.operands[0])
                L.append(f"{ind}# dW of {op.comment}: one GEMM over all T*B rows")
            if len(w.matrices) == 1:
                self.grad(ind, w.matrices[0], f"{g}.T @ {x}")
            else:
                L.append(f"{ind}_dw = {g}.T @ {x}")
                for (col, sz), mat in zip(w.offsets(), w.matrices):
                    self.grad(ind, mat, f"_dw[{pysize(col)}:{pysize(col + ir.size(sz))}]")
        elif isinstance(op, ir.RowSum):
            src = self.all_view(op.source)
            L.append(f"{ind}_sum = {src}.sum(0)")
            for prm in op.param:
                self.grad(ind, prm, "_sum")
        elif isinstance(op, ir.AddRows):
            dst = self.all_view(f"grad_input:{op.input}", flat=False)
            L.append(f"{ind}{d.add_into.format(dst, self.all_view(op.source, flat=False))}")
        elif isinstance(op, ir.Zero):
            L.append(f"{ind}{d.zero.format(self.rows_view(op.buffer, 0) if self.in_loop else self.buf(op.buffer))}")
        elif isinstance(op, ir.Hold):
            b = self.buf(op.buffer)
            L.append(f"{ind}if _bs is not None:  # ended sequences hold their state")
            L.append(f"{ind}    {d.copy_into.format(f'{b}[_t + 1, _bs[_t]:]', f'{b}[_t, _bs[_t]:]')}")
        else:  # pragma: no cover
            raise TypeError(op)

    def grad(self, ind: str, param: str, value: str) -> None:
        if param in self.grads_seen:
            self.lines.append(f'{ind}_grads["{param}"] += {value}')
        else:
            self.grads_seen.add(param)
            self.lines.append(f'{ind}_grads["{param}"] = {value}')


class _FunctionalFunction(_Function):
    """Renders one program function in :data:`TORCH_DIFFERENTIABLE`: every write the program
    makes into a buffer becomes a new tensor, so autograd can record it. A timed buffer the
    function writes is a list of its per-step rows (``_X_rows``, stacked back into ``_X`` at the
    end); an untimed one is rebound; a column range is written with ``torch.slice_scatter``."""

    def __init__(self, prog: ir.Program, fn: ir.Function, names: dict[str, str], printer, d: Dialect):
        super().__init__(prog, fn, names, printer, d)
        self.written = _written_buffers(fn)
        self.row_views = [b for b in self.written if fn.buffers[b].timed]
        self.stacked: set[str] = set()  # list buffers whose rows are stacked into _X, unchanged since
        self.ind = "    "

    def rows_view(self, name: str, time: int) -> str:
        """Step _t's rows: an untimed buffer is rebound whole; a timed one is a list of rows."""
        if not self.fn.buffers[name].timed:
            return self.buf(name)
        if name not in self.row_views:
            self.row_views.append(name)
        return f"{self.buf(name)}_rows[_t + {time}]" if time else f"{self.buf(name)}_rows[_t]"

    def whole(self, name: str) -> str:
        """A list buffer read whole outside the loop is stacked once (until its next write)."""
        if name not in self.written or not self.fn.buffers[name].timed:
            return self.buf(name)
        if self.ind != "    ":  # inside the loop
            return f"torch.stack({self.buf(name)}_rows)"
        if name not in self.stacked:
            self.stacked.add(name)
            self.lines.append(f"{self.ind}{self.buf(name)} = torch.stack({self.buf(name)}_rows)")
        return self.buf(name)

    def restack(self) -> list[str]:
        """Lines that stack every written timed buffer not stacked since its last write."""
        out = []
        for name in self.written:
            if self.fn.buffers[name].timed and name not in self.stacked:
                self.stacked.add(name)
                out.append(f"{self.buf(name)} = torch.stack({self.buf(name)}_rows)")
        return out

    def emit(self, op, ind: str) -> None:
        L = self.lines
        self.ind = ind
        if isinstance(op, ir.Loop):
            for o in op.ahead:  # one chunk of all T steps: before the loop
                self.emit(o, ind)
            L.append(f"{ind}for _t in {'reversed(range(_T))' if op.reverse else 'range(_T)'}:")
            for o in op.body:
                self.emit(o, ind + "    ")
            for o in op.behind:  # one chunk of all T steps: after the loop
                self.emit(o, ind)
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
                self.assign(ind, self.fn.slots[w], op.rows, n[w])
        elif isinstance(op, ir.Project):
            w = self.p.weights[op.weight]
            a = self.operand_rows(op, op.rows)
            buf = self.fn.buffers[op.out]
            whole = ir.Slot(op.out, 0 if buf.timed else None, sp.S.Zero, "")
            L.append(f"{ind}# {op.comment}{_stack_note(op.operands)}")
            value = f"{a} @ _wt_{w.name}"
            if op.stacked:  # [k * rows, width] back to the buffer's [rows, k * width]
                value = f"({value}).reshape(-1, {pysize(buf.shape[-1])})"
            self.assign(ind, whole, op.rows, value, full=True)
        elif isinstance(op, ir.ProjectBack):
            w = self.p.weights[op.weight]
            if op.stacked:
                buf = self.fn.buffers[op.stacked]
                g = self.stacked_rows(op.d_out, op.rows, w.width)
                whole = ir.Slot(op.stacked, 0 if buf.timed else None, sp.S.Zero, "")
                L.append(f"{ind}# [{'; '.join(op.d_operands)}] from one GEMM ({op.comment})")
                self.assign(ind, whole, op.rows, f"({g} @ _w_{w.name}).reshape(-1, {pysize(buf.shape[-1])})",
                            full=True)
            else:
                g = self.d_rows(op, op.rows)
                self.assign(ind, self.fn.slots[op.d_operands[0]], op.rows, f"{g} @ _w_{w.name}",
                            add=op.accumulate)
        elif isinstance(op, ir.Stack):
            view = self.step_view if op.rows == "step" else (lambda k: self.all_view(k, flat=False))
            L.append(f"{ind}# {op.comment}")
            for src, tgt in zip(op.sources, op.targets):
                self.assign(ind, self.fn.slots[tgt], op.rows, view(src))
        elif isinstance(op, ir.AddRows):
            src = self.all_view(op.source, flat=False)
            self.assign(ind, self.fn.slots[f"grad_input:{op.input}"], "all", src, add=True)
        elif isinstance(op, ir.Zero):
            b = self.buf(op.buffer)
            self.stacked.discard(op.buffer)
            if self.fn.buffers[op.buffer].timed:
                L.append(f"{ind}{b}_rows = [torch.zeros_like(_r) for _r in {b}_rows]")
            else:
                L.append(f"{ind}{b} = torch.zeros_like({b})")
        elif isinstance(op, ir.Hold):
            pass  # the functional rendering runs full batches: no sequence ends early
        else:  # WeightGrad, RowSum: already functional but for grad()
            super().emit(op, ind)

    def assign(self, ind: str, sl: ir.Slot, rows: str, value: str, add: bool = False, full: bool = False) -> None:
        """``slot = value`` (``+=`` with ``add``) as a rebinding: ``rows`` is ``step`` (row _t of
        a timed buffer) or ``all`` (every step's rows from one [T*B, w] or [T, B, w] value)."""
        buf = self.fn.buffers[sl.buffer]
        b = self.buf(buf.name)
        self.stacked.discard(buf.name)
        full = full or self.full_width(sl)
        lo, hi = ("0", "0") if full else (pysize(sl.col), pysize(sl.col + ir.size(sl.size)))
        if buf.timed and rows == "all":
            start = pysize(sl.time or 0)
            cols = "None, None" if full else f"{lo}, {hi}"
            self.lines.append(f"{ind}{b}_rows = _scatter_rows({b}_rows, {start}, _T, {cols}, {value}, add={add})")
            return
        if buf.timed:
            target = f"{b}_rows[_t + {sl.time}]" if sl.time else f"{b}_rows[_t]"
        else:
            target = b
        if add:
            value = f"{target}{'' if full else f'[:, {lo}:{hi}]'} + {value}"
        if full:
            self.lines.append(f"{ind}{target} = {value}")
        else:
            self.lines.append(f"{ind}{target} = torch.slice_scatter({target}, {value}, 1, {lo}, {hi})")

    def grad(self, ind: str, param: str, value: str) -> None:
        if param in self.grads_seen:
            self.lines.append(f'{ind}_grads["{param}"] = _grads["{param}"] + {value}')
        else:
            self.grads_seen.add(param)
            self.lines.append(f'{ind}_grads["{param}"] = {value}')


def _stack_note(operands: tuple[str, ...]) -> str:
    """The comment of a row-stacked GEMM: its operands, one block of rows each."""
    if len(operands) == 1:
        return ""
    return f": rows stacked, [{'; '.join(operands)}] (row r * {len(operands)} + j is operand j's row r)"


def _written_buffers(fn: ir.Function) -> list[str]:
    """Buffers a function's ops write, in first-write order."""
    out: list[str] = []
    for op in fn.flat():
        for name in fn.written_by(op):
            if name not in out:
                out.append(name)
    return out


def render(prog: ir.Program, names: dict[str, str], printer, d: Dialect) -> dict:
    """Context entries for ``sequence.py.j2``: per function, its allocation lines, its op lines
    and the row views it splits before the loop (and, functional, stacks back after it); plus
    the weights and results. The functional dialect renders the forward and the backward."""
    out: dict = {"dialect": d.name, "functional": d.functional}
    functions = (prog.forward, prog.backward) if d.functional else prog.functions
    for fn in functions:
        r = (_FunctionalFunction if d.functional else _Function)(prog, fn, names, printer, d)
        for op in fn.ops:
            r.emit(op, "    ")
        allocs = []
        for b in fn.buffers.values():
            if b.init == "arg":
                continue
            if b.role in ("input", "param", "d_output", "d_state", "state", "grad_scratch"):
                continue  # bound from the arguments, or (grad_scratch) the native library's alone
            make = d.zeros if b.init == "zeros" else d.empty
            allocs.append(f"{r.buf(b.name)} = {make.format(_shape(b.shape))}")
        if d.functional:
            rows = [f"{r.buf(n)}_rows = list({r.buf(n)}.unbind(0))" for n in r.row_views]
            r.ind = "    "
            after = r.restack()
            packed_zero = []
        else:
            rows = []
            for key in r.row_views:
                b = r.buf(key[0])
                rows.append(f"{r.list_name(key)} = " + (f"_rows({b}, _T, _bs)" if key[1] is None else f"_steps({b}, {key[1]}, _T, _bs)"))
            after = []
            packed_zero = [d.zero.format(r.buf(n)) for n in fn.zero_when_packed]
        grads_zero = [prm.key for prm in prog.params if prm.key not in r.grads_seen]
        out[fn.name] = {
            "allocs": allocs,
            "rows": rows,
            "packed_zero": packed_zero,
            "lines": r.lines,
            "after": after,
            "grads_zero": grads_zero,
            "outputs": [r.all_view(v.name, flat=False) for v in prog.outputs] if fn.name != "backward" else [],
        }
    out["weights"] = [
        {"name": w.name, "cat": (d.cat.format(", ".join(w.matrices)) if len(w.matrices) > 1 else w.matrices[0])}
        for w in prog.weights.values()
    ]
    out["transpose"] = d.transpose_contiguous
    out["unbind"] = d.unbind
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
    for i, v in enumerate(prog.inputs[: len(prog.inputs) - len(prog.masks)]):  # not the masks: drawn later
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
        d_inputs=[f"_{prog.d_inputs[v.key]}" if v.key in prog.d_inputs else "None" for v in prog.inputs],
        d_states=[f"_{prog.d_states[v.key]}" for v in prog.states],
        first_input=first,
        engine_params=[prm.key for prm in prog.params],
        consts=list(prog.consts),
        prepared=bool(prog.prepared) or [prm.key for prm in prog.params] != [prm.key for prm in prog.spec_params],
        **_prepare_lines(prog, d),
    )
    return ctx
