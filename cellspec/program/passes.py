"""Planner passes that change where values live, not what is computed.

:func:`resolve_aliases`: a per-step adjoint that is only another name of an adjoint already
stored over time (the LSTM's ``d_b_ii = d_W_hi_h``: the bias of ``f(W @ x + b + U @ h)`` has the
adjoint of the projection) is not written again. Its slot becomes the original's, so the
reductions after the loop (a vector param's row sum, a hoisted GEMM's dW and d_operand) read
the original; a hoisted GEMM group all of whose adjoints are such names reads the recurrent
group's adjoint buffer as it is (no copy at all).
"""

from __future__ import annotations

import sympy as sp

from cellspec.program.ir import T


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
