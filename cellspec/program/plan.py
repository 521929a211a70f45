"""The planner: schedule + derived backward → the sequence program.

Input: :class:`~cellspec.model.schedule.Schedule` and :class:`~cellspec.model.gradients.Backward`.
Output: :class:`~cellspec.program.ir.Program`.

It decides, once for every back end:

* **where each vector lives** (:class:`~cellspec.program.ir.Slot`): inputs and state sequences
  (``[T + 1, B, n]``: a state at time offset 0, its next value at 1), hoisted GEMM results and
  hoisted values over all T·B rows, the per-step GEMM outputs, values kept per step (saved for
  the backward, or outputs: ``[T, B, n]``) and per-step scratch (``[B, n]``) for what crosses a
  block boundary without being kept; in the backward, the adjoint buffers of every GEMM group
  (``[T, B, width]``, read by the dW GEMMs after the loop), the carried state adjoints, the
  per-step adjoints of inputs and vector params;
* **what each pointwise block exports** (what a later block, GEMM or result reads) and which
  statements are dead;
* **aliases** (:func:`cellspec.program.passes.resolve_aliases`): a per-step adjoint that is
  only another name of a stored GEMM adjoint (``d_b_ii = d_W_hi_h`` in an LSTM) is not stored
  again; the reductions after the loop read the original;
* **what is saved** (:mod:`cellspec.program.save`): the training forward keeps exactly the
  buffers the backward reads; the inference forward keeps nothing it does not return;
* **initial contents**: a buffer is zero-filled only where some element is read before the
  program writes it;
* **work ahead of the steps** (:func:`cellspec.program.passes.run_ahead`): a forward's hoisted
  ops become the loop's ``ahead`` ops, which an engine may run in chunks of steps;
* **work behind the steps** (:func:`cellspec.program.passes.run_behind`): a backward's weight
  gradients, row sums and per-row products become the loop's ``behind`` ops, run in chunks of
  steps just after them, and the step adjoints only they read a ring of one chunk.
"""

from __future__ import annotations

import sympy as sp

from cellspec.model.gradients import Assignment, Backward
from cellspec.model.schedule import GemmGroup, Schedule
from cellspec.program import ir, passes, save
from cellspec.program.ir import B, T, size


def _col(sizes: list[str]) -> sp.Expr:
    return sum((size(s) for s in sizes), sp.S.Zero)


_free = passes.free_names


