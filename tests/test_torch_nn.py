"""Generated cells against torch.nn and against the hand-written references.

Two kinds of test live here:

* ``test_reference_*`` need nothing but torch: they check that ``tests/references.py`` (the
  independent, hand-written step functions and the torch.nn <-> spec weight mappings) reproduces
  torch.nn.RNNCell / LSTMCell / GRUCell / RNN / LSTM / GRU / LSTM(proj_size) in float64.
* everything else compiles the shipped specs (through the ``compiled`` fixture of
  ``tests/conftest.py``: ``compiled("lstm")`` returns the imported package ``generated.lstm``) and
  compares the generated modules with torch.nn (weights copied in by name with
  ``load_state_dict``) and with the references: outputs, final states, and gradients of a random
  linear loss with respect to the input, the initial state and every parameter.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

try:  # tests/ as a package or as a plain directory on sys.path
    from tests import references as R
except ImportError:  # pragma: no cover
    import references as R

DT = torch.float64
RTOL, ATOL = 1e-9, 1e-12
I, H, P, B, T = 5, 6, 3, 4, 7

TORCH_NATIVE = ["elman", "lstm", "torch_gru", "lstmp"]
ALL_CELLS = list(R.REFERENCES)
# backend=None: the module's default (the generated backward); "autograd": plain autograd
# through the generated forward.
BACKENDS = [None, "autograd"]


def close(actual, expected, what=""):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- helpers


def sizes_kw(name):
    return {"proj_size": P} if name == "lstmp" else {}


def state_sizes(name):
    return R.state_sizes(name, I, H, P)


def as_tuple(state):
    return tuple(state) if isinstance(state, (tuple, list)) else (state,)


def pack(name, tensors):
    """One tensor for one-state cells, a tuple in declaration order otherwise."""
    tensors = tuple(tensors)
    return tensors[0] if len(state_sizes(name)) == 1 else tensors


def rand_state(name, gen, requires_grad=True):
    return pack(
        name,
        [
            torch.randn(B, n, dtype=DT, generator=gen).requires_grad_(requires_grad)
            for n in state_sizes(name)
        ],
    )


def torch_state(name, state, layer):
    """Our [B, n] state in the form a torch.nn module takes (layers add a num_layers dim)."""
    ts = as_tuple(state)
    if layer:
        ts = tuple(s.unsqueeze(0) for s in ts)
    return ts[0] if len(ts) == 1 else ts


def flat_state(state, like=None):
    """A state as a tuple of tensors, reshaped like ``like`` (torch layers' [1, B, n] vs [B, n])."""
    ts = as_tuple(state)
    if like is not None:
        ts = tuple(t.reshape(l.shape) for t, l in zip(ts, as_tuple(like)))
    return ts


def torch_cell_step(name, mod, x, state):
    """(output, new_state) of a torch.nn cell for module ``name``, in our state convention."""
    if name == "lstmp":  # torch has no LSTMCell with projection: one step of nn.LSTM
        out, (h, c) = mod(x.unsqueeze(0), torch_state(name, state, layer=True))
        return out[0], (h[0], c[0])
    if state is None:
        new = mod(x)
    else:
        new = mod(x, state)
    if name == "lstm":
        return new[0], tuple(new)
    return new, new


def generated_class(pkg, name, layer):
    cell = R.CELLS[name]
    return getattr(pkg, cell if layer else cell + "Cell")


def make_generated(pkg, name, *, layer, batch_first=False, backend=None, params=None):
    kw = dict(sizes_kw(name))
    if layer:
        kw["batch_first"] = batch_first
    if backend is not None:
        kw["backend"] = backend
    mod = generated_class(pkg, name, layer)(I, H, **kw).to(DT)
    if getattr(pkg.torch_cell, "MASKS", None):  # random ops: the references' masks=None, evaluation
        mod.eval()
    if params is not None:
        mod.load_state_dict({k: v.detach().clone() for k, v in params.items()}, strict=True)
    return mod


def linear_loss(out, state, gen):
    """A random linear functional of the outputs and the final state (weights drawn from gen)."""
    total = 0
    for t in list(as_tuple(out)) + list(as_tuple(state)):
        total = total + (t * torch.randn(t.shape, dtype=DT, generator=gen)).sum()
    return total


def param_grads(mod):
    return {k: v.grad for k, v in mod.named_parameters()}


# --------------------------------------------------------------------------- references vs torch.nn
# (no cellspec needed)


@pytest.mark.parametrize("name", ["elman", "lstm", "torch_gru", "lstmp"])
@pytest.mark.parametrize("layer", [False, True], ids=["cell", "layer"])
def test_reference_matches_torch_nn(name, layer):
    """references.py step functions and weight maps reproduce torch.nn exactly (float64)."""
    if name == "lstmp" and not layer:
        pytest.skip("torch has no projected LSTMCell; the layer test covers lstmp")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    mod = R.make_torch_module(name, I, H, P, layer=layer)
    p = {k: v.requires_grad_() for k, v in R.params_from_torch(name, mod).items()}
    shapes = R.param_shapes(name, I, H, P)
    assert {k: tuple(v.shape) for k, v in p.items()} == shapes

    xs = torch.randn(T if layer else 1, B, I, dtype=DT, generator=gen, requires_grad=True)
    s0 = rand_state(name, gen)
    if layer:
        out_t, fin_t = mod(xs, torch_state(name, s0, layer=True))
    else:
        out_t, fin_t = torch_cell_step(name, mod, xs[0], s0)
    out_r, fin_r = R.run_sequence(R.REFERENCES[name], p, xs, s0)
    if not layer:
        out_r = out_r[0]
    close(out_r, out_t, "output")
    for a, b in zip(flat_state(fin_r, like=fin_t), as_tuple(fin_t)):
        close(a, b, "final state")

    # gradients: the same random linear loss through both
    lg = torch.Generator().manual_seed(2)
    g_t = torch.autograd.grad(linear_loss(out_t, fin_t, lg), [xs, *as_tuple(s0), *mod.parameters()])
    lg = torch.Generator().manual_seed(2)
    fin_r_like = flat_state(fin_r, like=fin_t)
    g_r = torch.autograd.grad(
        linear_loss(out_r, pack(name, fin_r_like), lg), [xs, *as_tuple(s0), *p.values()]
    )
    n_in = 1 + len(as_tuple(s0))
    for a, b in zip(g_r[:n_in], g_t[:n_in]):
        close(a, b, "input/state grad")
    # map torch's parameter grads into spec names
    for prm, g in zip(mod.parameters(), g_t[n_in:]):
        prm.grad = g
    torch_grads = R.grads_from_torch(name, mod)
    ref_grads = dict(zip(p, g_r[n_in:]))
    assert torch_grads.keys() == ref_grads.keys()
    for k, g in ref_grads.items():
        close(g, torch_grads[k], f"grad {k}")


@pytest.mark.parametrize("name", ["elman", "lstm", "torch_gru", "lstmp"])
def test_reference_weight_round_trip(name):
    """params_to_torch(params_from_torch(m)) reproduces m's state_dict bit for bit."""
    for layer in (False, True):
        if name == "lstmp" and not layer:
            continue
        a = R.make_torch_module(name, I, H, P, layer=layer)
        b = R.make_torch_module(name, I, H, P, layer=layer)
        R.params_to_torch(name, R.params_from_torch(name, a), b)
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)


