"""The PyTorch sequence engine's plan: what runs once per call, what once per step, and where
each per-step result is written.

Input: a schedule, its backward and the render context of the PyTorch back end. Output: more
context entries (``fwd_*`` and ``bwd_*``) for ``torch_engine.py.j2``. The plan changes no math,
only where it runs and where it lands (see docs/performance.md):

* **loop-invariant pointwise work leaves the loop**: a sub-expression of a step value that reads
  only inputs, hoisted results and vector params (``W_ii @ x + b_ii + b_hi``) is computed once
  over all T·B rows before the loop (``_pre_i_seq``); the step reads its row ``_pre_i_rows[_t]``;
* **per-step results are written in place**: the stacked recurrent GEMM goes into a preallocated
  buffer (``torch.mm(..., out=)``), and a value that is saved for the backward, a next state or
  an output is computed straight into its row of the sequence buffer (``torch.sigmoid(z,
  out=_i_rows[_t])``, where ``_i_rows = _i_seq.unbind(0)``) instead of being allocated and then copied;
* **no per-step indexing**: every ``[T, B, n]`` sequence a loop reads or writes is split into
  its T row blocks once (``unbind(0)``, views), so a step indexes a Python tuple;
* **only what the backward reads is saved**: a next state is read back from the state sequence
  (not saved twice), a hoisted projection or value only if a backward statement reads it;
* **per-step copies become whole-sequence work after the loop**: an adjoint that is only another
  name of a GEMM adjoint already stored in a ``[T, B, width]`` buffer (the bias adjoints of
  ``f(W @ x + b + U @ h)``, the hoisted projection adjoints of an LSTM) is not copied every step:
  vector-param gradients are one sum over T·B rows of that buffer, and a hoisted GEMM whose
  adjoints are all such names reuses the buffer itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sympy as sp

from cellspec.backends.printers import TorchPrinter
from cellspec.model import functions as fn
from cellspec.model import ops
from cellspec.model.gradients import Backward
from cellspec.model.schedule import Schedule

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_WORD = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")


@dataclass
class Lifted:
    """A loop-invariant sub-expression computed once for the whole sequence."""

    name: str
    expr: str
    rows: bool  # [T, B, size] (reads inputs / hoisted results) or [size] (params only)
    comment: str


@dataclass
class StepValue:
    name: str
    code: str  # the statement(s) computing it
    comment: str
    copies: list[str] = field(default_factory=list)  # destinations it is copied into afterwards


def plan(ctx: dict, sched: Schedule, back: Backward) -> None:
    """Add the engine plan to ``ctx`` (see the module docstring)."""
    m = sched.model
    names: dict[str, str] = ctx["names"]
    taken = set(names.values())
    state_of_next = {v: s for s, v in m.next_state.items()}
    hoisted_proj = {p.key for p in sched.hoisted_projections}
    hoisted_vals = {v.key for v in sched.hoisted_values}
    inputs = {v.name for v in m.cell.inputs}
    vector_params = {p.name for p in m.cell.params if not p.is_matrix}
    row_invariant = inputs | hoisted_proj | hoisted_vals
    invariant = row_invariant | vector_params

    # ---- what the backward reads -----------------------------------------------------------
    read: set[str] = set()
    for st in ctx["back_stages"]:
        for s in st.back:
            read |= set(_WORD.findall(s.expr))
    for s in ctx["leaf_stmts"] + ctx["hoisted_back"] + ctx["hoisted_leaf_back"]:
        read |= set(_WORD.findall(s.expr))
    saved_keys = [k for k in back.saved if k not in state_of_next]
    saved = [names[k] for k in saved_keys]
    step_operands = {g.operand for g in ctx["step_gemms"]}  # dW after the loop reads them
    hoisted_proj_saved = [p for p in ctx["hoisted_projections"] if p["name"] in read or p["name"] in step_operands]
    # every hoisted value: the whole-sequence backward of the hoisted part binds them all
    hoisted_val_saved = list(ctx["hoisted_value_info"])
    ctx["fwd_saved"] = saved
    ctx["bwd_reads"] = read
    ctx["fwd_saved_keys"] = saved_keys
    proj_keys = {p.key for p in m.projections}
    ctx["fwd_saved_projections"] = {names[k] for k in saved_keys if k in proj_keys}
    ctx["fwd_hoisted_proj_saved"] = hoisted_proj_saved
    ctx["fwd_hoisted_val_saved"] = hoisted_val_saved

    # ---- loop-invariant sub-expressions ----------------------------------------------------
    lifted: dict[sp.Expr, Lifted] = {}
    lifted_sym: dict[sp.Expr, sp.Symbol] = {}
    extra_names = dict(names)

    def keys_of(e: sp.Expr) -> set[str]:
        return {s.name for s in e.free_symbols}

    def new_lifted(e: sp.Expr, owner: str, comment: str) -> sp.Symbol:
        if e in lifted_sym:
            return lifted_sym[e]
        base = f"_pre_{owner}"
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        sym = sp.Symbol(name, real=True)
        lifted_sym[e] = sym
        rows = bool(keys_of(e) & row_invariant)
        lifted[e] = Lifted(name, "", rows, comment)
        return sym

    def lift(e: sp.Expr, owner: str, comment: str) -> sp.Expr:
        if e.is_Atom:
            return e
        ks = keys_of(e)
        if ks and ks <= invariant:
            return new_lifted(e, owner, comment)
        if isinstance(e, sp.Add):
            inv = [a for a in e.args if keys_of(a) <= invariant]
            sym_inv = [a for a in inv if a.free_symbols]
            if len(sym_inv) >= 2 or (len(sym_inv) == 1 and not sym_inv[0].is_Symbol):
                rest = [a for a in e.args if not keys_of(a) <= invariant]
                return sp.Add(new_lifted(sp.Add(*inv), owner, comment), *[lift(a, owner, comment) for a in rest])
        return e.func(*[lift(a, owner, comment) for a in e.args])

    step_exprs: dict[str, sp.Expr] = {}
    for v in sched.step_values:
        step_exprs[v.key] = lift(v.expr, names[v.key], v.spec_key or v.key)
    for e, li in lifted.items():
        extra_names[li.name] = li.name
    pr = TorchPrinter(extra_names)
    for e, li in lifted.items():
        li.expr = pr.doprint(e)
    ctx["fwd_lifted"] = list(lifted.values())

    # ---- where each step value lands -------------------------------------------------------
    rows = set(inputs) | {v.name for v in m.cell.states} | {p.key for p in m.projections} | hoisted_vals
    rows |= {li.name for li in lifted.values() if li.rows}
    for v in sched.step_values:  # values are in dependency order
        if keys_of(step_exprs[v.key]) & rows:
            rows.add(v.key)
    outputs_plain = {o["key"]: o for o in ctx["outputs"] if not o["state"]}
    state_name = {s["key"]: s["name"] for s in ctx["states"]}
    stage_values: dict[int, list[StepValue]] = {}
    for st in sched.stages:
        out: list[StepValue] = []
        for v in st.values:
            name = names[v.key]
            dests = []
            if v.key in state_of_next:
                dests.append(f"_{state_name[state_of_next[v.key]]}_rows[_t + 1]")
            if v.key in saved_keys:
                dests.append(f"_{name}_rows[_t]")
            if v.key in outputs_plain:
                dests.append(f"_{name}_out_rows[_t]")
            e = step_exprs[v.key]
            comment = f"{m.cell.filename}:{v.line}  {v.text}"
            call = _out_call(e, pr, rows, dests[0]) if dests and v.key in rows else None
            if call is not None:
                code = f"{name} = {call}"
                copies = dests[1:]
            else:
                code = f"{name} = {pr.doprint(e)}"
                copies = dests
            out.append(StepValue(name, code, comment, copies))
        stage_values[st.index] = out
    ctx["fwd_stage_values"] = stage_values
    step_reads: set[str] = set()
    for vals in stage_values.values():
        for sv in vals:
            step_reads |= set(_WORD.findall(sv.code.split("=", 1)[1]))
    for g in ctx["step_gemms"]:
        step_reads.add(g.operand)
    ctx["fwd_step_reads"] = step_reads

    # ---- backward: GEMM-slice adjoints computed straight into the [T, B, width] buffer --------
    written: set[str] = set()  # slice names whose adjoint lands in the buffer by out=
    for bs, sc in zip(back.stages, ctx["back_stages"]):
        dest_of = {}
        for g in sc.gemms:
            for sl in g.slices:
                if sl.name in ctx["adjoint_of"]:
                    dest_of[ctx["adjoint_of"][sl.name]] = (sl.name, f"_d_{g.key}_rows[_t][:, {sl.start}:{sl.stop}]")
        new_back = []
        for a, stmt in zip(bs.assigns, sc.back):
            target = names[a.target]
            call = None
            if target in dest_of and not a.temp:
                call = _out_call(a.expr, pr, _rows_in_backward(m), dest_of[target][1])
            if call is not None:
                written.add(dest_of[target][0])
                stmt = type(stmt)(stmt.target, call, stmt.comment, stmt.temp)
            new_back.append(stmt)
        sc.back = new_back
    ctx["bwd_written"] = written

    # ---- backward: adjoints that are other names of stored GEMM adjoints -------------------
    alias: dict[str, str] = {}
    for st in ctx["back_stages"]:
        for s in st.back:
            if _IDENT.match(s.expr):
                alias[s.target] = s.expr
    for s in ctx["leaf_stmts"]:
        if _IDENT.match(s.expr):
            alias[s.target] = s.expr

    # a state's adjoint is carried between steps and reassigned at the end of each: an alias of it
    # names its value at the start of the step only, so resolution stops before it
    carried = {v["adjoint"] for v in ctx["states"]}

    def root(n: str) -> str:
        seen = {n}  # aliases can form a cycle (h' = h + ...: d_h_next = d_h, then d_h = d_h_next)
        while n in alias and alias[n] not in seen and alias[n] not in carried:
            n = alias[n]
            seen.add(n)
        return n

    adjoint_of = ctx["adjoint_of"]
    stored: dict[str, tuple[str, str, str]] = {}  # adjoint root -> (buffer, start, stop)
    for g in ctx["step_gemms"]:
        for s in g.slices:
            if s.name in adjoint_of:
                stored.setdefault(root(adjoint_of[s.name]), (f"_d_{g.key}_seq", s.start, s.stop))

    # hoisted GEMMs: reuse a step GEMM's adjoint buffer, copy slices after the loop, or store per step
    hoisted_plan = []
    for g in ctx["hoisted_gemms"]:
        per_step, after = [], []
        for s in g.slices:
            if s.name not in adjoint_of:
                continue
            r = root(adjoint_of[s.name])
            if r in stored:
                after.append((s, stored[r]))
            else:
                per_step.append((s, adjoint_of[s.name]))
        reuse = ""
        n_adj = sum(1 for s in g.slices if s.name in adjoint_of)
        if not per_step and n_adj == len(g.slices) and after:
            bufs = {b for _, (b, _, _) in after}
            if len(bufs) == 1 and all((s.start, s.stop) == (a, b) for s, (_, a, b) in after):
                width = next(sg.width for sg in ctx["step_gemms"] if f"_d_{sg.key}_seq" in bufs)
                if width == g.width:
                    reuse = bufs.pop()
        hoisted_plan.append({"gemm": g, "reuse": reuse, "per_step": [] if reuse else per_step,
                             "after": [] if reuse else after})
    ctx["bwd_hoisted"] = hoisted_plan

    # vector-param gradients: one sum over all T*B rows after the loop
    vec_plan = []
    buffers: dict[str, dict] = {}  # adjoint root not stored in a GEMM buffer -> its own buffer
    for p in ctx["vector_params"]:
        if p["zero"]:
            continue
        r = root(p["adjoint"])
        if r in stored:
            buf, a, b = stored[r]
            vec_plan.append({"key": p["key"], "buffer": buf, "start": a, "stop": b})
        else:
            if r not in buffers:
                buffers[r] = {"name": f"_d_{p['name']}_rows", "adjoint": r, "size": p["size"]}
            vec_plan.append({"key": p["key"], "buffer": buffers[r]["name"], "start": "", "stop": ""})
    ctx["bwd_vec"] = vec_plan
    ctx["bwd_vec_buffers"] = list(buffers.values())
    ctx["bwd_sum_buffers"] = sorted({v["buffer"] for v in vec_plan if v["start"]})
    ctx["bwd_width"] = {f"_d_{g.key}_seq": g.width for g in ctx["step_gemms"]}


def _rows_in_backward(m) -> _NotParams:
    return _NotParams({p.name for p in m.cell.params})


class _NotParams:
    """Every symbol of a backward expression but the params is a [B, size] row block."""

    def __init__(self, params: set[str]):
        self.params = params

    def __and__(self, other: set[str]) -> set[str]:
        return {k for k in other if k not in self.params}

    __rand__ = __and__


def _out_call(e: sp.Expr, pr: TorchPrinter, rows: set[str], dest: str) -> str | None:
    """``e`` computed straight into ``dest`` (a torch call with ``out=``), or None."""
    # the op table names the torch function with an out= variant, if the op has one
    out = ops.of(e).torch_out if isinstance(e, fn.CellFunction) else None
    if out is not None and len(e.args) == 1:
        return f"{out}({pr.doprint(e.args[0])}, out={dest})"
    if isinstance(e, (sp.Add, sp.Mul)) and len(e.args) >= 2:
        first = next((a for a in e.args if {s.name for s in a.free_symbols} & rows), None)
        if first is None:
            return None
        rest = list(e.args)
        rest.remove(first)
        op = "torch.add" if isinstance(e, sp.Add) else "torch.mul"
        other = e.func(*rest)
        return f"{op}({pr.doprint(first)}, {pr.doprint(other)}, out={dest})"
    return None
