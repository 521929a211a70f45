"""``cellspec show --stage program``: the sequence program as text, one op per line."""

from __future__ import annotations

import sympy as sp

from cellspec.program import ir


def _dims(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _where(fn: ir.Function, name: str) -> str:
    sl = fn.slots[name]
    buf = fn.buffers[sl.buffer]
    cols = "" if (sl.col == 0 and sp.expand(ir.size(sl.size) - buf.shape[-1]) == 0) else f"[:, {sl.col}:{sl.col + ir.size(sl.size)}]"
    if sl.time is None:
        return f"{sl.buffer}{cols}"
    t = "t" if sl.time == 0 else f"t+{sl.time}"
    return f"{sl.buffer}[{t}]{cols}"


def _stacked(names: tuple[str, ...], buffer: str) -> str:
    """One operand as itself; a row-stacked GEMM's operands as ``[h; c] (in st_W__h__c)``."""
    if len(names) == 1:
        return names[0]
    return f"[{'; '.join(names)}] (side by side in {buffer})"


def _run(fn: ir.Function, prog: ir.Program, op) -> str:
    """``d_out``, or its run of columns where several groups share it."""
    k = len(op.d_operands if isinstance(op, ir.ProjectBack) else op.operands)
    if op.d_col == 0 and sp.expand(k * prog.weights[op.weight].width - fn.buffers[op.d_out].shape[-1]) == 0:
        return op.d_out
    w = prog.weights[op.weight]
    return f"{op.d_out}[:, {op.d_col}:{op.d_col + w.width}]"


def _rows(rows: str, names: tuple[str, ...]) -> str:
    return rows if len(names) == 1 else f"{len(names)} x {rows}, one GEMM"


def _op(fn: ir.Function, prog: ir.Program, op, indent: str) -> list[str]:
    if isinstance(op, ir.Loop):
        head = f"{indent}for t in {'reversed(range(T))' if op.reverse else 'range(T)'}:"

        def chunked(ops: tuple, where: str, when: str) -> list[str]:
            """The ops ahead of or behind each chunk of steps (Loop.ahead, Loop.behind)."""
            if not ops:
                return []
            lines = [f"{indent}  {where} each chunk of steps, on the chunk's rows (one chunk of T steps: {when} the loop):"]
            if op.ring:
                lines.append(f"{indent}  ({', '.join(op.ring)}: one chunk of steps, which each chunk overwrites, where chunks run)")
            return lines + [line for o in ops for line in _op(fn, prog, o, indent + "    ")]

        return ([head] + chunked(op.ahead, "ahead of", "before") + [line for o in op.body for line in _op(fn, prog, o, indent + "  ")]
                + chunked(op.behind, "behind", "after"))
    if isinstance(op, ir.Pointwise):
        lines = [f"{indent}pointwise {op.block} ({op.rows} rows): reads {', '.join(op.reads) or '-'}"]
        for st in op.statements:
            mark = " ->" if st.target in op.writes else "   "
            dest = f"   => {_where(fn, st.target)}" if st.target in op.writes else ""
            lines.append(f"{indent} {mark} {st.target} = {st.expr}{dest}")
        return lines
    rows = "T*B rows" if getattr(op, "rows", "all") == "all" else "B rows"
    if isinstance(op, ir.Project):
        w = prog.weights[op.weight]
        b = " (one row, broadcast)" if op.broadcast else ""
        return [(f"{indent}gemm {op.out} = {_stacked(op.operands, op.stacked)}{b} @ [{', '.join(w.matrices)}]^T   "
                 f"({_rows(rows, op.operands)}: {op.comment})")]
    if isinstance(op, ir.ProjectBack):
        w = prog.weights[op.weight]
        eq = "+=" if op.accumulate else "="
        dest = ""
        if not op.stacked and fn.buffers[fn.slots[op.d_operands[0]].buffer].role == "d_state":
            dest = f"   => {_where(fn, op.d_operands[0])}"  # straight into a state's adjoint
        return [(f"{indent}gemm {_stacked(op.d_operands, op.stacked)} {eq} {_run(fn, prog, op)} @ [{', '.join(w.matrices)}]   "
                 f"({_rows(rows, op.d_operands)}){dest}")]
    if isinstance(op, ir.WeightGrad):
        w = prog.weights[op.weight]
        return [(f"{indent}gemm d[{', '.join(w.matrices)}] += {_run(fn, prog, op)}^T @ {_stacked(op.operands, op.stacked)}   "
                 f"({_rows('T*B rows', op.operands)}: {op.comment})")]
    if isinstance(op, ir.Stack):
        dest = ", ".join(_where(fn, t) for t in op.targets)
        return [f"{indent}copy {', '.join(op.sources)} -> {dest}   ({rows}: {op.comment})"]
    if isinstance(op, ir.RowSum):
        return [f"{indent}d[{', '.join(op.param)}] += sum over T*B rows of {op.source} ({_where(fn, op.source)})"]
    if isinstance(op, ir.AddRows):
        return [f"{indent}d_{op.input} += {op.source}"]
    if isinstance(op, ir.Zero):
        return [f"{indent}{op.buffer} = 0"]
    if isinstance(op, ir.Hold):
        return [f"{indent}{op.buffer}[t+1][B_t:] = {op.buffer}[t][B_t:]   (lengths: ended sequences hold)"]
    raise TypeError(op)  # pragma: no cover


def mask_text(mask) -> str:
    """What a random op's mask holds in training and in evaluation (``cellspec show``)."""
    p = mask.rate if isinstance(mask.rate, str) else repr(float(mask.rate))
    if mask.kind == "zoneout":
        return f"Bernoulli({p}) in training, {p} in evaluation  (line {mask.line}: zoneout)"
    per = "per sequence, the same at every step" if mask.kind == "variational" else "per step"
    what = "variational_dropout" if mask.kind == "variational" else "dropout"
    return f"Bernoulli(1 - {p}) / (1 - {p}) {per} in training, 1 in evaluation  (line {mask.line}: {what})"


def prepared_text(pr) -> str:
    """``W - W^T - gamma*eye``, ``alpha (broadcast)``, ``dt (broadcast)`` for ``show``."""
    parts = []
    for t in pr.terms:
        src = t.source or ("eye" if len(pr.shape) == 2 else "ones")
        if t.transpose:
            src = f"transpose({src})"
        parts.append(str(sp.Mul(t.coef, sp.Symbol(src), evaluate=True)))
    return " + ".join(parts).replace("+ -", "- ") + ("  (broadcast)" if len(pr.shape) == 1 else "")


def render(prog: ir.Program) -> str:
    lines = [f"cell {prog.cell}: sequence program"]
    if prog.consts:
        lines.append("  consts (keyword arguments, default): " + ", ".join(f"{k} = {v!r}" for k, v in prog.consts))
    if prog.masks:
        lines.append("  masks (inputs drawn by the caller once per call; no gradient):")
        for mk in prog.masks:
            lines.append(f"    {mk.key} [T, B, {mk.size}] = {mask_text(mk)}")
    if prog.prepared:
        lines.append("  prepared params (formed once per call, before the loop; gradients go to their terms):")
        for pr in prog.prepared:
            lines.append(f"    {pr.key} {_dims(pr.shape)} = {prepared_text(pr)}")
    if prog.weights:
        lines.append("  weights (param matrices stacked by rows, formed once per call):")
        for w in prog.weights.values():
            lines.append(f"    {w.name} = [{', '.join(w.matrices)}]  [{w.width}, {w.inner}]")
    for fn in prog.functions:
        lines.append(f"  {fn.name}:")
        lines.append("    buffers:")
        for b in fn.buffers.values():
            lines.append(f"      {b.name:<22} {_dims(b.shape):<18} {b.role:<18} {b.init}")
        lines.append("    ops:")
        for op in fn.ops:
            lines += _op(fn, prog, op, "      ")
        if fn.zero_when_packed:
            lines.append(f"    with lengths (step ops on rows 0..B_t-1): zero-filled {', '.join(fn.zero_when_packed)}")
        if fn.last_only:
            lines.append(f"    only the final step returned: {', '.join(fn.last_only)} (steps t and t + 1 are enough)")
    lines.append(f"  saved for the backward: {', '.join(prog.saved) or '(nothing)'}")
    return "\n".join(lines)
