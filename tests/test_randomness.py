"""Randomness during training: dropout(v, p), variational_dropout(v, p), zoneout(new, old, p).

Each random call lowers to elementwise math with a mask of its own, a per-step input of the
engine that the layer draws once per call (training mode, torch's generator of the input's
device) or fills with its expectation (evaluation mode), and that the backward reads but never
differentiates. Held against: the spec with the expectation written in (evaluation), the plain
cell and torch.nn.LSTM (p = 0), every backend against the others under one seed, statistical
bounds on the mask rates, gradcheck in training mode with a re-seeded function, NumPy with fixed
masks and with a seeded generator, and `cellspec check` (fixed masks, finite differences).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import cellspec
from cellspec.driver import compile_file
from cellspec.runtime import native
from cellspec.verify.check import check_cell

try:  # tests/ as a package or as a plain directory on sys.path
    from tests import references as R
    from tests.conftest import SPECS
except ImportError:  # pragma: no cover
    import references as R
    from conftest import SPECS

DT = torch.float64
I, H, T, B = 3, 5, 7, 4
HAVE_CXX = native.which_cxx() is not None
BACKENDS = ["generated", "autograd"] + (["fused"] if HAVE_CXX else [])
RANDOM_SPECS = ["zoneout_lstm", "variational_lstm", "layer_norm_basic_lstm"]


def close(a, b, what=""):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"{what}: {m}")


def lstm_weights(mod, ref):
    """torch.nn.LSTM's weights into a generated LSTM-form layer (zoneout, variational)."""
    mod.load_state_dict(torch_nn_named(ref))
    return mod


def torch_nn_named(ref, grads=False):
    """torch.nn.LSTM's params (or their gradients) under the generated layer's names."""
    tensors = {k: (v.grad if grads else v).detach() for k, v in ref.named_parameters()}
    default = ref.num_layers == 1 and not ref.bidirectional
    sd = {}
    for layer in range(ref.num_layers):
        for sfx in ["", "_reverse"][: 2 if ref.bidirectional else 1]:
            for k, v in R._from_torch("lstm", tensors, f"_l{layer}{sfx}").items():
                sd[k if default else f"{k}_l{layer}{sfx}"] = v.clone()
    return sd


def run_seeded(mod, x, seed=0, **kw):
    torch.manual_seed(seed)
    return mod(x, **kw)


# ------------------------------------------------------------------ the language
def test_masks_in_the_model_and_program():
    cc = compile_file(str(SPECS / "zoneout_lstm.cell"))[0]
    masks = cc.model.masks
    assert [(m.key, m.kind, m.rate, m.size) for m in masks] == [
        ("keep_c", "zoneout", "zoneout_c", "H"), ("keep_h", "zoneout", "zoneout_h", "H")]
    # masks are the engine's last inputs, with no gradient; the spec's inputs are unchanged
    assert [v.name for v in cc.model.cell.inputs] == ["x", "keep_c", "keep_h"]
    assert [v.name for v in cc.model.spec_cell.inputs] == ["x"]
    assert set(cc.program.d_inputs) == {"x"}
    assert not any(k.startswith(("keep_", "d_keep")) for k in cc.backward.adjoint)
    text = cc.files["zoneout_lstm/torch_cell.py"] if "zoneout_lstm/torch_cell.py" in cc.files else cc.files["torch_cell.py"]
    assert 'MASKS = {"keep_c": ("zoneout", "H", "zoneout_c"), "keep_h": ("zoneout", "H", "zoneout_h")}' in text


def test_dropout_of_an_input_is_hoisted():
    """W @ variational_dropout(x, p) depends on inputs and masks only: one GEMM before the loop."""
    cc = compile_file(str(SPECS / "variational_lstm.cell"))[0]
    assert [o for g in cc.schedule.hoisted_gemms for o in g.operands] == ["xd"]
    assert [v.key for v in cc.schedule.hoisted_values] == ["xd"]


