"""Row stacking (issue 9): projections by the same matrix (or stack of matrices) on different
operands of one stage, or of one hoisted level, are one GEMM over the operands' rows.

The middle (schedule, program, ``cellspec show``) is held to one GEMM per group forward, one
d_operand GEMM and one dW GEMM backward; the numbers are held against the autograd reference on
every engine, with variable lengths (rows per step shrinking) and on the fused CPU path (T >= 8).
``tests/specs/shared_matrix.cell`` also runs through every backend pair in test_backends.py and
the other spec-parametrized tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TEST_SPECS, compiled_cells, load_module

from cellspec.cli import main
from cellspec.program import ir
from cellspec.runtime import native

SPEC = TEST_SPECS / "shared_matrix.cell"
DT = torch.float64


def _cell(name: str):
    return next(cc for cc in compiled_cells(str(SPEC)) if cc.checked.name == name)


def _ops(fn: ir.Function) -> list:
    return fn.flat()


def test_schedule_stacks_operands_by_rows():
    s = _cell("SharedMatrix").schedule
    hoisted = [(g.operands, g.matrices) for g in s.hoisted_gemms]
    assert (["x1", "x2"], ["W"]) in hoisted  # W on two inputs
    assert any(ops == ["A_in", "A_in_2"] and mats == ["A"] for ops, mats in hoisted)  # on two hoisted values
    step = [(g.operands, g.matrices) for g in s.step_gemms]
    assert step == [(["h", "c"], ["U", "R"]), (["p", "q"], ["V"])]
    copies = _cell("SharedMatrixCopies").schedule
    assert [(g.operands, g.matrices) for g in copies.step_gemms] == [
        (["h"], ["S"]), (["p", "q"], ["V"]), (["h_next", "r"], ["S"])]
    assert [(g.operands, g.matrices) for g in copies.hoisted_gemms] == [(["x"], ["W", "Q"]), (["M_in", "M_in_2"], ["M"])]


def test_shipped_cells_do_not_stack_rows():
    """No shipped spec has such a pair: their programs (and generated/) are unchanged."""
    from conftest import spec_paths

    for path in spec_paths():
        for cc in compiled_cells(str(path)):
            assert all(len(g.operands) == 1 for g in cc.schedule.step_gemms + cc.schedule.hoisted_gemms), cc.module_name


@pytest.mark.parametrize("cell", ["SharedMatrix", "SharedMatrixCopies"])
def test_program_has_one_gemm_per_group(cell):
    """Forward: one Project per group (k operands, k times the rows); backward: one ProjectBack
    giving every operand's adjoint and one WeightGrad per group (dW summed over all stacked rows)."""
    cc = _cell(cell)
    prog = cc.program
    groups = cc.schedule.step_gemms + cc.schedule.hoisted_gemms
    stacked = [g for g in groups if len(g.operands) > 1]
    assert stacked
    for fn in (prog.forward, prog.inference):
        projects = [o for o in _ops(fn) if isinstance(o, ir.Project)]
        for g in stacked:
            mine = [o for o in projects if set(o.operands) & set(g.operands)]
            assert len(mine) == 1 and mine[0].operands == tuple(g.operands) and mine[0].stacked, (fn.name, g.key)
            buf = fn.buffers[mine[0].stacked]
            k_in = ir.size(g.projections[0].in_size)
            assert buf.shape[-1] == len(g.operands) * k_in  # exactly the operands, side by side
    ops = _ops(prog.backward)
    for g in stacked:
        w = "_".join(g.matrices)
        grads = [o for o in ops if isinstance(o, ir.WeightGrad) and o.weight == w and set(o.operands) == set(g.operands)]
        assert len(grads) == 1 and grads[0].stacked
        back = [o for o in ops if isinstance(o, ir.ProjectBack) and o.d_out == grads[0].d_out]
        assert len(back) == 1 and len(back[0].d_operands) == len(g.operands)
    # one dW GEMM per matrix stack and group: never one per operand
    n_groups = {"_".join(g.matrices): 0 for g in groups}
    for g in groups:
        n_groups["_".join(g.matrices)] += 1
    for w, n in n_groups.items():
        assert len([o for o in ops if isinstance(o, ir.WeightGrad) and o.weight == w]) == n


def test_show_program_names_both_operands(capsys):
    assert main(["show", str(SPEC), "--stage", "program", "--cell", "SharedMatrix"]) == 0
    text = capsys.readouterr().out
    assert "gemm hg_W__x1__x2 = [x1; x2] (side by side in hst_W__x1__x2) @ [W]^T   (2 x T*B rows, one GEMM" in text
    assert "gemm g_U_R__h__c = [h; c] (side by side in st_U_R__h__c) @ [U, R]^T   (2 x B rows, one GEMM" in text
    assert "gemm g_V__p__q = [p; q] (side by side in st_V__p__q) @ [V]^T" in text
    assert "gemm d[V] += dg_V__p__q^T @ [p; q] (side by side in st_V__p__q)   (2 x T*B rows, one GEMM" in text
    assert "gemm [d_p_gemm; d_q_gemm] (side by side in tmp_d_V__p__q) = dg_V__p__q @ [V]   (2 x B rows, one GEMM)" in text
    # values the step computes are laid out side by side: no copy; inputs and states are copied
    assert "-> p = f*g   => st_V__p__q[t][:, 0:H]" in text
    assert "copy x1, x2 -> hst_W__x1__x2[t][:, 0:I], hst_W__x1__x2[t][:, I:2*I]" in text
    assert "copy p" not in text


