"""Language reach (issue 9): consts, scalar params, defs and matrix expressions left of '@'.

Each feature is checked against the same cell written without it (the number written in, the
def expanded by hand, the matrix formed outside), on NumPy, the PyTorch engine, autograd and the
fused CPU kernels."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cellspec.driver import compile_source
from cellspec.errors import Source
from cellspec.runtime.loader import load_package

CORNN = """
cell C {
  input x[I]
  state y[H], z[H]
  const dt = 0.042, gamma = 2.7
  param V[H, I], W[H, H], b[H]
  z' = z + dt * (tanh(W @ y + V @ x + b) - gamma * y)
  y' = y + dt * z'
  output y'
}
"""


def _load(text: str, name: str = "t.cell"):
    (cc,) = compile_source(Source(name, text))
    return load_package(cc.module_name, cc.files), cc


def _params(pkg, sizes, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.5, [sizes[d] for d in shape]) for k, shape in pkg.numpy_cell.PARAMS.items()}


def test_const_overridden_equals_the_number_written_in():
    pkg, _ = _load(CORNN)
    written, _ = _load(CORNN.replace("cell C", "cell D").replace("const dt = 0.042, gamma = 2.7", "const gamma = 2.7")
                       .replace("dt *", "0.05 *"))
    sizes = {"I": 3, "H": 4}
    params = _params(pkg, sizes)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 2, 3))
    out, _ = pkg.numpy_cell.forward_sequence(params, x, dt=0.05)
    ref, _ = written.numpy_cell.forward_sequence(params, x)
    np.testing.assert_allclose(out, ref, rtol=1e-13, atol=1e-15)
    d_out = rng.normal(size=out.shape)
    g = pkg.numpy_cell.backward_sequence(params, x, None, d_out, None, dt=0.05)
    gr = written.numpy_cell.backward_sequence(params, x, None, d_out, None)
    for k in params:
        np.testing.assert_allclose(g[0][k], gr[0][k], rtol=1e-12, atol=1e-14)
    default, _ = pkg.numpy_cell.forward_sequence(params, x)
    assert not np.allclose(default, out)  # the default (0.042) is another cell

    torch.manual_seed(0)
    xt = torch.tensor(x)
    for backend in ("generated", "autograd", "fused"):
        m = pkg.torch_cell.C(3, 4, dt=0.05, dtype=torch.float64, backend=backend)
        r = written.torch_cell.D(3, 4, dtype=torch.float64, backend=backend)
        r.load_state_dict(m.state_dict())
        assert m.dt == 0.05 and "dt" not in m.state_dict() and "dt" not in dict(m.named_parameters())
        y, _ = m(xt)
        yr, _ = r(xt)
        torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-14)
        y.sum().backward()
        yr.sum().backward()
        for k, p in m.named_parameters():
            torch.testing.assert_close(p.grad, dict(r.named_parameters())[k].grad, rtol=1e-11, atol=1e-13)


def test_one_native_build_serves_every_const_value():
    pkg, cc = _load(CORNN)
    code = "\n".join(line.split("//")[0] for line in cc.files["c.cu"].splitlines()
                     if not line.lstrip().startswith(("*", "/*", "//")))
    assert not re.search(r"(?<![\d.])0\.042(0\d*)?(?!\d)", code)  # 0.042, 0.042000000000000003 (not tanh's -0.0425082408f)
    x = torch.randn(9, 2, 3, dtype=torch.float64)
    outs = []
    for dt in (0.01, 0.2):
        m = pkg.torch_cell.C(3, 4, dt=dt, dtype=torch.float64, backend="fused")
        torch.manual_seed(0)
        m.reset_parameters()
        outs.append(m(x)[0])
        ref = m.__class__(3, 4, dt=dt, dtype=torch.float64, backend="generated")
        ref.load_state_dict(m.state_dict())
        torch.testing.assert_close(outs[-1], ref(x)[0], rtol=1e-12, atol=1e-14)
    assert len(pkg.torch_cell._LIBRARIES) == 1
    assert not torch.allclose(outs[0], outs[1])


def test_scalar_param_is_a_zero_dim_parameter_with_exact_gradient():
    pkg, _ = _load("""
