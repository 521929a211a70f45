"""Native renderer: the sequence program as one self-contained ``.cu`` file.

Input: a :class:`~cellspec.program.ir.Program`. Output: ``{"<module>.cu": text}`` and the
context the PyTorch module's glue (:func:`glue_context`) needs to call it.

The file holds, per pointwise block of the program and per size symbol within it:

* a ``__host__ __device__`` element function with the math (spec names as variables, the spec
  line as a comment), templated on the math type ``real``;
* a ``__global__`` kernel and its launcher (nvcc builds only), and a host function (an OpenMP
  loop over rows, a vectorisable loop over units);

and, per program function (``forward``, ``inference``, ``backward``), the **host loop**: the
whole sequence in one call — the GEMMs (a BLAS ``?gemm_`` found at run time on the CPU,
``cublasGemmEx`` on the GPU), the fused pointwise calls, the reductions after the loop. The
loop is written once; the build chooses how a GEMM and a pointwise block run (``CS_GEMM_*``
and ``CS_PW`` in the prelude). Entry points::

    int <module>_<function>_<f32|f64>(const int64_t* dims, void* const* ptrs, const void* ctx)       (CPU build)
    int <module>_cuda_<function>_<f32|f64|f16|bf16>(const int64_t* dims, void* const* ptrs, const void* ctx)  (nvcc)

``dims`` is ``[T, B, <sizes in constructor order>]``; ``ptrs`` the function's buffers in
program order, then the stacked weights, then (backward) the gradient of every param, then the
per-step batch sizes (or NULL), and last one ``[B, size]`` array per state that the function
copies in at its start (a forward's initial state, a backward's final-state gradient), or NULL
for zeros.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field, replace

import sympy as sp
from sympy.printing.c import C99CodePrinter

from cellspec.backends.naming import C_RESERVED, mangle
from cellspec.backends.printers import CudaPrinter
from cellspec.backends.render import render_template
from cellspec.model import functions as fn_
from cellspec.model import ops
from cellspec.program import ir

#: storage types of the CUDA entry points: suffix -> C++ type
CUDA_DTYPES = {"f32": "float", "f64": "double", "f16": "__half", "bf16": "__nv_bfloat16"}
HOST_DTYPES = {"f32": "float", "f64": "double"}


@dataclass
class Line:
    target: str
    expr: str
    comment: str
    kind: str  # "local" or "out"


@dataclass
class ElementFunction:
    """One pointwise block restricted to one size symbol."""

    name: str
    block: str
    size: str
    title: str
    reads: list[str]
    writes: list[str]
    inouts: list[str]
    lines: list[Line] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # code name -> program name
    simd: bool = False  # ops.vector_pays: 16 units at a time on cs_v16 in the AVX-512 host build

    @property
    def args(self) -> list[dict]:
        """Arguments in ABI order: reads, then in-outs, then writes."""
        return (
            [{"name": n, "io": "in"} for n in self.reads]
            + [{"name": n, "io": "inout"} for n in self.inouts]
            + [{"name": n, "io": "out"} for n in self.writes]
        )


@dataclass
class RowFunction:
    """One pointwise block with reductions: per row, loops over units for the element parts, a
    reduction loop per ``RowSum`` (a block-wide sum on the GPU), the row statements between them.

    ``args`` are (code name, io, size) with size ``ir.ROW`` for a row scalar (one element per
    row); ``sizes`` the size symbols its loops run over; ``body`` the C++ of one row."""

    name: str
    block: str
    title: str
    args: list[dict]
    sizes: list[str]
    body: list[str]
    keys: dict[str, str] = field(default_factory=dict)  # code name -> program name
    row = True


class _SizePrinter(C99CodePrinter):
    """Sizes in the host loop: T -> n_T, H -> n_H."""

    def _print_Symbol(self, expr):
        return f"n_{expr.name}"


def cexpr(e) -> str:
    return _SizePrinter().doprint(sp.sympify(e))


#: the C variable of the first step a rows kind is at: one step (t), the first of a chunk (tc)
_STEP_VAR = {"step": "t", "chunk": "tc"}
#: the same in a ring of one chunk of steps (ir.Loop.ring): a chunk is written from its start
_RING_STEP_VAR = {"step": "t % n_ch", "chunk": ""}


class _Renderer:
    def __init__(self, prog: ir.Program):
        self.p = prog
        keys: list[str] = []
        for fn in prog.functions:
            for blk in fn.pointwise():
                for n in blk.reads:
                    keys.append(n)
                for st in blk.statements:
                    keys.append(st.target)
                    keys.extend(sorted(s.name for s in st.expr.free_symbols))
        seen: dict[str, None] = {}
        for k in keys:
            seen.setdefault(k, None)
        self.names = mangle(list(seen), C_RESERVED)
        self.pr = CudaPrinter(self.names)
        self.functions: list[ElementFunction] = []
        self.row_functions: list[RowFunction] = []
        self.by_block: dict[tuple[str, str], list[ElementFunction]] = {}

    # ------------------------------------------------------------------ row functions
    @staticmethod
    def is_row_block(prog: ir.Program, blk: ir.Pointwise) -> bool:
        """A block with a reduction or a row scalar: it runs row by row (:class:`RowFunction`)."""
        sizes = prog.value_sizes
        return any(st.expr.atoms(fn_.RowSum) for st in blk.statements) or any(
            sizes.get(n) == ir.ROW for n in (*blk.reads, *(st.target for st in blk.statements))
        )

    def row_function(self, fn: ir.Function, blk: ir.Pointwise) -> RowFunction:
        """The block as one :class:`RowFunction` (see there)."""
        sizes = self.p.value_sizes
        n = self.names
        stmts = list(blk.statements)
        defined = {st.target for st in stmts}
        level: dict[str, str] = {r: sizes[r] for r in blk.reads}

        def outer_symbols(e: sp.Expr) -> set[str]:
            flat = e.xreplace({a: sp.S.Zero for a in e.atoms(fn_.RowSum)})
            return {s.name for s in flat.free_symbols}

        for st in stmts:
            if st.target in sizes and not st.temp:
                level[st.target] = sizes[st.target]
            else:
                elems = {level[s] for s in outer_symbols(st.expr) if level.get(s, ir.ROW) != ir.ROW}
                level[st.target] = min(elems) if elems else ir.ROW
        reads_of = {st.target: {s.name for s in st.expr.free_symbols} for st in stmts}
        exported = set(blk.writes)

        # results of the block stored by an earlier pass over the units: later passes load them
        # instead of computing them again (each thread reads back only its own units)
        stored: set[str] = set()

        def needed(names: set[str]) -> list:
            """Element statements (in order) that ``names`` need, within the block."""
            need: set[str] = set()
            todo = [x for x in names if x in defined and level[x] != ir.ROW and x not in stored]
            while todo:
                x = todo.pop()
                if x in need:
                    continue
                need.add(x)
                todo.extend(r for r in reads_of[x] if r in defined and level[r] != ir.ROW and r not in stored)
            return [st for st in stmts if st.target in need]

        def loads(names: set[str], size: str) -> list[str]:
            return [f"        const real {n[r]} = CS_LD(_p_{n[r]}[_r * _ld_{n[r]} + _j]);"
                    for r in sorted(names) if (r in blk.reads or r in stored) and level[r] == size]

        def store_early(inner: list) -> tuple[list[str], set[str]]:
            """Stores of the block's vector results (not also read by it) computed in a pass."""
            out = [x.target for x in inner if x.target in exported and x.target not in blk.reads]
            return [f"        CS_ST(_p_{n[w]}[_r * _ld_{n[w]} + _j], {n[w]});" for w in out], set(out)

        body: list[str] = []
        for r in blk.reads:
            if level[r] == ir.ROW:
                body.append(f"    const real {n[r]} = CS_LD(_p_{n[r]}[_r * _ld_{n[r]}]);")
        loop_sizes: list[str] = []
        # Row statements in order; the reductions they need run in as few passes over the units
        # as the dependencies allow: every pass sums, per size, all the pending reductions whose
        # arguments read only row scalars already known, then the row statements they complete
        # are computed.
        row_stmts = [st for st in stmts if level[st.target] == ir.ROW]
        row_names = {st.target for st in row_stmts}
        known = {r for r in blk.reads if level[r] == ir.ROW}
        acc_of: dict = {}  # RowSum atom -> accumulator name

        def row_deps(names: set[str]) -> set[str]:
            """Row scalars of the block that these names (and the element statements they
            need) read."""
            out = {x for x in names if x in row_names}
            for x in needed(names):
                out |= reads_of[x.target] & row_names
            return out

        pending = list(row_stmts)
        while pending:
            ready_sums = []
            for st in pending:
                for a in sorted(st.expr.atoms(fn_.RowSum), key=sp.default_sort_key):
                    syms = {s.name for s in a.args[0].free_symbols}
                    if a not in acc_of and a not in ready_sums and row_deps(syms) <= known:
                        ready_sums.append(a)
            by_size: dict[str, list] = {}
            for a in ready_sums:
                syms = {s.name for s in a.args[0].free_symbols}
                size = next(level[s] for s in sorted(syms) if level.get(s, ir.ROW) != ir.ROW)
                by_size.setdefault(size, []).append(a)
            for size, sums in sorted(by_size.items()):
                loop_sizes.append(size)
                names = [f"_acc{len(acc_of) + k}" for k in range(len(sums))]
                syms = set().union(*({s.name for s in a.args[0].free_symbols} for a in sums))
                inner = needed(syms)
                used = syms | set().union(*(reads_of[x.target] for x in inner)) if inner else syms
                for name in names:
                    body.append(f"    real {name} = real(0);")
                body.append(f"    CS_SIMD_SUM({', '.join(names)})")
                body.append(f"    for (int64_t _j = _j0; _j < n_{size}; _j += _dj) {{")
                body += loads(used, size)
                for x in inner:
                    body.append(f"        const real {n[x.target]} = {self.pr.doprint(x.expr)};")
                for name, a in zip(names, sums):
                    body.append(f"        {name} += {self.pr.doprint(a.args[0])};")
                early, done = store_early(inner)
                body += early
                body.append("    }")
                stored |= done
                for name, a in zip(names, sums):
                    body.append(f"    {name} = CS_ROW_SUM({name});")
                    self.names[name] = name
                    acc_of[a] = name
            progressed = bool(ready_sums)
            still = []
            for st in pending:
                sums = st.expr.atoms(fn_.RowSum)
                deps = {s.name for s in st.expr.free_symbols} - {
                    s.name for a in sums for s in a.args[0].free_symbols}
                if all(a in acc_of for a in sums) and (deps & row_names) <= known and not still:
                    expr = st.expr.xreplace({a: sp.Symbol(acc_of[a]) for a in sums})
                    comment = f"  // {st.comment}" if st.comment else ""
                    body.append(f"    const real {n[st.target]} = {self.pr.doprint(expr)};{comment}")
                    known.add(st.target)
                    progressed = True
                else:
                    still.append(st)
            pending = still
            if not progressed:  # pragma: no cover - the block's statements are in dependency order
                raise RuntimeError(f"{blk.block}: row statements with unmet dependencies")
        # the element results, one loop per size
        elem_out = [w for w in blk.writes if level[w] != ir.ROW]
        for size in sorted({level[w] for w in elem_out}):
            mine = [w for w in elem_out if level[w] == size and w not in stored]
            if not mine:
                continue
            inner = needed(set(mine))
            used = set().union(*(reads_of[x.target] for x in inner))
            loop_sizes.append(size)
            body.append("    CS_SIMD")
            body.append(f"    for (int64_t _j = _j0; _j < n_{size}; _j += _dj) {{")
            body += loads(used, size)
            for x in inner:
                comment = f"  // {x.comment}" if x.comment else ""
                body.append(f"        const real {n[x.target]} = {self.pr.doprint(x.expr)};{comment}")
            for w in mine:
                body.append(f"        CS_ST(_p_{n[w]}[_r * _ld_{n[w]} + _j], {n[w]});")
            body.append("    }")
        for w in blk.writes:
            if level[w] == ir.ROW:
                body.append(f"    if (_j0 == 0) CS_ST(_p_{n[w]}[_r * _ld_{n[w]}], {n[w]});")
        args = [{"name": n[r], "io": "in", "size": level[r]} for r in sorted(blk.reads) if r not in exported]
        args += [{"name": n[w], "io": "inout" if w in blk.reads else "out", "size": level[w]} for w in blk.writes]
        rf = RowFunction(
            name=f"{self.p.module}_{fn.name}_{blk.block}_rows",
            block=blk.block,
            title=f"{fn.name}: {blk.title}, row by row (reductions over the units)",
            args=args,
            sizes=sorted(set(loop_sizes)),
            body=body,
        )
        rf.keys = {n[k]: k for k in (*blk.reads, *blk.writes)}
        self.row_functions.append(rf)
        return rf

    # ------------------------------------------------------------------ element functions
    def split(self, fn: ir.Function, blk: ir.Pointwise) -> list[ElementFunction]:
        """The block as one element function per size symbol (what crosses sizes lives in slots)."""
        key = (fn.name, blk.block)
        sizes = self.p.value_sizes
        stmts = blk.statements
        defined = {st.target for st in stmts}
        reads_of = {st.target: {s.name for s in st.expr.free_symbols} for st in stmts}
        size: dict[str, str | None] = {}
        for st in stmts:
            known = {size.get(r) if r in defined else sizes.get(r) for r in reads_of[st.target]} - {None}
            size[st.target] = sizes.get(st.target) or (min(known) if known else None)
        exported = set(blk.writes)
        out = []
        for g in sorted({sz for sz in size.values() if sz is not None}):
            need = {t for t in defined if size[t] == g}
            changed = True
            while changed:
                changed = False
                for t in list(need):
                    for r in reads_of[t]:
                        if r in defined and r not in need:
                            need.add(r)
                            changed = True
            mine = [st for st in stmts if st.target in need]
            live = {st.target for st in mine if st.target in exported and not st.temp}
            for st in reversed(mine):
                if st.target in live:
                    live |= reads_of[st.target] & defined
            mine = [st for st in mine if st.target in live]
            reads: set[str] = set()
            assigned: set[str] = set()
            for st in mine:
                reads |= {r for r in reads_of[st.target] if r not in assigned}
                assigned.add(st.target)
            writes = [st.target for st in mine if st.target in exported and not st.temp]
            if not writes:
                continue
            inouts = sorted(set(writes) & reads)
            n = self.names
            ef = ElementFunction(
                name=f"{self.p.module}_{fn.name}_{blk.block}_{g}",
                block=blk.block,
                size=g,
                title=f"{fn.name}: {blk.title}, units of size {g}",
                reads=[n[r] for r in sorted(reads) if r not in inouts],
                writes=[n[w] for w in writes if w not in inouts],
                inouts=[n[r] for r in inouts],
            )
            for st in mine:
                kind = "out" if st.target in writes else "local"
                ef.lines.append(Line(n[st.target], self.pr.doprint(st.expr), st.comment, kind))
            ef.keys = {n[k]: k for k in reads | set(writes)}
            ef.simd = ops.vector_pays([st.expr for st in mine])
            out.append(ef)
        self.by_block[key] = out
        self.functions.extend(out)
        return out

    # ------------------------------------------------------------------ host loop
    def ptr(self, fn: ir.Function, name: str, rows: str) -> tuple[str, str]:
        """(pointer expression, row stride) of a slot at step t (rows='step') or at t = 0 over
        all T*B rows."""
        sl = fn.slots[name]
        buf = fn.buffers[sl.buffer]
        if len(buf.shape) == 1:
            return f"b_{buf.name}", "0"
        width = cexpr(buf.shape[-1])
        parts = []
        if buf.timed:
            assert buf.name not in fn.last_only or rows == "step", (buf.name, rows)
            time = self.step_index(fn, buf.name, self.step_var(fn, buf.name).get(rows, ""), sl.time)
            if time != "0":
                parts.append(f"{time} * n_B * ({width})")
        if sl.col != 0:
            parts.append(cexpr(sl.col))
        return f"b_{buf.name}" + "".join(f" + {x}" for x in parts), width

    def d_ptr(self, fn: ir.Function, op, rows: str) -> tuple[str, str]:
        """(pointer, row stride) of a ProjectBack's or WeightGrad's run of its adjoint buffer."""
        g, ld = self.buf_ptr(fn, op.d_out, rows)
        return (f"{g} + {cexpr(op.d_col)}" if op.d_col != 0 else g), ld

    def buf_ptr(self, fn: ir.Function, name: str, rows: str) -> tuple[str, str]:
        buf = fn.buffers[name]
        width = cexpr(buf.shape[-1])
        t = self.step_index(fn, name, self.step_var(fn, name).get(rows, ""), None) if buf.timed else "0"
        if t != "0":
            return f"b_{name} + {t} * n_B * ({width})", width
        return f"b_{name}", width

    @staticmethod
    def step_index(fn: ir.Function, name: str, t: str, offset: int | None) -> str:
        """The C index of a timed buffer's step t + offset ("0" for none), parenthesised where it
        is not one term; modulo 2 for a state of which two steps are kept (Function.last_only)."""
        time = " + ".join(x for x in (t, str(offset) if offset else "") if x) or "0"
        if name in fn.last_only:
            time = f"({time}) % 2" if "+" in time else f"{time} % 2"
        return f"({time})" if " " in time else time

    @staticmethod
    def step_var(fn: ir.Function, name: str) -> dict[str, str]:
        """Where a timed buffer's rows of a step or chunk start (a ring holds one chunk)."""
        return _RING_STEP_VAR if name in fn.loop().ring else _STEP_VAR

    def host_loop(self, fn: ir.Function) -> dict:
        p = self.p
        lines: list[str] = []
        grads_written: set[str] = set()
        # a stack's dW scratch that may be its grads' own block (the glue then passes one buffer
        # whose rows are the matrices' grads: the split copies onto themselves are no-ops): its
        # only writer is one WeightGrad, which gives every matrix its first contribution
        dw_writers = Counter(o.scratch for o in fn.flat() if isinstance(o, ir.WeightGrad) and o.scratch)
        grads_block: dict[str, str] = {}  # scratch -> weight
        shapes = {prm.key: tuple(prm.shape) for prm in p.params}
        forward_weights: list[str] = []  # the floats of the weights a forward loop's steps multiply by

        def rows_of(r: str, k: int = 1) -> str:
            """rows: B_t, the active rows of step t; a row-stacked GEMM runs k rows per row of
            its buffers (they hold the k operands side by side: see ir.Project)."""
            n = {"step": "rows", "chunk": "n_c * n_B"}.get(r, "n_T * n_B")
            return n if k == 1 else f"{k} * {n}"

        def stacked_ptr(name: str, r: str) -> str:
            return self.buf_ptr(fn, name, r)[0]

        # the ops behind a backward loop's steps run on the rows of each chunk of n_ch steps, just
        # after them (ir.Loop.behind): their sums over rows add up chunk by chunk (beta "cs_more"
        # past the first chunk), and what they finish with (a stack's dW split into its grads,
        # the column sums of a dW pass) comes after the last chunk
        span = {"rows": "all", "finish": None, "ind": ""}

        def beta_of(beta: int) -> str:
            """A sum over rows: its beta, or in a chunk past the first, 1."""
            return "1" if beta else ("cs_more" if span["rows"] == "chunk" else "0")

        def finish(ind: str, text: str) -> None:
            """A line an op ends with: after the last chunk (at the loop's indentation), or here."""
            if span["finish"] is None:
                lines.append(ind + text)
            else:
                span["finish"].append(span["ind"] + text)

        def emit(op, ind: str) -> None:
            if isinstance(op, ir.Loop):
                # the ops ahead of the steps run on the rows of a chunk of n_ch steps, just before
                # them (a chunk's results are still in cache when its steps read them)
                ahead = [replace(o, rows="chunk") for o in op.ahead]
                behind = [replace(o, rows="chunk") if hasattr(o, "rows") else o for o in op.behind]
                assert not (ahead and op.reverse), "ops ahead of the steps belong to a forward loop"
                assert not (behind and not op.reverse), "ops behind the steps belong to a backward loop"
                ring = f"; {', '.join(op.ring)} hold{'s' if len(op.ring) == 1 else ''} one chunk" if op.ring else ""
                if ahead or behind:
                    lines.append(f"{ind}// steps per chunk of the work {'ahead of' if ahead else 'behind'} them, "
                                 f"from the caller (all T on a GPU){ring}")
                    lines.append(f"{ind}const int64_t n_ch = dims[{2 + len(p.sizes)}] < 1 ? 1 : dims[{2 + len(p.sizes)}];")
                packs = []  # the weights every step (or chunk) multiplies by: packed once per call
                work = None  # the multiply-adds of the first per-step GEMM (whether a team pays)
                step_weights = []  # the floats of every weight a step multiplies by
                for o in (*ahead, *op.body, None, *behind):  # None: past the steps' (and ahead) ops
                    if o is None:
                        team_packs = len(packs)  # the weights a team's threads multiply by
                    elif isinstance(o, (ir.Project, ir.ProjectBack)) and o.rows in ("step", "chunk"):
                        w = p.weights[o.weight]
                        kind = "nt" if isinstance(o, ir.Project) else "nn"
                        k_op = len(o.operands if kind == "nt" else o.d_operands)
                        m = "n_B" if o.rows == "step" else "n_ch * n_B"  # the rows it is packed for
                        m = m if k_op == 1 else f"{k_op} * {m}"
                        if o.rows == "step" and work is None:
                            work = f"{m} * ({cexpr(w.width)}) * n_{w.inner}"
                        if o.rows == "step":
                            step_weights.append(f"({cexpr(w.width)}) * n_{w.inner}")
                        if (w.name, kind) not in [(x, y) for x, y, _ in packs]:
                            n, k = (cexpr(w.width), f"n_{w.inner}") if kind == "nt" else (f"n_{w.inner}", cexpr(w.width))
                            call = "cs_pack(ctx, " if o.rows == "step" else "cs_pack_if(n_ch < n_T, ctx, "
                            packs.append((w.name, kind, f"{call}{1 if kind == 'nt' else 0}, {m}, {n}, {k}, "
                                                        f"w_{w.name}, n_{w.inner})"))
                for name, kind, call in packs:
                    lines.append(f"{ind}cs_packed<S> pk_{name}_{kind} = {call};")
                if step_weights and not op.reverse and not forward_weights:
                    forward_weights.append(" + ".join(step_weights))
                for o in behind:  # a pass of weight gradients adds up over the chunks
                    if isinstance(o, ir.WeightGrad) and id(o) in wg_runs:
                        lines.append(f"{ind}CS_WGRADS(wg_{run_name[id(o)]});")
                # one team of threads for all steps where a step's GEMM would fork (CS_TEAM_OK)
                # a team's threads may run the steps on rows of their own (CS_SPLIT_ROWS) where every
                # op of a step is row by row: no row-stacked GEMM, no copy into a stacked operand
                split = work is not None and all(
                    isinstance(o, (ir.Pointwise, ir.Zero, ir.Hold))
                    or (isinstance(o, (ir.Project, ir.ProjectBack)) and o.rows == "step" and not o.stacked)
                    for o in op.body)
                team = "CS_TEAM_BEGIN(0)"
                if work is not None:  # (the ops behind the steps run outside the team: their weights aside)
                    own = " && ".join(f"CS_PACKED_OWN(pk_{name}_{kind})" for name, kind, _ in packs[:team_packs])
                    how = "each op's work shared, a barrier after it (cs_for)"
                    if split:
                        lines.append(f"{ind}const int split_rows = CS_SPLIT_OK(n_B, {' + '.join(step_weights)});")
                        how = f"each thread runs the steps on its own rows of the batch (split_rows), else {how}"
                    lines.append(f"{ind}// the steps as one team of threads where a step's GEMM would fork: {how}")
                    team = f"CS_TEAM_BEGIN(CS_TEAM_OK({work}, {own}))"
                outer = ind
                if behind:  # a team per chunk: the work behind it runs outside the team, its ops forking as they do
                    lines.append(f"{ind}for (int64_t tc = n_T > 0 ? (n_T - 1) / n_ch * n_ch : 0; tc >= 0; tc -= n_ch) {{  "
                                 "// chunks of steps tc .. tc + n_c - 1 (all B rows), the last first (T = 0: one of none)")
                    ind = ind + "    "
                    lines.append(f"{ind}const int64_t n_c = n_T - tc < n_ch ? n_T - tc : n_ch;")
                    lines.append(f"{ind}const int cs_more = tc + n_c < n_T;  // past the first chunk: sums over rows add up")
                    for name in op.ring:
                        if name in fn.zero_when_packed:
                            lines.append(f"{ind}if (bs) CS_ZERO(b_{name}, n_c * n_B * ({cexpr(fn.buffers[name].shape[-1])}));"
                                         "  // rows of ended sequences, which no step writes")
                lines.append(ind + team)
                head = ("for (int64_t t = tc + n_c - 1; t >= tc; --t) {" if behind
                        else "for (int64_t t = n_T - 1; t >= 0; --t) {" if op.reverse
                        else "for (int64_t t = 0; t < n_T; ++t) {")
                lines.append(ind + head)
                lines.append(ind + "    const int64_t rows = bs ? bs[t] : n_B;  // variable lengths: rows 0..B_t-1 run")
                if ahead:  # forward loops only (passes.run_ahead)
                    lines.append(f"{ind}    if (t % n_ch == 0) {{  // a chunk starts: steps tc .. tc + n_c - 1 (all B rows)")
                    if split:
                        lines.append(f"{ind}        CS_SPLIT_PAUSE();  // the team shares the chunk's work, once every thread is done with the last chunk")
                    lines.append(f"{ind}        const int64_t n_c = n_T - t < n_ch ? n_T - t : n_ch;")
                    lines.append(f"{ind}        const int64_t tc = t;")
                    for o in ahead:
                        emit(o, ind + "        ")
                    lines.append(f"{ind}    }}")
                if split:
                    lines.append(f"{ind}    CS_SPLIT_ROWS(split_rows, n_B);")
                for o in op.body:
                    emit(o, ind + "    ")
                lines.append(ind + "}")
                if split:
                    lines.append(ind + "CS_SPLIT_DONE();")
                lines.append(ind + "CS_TEAM_END")
                if behind:  # backward loops only (passes.run_behind)
                    lines.append(f"{ind}// the work behind the chunk's steps, on its rows")
                    span.update(rows="chunk", finish=[], ind=outer)
                    for o in behind:
                        emit(o, ind)
                    done = span["finish"]
                    span.update(rows="all", finish=None)
                    ind = outer
                    lines.append(ind + "}")
                    lines.extend(done)  # after the last chunk
                for name, kind, _ in packs:
                    lines.append(f"{ind}cs_unpack(pk_{name}_{kind});")
            elif isinstance(op, ir.Pointwise) and self.is_row_block(p, op):
                rf = self.row_function(fn, op)
                args = []
                for a in rf.args:
                    ptr, ld = self.ptr(fn, rf.keys[a["name"]], op.rows)
                    args.append(f"{ptr}, {ld}")
                lines.append(f"{ind}// {rf.title}")
                lines.append(f"{ind}CS_ROWS({rf.name}, {rows_of(op.rows)}, "
                             + ", ".join([*(f"n_{s}" for s in rf.sizes), *args]) + ");")
            elif isinstance(op, ir.Pointwise):
                for ef in self.split(fn, op):
                    args = []
                    for a in ef.args:
                        ptr, ld = self.ptr(fn, ef.keys[a["name"]], op.rows)
                        args.append(f"{ptr}, {ld}")
                    lines.append(f"{ind}// {ef.title}")
                    lines.append(f"{ind}CS_PW({ef.name}, {rows_of(op.rows)}, n_{ef.size}, " + ", ".join(args) + ");")
            elif isinstance(op, ir.Project):
                w = p.weights[op.weight]
                k = len(op.operands)
                if op.stacked:  # [k * rows, inner] rows of the operands side by side: one GEMM
                    a, lda = stacked_ptr(op.stacked, op.rows), f"n_{w.inner}"
                    c, ldc = stacked_ptr(op.out, op.rows), cexpr(w.width)
                    what = f"[{'; '.join(op.operands)}] (rows stacked, side by side in {op.stacked})"
                else:
                    a, lda = self.ptr(fn, op.operands[0], op.rows)
                    c, ldc = self.buf_ptr(fn, op.out, op.rows)
                    what = op.operands[0]
                lines.append(f"{ind}// {op.out} = {what} @ [{', '.join(w.matrices)}]^T  ({op.comment})")
                if op.rows in ("step", "chunk"):  # the weight packed once before the loop
                    lines.append(f"{ind}CS_GEMM_NT_PACKED({rows_of(op.rows, k)}, {cexpr(w.width)}, n_{w.inner}, {a}, "
                                 f"{lda}, pk_{w.name}_nt, {c}, {ldc}, 0);")
                else:
                    lines.append(f"{ind}CS_GEMM_NT({rows_of(op.rows, k)}, {cexpr(w.width)}, n_{w.inner}, {a}, {lda}, "
                                 f"w_{w.name}, n_{w.inner}, {c}, {ldc}, 0);")
            elif isinstance(op, ir.ProjectBack):
                w = p.weights[op.weight]
                k = len(op.d_operands)
                if op.stacked:
                    g, ldg = stacked_ptr(op.d_out, op.rows), cexpr(w.width)
                    c, ldc = stacked_ptr(op.stacked, op.rows), f"n_{w.inner}"
                    what = f"[{'; '.join(op.d_operands)}] (side by side in {op.stacked})"
                else:
                    g, ldg = self.d_ptr(fn, op, op.rows)
                    c, ldc = self.ptr(fn, op.d_operands[0], op.rows)
                    what = op.d_operands[0]
                beta = 1 if op.accumulate else 0
                lines.append(f"{ind}// {what} {'+=' if op.accumulate else '='} {op.d_out} @ [{', '.join(w.matrices)}]")
                if op.rows in ("step", "chunk"):
                    lines.append(f"{ind}CS_GEMM_NN_PACKED({rows_of(op.rows, k)}, n_{w.inner}, {cexpr(w.width)}, {g}, "
                                 f"{ldg}, pk_{w.name}_nn, {c}, {ldc}, {beta});")
                else:
                    lines.append(f"{ind}CS_GEMM_NN({rows_of(op.rows, k)}, n_{w.inner}, {cexpr(w.width)}, {g}, {ldg}, "
                                 f"w_{w.name}, n_{w.inner}, {c}, {ldc}, {beta});")
            elif isinstance(op, ir.Stack):
                lines.append(f"{ind}// {op.comment}")
                for src, tgt in zip(op.sources, op.targets):
                    s_ptr, s_ld = self.ptr(fn, src, op.rows)
                    t_ptr, t_ld = self.ptr(fn, tgt, op.rows)
                    lines.append(f"{ind}CS_COPY_ROWS({rows_of(op.rows)}, n_{fn.slots[tgt].size}, {s_ptr}, {s_ld}, "
                                 f"{t_ptr}, {t_ld});")
            elif isinstance(op, ir.WeightGrad) and id(op) in wg_runs:
                emit_weight_grads(wg_runs[id(op)], ind)
            elif isinstance(op, ir.WeightGrad) and id(op) in wg_done:
                pass  # one pass over its adjoint with the first of its run
            elif isinstance(op, ir.WeightGrad):
                w = p.weights[op.weight]
                k = len(op.operands)
                rows = span["rows"]
                if op.stacked:  # every operand's rows: k * T * B rows of [k * rows, inner]
                    g, ldg = stacked_ptr(op.d_out, rows), cexpr(w.width)
                    x, ldx = stacked_ptr(op.stacked, rows), f"n_{w.inner}"
                    what = f"[{'; '.join(op.operands)}] (side by side in {op.stacked})"
                else:
                    g, ldg = self.d_ptr(fn, op, rows)
                    x, ldx = self.ptr(fn, op.operands[0], rows)
                    what = op.operands[0]
                inner_rows = rows_of(rows, k)
                lines.append(f"{ind}// d[{', '.join(w.matrices)}] += {op.d_out}^T @ {what}  ({op.comment})")
                if op.scratch:  # the stack's dW in one GEMM, then a block per matrix
                    note_grads_block(op, ind)
                    lines.append(f"{ind}CS_GEMM_TN({cexpr(w.width)}, n_{w.inner}, {inner_rows}, {g}, {ldg}, {x}, {ldx}, "
                                 f"b_{op.scratch}, n_{w.inner}, {beta_of(0)});")
                    for text in scratch_adds(op):
                        finish(ind, text)
                    return
                for (col, sz), mat in zip(w.offsets(), w.matrices):
                    beta = 1 if mat in grads_written else 0
                    grads_written.add(mat)
                    gcol = f"{g} + {cexpr(col)}" if col != 0 else g
                    lines.append(f"{ind}CS_GEMM_TN(n_{sz}, n_{w.inner}, {inner_rows}, {gcol}, {ldg}, {x}, {ldx}, "
                                 f"g_{mat}, n_{w.inner}, {beta_of(beta)});")
            elif isinstance(op, ir.RowSum):
                rows = span["rows"]
                src, ld = self.ptr(fn, op.source, rows)
                sz = fn.slots[op.source].size
                wg = summed.get(id(op))  # its column sums from the dW pass
                rowsum = f"CS_COLSUM(wg_{wg}, " if wg else "CS_ROWSUM("
                how = (f" (column sums of {fn.slots[op.source].buffer} from its dW pass where the own kernel ran it)"
                       if wg else "")
                # the pass's sums where it has them (after the last chunk), else this one's rows
                off = cexpr(sp.expand(fn.slots[op.source].col - summed_col[id(op)])) if wg else ""
                dst, beta = (f"g_{op.param[0]}", 1 if op.param[0] in grads_written else 0) if len(op.param) == 1 else (f"b_{op.scratch}", 0)
                if len(op.param) == 1:
                    grads_written.add(op.param[0])
                    lines.append(f"{ind}// d[{op.param[0]}] += sum over rows of {op.source}{how}")
                else:
                    lines.append(f"{ind}// d[{', '.join(op.param)}] += sum over rows of {op.source} (summed once){how}")
                lines.append(f"{ind}{rowsum}{rows_of(rows)}, n_{sz}, {src}, {ld}, {dst}, {beta_of(beta)});")
                if wg:
                    finish(ind, f"CS_COLSUM_END(wg_{wg}, n_{sz}, {off}, {dst}, {beta});")
                for prm in op.param if len(op.param) > 1 else ():
                    b = 1 if prm in grads_written else 0
                    grads_written.add(prm)
                    finish(ind, f"CS_ADD(n_{sz}, b_{op.scratch}, g_{prm}, {b});")
            elif isinstance(op, ir.AddRows):
                src, ld = self.ptr(fn, op.source, span["rows"])
                dst, ldd = self.ptr(fn, f"grad_input:{op.input}", span["rows"])
                sz = fn.slots[op.source].size
                lines.append(f"{ind}// d_{op.input} += {op.source}")
                lines.append(f"{ind}CS_ADD_ROWS({rows_of(span['rows'])}, n_{sz}, {src}, {ld}, {dst}, {ldd});")
            elif isinstance(op, ir.Zero):  # inside the loop: a [B, n] carried adjoint, active rows
                buf = fn.buffers[op.buffer]
                lines.append(f"{ind}CS_ZERO_ROWS(b_{op.buffer}, rows, {cexpr(buf.shape[-1])});")
            elif isinstance(op, ir.Hold):
                w = cexpr(fn.buffers[op.buffer].shape[-1])
                b = f"b_{op.buffer}"
                now, nxt = (self.step_index(fn, op.buffer, "t", k) for k in (0, 1))
                lines.append(f"{ind}// ended sequences hold their state: rows B_t.. of {op.buffer}[t + 1] = {op.buffer}[t]")
                lines.append(f"{ind}CS_HOLD_ROWS({b} + {nxt} * n_B * ({w}), {b} + {now} * n_B * ({w}), rows, n_B, {w});")
            else:  # pragma: no cover
                raise TypeError(op)

        zero_fill = []
        for b in fn.buffers.values():
            if b.init == "zeros":
                zero_fill.append((b.name, " * ".join(f"({cexpr(d)})" for d in b.shape)))
        # the states' first step (a forward's) or the final states' adjoints (a backward's): copied
        # from the call's trailing pointers, one per state, where not NULL, else zeros
        starts = [p.d_states[v.key] if fn.name == "backward" else f"s_{v.key}" for v in p.states]
        state_in = [(name, " * ".join(f"({cexpr(d)})" for d in fn.buffers[name].shape[-2:])) for name in starts]
        packed_zero = []
        for name in fn.zero_when_packed:
            if name in fn.loop().ring:  # (a backward's: run_ahead keeps these out of a forward's)
                continue  # one chunk of steps: zeroed per chunk (the loop above)
            packed_zero.append((name, " * ".join(f"({cexpr(d)})" for d in fn.buffers[name].shape)))
        # Weight gradients after the loop: a run of WeightGrads into dW scratch that read one
        # adjoint (an LSTM's dW_hh and dW_ih both read dg) is one pass over it (CS_WEIGHT_GRADS),
        # which also gives its column sums to the RowSums over it that follow (CS_COLSUM).
        def run_cols(run: list) -> tuple[sp.Expr, sp.Expr]:
            """The first column of the adjoint a run's WeightGrads read (each from its d_col) and
            the number of columns they cover."""
            cols = [sp.expand(o.d_col) for o in run]
            lo = hi = cols[0]
            for c in cols[1:]:
                if sp.expand(c - lo).is_nonpositive:
                    lo = c
                elif sp.expand(c - hi).is_nonnegative:
                    hi = c
                elif not (sp.expand(c - lo).is_nonnegative and sp.expand(hi - c).is_nonnegative):  # pragma: no cover
                    raise AssertionError(f"runs of {run[0].d_out} in no fixed order: {cols}")
            return lo, sp.expand(hi - lo) + p.weights[run[0].weight].width

        wg_runs: dict[int, list] = {}  # the first WeightGrad of a run -> the run
        wg_done: set[int] = set()  # the others
        run_name: dict[int, str] = {}  # a run's variable (wg_<name>): its adjoint, numbered past the first
        summed: dict[int, str] = {}  # a RowSum -> the run whose column sums it reads
        summed_col: dict[int, sp.Expr] = {}  # and the first column of that run
        runs_over: Counter = Counter()  # adjoint -> runs over it so far
        latest: dict[str, list] = {}  # adjoint -> the runs over it so far: (name, first column, width)
        top = [x for o in fn.ops for x in (o.behind if isinstance(o, ir.Loop) else (o,))]  # the ops after the steps
        for i, o in enumerate(top):
            if isinstance(o, ir.WeightGrad) and o.scratch and not o.stacked and id(o) not in wg_done:
                run = [o]
                for nxt in top[i + 1:]:
                    if not (isinstance(nxt, ir.WeightGrad) and nxt.scratch and not nxt.stacked and nxt.d_out == o.d_out
                            and sp.expand(p.weights[nxt.weight].width - p.weights[o.weight].width) == 0):
                        break
                    run.append(nxt)
                wg_runs[id(o)] = run
                wg_done.update(id(x) for x in run[1:])
                n = runs_over[o.d_out]
                runs_over[o.d_out] += 1
                run_name[id(o)] = o.d_out if n == 0 else f"{o.d_out}_{n}"
                latest.setdefault(o.d_out, []).append((run_name[id(o)], *run_cols(run)))
            elif isinstance(o, ir.RowSum) and fn.slots[o.source].buffer in latest:
                sl = fn.slots[o.source]  # the last run whose columns hold the source's
                for name, col, width in reversed(latest[sl.buffer]):
                    if (sp.expand(sl.col - col).is_nonnegative
                            and sp.expand(col + width - sl.col - ir.size(sl.size)).is_nonnegative):
                        summed[id(o)], summed_col[id(o)] = name, col
                        break

        def note_grads_block(op: ir.WeightGrad, ind: str) -> None:
            """A stack's dW scratch that may be its grads' own block (see dw_writers)."""
            w = p.weights[op.weight]
            if dw_writers[op.scratch] == 1 and all(
                    m not in grads_written and shapes.get(m) == (o, w.inner) for m, o in zip(w.matrices, w.outs)):
                grads_block[op.scratch] = op.weight
                lines.append(f"{ind}// the glue passes the grads of {', '.join(w.matrices)} as rows of b_{op.scratch}: "
                             "the copies below are then no-ops")

        def scratch_adds(op: ir.WeightGrad) -> list[str]:
            """Each matrix's block of the stack's dW scratch, added to (or assigned) its grad."""
            w = p.weights[op.weight]
            adds = []
            for (col, sz), mat in zip(w.offsets(), w.matrices):
                beta = 1 if mat in grads_written else 0
                grads_written.add(mat)
                block = f"b_{op.scratch} + ({cexpr(col)}) * n_{w.inner}" if col != 0 else f"b_{op.scratch}"
                adds.append(f"CS_ADD(n_{sz} * n_{w.inner}, {block}, g_{mat}, {beta});")
            return adds

        def emit_weight_grads(run: list, ind: str) -> None:
            d_out = run[0].d_out
            base = run_cols(run)[0]
            rows = span["rows"]
            g, ldg = self.d_ptr(fn, replace(run[0], d_col=base), rows)
            rhs = []
            adds = []
            for op in run:
                w = p.weights[op.weight]
                assert sp.expand(w.width - p.weights[run[0].weight].width) == 0, "one adjoint, one width"
                x, ldx = self.ptr(fn, op.operands[0], rows)
                a_col = sp.expand(op.d_col - base)
                cols = f"[:, {op.d_col}:{op.d_col + w.width}]" if len({sp.expand(o.d_col) for o in run}) > 1 else ""
                lines.append(f"{ind}// d[{', '.join(w.matrices)}] += {d_out}{cols}^T @ {op.operands[0]}  ({op.comment})")
                note_grads_block(op, ind)
                rhs.append(f"{{{x}, {ldx}, n_{w.inner}, b_{op.scratch}, n_{w.inner}"
                           + (f", {cexpr(a_col)}}}" if a_col != 0 else "}"))
                adds += scratch_adds(op)
            what = "one pass over it for all of them" if len(run) > 1 else "its pass"
            name = run_name[id(run[0])]
            sums = name in summed.values()
            if len(run) > 1 or sums:
                lines.append(f"{ind}// {what}" + (", with its column sums (the bias gradients below)" if sums else ""))
            w = p.weights[run[0].weight]
            if rows == "all":  # else declared before the chunks, whose sums it adds up
                lines.append(f"{ind}CS_WGRADS(wg_{name});")
            lines.append(f"{ind}CS_WEIGHT_GRADS(wg_{name}, {cexpr(w.width)}, {rows_of(rows)}, n_T * n_B, {g}, {ldg}, "
                         f"{int(sums)}, {beta_of(0)}, " + ", ".join(rhs) + ");")
            for text in adds:
                finish(ind, text)

        for op in fn.ops:
            emit(op, "    ")
        params_zero = [prm.key for prm in p.params if prm.key not in grads_written] if fn.name == "backward" else []
        return {
            "name": fn.name,
            "buffers": list(fn.buffers.values()),
            "weights": list(p.weights.values()),
            "grads": [prm.key for prm in p.params] if fn.name == "backward" else [],
            "zero_fill": zero_fill,
            "packed_zero": packed_zero,
            "state_in": state_in,
            "lines": lines,
            "grads_zero": params_zero,
            "grads_block": grads_block,
            "forward_weights": forward_weights[0] if forward_weights else "0",
        }