def test_reference_registry_is_complete():
    """Every shipped spec has a reference, and each spec file is named after its module."""
    import pathlib

    specs = pathlib.Path(__file__).resolve().parent.parent / "specs"
    shipped = sorted(p.stem for p in specs.glob("*.cell"))
    assert shipped == sorted(R.REFERENCES)
    assert sorted(R.CELLS) == sorted(R.REFERENCES)
    for module, cell in R.CELLS.items():
        text = (specs / f"{module}.cell").read_text()
        assert f"cell {cell} {{" in text
        assert text.startswith("#"), f"{module}.cell must start with a comment naming its source"


# --------------------------------------------------------------------------- generated vs torch.nn


@pytest.mark.parametrize("backend", BACKENDS, ids=["generated", "autograd"])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
@pytest.mark.parametrize("name", ["elman", "lstm", "torch_gru", "lstmp"])
def test_cell_matches_torch_nn(compiled, name, with_state, backend):
    pkg = compiled(name)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    ref = R.make_torch_module(name, I, H, P, layer=(name == "lstmp"))
    mod = make_generated(
        pkg, name, layer=False, backend=backend, params=R.params_from_torch(name, ref)
    )
    assert set(mod.state_dict()) == set(R.param_shapes(name, I, H, P))

    x_g = torch.randn(B, I, dtype=DT, generator=gen, requires_grad=True)
    x_t = x_g.detach().clone().requires_grad_()
    if with_state:
        s_g = rand_state(name, gen)
        s_t = pack(name, [s.detach().clone().requires_grad_() for s in as_tuple(s_g)])
        out_g, new_g = mod(x_g, s_g)
        out_t, new_t = torch_cell_step(name, ref, x_t, s_t)
    else:
        out_g, new_g = mod(x_g)
        if name == "lstmp":
            s_t = pack(name, [torch.zeros(B, n, dtype=DT) for n in state_sizes(name)])
            out_t, new_t = torch_cell_step(name, ref, x_t, s_t)
        else:
            out_t, new_t = torch_cell_step(name, ref, x_t, None)
    close(out_g, out_t, "output")
    assert isinstance(new_g, tuple) == (len(state_sizes(name)) > 1)
    for a, b in zip(as_tuple(new_g), as_tuple(new_t)):
        close(a, b, "new state")

    lg = torch.Generator().manual_seed(4)
    linear_loss(out_g, new_g, lg).backward()
    lg = torch.Generator().manual_seed(4)
    linear_loss(out_t, new_t, lg).backward()
    close(x_g.grad, x_t.grad, "d x")
    if with_state:
        for a, b in zip(as_tuple(s_g), as_tuple(s_t)):
            close(a.grad, b.grad, "d state")
    tg = R.grads_from_torch(name, ref)
    gg = param_grads(mod)
    assert gg.keys() == tg.keys()
    for k in tg:
        close(gg[k], tg[k], f"d {k}")


