"""PyTorch back end: ``nn.Module``s whose sequence backward is the generated one.

Input: a schedule and its backward. Output: ``torch_cell.py`` (the modules, the differentiable
``step`` in plain torch ops, and the sequence engine shared with NumPy) and the package's
``__init__.py``.
"""

from __future__ import annotations

import hashlib

from cellspec.backends import context, python_render
from cellspec.backends.naming import PYTHON_RESERVED
from cellspec.backends.printers import TorchPrinter
from cellspec.backends.render import render_template
from cellspec.model import ops
from cellspec.model.gradients import Backward
from cellspec.model.schedule import Schedule
from cellspec.program.ir import Program

def _batch_free(m) -> set[str]:
    """Keys of the values that no input or state reaches (constant over the batch)."""
    batch = {k for k, leaf in m.leaves.items() if leaf.kind not in ("param", "const")}
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
    like = next((names[k] for k, leaf in m.leaves.items() if leaf.kind not in ("param", "const") and leaf.size == size), None)
    if like is not None:
        return f"(torch.zeros_like({like}) + {name})"
    first = names[m.cell.inputs[0].name]
    p, i = next((p, i) for p in m.cell.params for i, d in enumerate(p.shape) if d == size)
    return f"({first}.new_zeros({first}.shape[0], {names[p.name]}.shape[{i}]) + {name})"


def _init_literal(init) -> str:
    if init is None:
        return '("default",)'
    return repr((init.kind, *[float(a) for a in init.args]))


def render(sched: Schedule, back: Backward, prog: Program, native_glue: dict | None = None) -> dict[str, str]:
    """``torch_cell.py`` and ``__init__.py``; with ``native_glue`` (the native renderer's glue
    context) the modules also run the ``.cu`` file's native library (``backend="fused"`` on the
    CPU, ``"cuda"`` on the GPU)."""
    ctx = context.build(sched, back, TorchPrinter, PYTHON_RESERVED, prog)
    ctx["seq"] = python_render.sequence_context(prog, ctx["names"], TorchPrinter(ctx["names"]), python_render.TORCH)
    # the same program in functional ops: the backward under create_graph=True and torch.func
    ctx["seq_differentiable"] = python_render.sequence_context(
        prog, ctx["names"], TorchPrinter(ctx["names"]), python_render.TORCH_DIFFERENTIABLE
    )
    m = sched.model
    names = ctx["names"]
    pr = TorchPrinter(names)

    eager = []
    for lv in sched.hoisted_levels:  # each level's values, then its GEMMs (which may read them)
        for v in lv.values:
            eager.append(context.Stmt(names[v.key], pr.doprint(v.expr), f"{m.cell.filename}:{v.line}  {v.text}"))
        for g in lv.gemms:
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
    layer = "num_layers=1, *, batch_first=False, dropout=0.0, bidirectional=False"
    ctx["ctor_args_seq"] = ", ".join(ctor) + f", {layer}" + (", " + ", ".join(extra) if extra else "")
    ctx["ctor_pass"] = ", ".join(ctor + [f"{a}={a}" for a in extra]).replace(f"{ctor[0]}, {ctor[1]}", f"{ctor[0]}, {ctor[1]}", 1)
    consts_doc = [f"{k}={v}" for k, v in ctx["consts"]]
    ctx["ctor_doc_cell"] = ", ".join(ctor + [f"{a}=..." for a in extra] + consts_doc)
    ctx["ctor_doc_seq"] = ", ".join(ctor + [layer] + [f"{a}=..." for a in extra] + consts_doc)
    ctx["inits"] = {p.name: _init_literal(p.init) for p in (m.spec_cell or m.cell).params}
    ctx["ctor_consts"] = "".join(f", {k}={v}" for k, v in ctx["consts"])
    ctx["ctor_consts_pass"] = "".join(f", {k}={k}" for k, _ in ctx["consts"])
    ctx["native"] = native_glue is not None
    # the spec param matrices the native library multiplies by as one stack (rows one after
    # another): the modules lay each stack out in one block, so the library takes it as a view
    spec_names = {p.name for p in (m.spec_cell or m.cell).params}
    ctx["stacks"] = [list(w.matrices) for w in prog.weights.values()
                     if len(w.matrices) > 1 and set(w.matrices) <= spec_names] if native_glue else []
    # custom op names: one per module and engine text (two versions may share a process)
    engine_text = "\n".join(ctx["seq"]["forward"]["lines"] + ctx["seq"]["backward"]["lines"])
    ctx["engine_op"] = f"{prog.module}_engine_{hashlib.sha256(engine_text.encode()).hexdigest()[:12]}"
    ctx.update(native_glue or {})

    ctx["helpers"] = ops.helpers("torch", context.printed_exprs(sched, back))
    text = render_template("torch_cell.py.j2", ctx)
    from cellspec.present.latex import package_context  # the spec and its equations for __init__.py

    ctx.update(package_context(sched, back))
    return {"torch_cell.py": text, "__init__.py": render_template("package_init.py.j2", ctx)}