def test_generated_code_says_why_it_copies():
    """A copy into a stacked operand is commented with the reason in every rendering."""
    files = _cell("SharedMatrix").files
    numpy_src = next(v for k, v in files.items() if k.endswith("numpy_cell.py"))
    cu = next(v for k, v in files.items() if k.endswith(".cu"))
    why = "copy h, c into the stacked operand (h: a state sequence, c: a state sequence, not laid out by the planner)"
    assert why in numpy_src and why in cu
    assert "CS_COPY_ROWS(rows, n_H, b_s_h + t * n_B * (n_H), n_H, b_st_U_R__h__c, 2*n_H);" in cu
    assert "CS_GEMM_NT_PACKED(2 * rows, 2*n_H, n_H, b_st_U_R__h__c, n_H, pk_U_R_nt, b_g_U_R__h__c, 2*n_H, 0);" in cu
    # no row-stacked cell, no copy macro
    assert "CS_COPY_ROWS" not in next(v for k, v in compiled_cells(str(TEST_SPECS / "four_states.cell"))[0].files.items()
                                      if k.endswith(".cu"))


def _layer(pkg, backend: str, bidirectional: bool = False):
    mod = pkg.torch_cell
    torch.manual_seed(0)
    layer = getattr(mod, mod.CELL)(3, 4, bidirectional=bidirectional, backend=backend).to(DT)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return layer


def _run(layer, xs, lengths):
    """Outputs, final states and the gradients of a fixed loss w.r.t. params and inputs."""
    xs = [x.clone().requires_grad_() for x in xs]
    out, fin = layer(xs[0] if len(xs) == 1 else tuple(xs), lengths=lengths)
    flat = [t for t in (out if isinstance(out, tuple) else (out,)) + (fin if isinstance(fin, tuple) else (fin,))]
    torch.manual_seed(7)
    loss = sum((t * torch.randn_like(t)).sum() for t in flat)
    grads = torch.autograd.grad(loss, list(layer.parameters()) + xs)
    return [t.detach() for t in flat], list(grads)


HAVE_CXX = native.which_cxx() is not None
BACKENDS = ["generated"] + (["fused"] if HAVE_CXX else [])


@pytest.mark.parametrize("module", ["shared_matrix", "shared_matrix_copies"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_variable_lengths_match_autograd(module, backend, bidirectional):
    """With lengths (rows per step shrinking; no sequence T long too), the row-stacked GEMMs run
    the first B_t rows of every operand: the same numbers as autograd through the plain step."""
    pkg = load_module(module)
    T, B = 9, 4
    torch.manual_seed(1)
    xs = [torch.randn(T, B, 3, dtype=DT) for _ in pkg.torch_cell.INPUTS]
    for lengths in ([9, 3, 7, 1], [5, 2, 5, 4]):
        ref = _run(_layer(pkg, "autograd", bidirectional), xs, lengths)
        got = _run(_layer(pkg, backend, bidirectional), xs, lengths)
        for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("module", ["shared_matrix", "shared_matrix_copies"])
def test_numpy_sequence_with_lengths(module):
    """numpy_cell's sequence functions with lengths agree with the PyTorch engine."""
    pkg = load_module(module)
    layer = _layer(pkg, "generated")
    T, B = 6, 3
    lengths = [4, 6, 2]
    torch.manual_seed(2)
    xs = [torch.randn(T, B, 3, dtype=DT) for _ in pkg.torch_cell.INPUTS]
    out_t, fin_t = layer(xs[0] if len(xs) == 1 else tuple(xs), lengths=lengths)
    params = {k: v.detach().numpy() for k, v in layer.named_parameters()}
    xn = [x.numpy() for x in xs]
    out_n, fin_n = pkg.numpy_cell.forward_sequence(params, xn[0] if len(xn) == 1 else tuple(xn), None,
                                                   lengths=lengths)
    flat = lambda v: list(v) if isinstance(v, tuple) else [v]
    for a, b in zip(flat(out_n), flat(out_t)):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-12, atol=1e-13)
    for a, b in zip(flat(fin_n), flat(fin_t)):
        np.testing.assert_allclose(np.asarray(a).reshape(-1), b.detach().numpy().reshape(-1), rtol=1e-12, atol=1e-13)


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler for the native CPU build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_runs_the_fused_path(dtype):
    """T >= 8 on the CPU: backend='auto' runs the native library, and agrees with the engine."""
    pkg = load_module("shared_matrix")
    auto, gen = _layer(pkg, "auto"), _layer(pkg, "generated")
    auto, gen = auto.to(dtype), gen.to(dtype)
    torch.manual_seed(3)
    T = max(8, pkg.torch_cell.MIN_NATIVE_STEPS)
    xs = [torch.randn(T, 5, 3, dtype=dtype) for _ in range(2)]
    assert auto._resolve_backend(tuple(xs), auto._zero_state((None,) * len(pkg.torch_cell.STATES), xs[0])) == "fused"
    a, b = _run(auto, xs, None), _run(gen, xs, None)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == DT else {"rtol": 2e-4, "atol": 2e-5}
    for u, v in zip(a[0] + a[1], b[0] + b[1]):
        torch.testing.assert_close(u, v, **tol)