@pytest.mark.parametrize("backend", BACKENDS, ids=["generated", "autograd"])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tbi", "bti"])
@pytest.mark.parametrize("name", ["elman", "lstm", "torch_gru", "lstmp"])
def test_layer_matches_torch_nn(compiled, name, batch_first, with_state, backend):
    pkg = compiled(name)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    ref = R.make_torch_module(name, I, H, P, layer=True, batch_first=batch_first)
    mod = make_generated(
        pkg,
        name,
        layer=True,
        batch_first=batch_first,
        backend=backend,
        params=R.params_from_torch(name, ref),
    )
    assert set(mod.state_dict()) == set(R.param_shapes(name, I, H, P))

    shape = (B, T, I) if batch_first else (T, B, I)
    x_g = torch.randn(shape, dtype=DT, generator=gen, requires_grad=True)
    x_t = x_g.detach().clone().requires_grad_()
    if with_state:
        s_g = rand_state(name, gen)
        s_t = pack(name, [s.detach().clone().requires_grad_() for s in as_tuple(s_g)])
        out_g, fin_g = mod(x_g, s_g)
        out_t, fin_t = ref(x_t, torch_state(name, s_t, layer=True))
    else:
        out_g, fin_g = mod(x_g)
        out_t, fin_t = ref(x_t)
    out_n = P if name == "lstmp" else H
    assert out_g.shape == ((B, T, out_n) if batch_first else (T, B, out_n))
    close(out_g, out_t, "outputs")
    assert isinstance(fin_g, tuple) == (len(state_sizes(name)) > 1)
    fin_g_flat = flat_state(fin_g, like=fin_t)
    for a, b in zip(fin_g_flat, as_tuple(fin_t)):
        close(a, b, "final state")

    lg = torch.Generator().manual_seed(6)
    linear_loss(out_g, fin_g_flat, lg).backward()
    lg = torch.Generator().manual_seed(6)
    linear_loss(out_t, fin_t, lg).backward()
    close(x_g.grad, x_t.grad, "d x")
    if with_state:
        for a, b in zip(as_tuple(s_g), as_tuple(s_t)):
            close(a.grad, b.grad, "d initial state")
    tg = R.grads_from_torch(name, ref)
    gg = param_grads(mod)
    assert gg.keys() == tg.keys()
    for k in tg:
        close(gg[k], tg[k], f"d {k}")