cell S {
  input x[I]
  state h[H]
  param W[H, I], alpha = 0.5, beta
  h' = tanh(W @ (alpha * x) + beta) * alpha + (1 - alpha) * h
}""")
    m = pkg.torch_cell.S(3, 4, dtype=torch.float64, backend="generated")
    assert m.alpha.shape == () and m.alpha.item() == 0.5 and m.beta.shape == ()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    grads = {}
    for backend in ("generated", "autograd", "fused"):
        m.backend = backend
        m.zero_grad()
        m(x)[0].pow(2).sum().backward()
        grads[backend] = (m.alpha.grad.clone(), m.beta.grad.clone())
    for b in ("generated", "fused"):
        torch.testing.assert_close(grads[b], grads["autograd"], rtol=1e-11, atol=1e-13)
    # and numerically: d/d alpha by central differences
    with torch.no_grad():
        def loss(a):
            m.backend = "generated"
            m.alpha.fill_(a)
            return float(m(x)[0].pow(2).sum())
        fd = (loss(0.5 + 1e-6) - loss(0.5 - 1e-6)) / 2e-6
    assert abs(fd - float(grads["autograd"][0])) < 1e-6 * max(1.0, abs(fd))


def test_def_expands_to_the_same_cell():
    with_def, _ = _load("""
def gate(W, b, v) = sigmoid(W @ v + b)
def mix(a, u, v) = a * u + (1 - a) * v
cell A {
  input x[I]
  state h[H]
  param W[H, I], U[H, H], b[H]
  h' = mix(gate(W, b, x), h, tanh(U @ h))
}""")
    by_hand, _ = _load("""
cell B {
  input x[I]
  state h[H]
  param W[H, I], U[H, H], b[H]
  h' = sigmoid(W @ x + b) * h + (1 - sigmoid(W @ x + b)) * tanh(U @ h)
}""")
    params = _params(with_def, {"I": 3, "H": 4})
    x = np.random.default_rng(2).normal(size=(4, 2, 3))
    np.testing.assert_allclose(with_def.numpy_cell.forward_sequence(params, x)[0],
                               by_hand.numpy_cell.forward_sequence(params, x)[0], rtol=1e-13)


def test_matrix_expression_is_formed_before_the_loop_with_gradients_to_every_param():
    pkg, cc = _load("""
cell M {
  input x[I]
  state h[H]
  const gamma = 0.3
  param W[H, H], U[H, H], V[H, I]
  h' = tanh((W - transpose(W) + 2 * U - gamma * eye) @ h + V @ x)
}""")
    text = cc.files["numpy_cell.py"]
    loop = text[text.index("def _forward"):]
    loop = loop[loop.index("for _t in"):loop.index("_outputs = ")]
    assert "_params" not in loop and ".T" not in loop.replace("_wt_", "")  # formed once, before
    params = _params(pkg, {"I": 3, "H": 4})
    x = np.random.default_rng(3).normal(size=(5, 2, 3))
    out, _ = pkg.numpy_cell.forward_sequence(params, x)
    A = params["W"] - params["W"].T + 2 * params["U"] - 0.3 * np.eye(4)
    h = np.zeros((2, 4))
    for t in range(5):
        h = np.tanh(h @ A.T + x[t] @ params["V"].T)
        np.testing.assert_allclose(out[t], h, rtol=1e-13)
    m = pkg.torch_cell.M(3, 4, dtype=torch.float64, backend="generated")
    m(torch.tensor(x))[0].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


@pytest.mark.parametrize("spec", ["co_rnn", "antisymmetric_rnn", "def_lstm", "layer_norm_lstm", "haste_layer_norm_lstm", "layer_norm_gru", "slstm"])
def test_new_specs_train(compiled, spec):
    """Adam steps toward the outputs of a teacher of the same cell: the loss falls (fused CPU
    kernels)."""
    pkg = compiled(spec)
    cls = next(getattr(pkg.torch_cell, n) for n in dir(pkg.torch_cell)
               if isinstance(getattr(pkg.torch_cell, n), type) and n == pkg.torch_cell.CELL)
    kwargs = {"eps": 1.0} if spec == "antisymmetric_rnn" else {}
    torch.manual_seed(1)
    teacher = cls(3, 16, **kwargs)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(3.0)
    torch.manual_seed(0)
    model = cls(3, 16, **kwargs)
    x = torch.randn(20, 8, 3)
    with torch.no_grad():
        target = teacher(x)[0]
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        out = model(x)[0]
        loss = (out - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses[::8]


# ------------------------------------------------------------------------------ reductions
LN = """
cell N {
  input x[I]
  state h[H]
  param W[H, I], U[H, H]%s
  h' = %s
}
"""


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("backend", ["generated", "fused", "autograd"])
def test_layer_norm_matches_torch(affine, backend):
    """h' = layer_norm(W x + U h) (times a gain plus a shift, written as params) against
    F.layer_norm with and without its affine weight, forward and gradients; a row whose units
    are all equal (variance 0) stays finite and agrees with torch."""
    params = ", g[H], b[H]" if affine else ""
    body = "g * layer_norm(W @ x + U @ h, 1e-3) + b" if affine else "layer_norm(W @ x + U @ h, 1e-3)"
    pkg, _ = _load(LN % (params, body))
    torch.manual_seed(0)
    m = pkg.torch_cell.N(3, 5, dtype=torch.float64, backend=backend)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    x[:, 0] = 0.0  # row 0: W x + U h = 0 at every step: all units equal
    out, _ = m(x)
    # the same in eager torch
    p = {k: v.detach().clone().requires_grad_() for k, v in m.named_parameters()}
    h = torch.zeros(4, 5, dtype=torch.float64)
    ref = []
    for t in range(6):
        z = x[t] @ p["W"].T + h @ p["U"].T
        h = F.layer_norm(z, (5,), p["g"] if affine else None, p["b"] if affine else None, eps=1e-3)
        ref.append(h)
    ref = torch.stack(ref)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(out).all()  # row 0 is all-equal at t = 0 (and at every t without affine)
    if not affine:
        assert out[:, 0].abs().max() == 0.0
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for k, v in m.named_parameters():
        torch.testing.assert_close(v.grad, p[k].grad, rtol=1e-10, atol=1e-12)


def test_joint_mean_is_the_mean_of_the_concatenation():
    pkg, _ = _load("""
