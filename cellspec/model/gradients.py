"""Reverse mode over the schedule: the backward program of one step and of the hoisted part.

Input: :class:`~cellspec.model.schedule.Schedule`. Output: :class:`Backward`.

Each value's adjoint is one expression: its seeds (the incoming state adjoint if it is a next
state, the output adjoint if it is an output), plus, for every value that reads it,
``d_consumer * ∂consumer/∂value``, plus the GEMM backward of every projection it is the operand
of. Partial derivatives come from the derivative rules in :mod:`cellspec.model.functions`;
where a rule yields a function application that the forward already computed and named (the
``Sigmoid(...)`` of ``r = sigmoid(...)``), the saved name replaces it.

Save policy: the forward saves, per step, exactly the values and projection results that the
backward expressions read, plus the operands of the per-step GEMMs (needed for ``dW``); states
(and so the next-state values) are kept as the state sequence, never twice. Everything else the backward needs it recomputes pointwise.

CSE (``sympy.cse``) runs over each block of assignments just before printing; temporaries and
assignments are then ordered topologically so that every name is defined before it is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from cellspec.frontend.semantics import ROW
from cellspec.model import functions as fn
from cellspec.model.lower import Namer
from cellspec.model.schedule import GemmGroup, Schedule


@dataclass
class Assignment:
    target: str
    expr: sp.Expr
    comment: str = ""
    temp: bool = False


@dataclass
class BackwardStage:
    index: int
    assigns: list[Assignment]  # adjoints of this stage's values and GEMM results
    gemms: list[GemmGroup]  # their GEMM backward: d_operand += d_P @ W


@dataclass
class Backward:
    adjoint: dict[str, str]  # forward key -> adjoint key
    output_seed: dict[str, str]  # output value key -> key of its incoming adjoint
    gemm_adjoint: dict[tuple[int, str], str]  # (stage index, operand) -> key of d_operand from GEMM
    stages: list[BackwardStage]  # in backward order (last stage first)
    leaf_assigns: list[Assignment]  # per-step adjoints of inputs, states, vector params, hoisted results
    hoisted_assigns: list[Assignment]  # whole-sequence adjoints of hoisted values (every level, last first)
    hoisted_leaf_assigns: list[Assignment]  # whole-sequence contributions to inputs and vector params
    hoisted_gemm_adjoint: dict[str, str]  # operand -> key of d_operand from the hoisted GEMMs
    step_seed: dict[str, str]  # hoisted value key -> key of its per-step adjoint
    hoisted_leaf_adjoint: dict[str, str]  # leaf key -> key of its whole-sequence contribution
    saved: list[str]  # forward keys the step backward reads (values and projection results)
    zero: set[str] = field(default_factory=set)  # adjoints that are identically zero
    # hoisted_assigns by hoisted level (index k: the adjoints of level k's values, then of the
    # level k-1 GEMM results that hoisted work reads); run last level first, after the loop
    hoisted_level_assigns: list[list[Assignment]] = field(default_factory=list)


def _row_partial(expr: sp.Expr, wrt: sp.Symbol, named: dict[sp.Expr, sp.Symbol]) -> sp.Expr:
    """∂expr/∂wrt for a row scalar ``wrt``: a reduction ``RowSum(e)`` contributes the sum over the
    units of ``∂e/∂wrt`` (``wrt`` is the same number for every unit it is read at)."""
    sums = sorted(expr.atoms(fn.RowSum), key=sp.default_sort_key)
    dummies = {s: sp.Dummy(f"rowsum{i}") for i, s in enumerate(sums)}
    flat = expr.xreplace(dummies)
    d = sp.diff(flat, wrt)
    for s, dummy in dummies.items():
        inner = sp.diff(s.args[0], wrt)
        if inner != 0:
            d += sp.diff(flat, dummy) * fn.RowSum(inner)
    d = d.xreplace({dummy: s for s, dummy in dummies.items()})
    if d != 0 and named:
        d = d.xreplace(named)
    return d


def _partial(expr: sp.Expr, wrt: sp.Symbol, named: dict[sp.Expr, sp.Symbol]) -> sp.Expr:
    d = sp.diff(expr, wrt)
    if d == 0:
        return d
    if named:
        d = d.xreplace(named)
    return d


class _Deriver:
    def __init__(self, sched: Schedule):
        self.s = sched
        self.m = sched.model
        # matrix params are no symbols, but they are names in the generated code too (a param
        # named t0 must not be shadowed by a CSE temporary t0)
        taken = set(self.m.symbols) | {v.key for v in self.m.values} | {p.name for p in self.m.cell.params}
        self.namer = Namer(taken)
        self.sym = dict(self.m.symbols)
        self.adjoint: dict[str, str] = {}
        self.zero: set[str] = set()
        # function applications the forward names: Sigmoid(z) -> r
        self.named = {
            v.expr: self.sym[v.key]
            for v in self.m.values
            if isinstance(v.expr, fn.CellFunction)
        }
        self.exprs = {v.key: v.expr for v in self.m.values}
        self.temp_count = 0
        self._zero_gemm: set[tuple[int, str]] = set()
        self.known: dict[sp.Expr, sp.Symbol] = {}  # assigned adjoint expression -> its name
        self.row = {v.key for v in self.m.values if v.size == ROW}  # row scalars (reductions)

    def new(self, preferred: str) -> str:
        key = self.namer.fresh(preferred)
        self.sym[key] = sp.Symbol(key, real=True)
        return key

    def adj(self, key: str) -> str:
        if key not in self.adjoint:
            self.adjoint[key] = self.new(f"d_{key}")
        return self.adjoint[key]

    def d(self, key: str) -> sp.Expr:
        """The adjoint symbol of key, or 0 if it is known to be zero."""
        if key in self.zero:
            return sp.S.Zero
        return self.sym[self.adj(key)]

    def term(self, consumer: str, wrt: str) -> sp.Expr:
        """d_consumer * ∂consumer/∂wrt, or the name of an adjoint already equal to it (the
        bias of ``f(W@x + b)`` has the adjoint of ``W@x``)."""
        if wrt in self.row:
            t = self.d(consumer) * _row_partial(self.exprs[consumer], self.sym[wrt], self.named)
            if consumer not in self.row and t != 0:  # a vector read the row scalar: sum its units
                t = fn.RowSum(t)
        else:
            t = self.d(consumer) * _partial(self.exprs[consumer], self.sym[wrt], self.named)
        return self.known.get(t, t)

    def assign(self, key: str, total: sp.Expr, out: list[Assignment], comment: str = "") -> None:
        if total == 0:
            self.zero.add(key)
            return
        out.append(Assignment(self.adj(key), total, comment))
        self.known.setdefault(total, self.sym[self.adj(key)])

    def run(self) -> Backward:
        s, m = self.s, self.m
        step_keys = {v.key for v in s.step_values}
        hoisted_keys = {v.key for v in s.hoisted_values}
        step_consumers = {k: [c for c in cs if c in step_keys] for k, cs in s.consumers.items()}
        hoisted_consumers = {k: [c for c in cs if c in hoisted_keys] for k, cs in s.consumers.items()}
        next_of = {v: st for st, v in m.next_state.items()}
        output_seed = {o: self.new(f"d_{o}_out") for o in m.outputs}
        gemm_adjoint: dict[tuple[int, str], str] = {}
        for st in s.stages:
            for g in st.gemms:
                for operand in g.operands:
                    gemm_adjoint[(st.index, operand)] = self.new(f"d_{operand}_gemm")
        for st in m.cell.states:  # the carried state adjoints exist from the start
            self.adj(st.name)

        stages: list[BackwardStage] = []
        for st in reversed(s.stages):
            block: list[Assignment] = []
            for v in reversed(st.values):
                total = sp.S.Zero
                if v.key in next_of:
                    total += self.d(next_of[v.key])
                if v.key in output_seed:
                    total += self.sym[output_seed[v.key]]
                for c in step_consumers.get(v.key, []):
                    total += self.term(c, v.key)
                for (idx, operand), gk in gemm_adjoint.items():
                    if operand == v.key and (idx, operand) not in self.zero_gemm():
                        total += self.sym[gk]
                self.assign(v.key, total, block, f"{v.spec_key or 'operand of ' + v.key}")
            for g in st.gemms:
                for p in g.projections:
                    total = sum((self.term(c, p.key) for c in step_consumers.get(p.key, [])), sp.S.Zero)
                    self.assign(p.key, total, block, f"{p.matrix} @ {p.operand}")
            for g in st.gemms:
                for operand in g.operands:  # d_operand = Σ over its projections (row block of the GEMM)
                    if all(p.key in self.zero for p in g.of(operand)):
                        self._zero_gemm.add((st.index, operand))
            stages.append(BackwardStage(st.index, self.cse(block), st.gemms))

        # per-step adjoints of leaves: inputs, previous states, vector params, hoisted results
        leaf_block: list[Assignment] = []
        late: list[Assignment] = []  # step seeds of hoisted next states
        step_seed: dict[str, str] = {}
        leaf_keys = list(m.leaves) + [p.key for p in s.hoisted_projections] + [v.key for v in s.hoisted_values]
        # hoisted projections that hoisted work reads (W2 @ tanh(W1 @ x)): their adjoint is
        # completed after the loop, so the step gives a per-step part, as for a hoisted value
        hoisted_operands = {o for g in s.hoisted_gemms for o in g.operands}
        read_hoisted = {p.key for p in s.hoisted_projections
                        if hoisted_consumers.get(p.key) or p.key in hoisted_operands}
        for key in leaf_keys:
            if key in m.leaves and m.leaves[key].kind in ("const", "mask"):
                continue  # a const or a drawn mask has no gradient
            total = sum((self.term(c, key) for c in step_consumers.get(key, [])), sp.S.Zero)
            for (idx, operand), gk in gemm_adjoint.items():
                if operand == key and (idx, operand) not in self.zero_gemm():
                    total += self.sym[gk]
            if key in read_hoisted:
                if total != 0:
                    step_seed[key] = self.new(f"d_{key}_step")
                    leaf_block.append(Assignment(step_seed[key], total, "per-step part"))
                continue
            if key in hoisted_keys:
                # a hoisted value can also be an output or a next state (``a = x`` with
                # ``W @ a`` and ``output a``): its seeds are per-step too
                carried = key in next_of
                if carried:  # the state adjoint as it comes in (even if the new one is 0)
                    total += self.sym[self.adj(next_of[key])]
                if key in output_seed:
                    total += self.sym[output_seed[key]]
                # the per-step part of a hoisted value's adjoint gets its own name
                if total != 0:
                    step_seed[key] = self.new(f"d_{key}_step")
                    seed = Assignment(step_seed[key], total, "per-step part")
                    # reading the incoming state adjoint: before the leaf block assigns the new one
                    (late if carried and stages else leaf_block).append(seed)
                continue
            self.assign(key, total, leaf_block, m.leaves[key].kind if key in m.leaves else "hoisted projection")
        if late:  # after the last stage block, which has every step value's adjoint
            stages[-1].assigns.extend(late)
        leaf_assigns = self.cse(leaf_block)

        # whole-sequence backward of the hoisted pass, level by level, last level first: a level's
        # GEMM results have their adjoints (from the step and from later levels), so its GEMM
        # backward gives its operands' adjoints; then its values' adjoints, and the adjoints of
        # the previous level's GEMM results that hoisted work reads
        hoisted_gemm_adjoint = {o: self.new(f"d_{o}_hgemm") for g in s.hoisted_gemms for o in g.operands}
        level_blocks: list[list[Assignment]] = [[] for _ in s.hoisted_levels]
        for lv in reversed(s.hoisted_levels):
            for g in lv.gemms:
                for operand in g.operands:
                    if all(p.key in self.zero for p in g.of(operand)):
                        self.zero.add(hoisted_gemm_adjoint[operand])
            hoisted_block = level_blocks[lv.index]
            for v in reversed(lv.values):
                total = sp.S.Zero
                if v.key in step_seed:
                    total += self.sym[step_seed[v.key]]
                for c in hoisted_consumers.get(v.key, []):
                    total += self.term(c, v.key)
                hk = hoisted_gemm_adjoint.get(v.key)
                if hk is not None and hk not in self.zero:
                    total += self.sym[hk]
                self.assign(v.key, total, hoisted_block, v.spec_key or f"operand of {v.key}")
            if lv.index == 0:
                continue
            for g in s.hoisted_levels[lv.index - 1].gemms:
                for p in g.projections:
                    if p.key not in read_hoisted:
                        continue
                    total = sp.S.Zero
                    if p.key in step_seed:
                        total += self.sym[step_seed[p.key]]
                    for c in hoisted_consumers.get(p.key, []):
                        total += self.term(c, p.key)
                    hk = hoisted_gemm_adjoint.get(p.key)
                    if hk is not None and hk not in self.zero:
                        total += self.sym[hk]
                    self.assign(p.key, total, hoisted_block, f"{p.matrix} @ {p.operand}")
        hoisted_leaf_block: list[Assignment] = []
        hoisted_leaf_adjoint: dict[str, str] = {}
        for key, leaf in m.leaves.items():
            if leaf.kind in ("state", "const", "mask"):
                continue
            total = sum((self.term(c, key) for c in hoisted_consumers.get(key, [])), sp.S.Zero)
            if total != 0:
                hoisted_leaf_adjoint[key] = self.new(f"d_{key}_hoisted")
                hoisted_leaf_block.append(Assignment(hoisted_leaf_adjoint[key], total, leaf.kind))

        saved: list[str] = []
        readable = {v.key for v in s.step_values} | {p.key for g in s.step_gemms for p in g.projections}
        blocks = [a for st in stages for a in st.assigns] + leaf_assigns
        used = set().union(*(a.expr.free_symbols for a in blocks)) if blocks else set()
        used_names = {x.name for x in used}
        for g in s.step_gemms:
            for operand in g.operands:
                if operand in readable:
                    used_names.add(operand)
        in_state_sequence = set(m.next_state.values())  # kept as the [T+1, B, size] state sequence
        for key in [v.key for v in s.step_values] + [p.key for g in s.step_gemms for p in g.projections]:
            if key in used_names and key in readable and key not in saved and key not in in_state_sequence:
                saved.append(key)

        level_assigns = [[] for _ in level_blocks]
        for k in reversed(range(len(level_blocks))):  # CSE in the order they run
            level_assigns[k] = self.cse(level_blocks[k])
        return Backward(
            adjoint=self.adjoint,
            output_seed=output_seed,
            gemm_adjoint=gemm_adjoint,
            stages=stages,
            leaf_assigns=leaf_assigns,
            hoisted_assigns=[a for blk in reversed(level_assigns) for a in blk],
            hoisted_leaf_assigns=self.cse(hoisted_leaf_block),
            hoisted_gemm_adjoint=hoisted_gemm_adjoint,
            step_seed=step_seed,
            hoisted_leaf_adjoint=hoisted_leaf_adjoint,
            saved=saved,
            zero=set(self.zero),
            hoisted_level_assigns=level_assigns,
        )

    def zero_gemm(self) -> set[tuple[int, str]]:
        return self._zero_gemm

    def cse(self, block: list[Assignment]) -> list[Assignment]:
        """Common subexpressions of a block become temporaries; order by dependency."""
        if not block:
            return []

        def names():
            while True:
                yield self.sym[self.new(f"t{self.temp_count}")]
                self.temp_count += 1

        replacements, reduced = sp.cse([a.expr for a in block], symbols=names())
        nodes: list[Assignment] = [Assignment(sym.name, e, temp=True) for sym, e in replacements]
        nodes += [Assignment(a.target, e, a.comment) for a, e in zip(block, reduced)]
        defined = {n.target for n in nodes}
        deps = {n.target: {x.name for x in n.expr.free_symbols} & defined for n in nodes}
        done: set[str] = set()
        ordered: list[Assignment] = []
        pending = list(nodes)
        while pending:
            for i, n in enumerate(pending):
                if deps[n.target] <= done:
                    ordered.append(n)
                    done.add(n.target)
                    del pending[i]
                    break
            else:  # pragma: no cover - a cycle would be a bug in the deriver
                raise RuntimeError("cyclic backward assignments")
        return ordered


def derive(sched: Schedule) -> Backward:
    """Derive the backward program of a schedule (see module docstring)."""
    return _Deriver(sched).run()