class _Planner:
    def __init__(self, sched: Schedule, back: Backward):
        self.s, self.b, self.m = sched, back, sched.model
        self.cell = self.m.cell
        self.size: dict[str, str] = {}
        self._sizes()
        self.weights: dict[str, ir.Weight] = {}
        # adjoint buffers several GEMM groups share (fixes a hoisted stack's order: before the forward)
        self.shared = {k: sh for sh in passes.share_adjoint_buffers(sched, back) for k in sh.first_col}
        self.kept_copy: dict[str, str] = {}  # a step product's block copied out to keep -> the block

    # ------------------------------------------------------------------ sizes of every key
    def _sizes(self) -> None:
        m, b = self.m, self.b
        for k, leaf in m.leaves.items():
            self.size[k] = leaf.size
        for v in m.values:
            self.size[v.key] = v.size
        for p in m.projections:
            self.size[p.key] = p.out_size
        for k, a in b.adjoint.items():
            self.size[a] = m.size_of(k)
        for k, a in b.output_seed.items():
            self.size[a] = m.size_of(k)
        for (_, operand), a in b.gemm_adjoint.items():
            self.size[a] = m.size_of(operand)
        for operand, a in b.hoisted_gemm_adjoint.items():
            self.size[a] = m.size_of(operand)
        for k, a in b.step_seed.items():
            self.size[a] = m.size_of(k)
        for k, a in b.hoisted_leaf_adjoint.items():
            self.size[a] = m.size_of(k)

    # ------------------------------------------------------------------ GEMM groups
    def stack(self, g: GemmGroup, operand: str) -> list:
        """One operand's projections in stack order: the schedule's, or the order a shared adjoint
        buffer gives a hoisted group (:func:`passes.share_adjoint_buffers`)."""
        mine = g.of(operand)
        sh = self.shared.get(g.key)
        if sh is not None and sh.hoisted == g.key:
            by_key = {p.key: p for p in mine}
            mine = [by_key[k] for k in sh.order]
        return mine

    def d_buffer(self, g: GemmGroup, prefix: str) -> tuple[str, sp.Expr]:
        """A group's adjoint buffer and the first column of its run there."""
        sh = self.shared.get(g.key)
        if sh is None:
            return f"{prefix}_{self.gkey(g)}", sp.S.Zero
        return sh.buffer, sh.first_col[g.key]

    def weight(self, g: GemmGroup) -> ir.Weight:
        mine = self.stack(g, g.operands[0])  # the stack: every operand of a group has the same one
        name = "_".join(p.matrix for p in mine)
        w = ir.Weight(name, tuple(p.matrix for p in mine), tuple(p.out_size for p in mine), mine[0].in_size)
        if name in self.weights and self.weights[name] != w:  # pragma: no cover - matrix order is fixed
            raise RuntimeError(f"two stacks named {name}")
        self.weights[name] = w
        return w

    def gkey(self, g: GemmGroup) -> str:
        """A group's name in buffer names: its stack (in stack order) and operands."""
        return "_".join(p.matrix for p in self.stack(g, g.operands[0])) + "__" + "__".join(g.operands)

    def columns(self, g: GemmGroup) -> list[tuple]:
        """(projection, first column, size symbol) of every projection of a group in its result
        buffer: operand j's block starts at ``j * width`` (see :class:`ir.Project`)."""
        w = self.weight(g)
        out = []
        for j, operand in enumerate(g.operands):
            for (col, sz), p in zip(w.offsets(), self.stack(g, operand)):
                out.append((p, j * w.width + col, sz))
        return out

    def placeable(self, key: str) -> bool:
        """A value the planner lays out itself, so it can live in a row-stacked GEMM's operand
        buffer: one a pointwise block computes (per step or hoisted), neither a next state (its
        state sequence) nor an output (a result buffer of its own). Everything else (an input,
        a previous state, a GEMM result) is copied there (:class:`ir.Stack`)."""
        m = self.m
        return (any(v.key == key for v in m.values) and key not in m.outputs
                and key not in m.next_state.values())

    def why_copied(self, key: str) -> str:
        m = self.m
        if key in m.leaves:
            return {"input": "a caller's input", "state": "a state sequence", "mask": "a drawn mask"}.get(
                m.leaves[key].kind, "a param")
        if key in m.next_state.values():
            return "a state sequence"
        if key in m.outputs:
            return "an output"
        return "a GEMM result"

    def stack_comment(self, g: GemmGroup, copied: list[str]) -> str:
        why = ", ".join(f"{o}: {self.why_copied(o)}" for o in copied)
        return (f"[{'; '.join(g.operands)}] for one GEMM: copy {', '.join(copied)} into the stacked operand "
                f"({why}, not laid out by the planner)")

    def stack_operands(self, tb, g: GemmGroup, buf: str, timed: bool, rows: str, suffix: str) -> ir.Stack | None:
        """Place a row-stacked group's operands side by side in ``buf`` (the placeable ones live
        there; call before anything else places them) and return the copy of the others."""
        k_in = g.projections[0].in_size
        copied = []
        for j, o in enumerate(g.operands):
            col = j * size(k_in)
            if self.placeable(o) and o not in tb.slots:
                tb.place(o, buf, 0 if timed else None, col, k_in)
            else:
                copied.append(o)
                tb.place(f"{o}:{suffix}", buf, 0 if timed else None, col, k_in)
        if not copied:
            return None
        return ir.Stack(buf, tuple(copied), tuple(f"{o}:{suffix}" for o in copied), rows,
                        self.stack_comment(g, copied))

    def batch_free(self, key: str) -> bool:
        """Reads no input and no state: one row for the whole batch."""
        m = self.m
        if key in m.leaves:
            return m.leaves[key].kind in ("param", "const")
        proj = next((p for p in m.projections if p.key == key), None)
        if proj is not None:
            return self.batch_free(proj.operand)
        v = m.value(key)
        return all(self.batch_free(x) for x in _free(v.expr))

    # ------------------------------------------------------------------ one function's tables
    class _Table:
        def __init__(self):
            self.buffers: dict[str, ir.Buffer] = {}
            self.slots: dict[str, ir.Slot] = {}
            self.aliased: set[str] = set()  # names that are another name of a stored value

        def buffer(self, name: str, shape: tuple, role: str, init: str = "empty") -> str:
            if name not in self.buffers:
                self.buffers[name] = ir.Buffer(name, tuple(sp.sympify(d) for d in shape), role, init)
            return name

        def place(self, key: str, buf: str, time: int | None, col: sp.Expr, sz: str) -> None:
            self.slots.setdefault(key, ir.Slot(buf, time, sp.sympify(col), sz))

    # ------------------------------------------------------------------ the forward
    def forward(self, keep: set[str], name: str) -> ir.Function:
        """The forward with ``keep`` the per-step values and projections kept over time."""
        s, m = self.s, self.m
        tb = self._Table()
        for v in self.cell.inputs:
            tb.place(v.name, tb.buffer(f"x_{v.name}", (T, B, size(v.size)), "input", "arg"), 0, 0, v.size)
        for v in self.cell.states:
            buf = tb.buffer(f"s_{v.name}", (T + 1, B, size(v.size)), "state")
            tb.place(v.name, buf, 0, 0, v.size)
            tb.place(m.next_state[v.name], buf, 1, 0, v.size)
        for p in self.cell.params:
            if not p.is_matrix:
                tb.place(p.name, tb.buffer(f"p_{p.name}", (size(p.shape[0]),), "param", "arg"), None, 0, p.shape[0])
        outputs = set(m.outputs)
        ops: list = []
        # row-stacked groups: their operands side by side in one buffer (placed first, so that
        # the blocks computing them write there); the others are copied in before the GEMM
        copies: dict[str, ir.Stack | None] = {}
        for lv in s.hoisted_levels:
            for g in lv.gemms:
                if len(g.operands) > 1:
                    placed = any(self.placeable(o) for o in g.operands)
                    w_in = len(g.operands) * size(g.projections[0].in_size)
                    buf = tb.buffer(f"hst_{self.gkey(g)}", (T, B, w_in), "hoisted_value" if placed else "stacked")
                    copies[self.gkey(g)] = self.stack_operands(tb, g, buf, True, "all", "stacked")
        for st in s.stages:
            for g in st.gemms:
                if len(g.operands) > 1:
                    timed = any(o in keep and self.placeable(o) for o in g.operands)
                    w_in = len(g.operands) * size(g.projections[0].in_size)
                    buf = tb.buffer(f"st_{self.gkey(g)}", (T, B, w_in) if timed else (B, w_in),
                                    "saved" if timed else "scratch")
                    copies[self.gkey(g)] = self.stack_operands(tb, g, buf, timed, "step", "stacked")
        # hoisted pointwise work and GEMMs, over all T·B rows, level by level
        for v in s.hoisted_values:
            if v.key not in tb.slots:  # not already an operand side by side with others
                tb.place(v.key, tb.buffer(f"hv_{v.key}", (T, B, size(v.size)), "hoisted_value"), 0, 0, v.size)
        for lv in s.hoisted_levels:
            if lv.values:
                stmts = tuple(ir.Statement(v.key, v.expr, self.comment(v)) for v in lv.values)
                ops.append(self.block(self.hoisted_tag("fwd", lv.index), self.hoisted_title("forward", lv.index),
                                      "all", stmts, {v.key for v in lv.values}, tb))
            for g in lv.gemms:
                w = self.weight(g)
                k = len(g.operands)
                buf = tb.buffer(f"hg_{self.gkey(g)}", (T, B, k * w.width), "hoisted_gemm")
                for p, col, sz in self.columns(g):
                    tb.place(p.key, buf, 0, col, sz)
                stacked = ""
                if k > 1:
                    stacked = f"hst_{self.gkey(g)}"
                    if copies[self.gkey(g)] is not None:
                        ops.append(copies[self.gkey(g)])
                ops.append(ir.Project(w.name, tuple(g.operands), buf, "all", self.batch_free(g.operands[0]),
                                      self.gemm_comment(g), stacked))
        # the step
        next_values = set(m.next_state.values())
        gemm_operands = {o for g in s.step_gemms + s.hoisted_gemms for o in g.operands}
        sinks = next_values | outputs | keep | gemm_operands
        body: list = []
        for st in s.stages:
            kept_copies: list[ir.Statement] = []  # of the blocks of a step product the backward reads
            for g in st.gemms:
                w = self.weight(g)
                k = len(g.operands)
                kept = [p for p in g.projections if p.key in keep]
                timed = bool(kept)
                if timed and k == 1 and len(kept) < len(g.projections):
                    # the backward reads some blocks alone (the GRU's W_hn_h): the product stays a
                    # step's scratch, and the block copies those out, [T, B, n] each
                    timed = False
                    for p in kept:
                        copy = f"{p.key}_kept"
                        while copy in self.size or copy in tb.slots:
                            copy += "_"
                        self.size[copy] = p.out_size
                        self.kept_copy[copy] = p.key
                        tb.place(copy, tb.buffer(f"v_{p.key}", (T, B, size(p.out_size)), "saved"), 0, 0, p.out_size)
                        kept_copies.append(ir.Statement(copy, sp.Symbol(p.key, real=True), f"{p.matrix} @ {p.operand}, kept for the backward"))
                buf = tb.buffer(f"g_{self.gkey(g)}", (T, B, k * w.width) if timed else (B, k * w.width),
                                "saved" if timed else "scratch")
                for p, col, sz in self.columns(g):
                    tb.place(p.key, buf, 0 if timed else None, col, sz)
                stacked = ""
                if k > 1:
                    stacked = f"st_{self.gkey(g)}"
                    if copies[self.gkey(g)] is not None:
                        body.append(copies[self.gkey(g)])
                body.append(ir.Project(w.name, tuple(g.operands), buf, "step", self.batch_free(g.operands[0]),
                                       self.gemm_comment(g), stacked))
            mine = {v.key for v in st.values}
            exported = set()
            for v in st.values:
                read_elsewhere = any(c not in mine for c in s.consumers.get(v.key, []))
                if v.key in sinks or read_elsewhere:
                    exported.add(v.key)
            for v in st.values:
                if v.key not in exported or v.key in next_values or v.key in tb.slots:
                    continue
                if v.key in keep or v.key in outputs:
                    role = "output" if v.key in outputs else "saved"
                    tb.place(v.key, tb.buffer(f"v_{v.key}", (T, B, size(v.size)), role), 0, 0, v.size)
                else:
                    tb.place(v.key, tb.buffer(f"tmp_{v.key}", (B, size(v.size)), "scratch"), None, 0, v.size)
            stmts = tuple(ir.Statement(v.key, v.expr, self.comment(v)) for v in st.values) + tuple(kept_copies)
            exported |= {c.target for c in kept_copies}
            body.append(self.block(f"fwd{st.index}", f"stage {st.index} forward", "step", stmts, exported, tb))
        body.extend(ir.Hold(f"s_{v.name}") for v in self.cell.states)
        ops.append(ir.Loop(False, tuple(body)))
        return ir.Function(name, tb.buffers, tb.slots, tuple(ops))

    # ------------------------------------------------------------------ the backward
    def backward(self, fwd: ir.Function) -> ir.Function:
        s, m, b = self.s, self.m, self.b
        tb = self._Table()
        # forward buffers the backward may read: bound as arguments (the save pass keeps the read ones)
        for key, slot in fwd.slots.items():
            fb = fwd.buffers[slot.buffer]
            if fb.role in ("scratch", "stacked"):  # a forward copy is not kept: the backward copies again
                continue
            tb.buffer(fb.name, fb.shape, fb.role, "arg")
            tb.place(self.kept_copy.get(key, key), fb.name, slot.time, slot.col, slot.size)
        for k, seed in b.output_seed.items():
            tb.place(seed, tb.buffer(f"dout_{k}", (T, B, size(m.size_of(k))), "d_output", "arg"), 0, 0, m.size_of(k))
        for v in self.cell.states:
            a = b.adjoint[v.name]
            tb.place(a, tb.buffer(f"ds_{v.name}", (B, size(v.size)), "d_state", "arg"), None, 0, v.size)
        for v in self.differentiated_inputs():
            tb.buffer(f"dx_{v.name}", (T, B, size(v.size)), "d_input")
            tb.place(f"grad_input:{v.name}", f"dx_{v.name}", 0, 0, v.size)
            if v.name in b.adjoint and v.name not in b.zero:
                tb.place(b.adjoint[v.name], f"dx_{v.name}", 0, 0, v.size)
        for p in self.cell.params:
            if not p.is_matrix and p.name in b.adjoint and p.name not in b.zero:
                buf = tb.buffer(f"dp_{p.name}", (T, B, size(p.shape[0])), "d_param_rows")
                tb.place(b.adjoint[p.name], buf, 0, 0, p.shape[0])
        for st in s.stages:
            for g in st.gemms:
                w = self.weight(g)
                k = len(g.operands)
                buf, c0 = self.d_buffer(g, "dg")
                tb.buffer(buf, (T, B, self.shared[g.key].width if g.key in self.shared else k * w.width), "d_gemm")
                for p, col, sz in self.columns(g):
                    if p.key in b.adjoint:
                        tb.place(b.adjoint[p.key], buf, 0, c0 + col, sz)
                k_in = g.projections[0].in_size
                if k == 1:
                    d_op = b.gemm_adjoint[(st.index, g.operands[0])]
                    tb.place(d_op, tb.buffer(f"tmp_{d_op}", (B, size(k_in)), "scratch"), None, 0, k_in)
                    continue
                # a row-stacked GEMM's operand adjoints come out of one GEMM, side by side
                d_buf = tb.buffer(f"tmp_d_{self.gkey(g)}", (B, k * size(k_in)), "scratch")
                for j, o in enumerate(g.operands):
                    tb.place(b.gemm_adjoint[(st.index, o)], d_buf, None, j * size(k_in), k_in)
        for g in s.hoisted_gemms:
            w = self.weight(g)
            k = len(g.operands)
            if g.key in self.shared:  # its run of a shared buffer: a step adjoint's column is that adjoint
                sh = self.shared[g.key]
                buf, c0 = self.d_buffer(g, "dhg")
                for p, col, sz in self.columns(g):
                    d = b.adjoint[p.key]
                    if d in sh.own:
                        tb.place(d, buf, 0, c0 + col, sz)
                    else:
                        tb.slots[d] = tb.slots[sh.names[d]]
                        tb.aliased.add(d)
            else:
                buf = tb.buffer(f"dhg_{self.gkey(g)}", (T, B, k * w.width), "d_gemm")
                for p, col, sz in self.columns(g):
                    if p.key in b.adjoint:
                        tb.place(b.adjoint[p.key], buf, 0, col, sz)
            sz = g.projections[0].in_size
            if k == 1:
                o = g.operands[0]
                if not self.is_input(o):
                    tb.place(b.hoisted_gemm_adjoint[o], tb.buffer(f"hgd_{o}", (T, B, size(sz)), "d_hoisted_operand"),
                             0, 0, sz)
                continue
            # a row-stacked GEMM: every operand's adjoint (an input's too, added to its gradient
            # after) side by side in one buffer, from one GEMM
            d_buf = tb.buffer(f"hgd_{self.gkey(g)}", (T, B, k * size(sz)), "d_hoisted_operand")
            for j, o in enumerate(g.operands):
                tb.place(b.hoisted_gemm_adjoint[o], d_buf, 0, j * size(sz), sz)
        for k, a in b.step_seed.items():
            tb.place(a, tb.buffer(f"seed_{k}", (T, B, size(m.size_of(k))), "step_seed"), 0, 0, m.size_of(k))
        for k, a in b.hoisted_leaf_adjoint.items():
            tb.place(a, tb.buffer(f"hl_{k}", (T, B, size(m.size_of(k))), "hoisted_leaf"), 0, 0, m.size_of(k))

        hoisted_reuse = passes.resolve_aliases(self, tb)

        # the leaf's work that does not need the last stage's step products, before them
        stage_assigns = {bs.index: list(bs.assigns) for bs in b.stages}
        leaf_assigns, into_state = list(b.leaf_assigns), {}
        if b.stages:
            last = b.stages[-1].index
            products = {b.gemm_adjoint[(last, o)]: len(g.operands) == 1
                        for g in next(x for x in s.stages if x.index == last).gemms for o in g.operands}
            stage_assigns[last], leaf_assigns, into_state = passes.fold_leaf(
                self, tb, stage_assigns[last], leaf_assigns, products)

        # per-step blocks: a non-temporary target is exported if it has a slot or another block reads it
        blocks: list[tuple[str, str, list[Assignment], str]] = [
            (f"bwd{bs.index}", f"stage {bs.index} backward", stage_assigns[bs.index], "step") for bs in b.stages
        ]
        blocks.append(("bwd_leaf", "per-step adjoints of inputs, states, vector params, hoisted results",
                       leaf_assigns, "step"))
        # after the loop, one block per hoisted level, the last level first (level 0 also gives
        # the inputs' and vector params' shares)
        levels = b.hoisted_level_assigns or [[]]
        for k in reversed(range(len(levels))):
            blocks.append((self.hoisted_tag("bwd", k), self.hoisted_title("backward", k),
                           levels[k] + (b.hoisted_leaf_assigns if k == 0 else []), "all"))
        reads_by_block = [set().union(*(_free(a.expr) for a in blk)) if blk else set() for _, _, blk, _ in blocks]
        made: dict[str, ir.Pointwise] = {}
        for i, (tag, title, blk, rows) in enumerate(blocks):
            others = set().union(*(r for j, r in enumerate(reads_by_block) if j != i))
            exported = set()
            for a in blk:
                if a.temp:
                    continue
                if a.target in tb.aliased:
                    continue
                if a.target in tb.slots or a.target in others:
                    exported.add(a.target)
                    if a.target not in tb.slots:
                        sz = self.size[a.target]
                        if rows == "all":
                            tb.place(a.target, tb.buffer(f"tmp_{a.target}", (T, B, size(sz)), "scratch"), 0, 0, sz)
                        else:
                            tb.place(a.target, tb.buffer(f"tmp_{a.target}", (B, size(sz)), "scratch"), None, 0, sz)
            stmts = tuple(ir.Statement(a.target, a.expr, self.adjoint_comment(a), a.temp) for a in blk)
            if stmts:
                made[tag] = self.block(tag, title, rows, stmts, exported, tb)

        body: list = []
        for bs in b.stages:
            if f"bwd{bs.index}" in made:
                body.append(made[f"bwd{bs.index}"])
            st = next(x for x in s.stages if x.index == bs.index)
            for g in st.gemms:
                d_ops = tuple(b.gemm_adjoint[(bs.index, o)] for o in g.operands)
                if any(d in r for d in d_ops for r in reads_by_block) or d_ops[0] in into_state:
                    stacked = f"tmp_d_{self.gkey(g)}" if len(d_ops) > 1 else ""
                    d_buf, d_col = self.d_buffer(g, "dg")
                    body.append(ir.ProjectBack(self.weight(g).name, d_buf, d_ops, "step",
                                               self.gemm_comment(g), into_state.get(d_ops[0], False), stacked, d_col))
        if "bwd_leaf" in made:
            body.append(made["bwd_leaf"])
        for v in self.cell.states:
            if v.name in b.zero or v.name not in b.adjoint:
                body.append(ir.Zero(f"ds_{v.name}"))
        ops: list = [ir.Loop(True, tuple(body))]

        # after the loop: dW of every GEMM group, hoisted GEMMs' d_operand, hoisted pointwise backward
        contributed = {v.name for v in self.differentiated_inputs() if b.adjoint.get(v.name) in tb.slots
                       and tb.slots[b.adjoint[v.name]].buffer == f"dx_{v.name}"}
        def dw_scratch(w: ir.Weight) -> str:
            if len(w.matrices) == 1:
                return ""
            return tb.buffer(f"dw_{w.name}", (w.width, size(w.inner)), "grad_scratch")

        def weight_grad(g: GemmGroup, d_buf: str, fwd_stacked: str, d_col: sp.Expr = sp.S.Zero) -> None:
            """dW of a group: one GEMM over all its rows. A row-stacked group reads its operands
            side by side: the forward's buffer when the backward has it over the whole sequence,
            else a copy made here (the operands' own buffers are whole sequences too)."""
            w = self.weight(g)
            stacked = ""
            if len(g.operands) > 1:
                fb = tb.buffers.get(fwd_stacked)
                if fb is not None and fb.timed:
                    stacked = fwd_stacked
                else:
                    k_in = g.projections[0].in_size
                    stacked = tb.buffer(f"bst_{self.gkey(g)}", (T, B, len(g.operands) * size(k_in)), "stacked")
                    for j, o in enumerate(g.operands):
                        tb.place(f"{o}:restacked", stacked, 0, j * size(k_in), k_in)
                    ops.append(ir.Stack(stacked, tuple(g.operands), tuple(f"{o}:restacked" for o in g.operands),
                                        "all", f"[{'; '.join(g.operands)}] over the whole sequence for the dW GEMM"))
            ops.append(ir.WeightGrad(w.name, d_buf, tuple(g.operands), self.batch_free(g.operands[0]),
                                     self.gemm_comment(g), dw_scratch(w), stacked, d_col))

        for g in s.step_gemms:
            d_buf, d_col = self.d_buffer(g, "dg")
            weight_grad(g, d_buf, f"st_{self.gkey(g)}", d_col)
        for lv in reversed(s.hoisted_levels or [None]):
            for g in lv.gemms if lv else []:
                w = self.weight(g)
                d_buf, d_col = self.d_buffer(g, "dhg")
                d_buf = hoisted_reuse.get(self.gkey(g), d_buf)
                if all(p.key in b.zero or p.key not in b.adjoint for p in g.projections):
                    continue
                weight_grad(g, d_buf, f"hst_{self.gkey(g)}", d_col)
                if len(g.operands) > 1:
                    # one GEMM gives every operand's adjoint, side by side; an input's is then
                    # added to its gradient
                    d_ops = tuple(b.hoisted_gemm_adjoint[o] for o in g.operands)
                    inputs = [o for o in g.operands if self.is_input(o)]
                    if inputs or any(d in r for d in d_ops for r in reads_by_block):
                        ops.append(ir.ProjectBack(w.name, d_buf, d_ops, "all", self.gemm_comment(g),
                                                  stacked=f"hgd_{self.gkey(g)}"))
                    for o in inputs:
                        ops.append(ir.AddRows(o, b.hoisted_gemm_adjoint[o]))
                        contributed.add(o)
                    continue
                operand = g.operands[0]
                is_input = self.is_input(operand)
                target = f"grad_input:{operand}" if is_input else b.hoisted_gemm_adjoint[operand]
                if is_input or any(b.hoisted_gemm_adjoint[operand] in r for r in reads_by_block):
                    # an input's gradient: the first contribution assigns, later ones add
                    first = is_input and operand not in contributed
                    ops.append(ir.ProjectBack(w.name, d_buf, (target,), "all", self.gemm_comment(g),
                                              accumulate=is_input and not first, d_col=d_col))
                    if is_input:
                        contributed.add(operand)
            tag = self.hoisted_tag("bwd", lv.index if lv else 0)
            if tag in made:
                ops.append(made[tag])
        for v in self.cell.inputs:
            if v.name in b.hoisted_leaf_adjoint:
                ops.append(ir.AddRows(v.name, b.hoisted_leaf_adjoint[v.name]))
        sums: dict[tuple, tuple[str, list[str]]] = {}  # one reduction per stored adjoint
        for p in self.cell.params:
            if p.is_matrix:
                continue
            sources = []
            if p.name in b.adjoint and p.name not in b.zero:
                sources.append(b.adjoint[p.name])
            if p.name in b.hoisted_leaf_adjoint:
                sources.append(b.hoisted_leaf_adjoint[p.name])
            for src in sources:
                sl = tb.slots[src]
                sums.setdefault((sl.buffer, sl.time, sl.col, sl.size), (src, []))[1].append(p.name)
        for k, (src, params) in sums.items():
            scratch = ""
            if len(params) > 1:
                scratch = tb.buffer(f"sum_{src}", (size(k[3]),), "grad_scratch")
            ops.append(ir.RowSum(tuple(params), src, scratch))
        fn = ir.Function("backward", tb.buffers, tb.slots, tuple(ops))
        return _initial_contents(fn)

    # ------------------------------------------------------------------ helpers
    def is_input(self, key: str) -> bool:
        return key in self.m.leaves and self.m.leaves[key].kind == "input"

    def differentiated_inputs(self) -> list:
        """The inputs that get a gradient: all but the masks of random ops."""
        return [v for v in self.cell.inputs if self.m.leaves[v.name].kind != "mask"]

    def block(self, tag: str, title: str, rows: str, stmts: tuple, exported: set[str], tb) -> ir.Pointwise:
        """A pointwise block: drop statements nothing exported depends on; reads are the names
        read before they are assigned in the block."""
        defined = {st.target for st in stmts}
        live = {t for t in exported}
        kept = []
        for st in reversed(stmts):
            if st.target in live:
                kept.append(st)
                live |= _free(st.expr) & defined
        kept.reverse()
        reads: list[str] = []
        assigned: set[str] = set()
        for st in kept:
            for r in sorted(_free(st.expr)):
                if r not in assigned and r not in reads:
                    reads.append(r)
            assigned.add(st.target)
        writes = [st.target for st in kept if st.target in exported and not st.temp]
        for r in reads:
            if r not in tb.slots:  # pragma: no cover - a planner bug, never a user's
                raise RuntimeError(f"{tag}: {r} is read but lives nowhere")
        return ir.Pointwise(tag, title, rows, tuple(kept), tuple(sorted(reads)), tuple(writes))

    @staticmethod
    def hoisted_tag(direction: str, level: int) -> str:
        """``fwd_hoisted`` / ``bwd_hoisted`` for level 0 (the only level of most cells), then
        ``fwd_hoisted1``, ..."""
        return f"{direction}_hoisted" + (str(level) if level else "")

    @staticmethod
    def hoisted_title(direction: str, level: int) -> str:
        return f"hoisted {direction} (all T*B rows)" + (f", level {level}" if level else "")

    def comment(self, v) -> str:
        return f"{self.cell.filename}:{v.line}  {v.text}"

    def gemm_comment(self, g: GemmGroup) -> str:
        return ", ".join(f"{p.matrix} @ {p.operand}" for o in g.operands for p in self.stack(g, o))

    def adjoint_comment(self, a: Assignment) -> str:
        if not a.comment:
            return ""
        b = self.b
        of = ({v: k for k, v in b.adjoint.items()}.get(a.target)
              or {v: k for k, v in b.hoisted_leaf_adjoint.items()}.get(a.target)
              or {v: k for k, v in b.step_seed.items()}.get(a.target))
        if of is not None and a.comment in ("state", "input", "param", "hoisted projection"):
            return f"adjoint of {a.comment} {of}"
        if of is not None and a.comment == "per-step part":
            return f"adjoint of {of}, per-step part"
        return f"adjoint of {a.comment}"


