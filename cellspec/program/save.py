"""The save policy, as its own pass.

:func:`kept_per_step`: the per-step values and projection results the training forward keeps
over time — exactly those the derived backward reads (``Backward.saved``: the values and
projection results its expressions read, and the operands of the per-step GEMMs, which the dW
GEMMs read). Next states are never kept twice: they are the state sequence.

:func:`bind_saved`: the forward buffers the backward program reads (its pointwise reads, the
operands of its dW GEMMs); the training forward returns them, and nothing else is kept. The
inference forward is planned with nothing kept per step.
"""

from __future__ import annotations

from cellspec.model.gradients import Backward
from cellspec.model.schedule import Schedule
from cellspec.program import ir

FORWARD_ROLES = ("state", "hoisted_gemm", "hoisted_value", "saved", "output")


def kept_per_step(sched: Schedule, back: Backward) -> set[str]:
    return set(back.saved)


def op_buffers(fn: ir.Function, o) -> set[str]:
    """Buffers one op (not a loop) reads or writes."""
    out: set[str] = set()

    def slot(name: str) -> None:
        out.add(fn.slots[name].buffer)

    if isinstance(o, ir.Pointwise):
        for n in o.reads + o.writes:
            slot(n)
    elif isinstance(o, ir.Project):
        if o.stacked:
            out.add(o.stacked)
        else:
            slot(o.operands[0])
        out.add(o.out)
    elif isinstance(o, ir.ProjectBack):
        out.add(o.d_out)
        if o.stacked:
            out.add(o.stacked)
        else:
            slot(o.d_operands[0])
    elif isinstance(o, ir.WeightGrad):
        out.add(o.d_out)
        if o.stacked:
            out.add(o.stacked)
        else:
            slot(o.operands[0])
        if o.scratch:
            out.add(o.scratch)
    elif isinstance(o, ir.Stack):
        out.add(o.buffer)
        for n in o.sources:
            slot(n)
    elif isinstance(o, ir.RowSum):
        slot(o.source)
        if o.scratch:
            out.add(o.scratch)
    elif isinstance(o, ir.AddRows):
        slot(o.source)
    elif isinstance(o, (ir.Zero, ir.Hold)):
        out.add(o.buffer)
    return out


def referenced(fn: ir.Function) -> set[str]:
    """Buffers an op of fn reads or writes."""
    return set().union(*(op_buffers(fn, o) for o in fn.flat()))


def bind_saved(forward: ir.Function, backward: ir.Function) -> tuple[ir.Function, tuple[str, ...]]:
    """Drop the forward buffers the backward does not read from its table; return it and the
    saved buffers (in forward order)."""
    used = referenced(backward)
    keep_roles = ("d_output", "d_state", "d_input")  # arguments and results, read or not
    buffers = {k: v for k, v in backward.buffers.items()
               if k in used or v.role in keep_roles or v.role in ("input", "param")}
    slots = {k: s for k, s in backward.slots.items() if s.buffer in buffers}
    saved = tuple(k for k, v in forward.buffers.items() if v.role in FORWARD_ROLES and k in buffers)
    return ir.Function(backward.name, buffers, slots, backward.ops), saved
