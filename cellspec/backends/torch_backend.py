"""PyTorch back end: ``nn.Module``s whose sequence backward is the generated one.

Input: a schedule and its backward. Output: ``torch_cell.py`` (the modules, the differentiable
``step`` in plain torch ops, and the sequence engine shared with NumPy) and the package's
``__init__.py``.
"""

from __future__ import annotations

import re

from cellspec.backends import context
from cellspec.backends.naming import PYTHON_RESERVED
from cellspec.backends.printers import TorchPrinter
from cellspec.backends.render import render_template
from cellspec.backends.torch_plan import plan as plan_engine
from cellspec.model.gradients import Backward
from cellspec.model.schedule import Schedule

XP = {
    "asarray": "{}",
    "zeros": "torch.zeros(({}), dtype=_dtype, device=_device)",
    "empty": "torch.empty(({}), dtype=_dtype, device=_device)",
    "cast": "{}.to(_dtype)",
    "cat": "torch.cat",
    "contiguous": "{}.contiguous()",
    "broadcast_to": "torch.broadcast_to",
    "dtype_from_saved": '    _dtype = _saved["{0}"].dtype\n    _device = _saved["{0}"].device',
}

HELPERS = {
    "_hard_sigmoid": '''def _hard_sigmoid(z):
    """F.hardsigmoid's values and kinks (gradient 1/6 on the open interval (-3, 3)), but with an
    exact 1/6: torch's own backward uses a float32 1/6 even in float64 (3e-8 relative)."""
    return torch.where((z > -3) & (z < 3), z / 6 + 0.5, (z >= 3).to(z.dtype))''',
    "_minimum": '''def _minimum(a, b):
    a, b = _tensors(a, b)
    return torch.minimum(a, b)''',
    "_maximum": '''def _maximum(a, b):
    a, b = _tensors(a, b)
    return torch.maximum(a, b)''',
    "_clip": '''def _clip(z, lo, hi):
    """torch.clamp with tensor or number bounds (hi wins when lo > hi)."""
    if not isinstance(lo, torch.Tensor) and not isinstance(hi, torch.Tensor):
        return torch.clamp(z, lo, hi)
    # broadcast first: torch.clamp's backward fails when a bound is wider than z ([H] vs [B, H])
    z, lo, hi = torch.broadcast_tensors(*_tensors(z, lo, hi))
    return torch.clamp(z, lo, hi)''',
    "_positive": '''def _positive(z):
    """1 where z > 0 (relu', 0 at 0 as in PyTorch)."""
    return (z > 0).to(z.dtype)''',
    "_inside_open3": '''def _inside_open3(z):
    """1 where -3 < z < 3 (hardsigmoid', open interval as in PyTorch)."""
    return ((z > -3) & (z < 3)).to(z.dtype)''',
    "_less_tie": '''def _less_tie(a, b):
    """1 where a < b, 1/2 where a == b: min/max split ties as torch.minimum/maximum do."""
    a, b = _tensors(a, b)
    return (a < b).to(a.dtype) + 0.5 * (a == b).to(a.dtype)''',
    "_clip_pass": '''def _clip_pass(z, lo, hi):
    """d clip / dz: 1 where lo <= z <= hi."""
    z, lo, hi = _tensors(z, lo, hi)
    return ((z >= lo) & (z <= hi)).to(z.dtype)''',
    "_clip_low": '''def _clip_low(z, lo, hi):
    """d clip / dlo as torch.clamp: 1 where z < lo < hi."""
    z, lo, hi = _tensors(z, lo, hi)
    return ((z < lo) & (lo < hi)).to(z.dtype)''',
    "_clip_high": '''def _clip_high(z, lo, hi):
    """d clip / dhi as torch.clamp: 1 where z > hi or lo > hi."""
    z, lo, hi = _tensors(z, lo, hi)
    return ((z > hi) | (lo > hi)).to(z.dtype)''',
}
_TENSORS = '''def _tensors(*values):
    """Numbers as tensors like the first tensor among values."""
    like = next(v for v in values if isinstance(v, torch.Tensor))
    return tuple(v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=like.dtype, device=like.device) for v in values)'''


def _batch_free(m) -> set[str]:
    """Keys of the values that no input or state reaches (constant over the batch)."""
    batch = {k for k, leaf in m.leaves.items() if leaf.kind != "param"}
    changed = True
    while changed:
        changed = False
        for p in m.projections:
            if p.key not in batch and p.operand in batch:
                batch.add(p.key)
                changed = True
        for v in m.values:
            if v.key not in batch and any(x.name in batch for x in v.expr.free_symbols):
                batch.add(v.key)
                changed = True
    return {v.key for v in m.values} - batch


