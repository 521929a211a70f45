"""NumPy back end: the readable reference implementation.

Input: a schedule and its backward. Output: the source of ``numpy_cell.py``, which needs
nothing but NumPy at run time. Functions with no direct NumPy equivalent are emitted as small
helpers at the top of the module (only those the cell's expressions apply, as the op table
:mod:`cellspec.model.ops` spells them), in numerically stable forms.
"""

from __future__ import annotations

from cellspec.backends import context, python_render
from cellspec.backends.naming import PYTHON_RESERVED
from cellspec.backends.printers import NumPyPrinter
from cellspec.backends.render import render_template
from cellspec.model import ops
from cellspec.model.gradients import Backward
from cellspec.model.schedule import Schedule
from cellspec.program.ir import Program

def render(sched: Schedule, back: Backward, prog: Program) -> str:
    ctx = context.build(sched, back, NumPyPrinter, PYTHON_RESERVED, prog)
    ctx["seq"] = python_render.sequence_context(prog, ctx["names"], NumPyPrinter(ctx["names"]), python_render.NUMPY)
    ctx["helpers"] = ops.helpers("numpy", context.printed_exprs(sched, back))
    # where a mask's size comes from in a call: the first spec input or param of that size
    sources: dict[str, str] = {}
    for i, v in enumerate(ctx["spec_inputs"]):
        sources.setdefault(v["size"], f"np.shape(_xs[{i}])[-1]")
    for p in prog.spec_params:
        for d, s in enumerate(p.shape):
            sources.setdefault(s, f'np.shape(_params["{p.key}"])[{d}]')
    ctx["mask_sizes"] = {k["size"]: sources[k["size"]] for k in ctx["masks"]}
    return render_template("numpy_cell.py.j2", ctx)
