"""Planner passes that change where values live, not what is computed.

:func:`resolve_aliases`: a per-step adjoint that is only another name of an adjoint already
stored over time (the LSTM's ``d_b_ii = d_W_hi_h``: the bias of ``f(W @ x + b + U @ h)`` has the
adjoint of the projection) is not written again. Its slot becomes the original's, so the
reductions after the loop (a vector param's row sum, a hoisted GEMM's dW and d_operand) read
the original; a hoisted GEMM group all of whose adjoints are such names reads the recurrent
group's adjoint buffer as it is (no copy at all).

:func:`run_ahead`: a forward's hoisted work (projections and pointwise levels over all T·B rows)
becomes the loop's ``ahead`` ops, which an engine may run in chunks of steps just before the
steps that read them: the native CPU loop then reads a chunk's hoisted rows from cache, not
from memory (LSTM (64, 32, 256) inference, one thread: 1.20x -> 1.10x torch.nn); and the loop's
``ring``, the results of those ops an engine may keep one chunk of (the native loop's ring
buffer, which stays in L2: (512, 8, 128) inference 1.09-1.15x -> 1.02-1.05x).

:func:`run_behind`: the mirror image for a backward: the weight gradients, row sums and
per-row products after its loop become the loop's ``behind`` ops, which an engine may run in
chunks of steps just after the steps that wrote their adjoints, and the adjoint buffers only
those read become a ring of one chunk: the native CPU loop no longer writes a [T, B, 4H]
adjoint to memory and reads it back (torch.nn's GRU at (64, 32, 256), one thread: training
0.96x the time before). An input's gradient (``dx = dg @ W``) runs first among them, while the
steps' writes of the adjoint are still in cache.

:func:`keep_last`: inference's state sequences no output shows (the LSTM's ``c``), of which an
engine may keep steps t and t + 1 alone. :func:`drop_unread_params`: a function's param buffers
no op reads (a backward's biases) are not among its arguments.

:func:`fold_leaf`: the per-step adjoints that do not need the step's recurrent product (an
input's, a bias's, a hoisted product's: the GRU's ``d_b_in``, the LSTM's ``d_c``) are computed
in the last stage's block, before that product, instead of in a block after it; and a state's
adjoint that is the product plus the rest (the GRU's ``d_h = d_h_gemm + d_h_next*z``) gets the
rest from that block and the product added by the GEMM itself (``+=``, beta = 1), into the state
adjoint's buffer. The block after the product then has nothing left to do in the shipped cells:
one pass over the step's rows less (the GRU's backward element functions, (64, 32, 256), one
thread: 1.5 -> 1.15 ms).

:func:`share_adjoint_buffers` (before the forward is planned, as it fixes a stack's row order):
a hoisted GEMM group some of whose product adjoints are another name of step products' adjoints
and the rest computed values (torch.nn's GRU: ``d_W_ir_x = d_W_hr_h``, ``d_W_iz_x = d_W_hz_h``,
``d_W_in_x = d_b_in``) shares one adjoint buffer with those step groups, ``[d_b_in | d_W_hr_h |
d_W_hz_h | d_W_hn_h]``: each group reads its own run of columns (the hoisted stack reordered to
``[W_in; W_ir; W_iz]`` so that its run is one), and the step's block writes 4H columns a row
instead of 6H (GRU backward element work, (64, 32, 256), one thread: 1.4-2.7 -> 1.2-1.8 ms in a
busy machine).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import permutations

import sympy as sp

from cellspec.model.gradients import Assignment
from cellspec.program import ir
from cellspec.program.ir import T
from cellspec.program.save import op_buffers


def resolve_aliases(planner, tb) -> dict[str, str]:
    """Rewrite slots of aliased adjoints in ``tb`` (the backward's table); return the hoisted
    GEMM groups (by key) whose adjoint buffer is another group's buffer."""
    b, m = planner.b, planner.m
    src = {}
    for a in b.leaf_assigns:
        if a.temp or not isinstance(a.expr, sp.Symbol):
            continue
        sl = tb.slots.get(a.expr.name)
        if sl is None or sl.time != 0:
            continue
        buf = tb.buffers[sl.buffer]
        if buf.timed and buf.shape[0] == T and buf.role == "d_gemm":
            src[a.target] = sl
    reuse: dict[str, str] = {}
    dropped: set[str] = set()
    for p in m.cell.params:
        if p.is_matrix or p.name not in b.adjoint:
            continue
        d = b.adjoint[p.name]
        if d in src and tb.slots.get(d) is not None and tb.slots[d].buffer == f"dp_{p.name}":
            dropped.add(tb.slots[d].buffer)
            tb.slots[d] = src[d]
            tb.aliased.add(d)
    # the other way round: a hoisted product's adjoint that is another name of a vector param's
    # (``d_W_in_x = d_b_in`` in torch.nn's GRU): the param's rows are computed straight into the
    # product's block of the adjoint buffer, which the reduction after the loop then reads
    param_rows = {b.adjoint[p.name]: p.name for p in m.cell.params
                  if not p.is_matrix and p.name in b.adjoint and p.name not in b.zero}
    hoisted_adjoints = {f"dhg_{planner.gkey(g)}" for g in planner.s.hoisted_gemms}
    # a hoisted product's own columns of a shared buffer, which no step reads
    own_columns = set().union(*(sh.own for sh in planner.shared.values()))
    moved: set[str] = set()
    for a in b.leaf_assigns:
        if a.temp or not isinstance(a.expr, sp.Symbol) or a.target in tb.aliased:
            continue
        d, sl = a.expr.name, tb.slots.get(a.target)
        if d not in param_rows or d in moved or sl is None or sl.time != 0:
            continue
        if sl.buffer not in hoisted_adjoints and a.target not in own_columns:
            continue  # (a step product's adjoint is read inside the loop, maybe before the param's rows are)
        own = tb.slots.get(d)
        if own is None or own.buffer != f"dp_{param_rows[d]}" or sp.expand(ir.size(own.size) - ir.size(sl.size)) != 0:
            continue
        dropped.add(own.buffer)
        tb.slots[d] = sl
        tb.aliased.add(a.target)
        moved.add(d)
    for g in planner.s.hoisted_gemms:
        ds = [b.adjoint.get(p.key) for p in g.projections]
        if any(d is None or d not in src for d in ds):
            continue
        bufs = {src[d].buffer for d in ds}
        w = planner.weight(g)
        if len(bufs) != 1 or any(src[d].col != col for d, (_, col, _) in zip(ds, planner.columns(g))):
            continue
        buf = bufs.pop()
        if sp.expand(tb.buffers[buf].shape[-1] - len(g.operands) * w.width) != 0:
            continue
        reuse[planner.gkey(g)] = buf
        for d in ds:
            dropped.add(tb.slots[d].buffer)
            tb.slots[d] = src[d]
            tb.aliased.add(d)
    for name in dropped:
        if not any(sl.buffer == name for sl in tb.slots.values()):
            tb.buffers.pop(name, None)
    return reuse


@dataclass(frozen=True)
class SharedAdjoints:
    """One ``[T, B, width]`` adjoint buffer for a hoisted GEMM group and step groups: where each
    group's run of columns starts, and the hoisted group's projections in their new stack order."""

    buffer: str
    hoisted: str  # the hoisted group's key
    width: sp.Expr
    first_col: dict  # group key -> its first column in the buffer
    order: tuple  # the hoisted group's projection keys, in stack (= column) order
    names: dict  # a hoisted product's adjoint -> the step product's adjoint it is another name of
    own: frozenset  # the hoisted product adjoints that are no such name (their own columns)


def share_adjoint_buffers(sched, back) -> list[SharedAdjoints]:
    """Lay out, for every hoisted GEMM group (one operand) whose product adjoints are partly
    other names of step products' adjoints (``leaf: d_W_ir_x = d_W_hr_h``) and partly its own,
    or are other names of the adjoints of several step groups, one adjoint buffer where each
    step group keeps its column order and the hoisted group's columns are one run: the step
    groups in some order and the hoisted group's own columns as one block among them, the first
    arrangement (step groups in schedule order first, the own block first) that works. A group
    whose adjoints are all names of one step group's reads that group's buffer as it is
    (:func:`resolve_aliases`); row-stacked groups keep their own buffers."""
    b = back
    alias = {a.target: a.expr.name for a in b.leaf_assigns if not a.temp and isinstance(a.expr, sp.Symbol)}
    step_of: dict[str, tuple] = {}  # a step product's adjoint -> (its group, its index there)
    for g in sched.step_gemms:
        if len(g.operands) == 1:
            for i, p in enumerate(g.projections):
                if p.key in b.adjoint and p.key not in b.zero:
                    step_of[b.adjoint[p.key]] = (g, i)
    taken: set[str] = set()
    out = []
    for h in sched.hoisted_gemms:
        if len(h.operands) != 1 or any(p.key not in b.adjoint or p.key in b.zero for p in h.projections):
            continue
        match: dict[int, tuple] = {}
        own: list[int] = []
        for j, p in enumerate(h.projections):
            hit = step_of.get(alias.get(b.adjoint[p.key]))
            if hit is not None and hit[0].projections[hit[1]].out_size == p.out_size and hit not in match.values():
                match[j] = hit
            else:
                own.append(j)
        groups = []
        for j in sorted(match):
            if match[j][0] not in groups:
                groups.append(match[j][0])
        if not groups or (not own and len(groups) == 1) or any(g.key in taken for g in groups):
            continue
        hits = {(g.key, i) for g, i in match.values()}
        found = None
        for perm in permutations(groups):
            for pos in range(len(perm) + 1) if own else [None]:
                items: list = list(perm)
                if own:
                    items.insert(pos, None)
                cols: list[tuple] = []  # (group key or None, index)
                for it in items:
                    cols += [(None, j) for j in own] if it is None else [(it.key, i) for i in range(len(it.projections))]
                mine = [n for n, c in enumerate(cols) if c[0] is None or c in hits]
                if mine == list(range(mine[0], mine[0] + len(h.projections))):
                    found = items, cols, mine
                    break
            if found:
                break
        if found is None:
            continue
        items, cols, mine = found
        size_of = {(g.key, i): p.out_size for g in groups for i, p in enumerate(g.projections)}
        size_of.update({(None, j): h.projections[j].out_size for j in own})
        starts, at = [], sp.S.Zero
        for c in cols:
            starts.append(at)
            at = at + ir.size(size_of[c])
        first = {it.key: starts[cols.index((it.key, 0))] for it in items if it is not None}
        first[h.key] = starts[mine[0]]
        back_j = {(g.key, i): j for j, (g, i) in match.items()}
        order = tuple(h.projections[c[1] if c[0] is None else back_j[c]].key for c in (cols[n] for n in mine))
        taken.update(g.key for g in groups)
        stack = {p.key: p.matrix for p in h.projections}
        name = f"dgs_{'_'.join(stack[k] for k in order)}__{h.operands[0]}"
        names = {b.adjoint[h.projections[j].key]: alias[b.adjoint[h.projections[j].key]] for j in match}
        own_adj = frozenset(b.adjoint[h.projections[j].key] for j in own)
        out.append(SharedAdjoints(name, h.key, at, first, order, names, own_adj))
    return out


def free_names(expr: sp.Expr) -> set[str]:
    """The names an expression reads."""
    return {s.name for s in expr.free_symbols}


def fold_leaf(planner, tb, stage: list[Assignment], leaf: list[Assignment],
              products: dict[str, bool]) -> tuple[list[Assignment], list[Assignment], dict[str, bool]]:
    """Move what the leaf block (after the last stage's step GEMMs) can compute before them into
    the last stage's block ``stage``; return the new stage and leaf lists and the GEMM adjoints
    now written straight into a state adjoint's buffer (True: added to what the block wrote).

    ``products``: the adjoints the last stage's GEMMs give (True where the GEMM has one operand,
    so that its result may go to a state adjoint's buffer). A leaf statement stays where it reads
    one of them or a statement that stays (a temporary that a staying statement reads stays too:
    temporaries are not stored across blocks). A state's adjoint ``d = g + rest``, with ``g`` one
    operand's product adjoint read nowhere else: ``rest`` moves, as its own name in ``d``'s
    buffer, and the GEMM adds ``g`` there; ``d = g``: the GEMM writes ``d``'s buffer."""
    b = planner.b
    state_adj = {b.adjoint[v.name]: v.name for v in planner.cell.states
                 if v.name in b.adjoint and v.name not in b.zero}
    reads = [free_names(a.expr) for a in leaf]
    reads_after = [set().union(*reads[i + 1:]) for i in range(len(leaf))]
    stays = set(products)
    for i, a in enumerate(leaf):  # a state's new adjoint the leaf reads again (not so in the shipped cells)
        if a.target in state_adj and a.target in reads_after[i]:
            stays.add(a.target)
    while True:
        before = len(stays)
        for a, r in zip(leaf, reads):
            if r & stays:
                stays.add(a.target)
        staying_reads = set().union(*(r for o, r in zip(leaf, reads) if o.target in stays))
        for a in leaf:
            if a.temp and a.target in staying_reads:
                stays.add(a.target)
        if len(stays) == before:
            break

    def fresh(name: str, like: str) -> str:
        """A new name in the buffer of ``like``."""
        while name in planner.size or name in tb.slots:
            name += "_"
        planner.size[name] = planner.size[like]
        sl = tb.slots[like]
        tb.place(name, sl.buffer, sl.time, sl.col, sl.size)
        return name

    into: dict[str, bool] = {}
    folded: dict[int, Assignment | None] = {}
    for i, a in enumerate(leaf):
        d = a.target
        if a.temp or d not in state_adj or d not in stays or d in reads_after[i]:
            continue
        terms = sp.Add.make_args(a.expr)
        gs = [t for t in terms if isinstance(t, sp.Symbol) and products.get(t.name)]
        if len(gs) != 1 or gs[0].name in into:
            continue
        g = gs[0].name
        rest = sp.Add(*(t for t in terms if t is not gs[0]))
        others = [(o, r) for o, r in zip(leaf, reads) if o is not a]
        if free_names(rest) & stays or any(g in r for _, r in others):
            continue
        if any(d in r for o, r in others if o.target in stays):
            continue  # a staying statement reads the incoming adjoint, which the buffer no longer holds
        old = tb.slots[g].buffer
        tb.slots[g] = tb.slots[d]
        if not any(sl.buffer == old for sl in tb.slots.values()):
            tb.buffers.pop(old, None)
        into[g] = rest != 0
        folded[i] = None if rest == 0 else Assignment(
            fresh(f"{d}_direct", d), rest,
            f"state {state_adj[d]}, less the recurrent product's share (the GEMM adds it)")
    moved, kept, states = [], [], []
    for i, a in enumerate(leaf):
        if i in folded:
            if folded[i] is not None:
                states.append(folded[i])
        elif a.target in stays:
            kept.append(a)
        elif a.target in state_adj:
            states.append(a)
        else:
            moved.append(a)
    # a state's adjoint computed in a block that reads the incoming one (the LSTM's d_c): a name
    # of its own, in the same buffer (every engine reads a block's inputs before it writes)
    read_there = set().union(*(free_names(a.expr) for a in (*stage, *moved, *states)))
    states = [Assignment(fresh(f"{a.target}_prev", a.target), a.expr,
                         f"state {state_adj[a.target]}, carried to the step before")
              if a.target in state_adj and a.target in read_there else a for a in states]
    # the block's values are not computed again; the state adjoints come last (an engine that
    # reads the incoming one as a view of its buffer has run every statement that reads it)
    known = {a.expr: sp.Symbol(a.target) for a in stage if not a.expr.is_Atom}
    tail = [Assignment(a.target, a.expr.xreplace(known), a.comment, a.temp) for a in (*moved, *states)]
    return stage + tail, kept, into


def run_ahead(fn: ir.Function, saved: tuple[str, ...] = ()) -> ir.Function:
    """Move the ops over all T·B rows before a forward loop into its ``ahead`` ops.

    Each of them computes row r from row r of its inputs (a hoisted GEMM, a hoisted pointwise
    level, a row-stacking copy), so it may run a few steps at a time. What stays before the loop:
    a projection of one broadcast row (params alone: no rows to split), every other op, and any
    op whose result something that stays reads.

    The loop's ``ring``: the hoisted values and products the ahead ops write that nothing
    outside the loop touches, that are not in ``saved`` (what the function keeps for a
    backward) and that every op reads at its own step (no slot at another time)."""
    loop = fn.loop()
    if loop.reverse:
        return fn
    at = fn.ops.index(loop)
    before = list(fn.ops[:at])
    stays = [True] * len(before)
    needed: set[str] = set()  # buffers an op that stays before the loop reads (or writes)
    for i in reversed(range(len(before))):
        op = before[i]
        eligible = (isinstance(op, (ir.Project, ir.Pointwise, ir.Stack)) and op.rows == "all"
                    and not getattr(op, "broadcast", False))
        if eligible and not set(fn.written_by(op)) & needed:
            stays[i] = False
            continue
        needed |= op_buffers(fn, op)
    ahead = tuple(op for op, st in zip(before, stays) if not st)
    if not ahead:
        return fn
    kept = tuple(op for op, st in zip(before, stays) if st)
    outside = set().union(*(op_buffers(fn, op) for op in (*kept, *fn.ops[at + 1:])))
    ring = []
    for op in ahead:
        for name in fn.written_by(op):
            buf = fn.buffers[name]
            if (buf.timed and buf.role in ("hoisted_gemm", "hoisted_value") and name not in saved and name not in outside and name not in ring
                    and name not in fn.zero_when_packed
                    and all(sl.time in (0, None) for sl in fn.slots.values() if sl.buffer == name)):
                ring.append(name)
    new_loop = ir.Loop(loop.reverse, loop.body, (*loop.ahead, *ahead), (*loop.ring, *ring))
    return replace(fn, ops=(*kept, new_loop, *fn.ops[at + 1:]))


def _row_wise(op) -> bool:
    """Whether an op over all T·B rows reads and writes each step's rows apart (or adds up over
    the rows): it may run a chunk of steps at a time."""
    if isinstance(op, (ir.WeightGrad, ir.RowSum, ir.AddRows)):
        return True
    return isinstance(op, (ir.ProjectBack, ir.Stack, ir.Pointwise)) and op.rows == "all" and not getattr(op, "broadcast", False)


def run_behind(fn: ir.Function) -> ir.Function:
    """Move the ops after a backward loop into its ``behind`` ops, where every one of them is
    row-wise (:func:`_row_wise`: weight gradients and row sums add up over the rows, an input's
    gradient and a product per row), so that an engine may run them a chunk of steps at a time,
    just after the chunk's steps.

    The loop's ``ring``: the step adjoints the steps write (``d_gemm`` buffers) that no op
    before the loop touches and that every op reads at its own step: an engine that runs chunks
    keeps one chunk of them (the native CPU loop: the [T, B, 4H] adjoint of torch.nn's GRU at
    (64, 32, 256), 8 MiB written and read again from memory, becomes a ring that stays in L2)."""
    loop = fn.loop()
    at = fn.ops.index(loop)
    after = fn.ops[at + 1:]
    if not loop.reverse or not after or not all(_row_wise(op) for op in after):
        return fn
    outside = set().union(*(op_buffers(fn, op) for op in fn.ops[:at]))
    written = {name for op in loop.body for name in fn.written_by(op)}
    ring = tuple(name for name, buf in fn.buffers.items()
                 if buf.timed and buf.shape[0] == T and buf.role == "d_gemm" and buf.init != "zeros" and name in written
                 and name not in outside and name not in loop.ring
                 and all(sl.time in (0, None) for sl in fn.slots.values() if sl.buffer == name))
    new_loop = replace(loop, behind=_products_first(fn, (*loop.behind, *after)), ring=(*loop.ring, *ring))
    return replace(fn, ops=(*fn.ops[:at], new_loop))


def _products_first(fn: ir.Function, ops: tuple) -> tuple:
    """``ops`` with each product by a weight (:class:`ir.ProjectBack`: an input's gradient) moved
    ahead of the weight gradients and row sums just before it that it does not depend on (nor
    they on it): it then reads its chunk of the adjoint right after the steps wrote it, while
    those rows are in cache, and the weight-gradient pass after it (harness, torch.nn's GRU at
    (64, 32, 256), one thread: the backward 20.15 against 20.42 ms over six turns each; stop 30)."""
    def written(op) -> set[str]:
        return set(fn.written_by(op)) | ({op.scratch} if getattr(op, "scratch", "") else set())

    def passable(other, touched: set[str], writes: set[str]) -> bool:
        """A weight gradient or row sum that writes nothing the product touches, nor touches
        what it writes."""
        return isinstance(other, (ir.WeightGrad, ir.RowSum)) and not (touched & written(other)) \
            and not (writes & op_buffers(fn, other))

    out = list(ops)
    for i, op in enumerate(out):
        if not isinstance(op, ir.ProjectBack):
            continue
        touched, writes = op_buffers(fn, op), written(op)
        j = i
        while j > 0 and passable(out[j - 1], touched, writes):
            j -= 1
        out.insert(j, out.pop(i))
    return tuple(out)


def keep_last(fn: ir.Function, outputs: tuple[str, ...]) -> ir.Function:
    """``Function.last_only``: the state sequences of a function that keeps nothing (inference)
    whose steps no output views (``outputs``: the slots of the function's outputs) and no op
    outside the loop or ahead of its steps touches, each read and written by the steps at t and
    t + 1 only."""
    loop = fn.loop()
    seen = {fn.slots[n].buffer for n in outputs}
    for op in (*(o for o in fn.ops if o is not loop), *loop.ahead):
        seen |= op_buffers(fn, op)
    last = tuple(b.name for b in fn.buffers.values()
                 if b.role == "state" and b.timed and b.name not in seen
                 and all(sl.time in (0, 1) for sl in fn.slots.values() if sl.buffer == b.name))
    return replace(fn, last_only=last) if last else fn


def drop_unread_params(fn: ir.Function) -> ir.Function:
    """Without the param buffers no op of the function reads (a backward does not read the
    biases: the saved gate values hold them): nothing to prepare or pass for them per call."""
    used = set().union(*(op_buffers(fn, op) for op in fn.flat()))
    drop = {n for n, b in fn.buffers.items() if b.role == "param" and n not in used}
    if not drop:
        return fn
    return replace(fn, buffers={n: b for n, b in fn.buffers.items() if n not in drop},
                   slots={k: sl for k, sl in fn.slots.items() if sl.buffer not in drop})