def _initial_contents(fn: ir.Function) -> ir.Function:
    """Zero-fill a buffer only where some element is read before the program writes it: a
    ``[T, B, w]`` adjoint buffer whose every column range a block writes at every step starts
    empty; one with columns no block writes (a projection whose adjoint is zero) starts as zeros."""
    written: dict[str, set] = {}
    for op in fn.loop().body:
        if isinstance(op, ir.Pointwise):
            for w in op.writes:
                sl = fn.slots[w]
                written.setdefault(sl.buffer, set()).add((sl.col, sl.size))
    for op in fn.ops:
        # a block over all T·B rows after the loop (a hoisted level's backward) writes every row,
        # before the GEMMs after it read them
        if isinstance(op, ir.Pointwise) and op.rows == "all":
            for w in op.writes:
                sl = fn.slots[w]
                if fn.buffers[sl.buffer].role == "d_gemm":
                    written.setdefault(sl.buffer, set()).add((sl.col, sl.size))
        # an input gradient assigned in full by a GEMM after the loop
        if isinstance(op, ir.ProjectBack) and op.rows == "all" and not op.accumulate and not op.stacked:
            sl = fn.slots[op.d_operands[0]]
            if fn.buffers[sl.buffer].role == "d_input":
                written.setdefault(sl.buffer, set()).add((sl.col, sl.size))
    buffers = dict(fn.buffers)
    for name, buf in fn.buffers.items():
        if buf.init != "empty" or buf.role not in ("d_gemm", "d_param_rows", "step_seed", "d_input"):
            continue
        cover = sum((size(s) for _, s in written.get(name, ())), sp.S.Zero)
        if sp.expand(cover - buf.shape[-1]) != 0:
            buffers[name] = ir.Buffer(name, buf.shape, buf.role, "zeros")
    return ir.Function(fn.name, buffers, fn.slots, fn.ops)