def render(prog: ir.Program, spec_text: str, version: str, filename: str) -> tuple[str, dict]:
    """The ``.cu`` source of a program, and what its host loops found for the glue (which param
    gradients they never write, so the caller zero-fills them; which dW scratch may be the rows
    of its grads)."""
    r = _Renderer(prog)
    loops = [r.host_loop(fn) for fn in prog.functions]
    ctx = {
        "module": prog.module,
        "cell": prog.cell,
        "version": version,
        "filename": filename,
        "spec_text": spec_text,
        "functions": r.functions,
        "row_functions": r.row_functions,
        "stack_copies": any(isinstance(o, ir.Stack) for fn in prog.functions for o in fn.flat()),
        "dtypes": CUDA_DTYPES,
        "host_dtypes": HOST_DTYPES,
        "loops": loops,
        "dims": ["T", "B", *prog.sizes],
        "c_prelude": ops.c_prelude(),
    }
    text = render_template("native.cu.j2", ctx)
    glue = {lp["name"]: {"grads_zero": lp["grads_zero"], "grads_block": lp["grads_block"]} for lp in loops}
    return text, glue


# ---------------------------------------------------------------------------------------------
# The Python side of the ABI, rendered into the PyTorch module (torch_cell.py): what to allocate
# and pass for each function, and which views of the buffers are its results.
# ---------------------------------------------------------------------------------------------
class _PySizePrinter(C99CodePrinter):
    def _print_Symbol(self, expr):
        return f"_{expr.name}"