def _batched(m, key: str, names: dict[str, str], free: set[str]) -> str:
    """The code name of value key in `step`, broadcast to [B, size] if it is batch-free."""
    name = names[key]
    if key not in free:
        return name
    size = m.size_of(key)
    like = next((names[k] for k, leaf in m.leaves.items() if leaf.kind != "param" and leaf.size == size), None)
    if like is not None:
        return f"(torch.zeros_like({like}) + {name})"
    first = names[m.cell.inputs[0].name]
    p, i = next((p, i) for p in m.cell.params for i, d in enumerate(p.shape) if d == size)
    return f"({first}.new_zeros({first}.shape[0], {names[p.name]}.shape[{i}]) + {name})"


def _init_literal(init) -> str:
    if init is None:
        return '("default",)'
    return repr((init.kind, *[float(a) for a in init.args]))


def render(sched: Schedule, back: Backward) -> dict[str, str]:
    ctx = context.build(sched, back, TorchPrinter, PYTHON_RESERVED)
    context.add_sequence_info(ctx)
    first = ctx["inputs"][0]["name"]
    ctx["xp"] = dict(XP, dtype_from_forward=f"    _dtype = _{first}_seq.dtype\n    _device = _{first}_seq.device")
    m = sched.model
    names = ctx["names"]
    pr = TorchPrinter(names)

    eager = []
    for v in sched.hoisted_values:
        eager.append(context.Stmt(names[v.key], pr.doprint(v.expr), f"{m.cell.filename}:{v.line}  {v.text}"))
    for g in sched.hoisted_gemms:
        for p in g.projections:
            eager.append(context.Stmt(names[p.key], f"F.linear({names[p.operand]}, {names[p.matrix]})", f"{p.matrix} @ {p.operand}"))
    for st in sched.stages:
        for g in st.gemms:
            for p in g.projections:
                eager.append(context.Stmt(names[p.key], f"F.linear({names[p.operand]}, {names[p.matrix]})", f"{p.matrix} @ {p.operand}"))
        for v in st.values:
            eager.append(context.Stmt(names[v.key], pr.doprint(v.expr), f"{m.cell.filename}:{v.line}  {v.text}"))
    ctx["eager_stmts"] = eager
    # an output or next state that no input or state reaches (a = tanh(b), or a constant after
    # simplification) has no batch dimension in `step`; give it one
    free = _batch_free(m)
    outs = [_batched(m, o["key"], names, free) for o in ctx["outputs"]]
    ctx["output_expr"] = outs[0] if len(outs) == 1 else "(" + ", ".join(outs) + ")"
    nexts = [_batched(m, m.next_state[s["key"]], names, free) for s in ctx["states"]]
    ctx["state_expr"] = nexts[0] if len(nexts) == 1 else "(" + ", ".join(nexts) + ")"

    sizes = ctx["sizes"]
    extra = [a for s, a in sizes[2:]]
    ctor = [sizes[0][1], sizes[1][1]]
    ctx["ctor_args"] = ", ".join(ctor) + (", *, " + ", ".join(extra) if extra else ", *")
    ctx["ctor_args_seq"] = ", ".join(ctor) + ", batch_first=False, *" + (", " + ", ".join(extra) if extra else "")
    ctx["ctor_pass"] = ", ".join(ctor + [f"{a}={a}" for a in extra]).replace(f"{ctor[0]}, {ctor[1]}", f"{ctor[0]}, {ctor[1]}", 1)
    ctx["ctor_doc_cell"] = ", ".join(ctor + [f"{a}=..." for a in extra])
    ctx["ctor_doc_seq"] = ", ".join(ctor + ["batch_first=False"] + [f"{a}=..." for a in extra])
    ctx["inits"] = {p.name: _init_literal(p.init) for p in m.cell.params}
    ctx["extra_backends"] = ""
    ctx["auto_backend_rule"] = ""
    ctx["extra_dispatch"] = ""
    for hook in EXTENSIONS:
        hook(ctx, sched, back)

    plan_engine(ctx, sched, back)
    ctx["helpers"] = []
    body = render_template("torch_cell.py.j2", ctx)
    used = [n for n in HELPERS if re.search(rf"\b{n}\(", body)]
    helpers = [HELPERS[n] for n in used]
    if any("_tensors(" in HELPERS[n] for n in used):
        helpers.append(_TENSORS)
    ctx["helpers"] = helpers
    text = render_template("torch_cell.py.j2", ctx)
    from cellspec.present.latex import package_context  # the spec and its equations for __init__.py

    ctx.update(package_context(sched, back))
    return {"torch_cell.py": text, "__init__.py": render_template("package_init.py.j2", ctx)}


#: functions (ctx, schedule, backward) -> None that other back ends (CUDA, the fused CPU
#: kernel) register to add a backend choice to the generated modules.
EXTENSIONS: list = []
