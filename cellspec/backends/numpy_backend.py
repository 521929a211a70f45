"""NumPy back end: the readable reference implementation.

Input: a schedule and its backward. Output: the source of ``numpy_cell.py``, which needs
nothing but NumPy at run time. Functions with no direct NumPy equivalent are emitted as small
helpers at the top of the module (only those the cell's expressions apply, as the op table
:mod:`cellspec.model.ops` spells them), in numerically stable forms.
"""

from __future__ import annotations

from cellspec.backends import context
from cellspec.backends.naming import PYTHON_RESERVED
from cellspec.backends.printers import NumPyPrinter
from cellspec.backends.render import render_template
from cellspec.model import ops
from cellspec.model.gradients import Backward
from cellspec.model.schedule import Schedule

XP = {
    "asarray": "np.asarray({})",
    "zeros": "np.zeros(({}), _dtype)",
    "empty": "np.empty(({}), _dtype)",
    "cast": "np.asarray({}, _dtype)",
    "cat": "np.concatenate",
    "contiguous": "np.ascontiguousarray({})",
    "broadcast_to": "np.broadcast_to",
    "dtype_from_saved": '    _dtype = _saved["{0}"].dtype',
}


def render(sched: Schedule, back: Backward) -> str:
    ctx = context.build(sched, back, NumPyPrinter, PYTHON_RESERVED)
    context.add_sequence_info(ctx)
    first = ctx["inputs"][0]["name"]
    params = ", ".join(f'_params["{p["key"]}"]' for p in ctx["params"])
    ctx["xp"] = dict(XP, dtype_from_forward=f"    _dtype = np.result_type(_{first}_seq, {params})")
    ctx["helpers"] = ops.helpers("numpy", context.printed_exprs(sched, back))
    return render_template("numpy_cell.py.j2", ctx)