def _zero_when_packed(fn: ir.Function) -> ir.Function:
    """Variable lengths: the timed buffers the loop writes row by row (outputs, saved values, the
    per-step adjoints the dW GEMMs, bias sums and input gradients read over all T·B rows after
    the loop) must hold zeros in the rows of ended sequences, which no step writes."""
    written: list[str] = []
    for op in fn.loop().body:
        for n in fn.written_by(op):
            b = fn.buffers[n]
            if b.timed and b.role != "state" and b.init == "empty" and n not in written:
                written.append(n)
    return ir.Function(fn.name, fn.buffers, fn.slots, fn.ops, tuple(written))


def plan(sched: Schedule, back: Backward) -> ir.Program:
    """Plan the sequence program of one cell (see the module docstring)."""
    p = _Planner(sched, back)
    m, cell = p.m, p.cell
    forward = p.forward(save.kept_per_step(sched, back), "forward")
    backward = p.backward(forward)
    backward, saved = save.bind_saved(forward, backward)
    inference = p.forward(set(), "inference")
    size_sources: dict[str, tuple] = {}
    for i, v in enumerate(p.differentiated_inputs()):  # the masks come last and are drawn to these sizes
        size_sources.setdefault(v.size, ("input", i))
    for prm in cell.params:
        for d, s_ in enumerate(prm.shape):
            size_sources.setdefault(s_, ("param", prm.name, d))
    for i, v in enumerate(cell.states):
        size_sources.setdefault(v.size, ("state", i))
    return ir.Program(
        cell=cell.name,
        module=cell.module_name,
        sizes=tuple(s_ for s_ in cell.sizes if s_ in size_sources),  # a size nothing uses has no value
        size_sources=size_sources,
        inputs=tuple(ir.Vector(v.name, v.name, v.size) for v in cell.inputs),
        states=tuple(ir.Vector(v.name, m.next_state[v.name], v.size) for v in cell.states),
        params=tuple(ir.Param(prm.name, tuple(prm.shape)) for prm in cell.params),
        outputs=tuple(ir.Vector(m.value(k).spec_key, k, m.value(k).size) for k in m.outputs),
        weights=dict(p.weights),
        forward=passes.run_ahead(_zero_when_packed(forward), saved),
        inference=passes.keep_last(passes.run_ahead(_zero_when_packed(inference)),
                                   tuple(m.outputs)),
        backward=passes.run_behind(passes.drop_unread_params(_zero_when_packed(backward))),
        saved=saved,
        d_states={v.name: f"ds_{v.name}" for v in cell.states},
        d_outputs={k: f"dout_{k}" for k in m.outputs},
        d_inputs={v.name: f"dx_{v.name}" for v in p.differentiated_inputs()},
        value_sizes=dict(p.size),
        spec_params=tuple(ir.Param(prm.name, tuple(prm.shape)) for prm in (m.spec_cell or cell).params),
        consts=tuple((c.name, c.value) for c in (m.spec_cell or cell).consts),
        prepared=tuple(m.prepared),
        masks=tuple(m.masks),
    )