@pytest.mark.parametrize("name", ["elman", "lstm", "torch_gru", "lstmp"])
def test_weights_copy_out_to_torch(compiled, name):
    """Weights go the other way too: generated state_dict -> torch.nn gives the same outputs."""
    pkg = compiled(name)
    torch.manual_seed(7)
    mod = make_generated(pkg, name, layer=True)
    ref = R.params_to_torch(
        name, dict(mod.state_dict()), R.make_torch_module(name, I, H, P, layer=True)
    )
    xs = torch.randn(T, B, I, dtype=DT)
    with torch.no_grad():
        out_g, fin_g = mod(xs)
        out_t, fin_t = ref(xs)
    close(out_g, out_t, "outputs")
    for a, b in zip(flat_state(fin_g, like=fin_t), as_tuple(fin_t)):
        close(a, b, "final state")


# --------------------------------------------------------------------------- generated vs references


def _random_params(name, gen, scale=0.5):
    return {
        k: (scale * torch.randn(s, dtype=DT, generator=gen))
        for k, s in R.param_shapes(name, I, H, P).items()
    }


@pytest.mark.parametrize("backend", BACKENDS, ids=["generated", "autograd"])
@pytest.mark.parametrize("name", ALL_CELLS)
def test_cell_matches_reference(compiled, name, backend):
    pkg = compiled(name)
    gen = torch.Generator().manual_seed(11)
    params = _random_params(name, gen)
    mod = make_generated(pkg, name, layer=False, backend=backend, params=params)
    assert {k: tuple(v.shape) for k, v in mod.state_dict().items()} == R.param_shapes(name, I, H, P)
    p_ref = {k: v.clone().requires_grad_() for k, v in params.items()}

    x_g = torch.randn(B, I, dtype=DT, generator=gen, requires_grad=True)
    x_r = x_g.detach().clone().requires_grad_()
    s_g = rand_state(name, gen)
    s_r = pack(name, [s.detach().clone().requires_grad_() for s in as_tuple(s_g)])
    out_g, new_g = mod(x_g, s_g)
    out_r, new_r = R.REFERENCES[name](p_ref, x_r, s_r)
    close(out_g, out_r, "output")
    for a, b in zip(as_tuple(new_g), as_tuple(new_r)):
        close(a, b, "new state")

    lg = torch.Generator().manual_seed(12)
    linear_loss(out_g, new_g, lg).backward()
    lg = torch.Generator().manual_seed(12)
    linear_loss(out_r, new_r, lg).backward()
    close(x_g.grad, x_r.grad, "d x")
    for a, b in zip(as_tuple(s_g), as_tuple(s_r)):
        close(a.grad, b.grad, "d state")
    for k, v in mod.named_parameters():
        close(v.grad, p_ref[k].grad, f"d {k}")


@pytest.mark.parametrize("backend", BACKENDS, ids=["generated", "autograd"])
@pytest.mark.parametrize("name", ALL_CELLS)
def test_layer_matches_reference(compiled, name, backend):
    pkg = compiled(name)
    gen = torch.Generator().manual_seed(13)
    params = _random_params(name, gen)
    mod = make_generated(pkg, name, layer=True, batch_first=True, backend=backend, params=params)
    p_ref = {k: v.clone().requires_grad_() for k, v in params.items()}

    x_g = torch.randn(B, T, I, dtype=DT, generator=gen, requires_grad=True)
    x_r = x_g.detach().clone().requires_grad_()
    s_g = rand_state(name, gen)
    s_r = pack(name, [s.detach().clone().requires_grad_() for s in as_tuple(s_g)])
    out_g, fin_g = mod(x_g, s_g)
    out_r, fin_r = R.run_sequence(R.REFERENCES[name], p_ref, x_r.transpose(0, 1), s_r)
    out_r = out_r.transpose(0, 1)
    close(out_g, out_r, "outputs")
    for a, b in zip(as_tuple(fin_g), as_tuple(fin_r)):
        close(a.reshape(b.shape), b, "final state")

    lg = torch.Generator().manual_seed(14)
    linear_loss(out_g, flat_state(fin_g, like=fin_r), lg).backward()
    lg = torch.Generator().manual_seed(14)
    linear_loss(out_r, fin_r, lg).backward()
    close(x_g.grad, x_r.grad, "d x")
    for a, b in zip(as_tuple(s_g), as_tuple(s_r)):
        close(a.grad, b.grad, "d initial state")
    for k, v in mod.named_parameters():
        close(v.grad, p_ref[k].grad, f"d {k}")


