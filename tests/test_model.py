"""The middle of the compiler, tested directly: lowering (projections, synthetic operands,
sharing, constant folding), scheduling (stages, hoisting, stacking) and the derived backward
(the saved set, adjoint aliases, zero adjoints), on small inline specs."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import sympy as sp
from conftest import SPECS

from cellspec.driver import CompiledCell, compile_source, read_source
from cellspec.errors import Source
from cellspec.model import functions as fn
from cellspec.program import ir, passes


def compile_one(text: str) -> CompiledCell:
    (cc,) = compile_source(Source("t.cell", text), targets=())
    return cc


def cell(body: str, decls: str = "input x[I]\n  state h[H]\n  param W[H, I], U[H, H], b[H]") -> str:
    return f"cell T {{\n  {decls}\n{body}\n}}\n"


GRU = (SPECS / "gru.cell").read_text()
LSTM = (SPECS / "lstm.cell").read_text()
ELMAN = cell("  h' = tanh(W @ x + U @ h + b)\n  output h'")
#: a chain of three GEMMs, a projection of a projection, a vector-param operand, stacking order,
#: and a param whose name (W_x) is the one the projection W @ x would get
DEEP = """cell Deep {
  input x[I]
  state h[H]
  param W[H, I], U1[H, H], U2[H, H], U3[H, H], V[H, H], m[I], W_x[H]
  a = U2 @ h + U1 @ h + V @ (W @ x) + W @ m + W_x
  h' = tanh(U3 @ tanh(a))
  output h'
}
"""
#: hoisted compound operands, shared projections, constants that fold
FOLD = """cell Fold {
  input x[I]
  state h[H]
  param W[H, I], U[H, H], m[I], b[H]
  a = h - h
  z = softsign(a) + sigmoid(h - h)
  p = W @ (x * m) + W @ (m * x) + W @ x
  q = tanh(W @ x + U @ h + b + a + z)
  h' = q * p
  output h'
}
"""
#: hoisting over levels (issue 9): an MLP on the input, and a projection of a projection that
#: the step also reads
MLP = cell(
    "  h' = tanh(W2 @ tanh(W1 @ x) + U @ h + b)\n  output h'",
    "input x[I]\n  state h[H]\n  param W1[H, I], W2[H, H], U[H, H], b[H]",
)
AVG = cell(
    "  m = avg @ (W_f @ x)\n  h' = tanh(W_f @ x - m + U @ h + b)\n  output h'",
    "input x[I]\n  state h[H]\n  param W_f[H, I], avg[H, H], U[H, H], b[H]",
)
#: an input-only value that is an output, and an input-only next state: never hoisted
OUTPUT_OPERAND = cell(
    "  a = x\n  h' = tanh(W @ sigmoid(a) + U @ h)\n  output h', a",
    "input x[I]\n  state h[H]\n  param W[H, I], U[H, H]",
)
NEXT_STATE_OPERAND = cell(
    "  h' = sigmoid(y) + 0.5 * tanh(x)\n  c' = tanh(W @ h' + U @ c)\n  output c', h'",
    "input x[I], y[I]\n  state h[I], c[H]\n  param W[H, I], U[H, H]",
)


# ------------------------------------------------------------------------------ lowering
@dataclass(frozen=True)
class Lowered:
    text: str
    projections: list[tuple[str, str, str]]  # (key, matrix, operand)
    synthetic: dict[str, str]  # synthetic operand value key -> its expression (str)


LOWERING = {
    "gru": Lowered(
        GRU,
        [
            ("W_r_x", "W_r", "x"),
            ("U_r_h", "U_r", "h"),
            ("W_u_x", "W_u", "x"),
            ("U_u_h", "U_u", "h"),
            ("W_c_x", "W_c", "x"),
            ("U_c_out", "U_c", "U_c_in"),
        ],
        {"U_c_in": "h*r"},
    ),
    "deep": Lowered(
        DEEP,
        # W @ x is W_x_2: the param W_x has the name first; V @ (W @ x) gets an operand value
        [
            ("U2_h", "U2", "h"),
            ("U1_h", "U1", "h"),
            ("W_x_2", "W", "x"),
            ("V_out", "V", "V_in"),
            ("W_out", "W", "W_in"),
            ("U3_out", "U3", "U3_in"),
        ],
        {"V_in": "W_x_2", "W_in": "m", "U3_in": "Tanh(a)"},
    ),
    "fold": Lowered(
        FOLD,
        # W @ (x * m) and W @ (m * x) are one projection with one operand value
        [("W_out", "W", "W_in"), ("W_x", "W", "x"), ("U_h", "U", "h")],
        {"W_in": "m*x"},
    ),
}


@pytest.mark.parametrize("name", list(LOWERING))
def test_lowering_projections_and_synthetic_operands(name):
    case = LOWERING[name]
    m = compile_one(case.text).model
    assert [(p.key, p.matrix, p.operand) for p in m.projections] == case.projections
    assert {v.key: str(v.expr) for v in m.values if v.spec_key == ""} == case.synthetic


def test_lowering_gru_values_and_states():
    m = compile_one(GRU).model
    assert [(v.key, v.spec_key) for v in m.values] == [
        ("r", "r"),
        ("u", "u"),
        ("U_c_in", ""),
        ("c", "c"),
        ("h_next", "h'"),
    ]
    assert m.next_state == {"h": "h_next"} and m.outputs == ["h_next"]
    assert {k: leaf.kind for k, leaf in m.leaves.items()} == {
        "x": "input",
        "h": "state",
        "b_r": "param",
        "b_u": "param",
        "b_c": "param",
    }
    r, c = m.value("r").expr, m.value("c").expr
    assert isinstance(r, fn.Sigmoid) and isinstance(c, fn.Tanh)
    assert {s.name for s in c.free_symbols} == {"U_c_out", "W_c_x", "b_c"}


def test_lowering_shares_projections_and_folds_constants():
    m = compile_one(FOLD).model
    # a = h - h is the number 0 and its readers see the number, not the name
    assert m.value("a").expr == 0
    # softsign(0) + sigmoid(0) fold to a number too
    assert m.value("z").expr == sp.Float(0.5)
    q = m.value("q").expr
    assert {s.name for s in q.free_symbols} == {"U_h", "W_x", "b"}
    assert sp.Float(0.5) in q.args[0].args  # tanh(U_h + W_x + b + 0.5)
    # the two spellings of W @ (x * m) are one projection, counted twice
    assert m.value("p").expr == 2 * sp.Symbol("W_out", real=True) + sp.Symbol("W_x", real=True)


# ------------------------------------------------------------------------------ schedule
@dataclass(frozen=True)
class Scheduled:
    text: str
    hoisted_gemms: list[tuple[str, list[str]]]  # (operand, stacked matrices)
    hoisted_values: list[str]
    stages: list[tuple[list[tuple[str, list[str]]], list[str]]]  # (GEMM groups, value keys)


SCHEDULES = {
    "elman": Scheduled(ELMAN, [("x", ["W"])], [], [([("h", ["U"])], ["h_next"])]),
    "gru": Scheduled(
        GRU,
        [("x", ["W_r", "W_u", "W_c"])],  # stacked: one GEMM over T*B rows
        [],
        [
            ([("h", ["U_r", "U_u"])], ["r", "u", "U_c_in"]),  # U_c @ (r * h) ends the stage
            ([("U_c_in", ["U_c"])], ["c", "h_next"]),
        ],
    ),
    "lstm": Scheduled(
        LSTM,
        [("x", ["W_ii", "W_if", "W_ig", "W_io"])],
        [],
        [([("h", ["W_hi", "W_hf", "W_hg", "W_ho"])], ["i", "f", "g", "o", "c_next", "h_next"])],
    ),
    "deep": Scheduled(
        DEEP,
        # W @ x and W @ m hoisted (the vector param is an operand value), and V @ (W @ x) too:
        # its operand reads only a hoisted projection (a second hoisted level)
        [("x", ["W"]), ("W_in", ["W"]), ("V_in", ["V"])],
        ["W_in", "V_in"],
        [
            ([("h", ["U2", "U1"])], ["a", "U3_in"]),  # stacked in spec order
            ([("U3_in", ["U3"])], ["h_next"]),
        ],
    ),
    "fold": Scheduled(
        FOLD,
        # W @ (x * m): its operand is computed before the loop; with W @ x one GEMM (rows stacked)
        [("W_in", "x", ["W"])],
        ["W_in"],
        [([], ["a", "z", "p"]), ([("h", ["U"])], ["q", "h_next"])],
    ),
    # W2 @ tanh(W1 @ x): tanh(W1 @ x) reads a hoisted projection, so W2 @ it is hoisted too
    "mlp": Scheduled(MLP, [("x", ["W1"]), ("W2_in", ["W2"])], ["W2_in"], [([("h", ["U"])], ["h_next"])]),
    # avg @ (W_f @ x): hoisted although W_f @ x is also read per step
    "avg": Scheduled(
        AVG, [("x", ["W_f"]), ("avg_in", ["avg"])], ["avg_in"], [([], ["m"]), ([("h", ["U"])], ["h_next"])]
    ),
    "output_operand": Scheduled(
        OUTPUT_OPERAND,
        [],
        [],
        [([], ["a", "W_in"]), ([("W_in", ["W"]), ("h", ["U"])], ["h_next"])],
    ),
    "next_state_operand": Scheduled(
        NEXT_STATE_OPERAND,
        [],
        [],
        [([], ["h_next"]), ([("h_next", ["W"]), ("c", ["U"])], ["c_next"])],
    ),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule(name):
    case = SCHEDULES[name]
    s = compile_one(case.text).schedule
    assert [(*g.operands, g.matrices) for g in s.hoisted_gemms] == case.hoisted_gemms
    assert [v.key for v in s.hoisted_values] == case.hoisted_values
    got = [
        ([(*g.operands, g.matrices) for g in st.gemms], [v.key for v in st.values]) for st in s.stages
    ]
    assert got == case.stages
    assert [st.index for st in s.stages] == list(range(len(case.stages)))
    # every value and projection is in exactly one place
    m = s.model
    placed = [v.key for v in s.hoisted_values] + [v.key for v in s.step_values]
    assert sorted(placed) == sorted(v.key for v in m.values)
    gemmed = [p.key for p in s.hoisted_projections] + [
        p.key for g in s.step_gemms for p in g.projections
    ]
    assert sorted(gemmed) == sorted(p.key for p in m.projections)


def test_outputs_and_next_states_are_never_hoisted():
    for text in (OUTPUT_OPERAND, NEXT_STATE_OPERAND, GRU, LSTM, DEEP, FOLD):
        s = compile_one(text).schedule
        per_step = set(s.model.outputs) | set(s.model.next_state.values())
        assert not per_step & {v.key for v in s.hoisted_values}


#: an output on the way: W2 @ tanh(a) with ``output a`` stays per step (and so does W3 @ of it),
#: while W1 @ x below it is hoisted
OUTPUT_IN_CHAIN = cell(
    "  a = W1 @ x\n  h' = tanh(W3 @ tanh(W2 @ tanh(a)) + U @ h)\n  output h', a",
    "input x[I]\n  state h[H]\n  param W1[H, I], W2[H, H], W3[H, H], U[H, H]",
)


@pytest.mark.parametrize(
    "text,levels",
    [
        # level 0: W1 @ x; level 1: tanh(W1 @ x), then W2 @ it
        (MLP, [([], [("x", ["W1"])]), (["W2_in"], [("W2_in", ["W2"])])]),
        (AVG, [([], [("x", ["W_f"])]), (["avg_in"], [("avg_in", ["avg"])])]),
        # W @ x and W @ m at level 0 (with the operand value m), V @ (W @ x) at level 1
        (DEEP, [(["W_in"], [("x", ["W"]), ("W_in", ["W"])]), (["V_in"], [("V_in", ["V"])])]),
        (OUTPUT_IN_CHAIN, [([], [("x", ["W1"])])]),
        (GRU, [([], [("x", ["W_r", "W_u", "W_c"])])]),  # one level: as before
    ],
    ids=["mlp", "avg", "deep", "output_in_chain", "gru"],
)
def test_hoisted_levels(text, levels):
    """Each hoisted level is its pointwise values, then its GEMM groups; a value reads leaves,
    values of its level or before and GEMM results of earlier levels; a GEMM's operand is a leaf
    or a value of its level."""
    s = compile_one(text).schedule
    got = [([v.key for v in lv.values], [(*g.operands, g.matrices) for g in lv.gemms]) for lv in s.hoisted_levels]
    assert got == levels
    assert [lv.index for lv in s.hoisted_levels] == list(range(len(levels)))
    for lv in s.hoisted_levels:
        for v in lv.values:
            for r in (x.name for x in v.expr.free_symbols):
                k = s.hoisted_level(r)
                is_gemm = any(p.key == r for p in s.hoisted_projections)
                assert k is None and r in s.model.leaves or (k < lv.index if is_gemm else k <= lv.index)
        for g in lv.gemms:
            assert all(o in s.model.leaves or s.hoisted_level(o) == lv.index for o in g.operands)
            assert all(s.hoisted_level(p.key) == lv.index for p in g.projections)


@pytest.mark.parametrize("text", [MLP, AVG, DEEP], ids=["mlp", "avg", "deep"])
def test_hoisted_levels_in_the_program(text, tmp_path):
    """``cellspec show FILE --stage program``: every projection of these cells but the recurrent
    ones runs over all T*B rows ahead of the steps (before the loop, or as the loop's ops ahead of
    each chunk of steps), level by level; the backward runs the levels in reverse after the loop."""
    from cellspec.show import show

    path = tmp_path / "t.cell"
    path.write_text(text)
    txt = show(str(path), "program")
    cc = compile_one(text)
    fwd = txt[txt.index("  forward:"):txt.index("  inference:")]
    loop = fwd[fwd.index("for t in range(T)"):]
    per_step = [line.split("(B rows: ")[1].rstrip(")") for line in loop.splitlines() if "gemm " in line and "(B rows: " in line]
    assert per_step == [", ".join(f"{p.matrix} @ {p.operand}" for p in g.projections) for g in cc.schedule.step_gemms]
    (outer,) = {"W2", "avg", "V"} & {p.matrix for p in cc.schedule.hoisted_projections}
    assert not any(f"{outer} @" in line for line in per_step)
    before = fwd[:fwd.rindex("\n", 0, fwd.index("(B rows: "))]  # up to the first per-step GEMM
    assert all("T*B rows" in line for line in before.splitlines() if line.strip().startswith("gemm "))
    for p in cc.schedule.hoisted_projections:
        assert f"{p.matrix} @ {p.operand})" in before or f"{p.matrix} @ {p.operand}," in before
    assert "pointwise fwd_hoisted1 (all rows)" in before
    # the hoisted GEMMs of level 1 run after its pointwise block
    assert before.index("fwd_hoisted1") < before.index(f"{cc.schedule.hoisted_levels[1].gemms[0].matrices[0]}]^T")
    bwd = txt[txt.index("  backward:"):]
    after = bwd[bwd.index("for t in reversed(range(T))"):]
    assert "pointwise bwd_hoisted1 (all rows)" in after
    # level 1's dW comes before level 1's backward block, which comes before level 0's dW
    lv1 = cc.schedule.hoisted_levels[1].gemms[0].matrices[0]
    lv0 = cc.schedule.hoisted_levels[0].gemms[0].matrices[0]
    assert after.index(f"gemm d[{lv1}] +=") < after.index("bwd_hoisted1") < after.index(f"gemm d[{lv0}] +=")


@pytest.mark.parametrize("spec", sorted(p.stem for p in SPECS.glob("*.cell")))
def test_ring_holds_only_what_the_loop_reads(spec):
    """ir.Loop.ring (passes.run_ahead): the results of the work ahead of the steps that a
    native loop keeps one chunk of steps of; and Function.last_only: the state sequences of
    which inference keeps two steps. Each is a hoisted value or product that no op
    outside the loop touches, that the forward does not save, and that every slot reads at its
    own step; an LSTM's input product is one in both loops, and a hoisted product the forward
    saves for the backward (the antisymmetric RNN's) is one in inference only."""
    from cellspec.program.save import op_buffers

    (cc,) = compile_source(read_source(SPECS / f"{spec}.cell"), ())
    prog = cc.program
    for fn in (prog.forward, prog.inference):
        loop = fn.loop()
        written = {b for o in loop.ahead for b in fn.written_by(o)}
        outside = set().union(*(op_buffers(fn, o) for o in fn.ops if o is not loop))
        for name in loop.ring:
            assert name in written and name not in outside
            assert fn.buffers[name].role in ("hoisted_gemm", "hoisted_value")
            assert fn.name == "inference" or name not in prog.saved
            assert all(sl.time in (0, None) for sl in fn.slots.values() if sl.buffer == name)
    # Function.last_only (passes.keep_last): inference's state sequences no output views
    out_buffers = {prog.inference.slots[v.name].buffer for v in prog.outputs}
    assert prog.forward.last_only == prog.backward.last_only == ()
    for name in prog.inference.last_only:
        assert prog.inference.buffers[name].role == "state" and name not in out_buffers
    if spec == "lstm":
        assert prog.forward.loop().ring == prog.inference.loop().ring == ("hg_W_ii_W_if_W_ig_W_io__x",)
        assert prog.inference.last_only == ("s_c",)  # h is the output: its sequence is returned
    if spec == "torch_gru":
        assert prog.inference.last_only == ()
    if spec == "antisymmetric_rnn":
        assert prog.forward.loop().ring == () and prog.inference.loop().ring == ("hg_V__x",)


@pytest.mark.parametrize("spec", sorted(p.stem for p in SPECS.glob("*.cell")))
def test_work_behind_the_backward_steps(spec):
    """ir.Loop.behind (passes.run_behind): every op after a backward loop reads the rows of a
    step only or adds up over the rows (weight gradients, row sums, an input's gradient, a
    product or pointwise level per row), so all of them become the loop's ``behind`` ops, in
    program order but for an input's gradient, which runs ahead of the weight gradients and row
    sums it does not depend on, and nothing is left after the loop; the loop's ring is the step
    adjoints the steps write that no op before the loop touches, each read at its own step. A forward
    loop has no ops behind it. torch.nn's GRU: its one shared adjoint buffer is the ring, and the
    ops behind are dx, its two weight gradients and four bias sums."""
    from cellspec.program.save import op_buffers

    (cc,) = compile_source(read_source(SPECS / f"{spec}.cell"), ())
    prog = cc.program
    fn = prog.backward
    loop = fn.loop()
    assert fn.ops[-1] is loop and loop.behind
    assert all(passes._row_wise(o) for o in loop.behind)
    assert [type(o) for o in fn.flat()][-len(loop.behind):] == [type(o) for o in loop.behind]
    written = {b for o in loop.body for b in fn.written_by(o)}
    before = set().union(*(op_buffers(fn, o) for o in fn.ops if o is not loop))
    for name in loop.ring:
        assert name in written and name not in before and fn.buffers[name].role == "d_gemm"
        assert all(sl.time in (0, None) for sl in fn.slots.values() if sl.buffer == name)
    assert prog.forward.loop().behind == prog.inference.loop().behind == ()
    if spec == "torch_gru":
        assert loop.ring == ("dgs_W_in_W_ir_W_iz__x",)
        assert [type(o).__name__ for o in loop.behind] == ["ProjectBack"] + ["WeightGrad"] * 2 + ["RowSum"] * 4


def test_products_first_only_past_ops_they_do_not_depend_on():
    """passes._products_first: an input's gradient (ProjectBack) goes ahead of the weight
    gradients and row sums before it, but not past one that writes what it reads, nor past any
    other kind of op."""
    (cc,) = compile_source(read_source(SPECS / "torch_gru.cell"), ())
    fn = cc.program.backward
    behind = fn.loop().behind
    pb = next(o for o in behind if isinstance(o, ir.ProjectBack))
    wg = next(o for o in behind if isinstance(o, ir.WeightGrad))
    rs = next(o for o in behind if isinstance(o, ir.RowSum))
    assert passes._products_first(fn, (wg, rs, pb)) == (pb, wg, rs)
    writes_its_input = replace(wg, scratch=pb.d_out)  # a pass that would overwrite the adjoint dx reads
    assert passes._products_first(fn, (wg, writes_its_input, pb)) == (wg, writes_its_input, pb)
    zero = ir.Zero(wg.d_out)
    assert passes._products_first(fn, (wg, zero, pb)) == (wg, zero, pb)


def test_run_behind_leaves_a_loop_with_other_ops_after_it():
    """An op after a backward loop that is not row-wise (here a projection of one broadcast
    row) keeps every op where it was: the chunks would run it before the ops before it."""
    (cc,) = compile_source(read_source(SPECS / "lstm.cell"), ())
    fn = cc.program.backward
    loop = fn.loop()
    plain = replace(fn, ops=(replace(loop, behind=(), ring=()), *loop.behind))
    assert passes.run_behind(plain) == fn
    odd = ir.Project("W_hi_W_hf_W_hg_W_ho", ("h",), "x", "all", broadcast=True)
    mixed = replace(plain, ops=(*plain.ops, odd))
    assert passes.run_behind(mixed) is mixed
    forward = cc.program.forward
    assert passes.run_behind(forward) is forward


def test_stacked_group_slices_follow_matrix_order():
    """A GEMM group's key and matrix order are the stacking order the back ends slice by."""
    s = compile_one(DEEP).schedule
    g = s.stages[0].gemms[0]
    assert g.key == "U2_U1__h"
    assert [p.key for p in g.projections] == ["U2_h", "U1_h"]


# ------------------------------------------------------------------------------ backward
@dataclass(frozen=True)
class Derived:
    text: str
    saved: list[str]
    zero: set[str]  # forward keys whose adjoint is identically zero
    gemm_adjoint: dict[tuple[int, str], str]


BACKWARDS = {
    # states are kept as their sequence (h_next is never saved); U_c_in is a per-step GEMM operand
    "gru": Derived(
        GRU,
        ["r", "u", "U_c_in", "c"],
        {"x"},
        {(0, "h"): "d_h_gemm", (1, "U_c_in"): "d_U_c_in_gemm"},
    ),
    "lstm": Derived(LSTM, ["i", "f", "g", "o"], {"x"}, {(0, "h"): "d_h_gemm"}),
    # nothing to save: the backward reads h_next from the state sequence
    "elman": Derived(ELMAN, [], {"x"}, {(0, "h"): "d_h_gemm"}),
    # the constants a and z and the hoisted leaves x, m have no per-step adjoint
    "fold": Derived(FOLD, ["p", "q"], {"a", "z", "x", "m"}, {(1, "h"): "d_h_gemm"}),
    "deep": Derived(
        DEEP,
        ["U3_in"],  # V @ (W @ x) is hoisted: nothing of it is kept per step
        {"x", "m"},
        {(0, "h"): "d_h_gemm", (1, "U3_in"): "d_U3_in_gemm"},
    ),
    # a state the step never reads
    "unread_state": Derived(
        cell(
            "  h' = tanh(W @ x + b)\n  output h'", "input x[I]\n  state h[H]\n  param W[H, I], b[H]"
        ),
        [],
        {"h", "x"},
        {},
    ),
}


@pytest.mark.parametrize("name", list(BACKWARDS))
def test_backward_saved_set_zero_adjoints_and_gemm_adjoints(name):
    case = BACKWARDS[name]
    b = compile_one(case.text).backward
    assert b.saved == case.saved
    assert b.zero == case.zero
    assert b.gemm_adjoint == case.gemm_adjoint
    # a zero adjoint is never assigned; everything assigned is a named adjoint or a temporary
    blocks = [a for st in b.stages for a in st.assigns] + b.leaf_assigns
    assigned = {a.target for a in blocks if not a.temp}
    assert not {b.adjoint[k] for k in case.zero if k in b.adjoint} & assigned


def _assigns(b) -> dict[str, sp.Expr]:
    blocks = [
        *(st.assigns for st in b.stages),
        b.leaf_assigns,
        b.hoisted_assigns,
        b.hoisted_leaf_assigns,
    ]
    return {a.target: a.expr for blk in blocks for a in blk}


def test_lstm_adjoint_aliases_reuse_the_projection_adjoint():
    """The bias of f(W@x + b) has the adjoint of W@x: the name is reused, not recomputed."""
    b = compile_one(LSTM).backward
    exprs = _assigns(b)
    for gate, bias_i, bias_h, x_proj in [
        ("i", "b_ii", "b_hi", "W_ii_x"),
        ("f", "b_if", "b_hf", "W_if_x"),
        ("g", "b_ig", "b_hg", "W_ig_x"),
        ("o", "b_io", "b_ho", "W_io_x"),
    ]:
        h_proj = f"W_h{gate}_h"
        alias = sp.Symbol(b.adjoint[h_proj], real=True)
        for leaf in (bias_i, bias_h, x_proj):
            assert exprs[b.adjoint[leaf]] == alias, leaf
    assert exprs[b.adjoint["b_ii"]] == sp.Symbol("d_W_hi_h", real=True)


def test_backward_reads_saved_gates_instead_of_recomputing_them():
    """Derivative rules in terms of the value: sigmoid' reads the saved gate, never Sigmoid(...)."""
    b = compile_one(LSTM).backward
    applied = set().union(*(e.atoms(fn.CellFunction) for e in _assigns(b).values()))
    # tanh(c') is not named in the forward, so the backward recomputes it; nothing else
    assert applied == {fn.Tanh(sp.Symbol("c_next", real=True))}
    d_i = _assigns(b)[b.adjoint["W_hi_h"]]
    assert sp.Symbol("i", real=True) in d_i.free_symbols


def test_elman_bias_and_hoisted_projection_reuse_the_step_projection_adjoint():
    b = compile_one(ELMAN).backward
    exprs = _assigns(b)
    d_u_h = sp.Symbol(b.adjoint["U_h"], real=True)
    assert exprs[b.adjoint["W_x"]] == d_u_h and exprs[b.adjoint["b"]] == d_u_h
    h_next = sp.Symbol("h_next", real=True)
    assert (
        sp.expand(
            exprs[b.adjoint["U_h"]] - sp.Symbol(b.adjoint["h_next"], real=True) * (1 - h_next**2)
        )
        == 0
    )


def test_output_and_state_seeds():
    b = compile_one(OUTPUT_OPERAND).backward
    assert b.output_seed == {"h_next": "d_h_next_out", "a": "d_a_out"}
    b = compile_one(NEXT_STATE_OPERAND).backward
    assert b.output_seed == {"c_next": "d_c_next_out", "h_next": "d_h_next_out"}
    # the state h is never read by the step: its adjoint is zero, but h' still gets its seeds
    assert "h" in b.zero and "h_next" not in b.zero


def test_param_rows_computed_into_the_hoisted_products_adjoint():
    """passes.resolve_aliases, the other way round: torch.nn's GRU has ``d_W_in_x = d_b_in`` (the
    input product's adjoint is another name of the bias's), so ``d_b_in`` is computed straight
    into the n block of the input product's adjoint buffer, which its reduction after the loop
    reads: no [T, B, H] rows of its own, the copy statement not stored. A bias whose adjoint is
    a step product's (read inside the loop) is left alone, and an LSTM's biases keep reading the
    step product's adjoint (the alias of the first kind)."""
    (cc,) = compile_source(read_source(SPECS / "torch_gru.cell"), ())
    bwd = cc.program.backward
    d_b_in, d_in_x = cc.backward.adjoint["b_in"], cc.backward.adjoint["W_in_x"]
    assert "dp_b_in" not in bwd.buffers
    assert bwd.slots[d_b_in] == bwd.slots[d_in_x]
    # (its own column of the adjoint buffer the input product shares with the step's: see
    # test_a_hoisted_group_shares_the_step_groups_adjoint_buffer)
    assert bwd.slots[d_b_in].buffer == "dgs_W_in_W_ir_W_iz__x" and bwd.slots[d_b_in].col == 0
    step = next(o for o in bwd.flat() if isinstance(o, ir.Pointwise) and o.block == "bwd0")
    assert d_b_in in step.writes and d_in_x not in step.writes
    (rs,) = [o for o in bwd.flat() if isinstance(o, ir.RowSum) and o.param == ("b_in",)]
    assert bwd.slots[rs.source] == bwd.slots[d_b_in]
    # b_hn's adjoint (r * t1) is its own value, not an alias: it keeps the step product's block
    assert bwd.slots[cc.backward.adjoint["b_hn"]] == bwd.slots[cc.backward.adjoint["W_hn_h"]]
    (lstm,) = compile_source(read_source(SPECS / "lstm.cell"), ())
    assert not any(name.startswith("dp_") for name in lstm.program.backward.buffers)


def test_the_forward_keeps_only_the_blocks_of_a_step_product_the_backward_reads():
    """torch.nn's GRU's backward reads one block of the step's recurrent product (W_hn @ h, in
    d_r) and not the other two: the product is a step's scratch and the forward's block copies
    that one out, [T, B, H] (saved: 5 of H per row instead of 7). The LSTM's backward reads no
    block of its product: nothing is kept of it."""
    H = sp.Symbol("H", integer=True, nonnegative=True)
    (cc,) = compile_source(read_source(SPECS / "torch_gru.cell"), ())
    prog = cc.program
    fwd, bwd = prog.forward, prog.backward
    assert fwd.buffers["g_W_hr_W_hz_W_hn__h"].role == "scratch"
    assert fwd.buffers["g_W_hr_W_hz_W_hn__h"].shape == (sp.Symbol("B", integer=True, nonnegative=True), 3 * H)
    (blk,) = [o for o in fwd.flat() if isinstance(o, ir.Pointwise)]
    (copy,) = [st for st in blk.statements if st.target == "W_hn_h_kept"]
    assert copy.expr == sp.Symbol("W_hn_h", real=True) and "W_hn_h_kept" in blk.writes
    assert fwd.slots["W_hn_h_kept"].buffer == "v_W_hn_h" and fwd.buffers["v_W_hn_h"].role == "saved"
    assert bwd.slots["W_hn_h"].buffer == "v_W_hn_h"
    assert prog.saved == ("s_h", "v_W_hn_h", "v_r", "v_z", "v_n")
    assert sp.expand(sum(fwd.buffers[n].shape[-1] for n in prog.saved) - 5 * H) == 0
    # the inference forward keeps nothing
    assert not any(st.target.endswith("_kept") for o in prog.inference.flat() if isinstance(o, ir.Pointwise)
                   for st in o.statements)
    (lstm,) = compile_source(read_source(SPECS / "lstm.cell"), ())
    assert lstm.program.forward.buffers["g_W_hi_W_hf_W_hg_W_ho__h"].role == "scratch"
    assert not any(n.endswith("_kept") for n in lstm.program.forward.slots)


def test_a_hoisted_group_shares_the_step_groups_adjoint_buffer():
    """passes.share_adjoint_buffers: torch.nn's GRU's input product has the adjoints of the step
    product's r and z blocks (other names) and one of its own (d_b_in). One [T, B, 4H] buffer
    holds [d_b_in | d_r | d_z | d_hn]: the step block writes 4H columns a row, not 6H (two copies
    less); the input stack is reordered to [W_in; W_ir; W_iz] so that its run of columns is
    [0, 3H), the step's is [H, 4H); each GEMM reads its run with the buffer's row stride. The TF
    GRU (gru.cell) and the MGU share one buffer among two step groups (two stages) and the input
    product, with no column of its own; the LSTM (all of its input adjoints one step group's)
    keeps reading that group's buffer as it is, its stack order unchanged."""
    H = sp.Symbol("H", integer=True, nonnegative=True)
    (cc,) = compile_source(read_source(SPECS / "torch_gru.cell"), ())
    prog, b = cc.program, cc.backward
    bwd = prog.backward
    assert [n for n, buf in bwd.buffers.items() if buf.role == "d_gemm"] == ["dgs_W_in_W_ir_W_iz__x"]
    assert bwd.buffers["dgs_W_in_W_ir_W_iz__x"].shape[-1] == 4 * H
    assert prog.weights["W_in_W_ir_W_iz"].matrices == ("W_in", "W_ir", "W_iz")
    col = {k: bwd.slots[b.adjoint[k]].col for k in ("b_in", "W_hr_h", "W_hz_h", "W_hn_h", "W_ir_x", "W_iz_x")}
    assert col == {"b_in": 0, "W_hr_h": H, "W_hz_h": 2 * H, "W_hn_h": 3 * H, "W_ir_x": H, "W_iz_x": 2 * H}
    step = next(o for o in bwd.flat() if isinstance(o, ir.Pointwise) and o.block == "bwd0")
    assert sorted(w for w in step.writes if bwd.slots[w].buffer.startswith("dgs_")) == sorted(
        [b.adjoint["b_in"], b.adjoint["W_hr_h"], b.adjoint["W_hz_h"], b.adjoint["W_hn_h"]])
    runs = {(type(o).__name__, o.weight): o.d_col for o in bwd.flat() if isinstance(o, (ir.ProjectBack, ir.WeightGrad))}
    assert runs == {("ProjectBack", "W_hr_W_hz_W_hn"): H, ("WeightGrad", "W_hr_W_hz_W_hn"): H,
                    ("WeightGrad", "W_in_W_ir_W_iz"): 0, ("ProjectBack", "W_in_W_ir_W_iz"): 0}
    # the forward's hoisted product follows the new stack order
    fwd = prog.forward
    assert [fwd.slots[k].col for k in ("W_in_x", "W_ir_x", "W_iz_x")] == [0, H, 2 * H]
    for spec, name, width in (("gru", "dgs_W_r_W_u_W_c__x", 3 * H), ("mgu", "dgs_W_f_W_h__x", 2 * H)):
        (cc,) = compile_source(read_source(SPECS / f"{spec}.cell"), ())
        bwd = cc.program.backward
        assert [n for n, buf in bwd.buffers.items() if buf.role == "d_gemm"] == [name]
        assert bwd.buffers[name].shape[-1] == width
        assert len({o.weight for o in bwd.flat() if isinstance(o, ir.WeightGrad) and o.d_out == name}) == 3
    # the other arrangement: the candidate's recurrent product leads its stack ([W_hn; W_hr; W_hz]),
    # so the input product's run comes after the step's, its own column last, its order kept
    (cc,) = compile_source(read_source(Path(__file__).parent / "specs" / "shared_adjoint_suffix.cell"), ())
    prog, b = cc.program, cc.backward
    bwd = prog.backward
    assert [n for n, buf in bwd.buffers.items() if buf.role == "d_gemm"] == ["dgs_W_ir_W_iz_W_in__x"]
    assert prog.weights["W_ir_W_iz_W_in"].matrices == ("W_ir", "W_iz", "W_in")
    col = {k: bwd.slots[b.adjoint[k]].col for k in ("W_hn_h", "W_hr_h", "W_hz_h", "b_in")}
    assert col == {"W_hn_h": 0, "W_hr_h": H, "W_hz_h": 2 * H, "b_in": 3 * H}
    runs = {(type(o).__name__, o.weight): o.d_col for o in bwd.flat() if isinstance(o, (ir.ProjectBack, ir.WeightGrad))}
    assert runs == {("ProjectBack", "W_hn_W_hr_W_hz"): 0, ("WeightGrad", "W_hn_W_hr_W_hz"): 0,
                    ("WeightGrad", "W_ir_W_iz_W_in"): H, ("ProjectBack", "W_ir_W_iz_W_in"): H}
    (lstm,) = compile_source(read_source(SPECS / "lstm.cell"), ())
    assert [n for n, buf in lstm.program.backward.buffers.items() if buf.role == "d_gemm"] == ["dg_W_hi_W_hf_W_hg_W_ho__h"]
    assert lstm.program.weights["W_ii_W_if_W_ig_W_io"].matrices == ("W_ii", "W_if", "W_ig", "W_io")


def test_leaf_work_moves_before_the_step_product_and_the_product_adds_into_the_state_adjoint():
    """passes.fold_leaf on the shipped cells: what does not need the step's recurrent product is
    computed in the block before it, and the product goes straight into the state adjoint's
    buffer, added (``+=``) to the rest where there is one. torch.nn's GRU: ``d_h = d_h_gemm +
    d_h_next*z`` becomes ``d_h_direct = d_h_next*z`` in ``ds_h``, then the GEMM ``+=`` there; its
    ``d_b_in`` is the block's ``t1``, not computed again; no block after the product, no per-step
    scratch for ``d_n``, ``d_h_next`` or the product. The LSTM: the GEMM writes ``ds_h``
    (``d_h = d_h_gemm``), and ``d_c`` comes from the block that reads the incoming one, under a
    name of its own in the same buffer. A layer-norm GRU, whose recurrent product is an earlier
    stage's: its last block assigns ``d_h`` as before (it does not read the incoming one)."""
    def parts(spec):
        (cc,) = compile_source(read_source(SPECS / spec), ())
        bwd = cc.program.backward
        blocks = {o.block: o for o in bwd.flat() if isinstance(o, ir.Pointwise)}
        backs = [o for o in bwd.loop().body if isinstance(o, ir.ProjectBack)]
        return bwd, blocks, backs

    bwd, blocks, (pb,) = parts("torch_gru.cell")
    assert "bwd_leaf" not in blocks
    assert pb.accumulate and bwd.slots[pb.d_operands[0]] == bwd.slots["d_h_direct"] == bwd.slots["d_h"]
    assert bwd.loop().body[-1] is pb
    stmts = {st.target: st.expr for st in blocks["bwd0"].statements}
    assert str(stmts["d_h_direct"]) == "d_h_next*z" and str(stmts["d_b_in"]) == "t1"
    assert "d_h_direct" in blocks["bwd0"].writes
    assert not any(n.startswith("tmp_") for n in bwd.buffers)

    bwd, blocks, (pb,) = parts("lstm.cell")
    assert "bwd_leaf" not in blocks and not pb.accumulate
    assert bwd.slots[pb.d_operands[0]].buffer == "ds_h"
    assert "d_c" in blocks["bwd0"].reads and bwd.slots["d_c_prev"].buffer == "ds_c"
    assert blocks["bwd0"].writes[-1] == "d_c_prev"  # the state adjoints last

    bwd, blocks, backs = parts("layer_norm_gru.cell")
    assert "bwd_leaf" not in blocks and not any(pb.accumulate for pb in backs)
    assert "d_h" in blocks["bwd0"].writes and "d_h" not in blocks["bwd0"].reads


def test_fold_leaf_keeps_what_reads_the_product():
    """passes.fold_leaf on statements of its own: a statement that reads the step product's
    adjoint stays after it, and so does what reads it; a temporary that a staying statement
    reads stays (temporaries are not stored between blocks), and with it what reads it; a state
    adjoint whose product is read by another statement is not folded into the GEMM."""
    from types import SimpleNamespace

    from cellspec.model.gradients import Assignment
    from cellspec.program import passes
    from cellspec.program.plan import _Planner

    S = sp.Symbol
    planner = SimpleNamespace(
        b=SimpleNamespace(adjoint={"h": "d_h"}, zero=set()),
        cell=SimpleNamespace(states=[SimpleNamespace(name="h")]),
        size={k: "H" for k in ("d_h", "g", "a", "t", "u", "v", "w")})
    tb = _Planner._Table()
    tb.place("d_h", tb.buffer("ds_h", ("B", "H"), "d_state", "arg"), None, 0, "H")
    tb.place("g", tb.buffer("tmp_g", ("B", "H"), "scratch"), None, 0, "H")
    leaf = [Assignment("t", S("a") * 2, temp=True),           # read by u (stays) and v (moves)
            Assignment("u", S("g") * S("t")),                   # reads the product: stays
            Assignment("v", S("t") + 1),                         # reads t, which stays: stays
            Assignment("w", S("a") + 1),                         # moves
            Assignment("d_h", S("g") + S("a"))]                 # g is read by u too: not folded
    stage, kept, into = passes.fold_leaf(planner, tb, [Assignment("a", S("x") * 3)], leaf, {"g": True})
    assert [a.target for a in kept] == ["t", "u", "v", "d_h"]
    assert [a.target for a in stage] == ["a", "w"] and into == {}
    assert tb.slots["g"].buffer == "tmp_g"

    leaf = [Assignment("d_h", S("g") + S("a") * S("d_h_in"))]
    stage, kept, into = passes.fold_leaf(planner, tb, [Assignment("a", S("x") * 3)], leaf, {"g": True})
    assert kept == [] and into == {"g": True}
    assert stage[-1] == Assignment("d_h_direct", S("a") * S("d_h_in"), stage[-1].comment)
    assert tb.slots["g"] == tb.slots["d_h"] == tb.slots["d_h_direct"] and "tmp_g" not in tb.buffers
