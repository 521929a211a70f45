"""NumPy back end: the readable reference implementation.

Input: a schedule and its backward. Output: the source of ``numpy_cell.py``, which needs
nothing but NumPy at run time. Functions with no direct NumPy equivalent are emitted as small
helpers at the top of the module (only those the cell uses), in numerically stable forms.
"""

from __future__ import annotations

import re

from cellspec.backends import context, python_render
from cellspec.backends.naming import PYTHON_RESERVED
from cellspec.backends.printers import NumPyPrinter
from cellspec.backends.render import render_template
from cellspec.model.gradients import Backward
from cellspec.model.schedule import Schedule
from cellspec.program.ir import Program

HELPERS = {
    "_sigmoid": '''def _sigmoid(z):
    """1 / (1 + exp(-z)), without overflow for large |z|."""
    return np.exp(-np.logaddexp(0.0, -z))''',
    "_exp": '''def _exp(z):
    """exp(z); overflows to inf (as torch.exp does) without a RuntimeWarning."""
    with np.errstate(over="ignore"):
        return np.exp(z)''',
    "_relu": '''def _relu(z):
    return np.maximum(z, 0)''',
    "_softplus": '''def _softplus(z):
    """log(1 + exp(z)) in the stable form max(z, 0) + log1p(exp(-|z|))."""
    return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))''',
    "_softsign": '''def _softsign(z):
    return z / (1 + np.abs(z))''',
    "_hard_sigmoid": '''def _hard_sigmoid(z):
    """clip(z / 6 + 1/2, 0, 1), PyTorch's hardsigmoid."""
    return np.clip(z / 6 + 0.5, 0, 1)''',
    "_clip": '''def _clip(z, lo, hi):
    """min(max(z, lo), hi), as torch.clamp (hi wins when lo > hi)."""
    return np.minimum(np.maximum(z, lo), hi)''',
    "_positive": '''def _positive(z):
    """1 where z > 0 (relu', 0 at 0 as in PyTorch)."""
    return _mask(z > 0, z)''',
    "_inside_open3": '''def _inside_open3(z):
    """1 where -3 < z < 3 (hard_sigmoid', open interval as in PyTorch)."""
    return _mask((z > -3) & (z < 3), z)''',
    "_less_tie": '''def _less_tie(a, b):
    """1 where a < b, 1/2 where a == b: min/max split ties as torch.minimum/maximum do."""
    return _mask(a < b, a, b) + 0.5 * _mask(a == b, a, b)''',
    "_clip_pass": '''def _clip_pass(z, lo, hi):
    """d clip / dz: 1 where lo <= z <= hi."""
    return _mask((z >= lo) & (z <= hi), z, lo, hi)''',
    "_clip_low": '''def _clip_low(z, lo, hi):
    """d clip / dlo as torch.clamp: 1 where z < lo < hi."""
    return _mask((z < lo) & (lo < hi), z, lo, hi)''',
    "_clip_high": '''def _clip_high(z, lo, hi):
    """d clip / dhi as torch.clamp: 1 where z > hi or lo > hi."""
    return _mask((z > hi) | (lo > hi), z, lo, hi)''',
}
_MASK = '''def _mask(cond, *like):
    """A boolean condition as 0/1 in the floating dtype of the arrays it came from."""
    return cond.astype(np.result_type(*[a for a in like if isinstance(a, np.ndarray)] or [float]))'''


def render(sched: Schedule, back: Backward, prog: Program) -> str:
    ctx = context.build(sched, back, NumPyPrinter, PYTHON_RESERVED)
    ctx["seq"] = python_render.sequence_context(prog, ctx["names"], NumPyPrinter(ctx["names"]), python_render.NUMPY)
    ctx["helpers"] = []
    body = render_template("numpy_cell.py.j2", ctx)
    used = [name for name in HELPERS if re.search(rf"\b{name}\(", body)]
    helpers = [HELPERS[n] for n in used]
    if any(re.search(r"\b_mask\(", HELPERS[n]) for n in used):
        helpers.append(_MASK)
    ctx["helpers"] = helpers
    return render_template("numpy_cell.py.j2", ctx)