@pytest.mark.parametrize("name", ALL_CELLS)
def test_numpy_cell_matches_reference(compiled, name):
    """The NumPy implementation (numpy_cell.forward) computes the reference step too."""
    pkg = compiled(name)
    numpy_cell = pkg.numpy_cell
    gen = torch.Generator().manual_seed(15)
    params = _random_params(name, gen)
    x = torch.randn(B, I, dtype=DT, generator=gen)
    s = rand_state(name, gen, requires_grad=False)
    out_r, new_r = R.REFERENCES[name](params, x, s)
    np_state = tuple(t.numpy() for t in as_tuple(s))
    np_state = np_state[0] if len(np_state) == 1 else np_state
    out_n, new_n = numpy_cell.forward(
        {k: v.numpy() for k, v in params.items()}, x.numpy(), np_state
    )
    np.testing.assert_allclose(np.asarray(out_n), out_r.numpy(), rtol=RTOL, atol=ATOL)
    new_n = new_n if isinstance(new_n, (tuple, list)) else (new_n,)
    for a, b in zip(new_n, as_tuple(new_r)):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ALL_CELLS)
def test_default_initialisation(compiled, name):
    """Parameters start from U(-k, k), k = 1/sqrt(hidden_size), except those declared `= number`
    (`b_r`, `b_u` of the GRU are 1.0; layer-norm gains 1.0 and shifts 0.0)."""
    pkg = compiled(name)
    torch.manual_seed(0)
    mod = make_generated(pkg, name, layer=True)
    fills = {k: v[1] for k, v in pkg.torch_cell.INITS.items() if v[0] == "fill"}
    assert {"gru": {"b_r", "b_u"}, "janet": {"b_f"}}.get(name, set()) <= set(fills)
    k = 1 / math.sqrt(H)
    for pname, v in mod.named_parameters():
        assert isinstance(v, nn.Parameter)
        assert getattr(mod, pname) is v
        if pname in fills:
            assert torch.all(v == fills[pname]), pname
        else:
            assert v.abs().max() <= k + 1e-12, pname
            assert v.std() > 0, pname


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")
@pytest.mark.parametrize("backend", BACKENDS, ids=["generated", "autograd"])
@pytest.mark.parametrize("name", ["elman", "lstm", "torch_gru", "lstmp"])
def test_layer_matches_torch_nn_float32(compiled, name, backend):
    """In float32 the generated layer agrees with torch.nn to float32 round-off."""
    pkg = compiled(name)
    torch.manual_seed(0)
    ref = R.make_torch_module(name, I, H, P, layer=True, dtype=torch.float32)
    kw = {**sizes_kw(name)}
    if backend is not None:
        kw["backend"] = backend
    mod = generated_class(pkg, name, layer=True)(I, H, **kw)
    mod.load_state_dict(R.params_from_torch(name, ref), strict=True)
    assert all(p.dtype == torch.float32 for p in mod.parameters())
    x_g = torch.randn(T, B, I, requires_grad=True)
    x_t = x_g.detach().clone().requires_grad_()
    out_g, fin_g = mod(x_g)
    out_t, fin_t = ref(x_t)
    assert out_g.dtype == torch.float32
    tol = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(out_g, out_t, **tol)
    for a, b in zip(flat_state(fin_g, like=fin_t), as_tuple(fin_t)):
        torch.testing.assert_close(a, b, **tol)
    out_g.sum().backward()
    out_t.sum().backward()
    torch.testing.assert_close(x_g.grad, x_t.grad, **tol)
    tg, gg = R.grads_from_torch(name, ref), param_grads(mod)
    for k in tg:
        torch.testing.assert_close(gg[k], tg[k], **tol, msg=k)
