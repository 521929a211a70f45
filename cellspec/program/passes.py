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

:func:`keep_last`: inference's state sequences no output shows (the LSTM's ``c``), of which an
engine may keep steps t and t + 1 alone. :func:`drop_unread_params`: a function's param buffers
no op reads (a backward's biases) are not among its arguments.
"""

from __future__ import annotations

from dataclasses import replace

import sympy as sp

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
    moved: set[str] = set()
    for a in b.leaf_assigns:
        if a.temp or not isinstance(a.expr, sp.Symbol) or a.target in tb.aliased:
            continue
        d, sl = a.expr.name, tb.slots.get(a.target)
        if d not in param_rows or d in moved or sl is None or sl.time != 0:
            continue
        if sl.buffer not in hoisted_adjoints:
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