cell J {
  input x[I]
  state h[H]
  param W[H, I], V[H, H]
  a = W @ x
  mu = mean(a, h, x)
  var = mean((a - mu) ^ 2, (h - mu) ^ 2, (x - mu) ^ 2)
  h' = (a - mu) / sqrt(var + 1e-5) + sum(x) * 0.1 + V @ h
}""")
    params = _params(pkg, {"I": 3, "H": 4})
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 2, 3))
    out, _ = pkg.numpy_cell.forward_sequence(params, x)
    h = np.zeros((2, 4))
    for t in range(3):
        a = x[t] @ params["W"].T
        cat = np.concatenate([a, h, x[t]], axis=-1)
        mu = cat.mean(-1, keepdims=True)
        var = cat.var(-1, keepdims=True)
        h = (a - mu) / np.sqrt(var + 1e-5) + x[t].sum(-1, keepdims=True) * 0.1 + h @ params["V"].T
        np.testing.assert_allclose(out[t], h, rtol=1e-12, atol=1e-13)


def test_layer_norm_saves_row_statistics_not_vectors(compiled):
    """The LN-LSTM keeps per-row statistics (one number per row) for its backward."""
    prog_saved = compiled("layer_norm_lstm").torch_cell.SAVED
    stats = [s for s in prog_saved if s.startswith(("mean", "rstd"))]
    assert stats, prog_saved


def test_check_shows_non_finite_results_and_scales_float32_tolerance_by_conditioning():
    from cellspec.verify import check

    assert np.isnan(check.rel_err(np.array([1.0, np.nan]), np.array([1.0, np.nan])))
    assert check.rel_err(np.array([1.0, np.inf]), np.array([1.0, 2.0])) == float("inf")
    rep = check.Report("C", "c.cell", {"H": 2}, 1, 1, columns={"torch": {"out h'": float("nan")}})
    assert " nan" in rep.table() and not rep.ok
    # a badly conditioned problem (a large term whose float32 rounding shifts the small ones)
    # gets a larger float32 tolerance than 2e-5; the table's tolerance row shows it
    _, cc = _load(LN % (", b[H]", "tanh(W @ x + U @ h + 1000 * b) + 1000 * b"))
    rep = check.check_cell(cc, fd=False)
    assert rep.tolerance("np-f32") > check.TOLERANCES["np-f32"]
    assert f"{rep.tolerance('np-f32'):.0e}" in rep.table().splitlines()[2]


@pytest.mark.parametrize("cell", ["HoistedMlp", "HoistedAvg", "HoistedDeep"])
def test_hoisted_levels_agree_everywhere(cell):
    """Hoisting over several levels (W2 @ tanh(W1 @ x), avg @ (W_f @ x), three levels with a
    layer norm): the whole hoisted pass runs before the loop, and NumPy, the PyTorch engine,
    autograd through `step`, finite differences and the native CPU build agree."""
    from pathlib import Path

    from cellspec.verify import check

    path = Path(__file__).parent / "specs" / "hoisted_levels.cell"
    (cc,) = [c for c in compile_source(Source(str(path), path.read_text())) if c.checked.name == cell]
    assert len(cc.schedule.hoisted_levels) >= 2
    assert not [p for p in cc.schedule.step_gemms if p.operands != ["h"]]  # only U @ h per step
    rep = check.check_cell(cc, fd=True)
    assert rep.ok, rep.table()
    assert "cuda-host" in rep.columns or "cuda-host" in rep.skipped
