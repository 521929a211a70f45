"""Every shipped spec: every backend agrees with the others and with finite differences,
forward and every gradient, whole sequences and single steps, batch_first both ways."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compiled_cells, load_module, spec_paths

from cellspec.runtime import native
from cellspec.verify.check import (
    TOLERANCES,
    compare,
    make_problem,
    rel_err,
    run_fd,
    run_numpy,
    run_torch,
)

MODULES = [cc.module_name for p in spec_paths(tests=True) for cc in compiled_cells(str(p))]


def _assert_close(errs: dict[str, float], tol: float, what: str) -> None:
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"{what}: " + ", ".join(f"{k} {v:.1e}" for k, v in bad.items()) + f" > {tol:.0e}"


@pytest.fixture(scope="module", params=MODULES)
def problem(request):
    pkg = load_module(request.param)
    return make_problem(pkg, T=5, B=3, seed=1)


def test_torch_generated_matches_numpy(problem):
    _assert_close(compare(run_torch(problem, "generated"), run_numpy(problem)), 1e-9, "torch vs numpy")


def test_autograd_matches_numpy(problem):
    _assert_close(compare(run_torch(problem, "autograd"), run_numpy(problem)), 1e-9, "autograd vs numpy")


def test_numpy_backward_matches_finite_differences(problem):
    ref = run_numpy(problem)
    _assert_close(compare(ref, run_fd(problem), grads_only=True), TOLERANCES["fd"], "numpy vs fd")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_float32_within_roundoff(problem, backend):
    ref = run_numpy(problem)
    res = run_numpy(problem, np.float32) if backend == "numpy" else run_torch(problem, "generated", "float32")
    _assert_close(compare(res, ref), TOLERANCES["np-f32"], f"{backend} float32 vs float64")


@pytest.mark.parametrize("module", MODULES)
def test_single_step_cell_matches_numpy_step(module):
    """NAMECell.forward and numpy_cell.forward/backward on one step agree (float64)."""
    pkg = load_module(module)
    p = make_problem(pkg, T=1, B=4, seed=2)
    np_cell, mod = pkg.numpy_cell, pkg.torch_cell
    x = p.pack([a[0] for a in p.xs])
    out, new = np_cell.forward(p.params, x, p.pack(p.states))
    d_out = p.pack([d[0] for d in p.d_outputs])
    dp, dx, ds = np_cell.backward(p.params, x, p.pack(p.states), d_out, p.pack(p.d_final))

    sizes = list(mod.SIZES.items())
    kwargs = {a: p.sizes[s] for s, a in sizes[2:]}
    cell = getattr(mod, mod.CELL + "Cell")(p.sizes[sizes[0][0]], p.sizes[sizes[1][0]], **kwargs).double()
    cell.train(not getattr(mod, "MASKS", None))  # random ops: evaluation, as numpy_cell's default
    with torch.no_grad():
        for k, v in p.params.items():
            cell._parameters[k].copy_(torch.as_tensor(v))
    xt = [torch.tensor(a[0], requires_grad=True) for a in p.xs]
    st = [torch.tensor(a, requires_grad=True) for a in p.states]
    t_out, t_new = cell(p.pack(xt), p.pack(st))
    t_out = t_out if isinstance(t_out, tuple) else (t_out,)
    t_new = t_new if isinstance(t_new, tuple) else (t_new,)
    out = out if isinstance(out, tuple) else (out,)
    new = new if isinstance(new, tuple) else (new,)
    for a, b in zip(t_out + t_new, out + new):
        assert rel_err(a.detach().numpy(), b) < 1e-12
    params = [cell._parameters[k] for k in mod.PARAMS]
    grads = torch.autograd.grad(
        list(t_out) + list(t_new),
        params + xt + st,
        [torch.as_tensor(d[0]) for d in p.d_outputs] + [torch.as_tensor(d) for d in p.d_final],
    )
    n = len(params)
    for k, g in zip(mod.PARAMS, grads[:n]):
        assert rel_err(g.numpy(), dp[k]) < 1e-9, k
    dxs = dx if isinstance(dx, tuple) else (dx,)
    dss = ds if isinstance(ds, tuple) else (ds,)
    for g, ref in zip(grads[n : n + len(xt)], dxs):
        assert rel_err(g.numpy(), ref) < 1e-9
    for g, ref in zip(grads[n + len(xt) :], dss):
        assert rel_err(g.numpy(), ref) < 1e-9


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("batch_first", [False, True])
def test_sequence_layer_batch_first(module, batch_first):
    """The sequence layer agrees with numpy_cell.forward_sequence/backward_sequence in both layouts."""
    pkg = load_module(module)
    p = make_problem(pkg, T=3, B=2, seed=3)
    mod = pkg.torch_cell
    sizes = list(mod.SIZES.items())
    kwargs = {a: p.sizes[s] for s, a in sizes[2:]}
    layer = getattr(mod, mod.CELL)(p.sizes[sizes[0][0]], p.sizes[sizes[1][0]], batch_first=batch_first, **kwargs).double()
    if p.masks:  # random ops: training mode with the problem's fixed masks, as run_numpy runs it
        fixed = tuple(torch.as_tensor(p.masks[k]) for k in mod.MASKS)
        layer._masks = lambda T, B, like, layer=0: fixed
    with torch.no_grad():
        for k, v in p.params.items():
            layer._parameters[k].copy_(torch.as_tensor(v))
    swap = (lambda a: a.transpose(0, 1)) if batch_first else (lambda a: a)
    xt = [torch.tensor(a, requires_grad=True) for a in p.xs]
    outs, _ = layer(p.pack([swap(a) for a in xt]), p.pack([torch.as_tensor(s) for s in p.states]))
    outs = outs if isinstance(outs, tuple) else (outs,)
    ref = run_numpy(p)
    for o, name in zip(outs, pkg.numpy_cell.OUTPUTS):
        assert rel_err(swap(o).detach().numpy(), ref.values[f"out {name}"]) < 1e-12
    g = torch.autograd.grad(list(outs), xt, [swap(torch.as_tensor(d)) for d in p.d_outputs])
    np_cell = pkg.numpy_cell
    _, dx, _ = np_cell.backward_sequence(p.params, p.pack(list(p.xs)), p.pack(list(p.states)), p.pack(list(p.d_outputs)), None,
                                         **p.mask_kwargs)
    dxs = dx if isinstance(dx, tuple) else (dx,)
    for a, b in zip(g, dxs):
        assert rel_err(a.numpy(), b) < 1e-9


def test_generated_module_is_an_ordinary_module():
    """.double(), .to(), state_dict by spec names, any optimizer, and the generated backward."""
    pkg = load_module("gru")
    layer = pkg.GRU(3, 4)
    assert set(layer.state_dict()) == set(pkg.torch_cell.PARAMS)
    assert torch.all(layer.b_r == 1.0) and torch.all(layer.b_u == 1.0)  # `= 1.0` in the spec
    layer = layer.double().to("cpu")
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    y, _ = layer(x)
    # the default backend ("auto") runs the native library (_NativeSequence) where a compiler
    # builds it, the generated torch engine (_Sequence) otherwise: both are the generated backward
    name = type(y.grad_fn).__name__ if y.grad_fn is not None else ""
    assert name.startswith(("_Sequence", "_NativeSequence"))
    losses = []
    for _ in range(3):
        opt.zero_grad()
        y, _ = layer(x)
        loss = (y**2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_generated_package_runs_without_cellspec_installed():
    """A generated package copied elsewhere: the default backend falls back to the PyTorch engine."""
    import subprocess
    import sys
    from pathlib import Path

    generated = Path(__file__).resolve().parent.parent / "generated"
    code = (
        "import sys; sys.modules['cellspec'] = None\n"  # makes `import cellspec` fail
        f"sys.path.insert(0, {str(generated)!r})\n"
        "import torch\n"
        "from lstm import LSTM, numpy_cell\n"
        "layer = LSTM(3, 4).double()\n"
        "y, (h, c) = layer(torch.randn(9, 2, 3, dtype=torch.float64))\n"
        "y.sum().backward()\n"
        "assert 'cellspec' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
        "print(type(y.grad_fn).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "_Sequence" in proc.stdout


@pytest.mark.parametrize("backend", ["generated", "fused", "autograd"])
@pytest.mark.parametrize("shape", [(0, 3), (4, 0), (0, 0)], ids=["T=0", "B=0", "T=B=0"])
def test_empty_sequences_as_torch_nn(backend, shape):
    """T = 0 or B = 0: empty outputs, the initial state as the final state, zero gradients."""
    T, B = shape
    pkg = load_module("lstm")
    m = pkg.torch_cell.LSTM(3, 4, backend=backend).double()
    x = torch.randn(T, B, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(B, 4, dtype=torch.float64, requires_grad=True)
    out, (h, c) = m(x, (h0, c0))
    assert out.shape == (T, B, 4)
    if T == 0:
        assert torch.equal(h.reshape(B, 4), h0) and torch.equal(c.reshape(B, 4), c0)
    (out.sum() + h.sum() + c.sum()).backward()
    for p in m.parameters():
        assert p.grad is None or not p.grad.any()
    assert x.grad is None or x.grad.shape == x.shape


@pytest.mark.parametrize("shape", [(0, 3), (4, 0)], ids=["T=0", "B=0"])
def test_empty_sequences_numpy(shape):
    T, B = shape
    pkg = load_module("gru")
    params = {k: np.ones([3 if d == "I" else 4 for d in dims]) for k, dims in pkg.numpy_cell.PARAMS.items()}
    out, h = pkg.numpy_cell.forward_sequence(params, np.zeros((T, B, 3)), None)
    assert out.shape == (T, B, 4) and h.shape == (B, 4)
    grads, dx, dh = pkg.numpy_cell.backward_sequence(params, np.zeros((T, B, 3)), None, None, None)
    assert dx.shape == (T, B, 3) and all(not g.any() for g in grads.values())


def test_weight_stacks_are_one_block_of_memory():
    """flatten_parameters: each weight stack the native library multiplies by (STACKS) lies in one
    block, at construction and after .double(), so the library takes it as a view; the params stay
    the same Parameter objects (an optimizer made before .to() still updates them), and a
    parametrized param leaves its stack to be concatenated per call, with the same numbers."""
    pkg = load_module("lstm")
    mod = pkg.torch_cell
    assert mod.STACKS == (("W_ii", "W_if", "W_ig", "W_io"), ("W_hi", "W_hf", "W_hg", "W_ho"))
    layer = pkg.LSTM(3, 5, 2, bidirectional=True)

    def one_block(m, sfx):
        for stack in mod.STACKS:
            ps = [getattr(m, k + sfx) for k in stack]
            assert mod._stacked(*ps) == ps[0].data_ptr(), (stack, sfx)  # the address: no copy

    for sfx in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
        one_block(layer, sfx)
    before = {k: id(v) for k, v in layer.named_parameters()}
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer = layer.double()
    assert {k: id(v) for k, v in layer.named_parameters()} == before
    one_block(layer, "_l1_reverse")
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    w = layer.W_ig_l0.detach().clone()
    layer(x)[0].sum().backward()
    opt.step()
    assert not torch.equal(w, layer.W_ig_l0)  # the optimizer made before .double() updates it
    one_block(layer, "_l0")
    # a parametrization on one matrix: its stack is concatenated per call, same numbers
    single = pkg.LSTM(3, 5, backend="fused" if native.which_cxx() else "generated").double()
    ref = pkg.LSTM(3, 5, backend="autograd").double()
    ref.load_state_dict(single.state_dict())
    torch.nn.utils.parametrize.register_parametrization(single, "W_if", _Identity())
    torch.nn.utils.parametrize.register_parametrization(ref, "W_if", _Identity())
    torch.testing.assert_close(single(x)[0], ref(x)[0], rtol=1e-10, atol=1e-12)


class _Identity(torch.nn.Module):
    def forward(self, w):
        return w * 1.0