def pyexpr(e) -> str:
    return _PySizePrinter().doprint(sp.sympify(e))


def _shape(buf: ir.Buffer, steps: str = "") -> str:
    """The buffer's shape in the glue; ``steps``: its first (time) axis instead (a ring of a
    chunk, the two steps kept of a state)."""
    dims = [pyexpr(d) for d in buf.shape]
    if steps:
        dims[0] = steps
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _view(fn: ir.Function, name: str) -> str:
    """The [T, B, n] view of a slot over the whole sequence."""
    sl = fn.slots[name]
    buf = fn.buffers[sl.buffer]
    t = f"[{sl.time}:{sl.time} + _T]" if (sl.time or sp.expand(buf.shape[0] - ir.T) != 0) else ""
    if sl.time == 0 and t:
        t = "[:_T]"
    cols = ""
    if sl.col != 0 or sp.expand(ir.size(sl.size) - buf.shape[-1]) != 0:
        cols = f"[..., {pyexpr(sl.col)}:{pyexpr(sl.col + ir.size(sl.size))}]"
    return f"{sl.buffer}{t}{cols}"


#: buffers no call returns: they live in the module's workspace between calls (the glue's
#: ``_workspace``) unless the forward saves them for the backward; a zero-initialised one is
#: zeroed by the library (CS_ZERO), as a fresh one is
SCRATCH_ROLES = frozenset({"hoisted_value", "hoisted_gemm", "scratch", "d_gemm", "d_param_rows", "grad_scratch",
                           "d_hoisted_operand", "step_seed", "hoisted_leaf"})


