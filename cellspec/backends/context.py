"""The render context: one schedule and its backward, as plain data for the templates.

Input: :class:`~cellspec.model.schedule.Schedule`, :class:`~cellspec.model.gradients.Backward`, a
printer class and the target's reserved names. Output: a dict of strings, lists and small
records; the templates only lay it out (no math happens in a template).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from cellspec import __version__
from cellspec.backends.naming import mangle
from cellspec.errors import Source
from cellspec.model.gradients import Assignment, Backward
from cellspec.model.schedule import GemmGroup, Schedule


@dataclass
class Slice:
    name: str  # code name of the projection result (or of its adjoint)
    matrix: str  # code name of the matrix
    spec_matrix: str
    size: str  # size variable of its rows (e.g. _H)
    start: str
    stop: str


@dataclass
class Gemm:
    key: str  # code name of the group (for its buffers)
    operand: str  # code name of the operand
    operand_kind: str  # input | state | value
    operand_size: str
    slices: list[Slice]
    width: str  # total rows of the stacked matrix
    d_operand: str = ""  # code name of d_operand from this GEMM
    comment: str = ""
    batch_free: bool = False  # the operand reads params and constants only: a single row


@dataclass
class Stmt:
    target: str
    expr: str
    comment: str = ""
    temp: bool = False


@dataclass
class StageCtx:
    index: int
    gemms: list[Gemm]
    values: list[Stmt]
    back: list[Stmt] = field(default_factory=list)


def _offsets(sizes: list[str]) -> list[tuple[str, str]]:
    """Start/stop expressions of stacked blocks, e.g. [H, H] -> [(0, _H), (_H, 2*_H)]."""
    out = []
    count: Counter[str] = Counter()

    def expr(c: Counter[str]) -> str:
        terms = [(f"{n}*_{s}" if n > 1 else f"_{s}") for s, n in sorted(c.items()) if n]
        return " + ".join(terms) or "0"

    for s in sizes:
        start = expr(count)
        count[s] += 1
        out.append((start, expr(count)))
    return out


def _per_operand(g: GemmGroup) -> list[GemmGroup]:
    """A group as one group per operand (the one-step records: a row-stacked GEMM is the
    sequence program's business)."""
    return [GemmGroup([o], g.of(o)) for o in g.operands]


def _total(sizes: list[str]) -> str:
    return _offsets(sizes)[-1][1] if sizes else "0"


def build(sched: Schedule, back: Backward, printer_cls, reserved: set[str], prog=None, **printer_kw) -> dict:
    """The template context of one cell; with ``prog`` (its sequence program) the names of what
    only the program computes (a planner pass's new statements) too."""
    m = sched.model
    cell = m.cell
    keys: list[str] = list(m.leaves) + [p.name for p in cell.params] + [v.key for v in m.values]
    keys += [p.key for p in m.projections]
    keys += sorted(set(back.adjoint.values()) | set(back.output_seed.values()))
    keys += sorted(set(back.gemm_adjoint.values()) | set(back.hoisted_gemm_adjoint.values()) | set(back.step_seed.values()))
    temps = [a.target for blk in [*(s.assigns for s in back.stages), back.leaf_assigns, back.hoisted_assigns, back.hoisted_leaf_assigns] for a in blk]
    keys += [t for t in temps if t not in keys]
    if prog is not None:
        keys += [st.target for fn in prog.functions for blk in fn.pointwise() for st in blk.statements]
    seen: list[str] = []
    for k in keys:
        if k not in seen:
            seen.append(k)
    names = mangle(seen, reserved)
    pr = printer_cls(names, **printer_kw)

    def code(expr) -> str:
        return pr.doprint(expr)

    def stmts(assigns: list[Assignment]) -> list[Stmt]:
        return [Stmt(names[a.target], code(a.expr), a.comment, a.temp) for a in assigns]

    def kind(key: str) -> str:
        if key in m.leaves:
            return m.leaves[key].kind
        return "value"

    projections = {p.key: p for p in m.projections}
    exprs = {v.key: v.expr for v in m.values}
    free_memo: dict[str, bool] = {}

    def batch_free(key: str) -> bool:
        """True for what reads no input and no state: it has no batch rows (a param, or a value
        computed from params and constants alone)."""
        if key not in free_memo:
            if key in m.leaves:
                free_memo[key] = m.leaves[key].kind in ("param", "const")
            elif key in projections:
                free_memo[key] = batch_free(projections[key].operand)
            else:
                free_memo[key] = all(batch_free(x.name) for x in exprs[key].free_symbols)
        return free_memo[key]

    def gemm(g: GemmGroup, d_operand: str = "") -> Gemm:
        offs = _offsets([p.out_size for p in g.projections])
        slices = [
            Slice(names[p.key], names[p.matrix], p.matrix, f"_{p.out_size}", a, b)
            for p, (a, b) in zip(g.projections, offs)
        ]
        comment = ", ".join(f"{p.matrix} @ {p.operand}" for p in g.projections)
        gkey = g.key
        return Gemm(
            key=mangle([gkey], reserved)[gkey],
            operand=names[g.operands[0]],
            operand_kind=kind(g.operands[0]),
            operand_size=f"_{g.projections[0].in_size}",
            slices=slices,
            width=_total([p.out_size for p in g.projections]),
            d_operand=names[d_operand] if d_operand else "",
            comment=comment,
            batch_free=batch_free(g.operands[0]),
        )

    stage_ctx = []
    for st in sched.stages:
        vals = [
            Stmt(names[v.key], code(v.expr), f"{cell.filename}:{v.line}  {v.text}")
            for v in st.values
        ]
        gemms = [gemm(one, back.gemm_adjoint[(st.index, one.operands[0])]) for g in st.gemms for one in _per_operand(g)]
        stage_ctx.append(StageCtx(st.index, gemms, vals))
    back_stages = []
    for bs in back.stages:
        sc = next(s for s in stage_ctx if s.index == bs.index)
        sc.back = stmts(bs.assigns)
        back_stages.append(sc)

    zero = back.zero
    adj = {k: names[v] for k, v in back.adjoint.items()}

    # per-step leaf adjoints, each with where it goes
    leaf_stmts = stmts(back.leaf_assigns)
    hoisted_gemms = [gemm(one, back.hoisted_gemm_adjoint[one.operands[0]])
                     for g in sched.hoisted_gemms for one in _per_operand(g)]

    def leaf_info(key: str) -> dict:
        return {
            "key": key,
            "name": names[key],
            "adjoint": adj.get(key, ""),
            "zero": key in zero or key not in back.adjoint,
        }

    sizes_src: dict[str, str] = {}
    for v in cell.inputs:
        sizes_src.setdefault(v.size, f"_{names[v.name]}_seq.shape[-1]")
    for p in cell.params:
        for i, s in enumerate(p.shape):
            sizes_src.setdefault(s, f'_params["{p.name}"].shape[{i}]')
    state_sizes = {}
    for v in cell.states:
        state_sizes.setdefault(v.size, v.name)

    saved_names = [names[k] for k in back.saved]
    hoisted_value_stmts = [
        Stmt(names[v.key], code(v.expr), f"{cell.filename}:{v.line}  {v.text}") for v in sched.hoisted_values
    ]
    state_of_next = {v: s for s, v in m.next_state.items()}

    ctx = {
        "version": __version__,
        "cell": cell,
        "names": names,
        "filename": cell.filename,
        "spec_text": _cell_text(cell),
        "sizes": list(cell.sizes.items()),
        "size_sources": sizes_src,
        "state_size_sources": state_sizes,
        "inputs": [
            {"key": v.name, "name": names[v.name], "size": v.size, **leaf_info(v.name)} for v in cell.inputs
        ],
        # the user's inputs: the engine's (``inputs``) end with the random ops' masks
        "spec_inputs": [
            {"key": v.name, "name": names[v.name], "size": v.size} for v in (m.spec_cell or cell).inputs
        ],
        "masks": [
            {"key": k.key, "size": k.size, "kind": k.kind, "line": k.line,
             "rate": k.rate if isinstance(k.rate, str) else repr(float(k.rate)),
             "const": isinstance(k.rate, str)}
            for k in m.masks
        ],
        "states": [
            {
                "key": v.name,
                "name": names[v.name],
                "size": v.size,
                "next": names[m.next_state[v.name]],
                "next_key": m.next_state[v.name],
                **leaf_info(v.name),
            }
            for v in cell.states
        ],
        "params": [
            {
                "key": p.name,
                "name": names[p.name],
                "shape": p.shape,
                "is_matrix": p.is_matrix,
                "init": p.init,
                **(leaf_info(p.name) if not p.is_matrix else {}),
            }
            for p in cell.params
        ],
        "spec_params": [
            {"key": p.name, "shape": p.shape, "init": p.init} for p in (m.spec_cell or cell).params
        ],
        "consts": [(c.name, repr(float(c.value))) for c in (m.spec_cell or cell).consts],
        "vector_params": [leaf_info(p.name) | {"size": p.shape[0]} for p in cell.params if not p.is_matrix],
        "outputs": [
            {
                "key": k,
                "name": names[k],
                "spec": m.value(k).spec_key,
                "size": m.value(k).size,
                "seed": names[back.output_seed[k]],
                "state": state_of_next.get(k),
            }
            for k in m.outputs
        ],
        "values": [{"key": v.key, "name": names[v.key], "size": v.size} for v in m.values],
        "hoisted_values": hoisted_value_stmts,
        "hoisted_value_info": [
            {
                "name": names[v.key],
                "size": v.size,
                "step_seed": names[back.step_seed[v.key]] if v.key in back.step_seed else "",
                "adjoint": adj.get(v.key, ""),
                "zero": v.key in zero,
            }
            for v in sched.hoisted_values
        ],
        "hoisted_gemms": hoisted_gemms,
        "hoisted_projections": [
            {"name": names[p.key], "size": p.out_size, "adjoint": adj.get(p.key, ""), "zero": p.key in zero or p.key not in back.adjoint}
            for p in sched.hoisted_projections
        ],
        "stages": stage_ctx,
        "back_stages": back_stages,
        "leaf_stmts": leaf_stmts,
        "hoisted_back": stmts(back.hoisted_assigns),
        "hoisted_leaf_back": stmts(back.hoisted_leaf_assigns),
        "hoisted_leaf_adjoint": {k: names[v] for k, v in back.hoisted_leaf_adjoint.items()},
        "saved": saved_names,
        "saved_keys": list(back.saved),
        "step_gemms": [g for s in stage_ctx for g in s.gemms],
        "adjoint_names": {
            names[k]: names[v] for k, v in back.adjoint.items() if k not in zero
        },
    }
    return ctx


def printed_exprs(sched: Schedule, back: Backward) -> list:
    """Every SymPy expression a back end prints for this cell: the hoisted and per-stage forward
    values and every block of backward assignments (what helper selection looks at)."""
    out = [v.expr for v in sched.hoisted_values] + [v.expr for st in sched.stages for v in st.values]
    blocks = [*(s.assigns for s in back.stages), back.leaf_assigns, back.hoisted_assigns, back.hoisted_leaf_assigns]
    return out + [a.expr for blk in blocks for a in blk]


def _cell_text(cell) -> str:
    """The cell's block from its source file, from ``cell`` to its closing brace."""
    lines = Source("", cell.source_text).lines()
    out, depth = [], 0
    for line in lines[cell.line - 1 :]:
        out.append(line.rstrip())
        code = line.split("#", 1)[0]
        depth += code.count("{") - code.count("}")
        if depth <= 0 and "}" in code:
            break
    return "\n".join(out)