# ------------------------------------------------------------------ evaluation and p = 0
ZONEOUT_EXPECTED = """
cell ZoneoutLSTM {
  input x[I]
  state h[H], c[H]
  const zoneout_h = 0.05, zoneout_c = 0.5
  param W_ii[H, I], W_hi[H, H], b_ii[H], b_hi[H]
  param W_if[H, I], W_hf[H, H], b_if[H], b_hf[H]
  param W_ig[H, I], W_hg[H, H], b_ig[H], b_hg[H]
  param W_io[H, I], W_ho[H, H], b_io[H], b_ho[H]
  i = sigmoid(W_ii @ x + b_ii + W_hi @ h + b_hi)
  f = sigmoid(W_if @ x + b_if + W_hf @ h + b_hf)
  g = tanh(W_ig @ x + b_ig + W_hg @ h + b_hg)
  o = sigmoid(W_io @ x + b_io + W_ho @ h + b_ho)
  c_new = f * c + i * g
  c' = zoneout_c * c + (1 - zoneout_c) * c_new
  h' = zoneout_h * h + (1 - zoneout_h) * (o * tanh(c_new))
  output h'
}
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_is_the_expectation_written_in(compiled, backend):
    torch.manual_seed(0)
    ours = compiled("zoneout_lstm").ZoneoutLSTM(I, H, backend=backend, zoneout_h=0.3).to(DT).eval()
    written = cellspec.load(ZONEOUT_EXPECTED).ZoneoutLSTM(I, H, backend=backend, zoneout_h=0.3).to(DT)
    written.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, I, dtype=DT)
    y, (h, c) = ours(x)
    y2, (h2, c2) = written(x)
    close(y, y2, "output")
    close(c, c2, "final c")
    y3, _ = ours(x)  # evaluation draws nothing: the same every call
    assert torch.equal(y, y3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_dropout_is_the_plain_cell(compiled, backend):
    torch.manual_seed(0)
    ours = compiled("layer_norm_basic_lstm").LayerNormBasicLSTM(I, H, backend=backend, recurrent_dropout=0.4).to(DT)
    plain = compiled("layer_norm_lstm").LayerNormLSTM(I, H, backend=backend).to(DT)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, I, dtype=DT)
    ours.eval()
    close(ours(x)[0], plain(x)[0], "eval vs plain")
    ours.train()
    assert not torch.allclose(run_seeded(ours, x)[0], plain(x)[0])  # training drops
    ours.recurrent_dropout = 0.0  # p = 0 in training: the plain cell
    close(run_seeded(ours, x)[0], plain(x)[0], "p=0 vs plain")


@pytest.mark.parametrize("name, cls", [("zoneout_lstm", "ZoneoutLSTM"), ("variational_lstm", "VariationalLSTM")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rate_zero_in_training_is_torch_nn_lstm(compiled, name, cls, backend):
    """With every rate 0 the training-mode layer is torch.nn.LSTM: outputs, states, gradients,
    with 2 layers, both directions and packed sequences of different lengths."""
    torch.manual_seed(1)
    ref = nn.LSTM(I, H, num_layers=2, bidirectional=True).to(DT)
    consts = {"zoneout_h": 0.0, "zoneout_c": 0.0} if name == "zoneout_lstm" else {"dropout_x": 0.0, "dropout_h": 0.0}
    ours = lstm_weights(getattr(compiled(name), cls)(I, H, 2, bidirectional=True, backend=backend, **consts).to(DT), ref)
    assert ours.training
    x = torch.randn(T, B, I, dtype=DT)
    lengths = torch.tensor([7, 3, 5, 1])
    outs = []
    for m in (ours, ref):
        xin = x.clone().requires_grad_(True)
        packed = pack_padded_sequence(xin, lengths, enforce_sorted=False)
        y, (h, c) = m(packed)
        y, _ = pad_packed_sequence(y, total_length=T)
        (y.square().sum() + h.sum() + (c * c).sum()).backward()
        outs.append((y, h, c, xin.grad))
    for a, b_, what in zip(outs[0], outs[1], ["output", "h", "c", "d x"]):
        close(a, b_, what)
    expected = torch_nn_named(ref, grads=True)
    for k, prm in ours.named_parameters():
        close(prm.grad, expected[k], f"d {k}")


# ------------------------------------------------------------------ one seed, every backend
@pytest.mark.parametrize("name, cls", [("zoneout_lstm", "ZoneoutLSTM"), ("variational_lstm", "VariationalLSTM"),
                                       ("layer_norm_basic_lstm", "LayerNormBasicLSTM")])
def test_backends_agree_under_one_seed(compiled, name, cls):
    """Masks are drawn in the layer, before the backend runs: under one torch.manual_seed every
    backend sees the same masks and gives the same outputs and gradients; another seed differs."""
    torch.manual_seed(2)
    mod = getattr(compiled(name), cls)(I, H, 2, bidirectional=True).to(DT)
    x = torch.randn(T, B, I, dtype=DT)
    results = {}
    for backend in BACKENDS:
        mod.backend = backend
        mod.zero_grad()
        xin = x.clone().requires_grad_(True)
        y, (h, c) = run_seeded(mod, xin, seed=5)
        (y.square().sum() + c.sum()).backward()
        results[backend] = (y.detach(), c.detach(), xin.grad, [p.grad.clone() for p in mod.parameters()])
    first = results[BACKENDS[0]]
    for backend, r in results.items():
        for a, b_, what in zip(r[:3], first[:3], ["output", "c", "d x"]):
            close(a, b_, f"{backend} {what}")
        for a, b_ in zip(r[3], first[3]):
            close(a, b_, f"{backend} d param")
    mod.backend = "generated"
    again, _ = run_seeded(mod, x, seed=5)
    other, _ = run_seeded(mod, x, seed=6)
    assert torch.equal(again, results["generated"][0])
    assert not torch.allclose(other, again)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_in_training_mode(compiled, backend):
    """Gradients are exact for the masks drawn: gradcheck of a function that re-seeds before
    every call (so every evaluation draws the same masks)."""
    torch.manual_seed(3)
    mod = compiled("zoneout_lstm").ZoneoutLSTM(2, 3, backend=backend, zoneout_h=0.4, zoneout_c=0.3).to(DT)
    params = list(mod.parameters())
    x = torch.randn(5, 2, 2, dtype=DT, requires_grad=True)
    h0 = torch.randn(1, 2, 3, dtype=DT, requires_grad=True)

    def f(x, h0, *ps):
        torch.manual_seed(11)
        out = torch.func.functional_call(mod, dict(zip([n for n, _ in mod.named_parameters()], ps)), (x, (h0, h0 * 0.5)))
        y, (h, c) = out
        return y, c

    assert torch.autograd.gradcheck(f, (x, h0, *params), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------ the masks themselves
def _masks(mod, T_, B_, train=True):
    mod.train(train)
    like = next(mod.parameters())
    return dict(zip(type(mod).__module__ and __import__(type(mod).__module__, fromlist=["MASKS"]).MASKS,
                    mod._masks(T_, B_, like)))


def test_mask_rates_within_statistical_bounds(compiled):
    torch.manual_seed(4)
    p_h, p_c = 0.2, 0.6
    mod = compiled("zoneout_lstm").ZoneoutLSTM(I, 50, zoneout_h=p_h, zoneout_c=p_c).to(DT)
    masks = _masks(mod, 40, 30)
    for key, p in (("keep_h", p_h), ("keep_c", p_c)):
        m = masks[key]
        assert m.shape == (40, 30, 50)
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        n = m.numel()
        assert abs(m.mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n), key
    p = 0.3
    mod = compiled("layer_norm_basic_lstm").LayerNormBasicLSTM(I, 50, recurrent_dropout=p).to(DT)
    (m,) = _masks(mod, 40, 30).values()
    assert set(np.round(m.unique().numpy(), 12).tolist()) <= {0.0, round(1 / (1 - p), 12)}
    kept = (m > 0).double()
    assert abs(kept.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / m.numel())
    assert not torch.equal(m[0], m[1])  # a fresh mask per step
    # evaluation: the expectation, as broadcast views (no memory per step)
    ev = _masks(mod, 40, 30, train=False)
    assert all(torch.equal(v, torch.ones_like(v)) and v.stride() == (0, 0, 0) for v in ev.values())
    zo = _masks(compiled("zoneout_lstm").ZoneoutLSTM(I, 5, zoneout_h=0.25).to(DT), 3, 2, train=False)
    assert torch.equal(zo["keep_h"], torch.full((3, 2, 5), 0.25, dtype=DT))


def test_variational_mask_is_the_same_at_every_step(compiled):
    torch.manual_seed(5)
    p = 0.5
    mod = compiled("variational_lstm").VariationalLSTM(I, 40, dropout_x=p, dropout_h=p).to(DT)
    masks = _masks(mod, 9, 20)
    for key, n in (("mask_x", I), ("mask_h", 40)):
        m = masks[key]
        assert m.shape == (9, 20, n)
        assert all(torch.equal(m[t], m[0]) for t in range(9)), key
        assert m.stride()[0] == 0  # one [B, n] draw, repeated
        assert set(m.unique().tolist()) <= {0.0, 2.0}
    m = masks["mask_h"][0]
    assert abs((m > 0).double().mean().item() - 0.5) < 5 * math.sqrt(0.25 / m.numel())
    other = _masks(mod, 9, 20)["mask_h"]
    assert not torch.equal(other, masks["mask_h"])  # drawn afresh for every call


def test_each_layer_and_direction_draws_its_own_masks(compiled):
    torch.manual_seed(6)
    mod = compiled("zoneout_lstm").ZoneoutLSTM(I, H, 2, bidirectional=True, zoneout_h=0.5, zoneout_c=0.5).to(DT)
    seen = []
    original = mod._masks

    def spy(T_, B_, like, layer=0):
        out = original(T_, B_, like, layer)
        seen.append(out[0].clone())
        return out

    mod._masks = spy
    mod(torch.randn(T, B, I, dtype=DT))
    assert len(seen) == 4
    assert all(not torch.equal(seen[i], seen[j]) for i in range(4) for j in range(i))


def test_bad_rate_at_run_time(compiled):
    mod = compiled("zoneout_lstm").ZoneoutLSTM(I, H, zoneout_h=1.5).to(DT)
    with pytest.raises(ValueError, match=r"rate of zoneout must be in \[0, 1\], got 1.5"):
        mod(torch.randn(T, B, I, dtype=DT))


# ------------------------------------------------------------------ NumPy
def test_numpy_training_evaluation_and_fixed_masks(compiled):
    pkg = compiled("zoneout_lstm")
    c = pkg.numpy_cell
    torch.manual_seed(7)
    mod = pkg.ZoneoutLSTM(I, H, backend="generated").to(DT)
    params = {k: v.detach().numpy() for k, v in mod.named_parameters()}
    x = np.random.default_rng(0).normal(size=(T, B, I))
    # evaluation (the default) is the torch module in eval mode
    out, (h, cc) = c.forward_sequence(params, x)
    mod.eval()
    y, _ = mod(torch.as_tensor(x))
    np.testing.assert_allclose(out, y.detach().numpy(), rtol=1e-10, atol=1e-12)
    # training: a seeded generator repeats; the backward with a generator in the same state uses
    # the forward's masks (its d_x matches the one from explicit masks)
    a, _ = c.forward_sequence(params, x, training=True, rng=np.random.default_rng(1))
    b_, _ = c.forward_sequence(params, x, training=True, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a, b_)
    assert not np.allclose(a, out)
    masks = c._masks(params, (x,), True, np.random.default_rng(1), None, 0.05, 0.5)
    fixed = dict(zip(c.MASKS, masks))
    m_out, _ = c.forward_sequence(params, x, training=True, masks=fixed)
    np.testing.assert_array_equal(m_out, a)
    d = np.ones_like(a)
    g1 = c.backward_sequence(params, x, None, d, None, training=True, rng=np.random.default_rng(1))
    g2 = c.backward_sequence(params, x, None, d, None, training=True, masks=fixed)
    np.testing.assert_allclose(g1[1], g2[1], rtol=1e-12)
    # the torch layer with the same fixed masks gives the same numbers
    mod.train()
    fixed_t = tuple(torch.as_tensor(fixed[k]) for k in pkg.torch_cell.MASKS)
    mod._masks = lambda T_, B_, like, layer=0: fixed_t
    y, _ = mod(torch.as_tensor(x))
    np.testing.assert_allclose(y.detach().numpy(), a, rtol=1e-10, atol=1e-12)
    # one step takes the same keywords
    o1, _ = c.forward(params, x[0], training=True, rng=np.random.default_rng(2))
    assert o1.shape == (B, H)


@pytest.mark.parametrize("name", RANDOM_SPECS)
def test_check_passes_with_fixed_masks(name):
    """`cellspec check`: every backend against the others and finite differences, with fixed
    training-mode masks."""
    cc = compile_file(str(SPECS / f"{name}.cell"))[0]
    report = check_cell(cc, T=5, B=3)
    assert report.ok, report.table()
    assert "masks" in report.table().splitlines()[0]
    assert {"torch", "autograd", "fd", "np-f32"} <= set(report.columns)


@pytest.mark.parametrize("name", RANDOM_SPECS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_mode_matches_the_independent_reference(compiled, name, backend):
    """The layer in training mode with given masks against the hand-written reference step
    (tests/references.py) fed the same masks: outputs, final state and every gradient."""
    pkg = compiled(name)
    mod_t = pkg.torch_cell
    torch.manual_seed(8)
    layer = getattr(pkg, R.CELLS[name])(I, H, backend=backend).to(DT)
    gen = torch.Generator().manual_seed(9)
    masks = {}
    for key, (kind, size, _) in mod_t.MASKS.items():
        m = (torch.rand(T if kind != "variational" else 1, B, {"I": I, "H": H}[size], generator=gen, dtype=DT) < 0.4).to(DT)
        masks[key] = (m if kind == "zoneout" else m / 0.6).expand(T, B, -1)
    layer._masks = lambda T_, B_, like, layer=0: tuple(masks[k] for k in mod_t.MASKS)
    params = {k: v.detach().clone().requires_grad_() for k, v in layer.named_parameters()}
    x = torch.randn(T, B, I, dtype=DT, requires_grad=True)
    x_r = x.detach().clone().requires_grad_()
    y, (h, c) = layer(x)
    state = (torch.zeros(B, H, dtype=DT), torch.zeros(B, H, dtype=DT))
    outs = []
    for t in range(T):
        out, state = R.REFERENCES[name](params, x_r[t], state, masks={k: v[t] for k, v in masks.items()})
        outs.append(out)
    y_r = torch.stack(outs)
    close(y, y_r, "outputs")
    close(c[0], state[1], "final c")
    w = torch.randn(T, B, H, dtype=DT, generator=gen)
    ((y * w).sum() + c.sum()).backward()
    ((y_r * w).sum() + state[1].sum()).backward()
    close(x.grad, x_r.grad, "d x")
    for k, v in layer.named_parameters():
        close(v.grad, params[k].grad, f"d {k}")


def test_compile_in_training_mode_draws_the_same_masks(compiled):
    torch._dynamo.reset()
    mod = compiled("zoneout_lstm").ZoneoutLSTM(I, H, zoneout_h=0.3, zoneout_c=0.3)
    x = torch.randn(9, B, I)
    eager, _ = run_seeded(mod, x, seed=3)
    fast, _ = run_seeded(torch.compile(mod, fullgraph=True), x, seed=3)
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-5)


def test_torch_func_in_training_mode(compiled):
    """torch.func: grad works; vmap over parameter sets needs a randomness flag, as for any random
    op: "same" draws one set of masks for every member, "different" one per member."""
    from torch.func import functional_call, grad, vmap

    mod = compiled("zoneout_lstm").ZoneoutLSTM(3, 4, zoneout_h=0.5, zoneout_c=0.5).to(DT)
    x = torch.randn(6, 2, 3, dtype=DT)
    params = {k: v.detach() for k, v in mod.named_parameters()}
    stacked = {k: torch.stack([v, v]) for k, v in params.items()}
    run = lambda p: functional_call(mod, p, (x,))[0]  # noqa: E731
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(run)(stacked)
    same = vmap(run, randomness="same")(stacked)
    assert torch.equal(same[0], same[1])  # identical params, identical masks
    different = vmap(run, randomness="different")(stacked)
    assert not torch.equal(different[0], different[1])
    g = grad(lambda p: run(p).sum())(params)
    assert set(g) == set(params)


@pytest.mark.parametrize("name, cls", [("zoneout_lstm", "ZoneoutLSTM"), ("variational_lstm", "VariationalLSTM")])
def test_variable_lengths_with_masks_agree_on_every_backend(compiled, name, cls):
    """Training mode with masks and sequences of different lengths (unsorted PackedSequence, two
    layers, both directions): every backend gives the same outputs and gradients under one seed,
    and the padded outputs past each end are zeros."""
    torch.manual_seed(9)
    mod = getattr(compiled(name), cls)(I, H, 2, bidirectional=True).to(DT)
    x = torch.randn(T, B, I, dtype=DT)
    lengths = torch.tensor([3, 7, 1, 5])
    results = {}
    for backend in BACKENDS:
        mod.backend = backend
        mod.zero_grad()
        xin = x.clone().requires_grad_(True)
        torch.manual_seed(21)
        y, (h, c) = mod(pack_padded_sequence(xin, lengths, enforce_sorted=False))
        y, _ = pad_packed_sequence(y, total_length=T)
        (y.square().sum() + h.sum() + c.square().sum()).backward()
        results[backend] = (y.detach(), h.detach(), c.detach(), xin.grad, [p.grad.clone() for p in mod.parameters()])
        for b_, n in enumerate(lengths.tolist()):
            assert torch.equal(y[n:, b_], torch.zeros_like(y[n:, b_]))
    first = results[BACKENDS[0]]
    for backend, r in results.items():
        for a, b_, what in zip(r[:4], first[:4], ["output", "h", "c", "d x"]):
            close(a, b_, f"{backend} {what}")
        for a, b_ in zip(r[4], first[4]):
            close(a, b_, f"{backend} d param")


def test_show_presents_the_masks():
    """cellspec show: the schedule and the program list the masks; the diagram draws them as
    nodes feeding what reads them; the LaTeX names them."""
    from cellspec.present import diagram, latex
    from cellspec.program import text as program_text

    cc = compile_file(str(SPECS / "zoneout_lstm.cell"))[0]
    prog = program_text.render(cc.program)
    assert "keep_c [T, B, H] = Bernoulli(zoneout_c) in training, zoneout_c in evaluation" in prog
    dot = diagram.to_dot(cc)
    assert '"leaf_keep_c" -> "value_c_next"' in dot and '"leaf_keep_h" -> "value_h_next"' in dot
    assert "random mask" in diagram.to_svg(cc)
    assert r"\mathit{keep}_{c}" in latex.cell_latex(cc)