def chunk_work(prog: ir.Program, fn: ir.Function) -> tuple[sp.Expr, sp.Expr, sp.Expr] | None:
    """What the ops ahead of a forward's steps write per row of a step (floats), the floats of
    the weights their GEMMs multiply by, and those of the weights the steps' GEMMs multiply by:
    what the library's chunk of steps is sized by (``Library.chunk_steps``). None: no ops ahead."""
    loop = fn.loop()
    if not loop.ahead:
        return None

    def weight_floats(ops) -> sp.Expr:  # per product, as the host loop's split test counts them
        return sum((ir.size(prog.weights[o.weight].inner) * prog.weights[o.weight].width
                    for o in ops if isinstance(o, ir.Project)), sp.Integer(0))

    per_row = sp.Integer(0)
    for o in loop.ahead:
        if isinstance(o, ir.Project):
            per_row += fn.buffers[o.out].shape[-1]
        elif isinstance(o, ir.Pointwise):
            per_row += sum((ir.size(fn.slots[n].size) for n in o.writes), sp.Integer(0))
    return (per_row if per_row != 0 else sp.Integer(1)), weight_floats(loop.ahead), weight_floats(loop.body)


def glue_context(prog: ir.Program, host: dict, cu_text: str) -> dict:
    """Records for ``native_glue.py.j2``; ``host``: what :func:`render`'s host loops found, per
    function (the grads they never write, the dW scratch that may be its grads' own block)."""
    sizes = []
    for s in prog.sizes:
        src = prog.size_sources[s]
        if src[0] == "input":
            sizes.append((s, f"_xs[{src[1]}].shape[-1]"))
        elif src[0] == "param":
            sizes.append((s, f'_params["{src[1]}"].shape[{src[2]}]'))
    inputs = {v.key: i for i, v in enumerate(prog.inputs)}

    blocks = host.get("backward", {}).get("grads_block", {})
    zeroed = set(host.get("backward", {}).get("grads_zero", ()))

    def allocs(fn: ir.Function, saved_from: dict[str, int] | None) -> list[str]:
        out = []
        ring = fn.loop().ring
        work = chunk_work(prog, fn)
        if work:  # the library runs the ahead ops n_ch steps at a time (all T on a GPU)
            out.append(f"_n_ch = _T if _lib is None else _lib.chunk_steps(_T, _B, _B * ({pyexpr(work[0])}), "
                       f"{pyexpr(work[1])}, {pyexpr(work[2])})")
        elif fn.loop().behind:  # and the ops behind a backward's steps (all T on a GPU)
            out.append("_n_ch = _T if _lib is None else _lib.chunk_steps_behind(_T, _B)")
        # the call's scratch buffers, all from one workspace lookup per dtype (_scratch, _gscratch)
        scratch: dict[str, list[tuple[str, str]]] = {"_scratch": [], "_gscratch": []}
        head = len(out)
        for b in fn.buffers.values():
            if b.name in ring:  # one chunk of steps (ir.Loop.ring)
                scratch["_scratch"].append((b.name, _shape(b, "_n_ch")))
            elif b.role == "input":
                out.append(f"{b.name} = _xs[{inputs[b.name[2:]]}].contiguous()")
            elif b.role == "param":
                out.append(f'{b.name} = _params["{b.name[2:]}"].contiguous()')
            elif saved_from is not None and b.name in saved_from:
                out.append(f"{b.name} = _saved[{saved_from[b.name]}]")
            elif b.role == "state":
                if b.name in fn.last_only:  # steps t and t + 1 only (ir.Function.last_only)
                    scratch["_scratch"].append((b.name, _shape(b, "2")))
                else:
                    out.append(f'{b.name} = _fresh("{b.name}", {_shape(b)})')
            elif b.role == "d_output":
                i = [f"dout_{v.name}" for v in prog.outputs].index(b.name)
                out.append(f"{b.name} = _zeros({_shape(b)}) if _d_outputs[{i}] is None else _d_outputs[{i}].contiguous()")
            elif b.role == "d_state":  # the library starts it from the final state's gradient
                out.append(f'{b.name} = _fresh("{b.name}", {_shape(b)})')
            elif fn.name == "backward" and b.name in blocks:  # the grads' own block (host_loop)
                outs = prog.weights[blocks[b.name]].outs
                split = f"_{outs[0]}" if len(set(outs)) == 1 else f"[{', '.join(f'_{o}' for o in outs)}]"
                out.append(f"{b.name} = _gempty({_shape(b)})")
                out.append(f"_rows_{b.name} = {b.name}.split({split})")
            elif b.role in SCRATCH_ROLES and b.name not in prog.saved and b.init != "arg":
                scratch["_gscratch" if b.role == "grad_scratch" else "_scratch"].append((b.name, _shape(b)))
            elif b.role == "grad_scratch":
                out.append(f"{b.name} = _gempty({_shape(b)})")
            else:
                out.append(f'{b.name} = _fresh("{b.name}", {_shape(b)})')
        lines = [f"{', '.join(n for n, _ in bufs)}{',' if len(bufs) == 1 else ''} = {fn_name}({', '.join(sh for _, sh in bufs)})"
                 for fn_name, bufs in scratch.items() if bufs]
        return out[:head] + lines + out[head:]

    weights = []
    for w in prog.weights.values():
        mats = [f'_params["{m}"]' for m in w.matrices]
        weights.append(f"_stacked({', '.join(mats)})" if len(mats) > 1 else f"{mats[0]}.contiguous()")
    dims = "(_T, _B" + "".join(f", _{s}" for s in prog.sizes) + ")"
    fwd = prog.forward
    funcs = []
    for fn in (prog.forward, prog.inference):
        outs = [_view(fn, v.name) for v in prog.outputs]
        finals = [f"s_{v.key}[_T % 2].clone()" if f"s_{v.key}" in fn.last_only else f"s_{v.key}[_T]" for v in prog.states]
        funcs.append({
            "name": fn.name,
            "dims": "_dims + (_n_ch,)" if fn.loop().ahead else "_dims",  # _n_ch: allocs, from chunk_work
            "allocs": allocs(fn, None),
            "buffers": list(fn.buffers),
            "outputs": outs,
            "finals": finals,
            "saved": list(prog.saved) if fn.name == "forward" else [],
        })
    saved_from = {name: i for i, name in enumerate(prog.saved)}
    bwd = prog.backward
    # the param gradients: rows of a stack's dW block (above), else one allocation per group of
    # equal shape and initial contents, split into its rows (one tensor op for, e.g., the LSTM's
    # eight biases: a torch.empty each cost ~1.2 us)
    in_block = {m: f"_rows_{name}[{i}]" for name, w in blocks.items() for i, m in enumerate(prog.weights[w].matrices)}
    groups: dict[tuple[tuple[str, ...], bool], list[str]] = {}
    for prm in prog.params:
        if prm.key not in in_block:
            groups.setdefault((tuple(prm.shape), prm.key in zeroed), []).append(prm.key)
    grad_groups, where = [], dict(in_block)
    for (shape, zero), keys in groups.items():
        if len(keys) == 1:
            one = "(" + ", ".join(f"_{d}" for d in shape) + ("," if len(shape) == 1 else "") + ")"
            where[keys[0]] = f"_gzeros({one})" if zero else f"_gempty({one})"
            continue
        name = f"_grads_{len(grad_groups)}"
        grad_groups.append(f"{name} = {'_gzeros' if zero else '_gempty'}(({len(keys)}{''.join(f', _{d}' for d in shape)})).unbind(0)")
        where.update({k: f"{name}[{i}]" for i, k in enumerate(keys)})
    grads = [(prm.key, where[prm.key]) for prm in prog.params]
    return {
        "native_sizes": sizes,
        "native_dims": dims,
        "native_weights": weights,
        "native_forward": funcs,
        "native_backward": {
            "allocs": allocs(bwd, saved_from),
            "dims": "_dims + (_n_ch,)" if bwd.loop().behind else "_dims",  # _n_ch: allocs
            "buffers": list(bwd.buffers),
            "grads": grads,
            "grad_groups": grad_groups,
            "d_inputs": [prog.d_inputs.get(v.key, "None") for v in prog.inputs],  # None: a mask
            "d_states": [prog.d_states[v.key] for v in prog.states],
        },
        "native_saved": list(prog.saved),
        "native_op": f"{prog.module}_{hashlib.sha256(cu_text.encode()).hexdigest()[:12]}",
        "native_forward_buffers": list(fwd.buffers),
    }
