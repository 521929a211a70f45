"""Layers as torch.nn builds them: num_layers, bidirectional, batch_first, dropout, variable
lengths (``lengths=`` and PackedSequence, sorted and unsorted), torch.nn's state shapes and param
names, against torch.nn.LSTM / GRU / RNN (and LSTM(proj_size)) in float64: outputs, final
states and every gradient, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from cellspec.driver import compile_source
from cellspec.errors import Source
from cellspec.runtime import native
from cellspec.runtime.loader import load_package

try:  # tests/ as a package or as a plain directory on sys.path
    from tests import references as R
except ImportError:  # pragma: no cover
    import references as R

DT = torch.float64
RTOL, ATOL = 1e-9, 1e-12
I, H, P, T, B = 3, 5, 2, 6, 4
LENGTHS = [4, 6, 1, 4]  # unsorted, with a tie
SORTED = [6, 4, 4, 1]
HAVE_CXX = native.which_cxx() is not None

# spec module -> (torch.nn class, generated class name)
MODULES = {"lstm": "LSTM", "torch_gru": "TorchGRU", "elman": "Elman", "lstmp": "LSTMP"}
# (num_layers, bidirectional, batch_first)
CONFIGS = [(2, False, False), (2, True, True), (3, True, False), (1, True, False), (3, False, True)]
MODES = ["plain", "lengths", "packed_sorted", "packed_unsorted"]
BACKENDS = ["generated", "autograd"] + (["fused"] if HAVE_CXX else [])


def close(actual, expected, what=""):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def torch_module(name, num_layers=1, bidirectional=False, batch_first=False, dropout=0.0):
    kw = {"num_layers": num_layers, "bidirectional": bidirectional, "batch_first": batch_first, "dropout": dropout}
    if name == "elman":
        return nn.RNN(I, H, **kw).to(DT)
    if name == "lstm":
        return nn.LSTM(I, H, **kw).to(DT)
    if name == "torch_gru":
        return nn.GRU(I, H, **kw).to(DT)
    return nn.LSTM(I, H, proj_size=P, **kw).to(DT)


def ours_from_torch(pkg, name, ref, backend=None, **kw):
    """The generated layer with the torch.nn module's weights, copied by name."""
    if name == "lstmp":
        kw["proj_size"] = P
    if backend is not None:
        kw["backend"] = backend
    layers, bidi = ref.num_layers, ref.bidirectional
    mod = getattr(pkg, MODULES[name])(I, H, layers, batch_first=ref.batch_first, bidirectional=bidi,
                                      dropout=ref.dropout, **kw).to(DT)
    mod.load_state_dict(spec_state_dict(name, ref), strict=True)
    return mod


def spec_state_dict(name, ref, grads=False):
    """torch.nn's params (or their gradients) under the generated layer's names: weight_ih_l1_reverse
    rows [i; f; g; o] -> W_ii_l1_reverse, ..., with the suffix dropped for one layer, one direction."""
    tensors = {k: (v.grad if grads else v).detach() for k, v in ref.named_parameters()}
    out = {}
    default = ref.num_layers == 1 and not ref.bidirectional
    for layer in range(ref.num_layers):
        for sfx in ["", "_reverse"][: 2 if ref.bidirectional else 1]:
            torch_sfx = f"_l{layer}{sfx}"
            for k, v in R._from_torch(name, tensors, torch_sfx).items():
                out[k if default else k + torch_sfx] = v.clone()
    return out


def state_sizes(name):
    return R.state_sizes(name, I, H, P)


def run(mod, name, x, state, mode, lengths, batch_first):
    """(padded outputs [T, B, n] or [B, T, n], final states) of a layer for one input mode."""
    if mode == "plain":
        out, fin = mod(x, state)
    elif mode == "lengths":
        out, fin = mod(x, state, lengths=torch.tensor(lengths))
    else:
        packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first,
                                      enforce_sorted=mode == "packed_sorted")
        out, fin = mod(packed, state)
        assert isinstance(out, PackedSequence)
        assert torch.equal(out.batch_sizes, packed.batch_sizes)
        out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=T)
    return out, fin if isinstance(fin, tuple) else (fin,)


def pack_state(states):
    return states[0] if len(states) == 1 else tuple(states)


# the autograd reference (slow: autograd over per-step ops) runs for two of the cells
NAME_BACKENDS = [(n, b) for n in MODULES for b in BACKENDS if b != "autograd" or n in ("lstm", "elman")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"L{c[0]}{'-bi' if c[1] else ''}{'-bf' if c[2] else ''}")
@pytest.mark.parametrize("name, backend", NAME_BACKENDS)
def test_layers_match_torch_nn(compiled, name, config, mode, backend):
    """Outputs, final states and the gradients of x, of the initial states and of every param."""
    num_layers, bidi, bf = config
    torch.manual_seed(0)
    ref = torch_module(name, num_layers, bidi, bf)
    ours = ours_from_torch(compiled(name), name, ref, backend)
    lengths = SORTED if mode in ("packed_sorted",) else LENGTHS
    if mode == "lengths" and num_layers == 3:
        lengths = SORTED
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((B, T, I) if bf else (T, B, I), dtype=DT, generator=gen)
    stack = num_layers * (2 if bidi else 1)
    s0 = [torch.randn(stack, B, n, dtype=DT, generator=gen) for n in state_sizes(name)]
    results = []
    for mod in (ref, ours):
        xx = x.clone().requires_grad_()
        ss = [s.clone().requires_grad_() for s in s0]
        # torch.nn takes lengths only through a PackedSequence
        m = "packed_unsorted" if (mod is ref and mode == "lengths") else mode
        out, fin = run(mod, name, xx, pack_state(ss), m, lengths, bf)
        lg = torch.Generator().manual_seed(2)
        loss = sum((t * torch.randn(t.shape, dtype=DT, generator=lg)).sum() for t in (out, *fin))
        loss.backward()
        results.append([out.detach(), *(f.detach() for f in fin), xx.grad, *(s.grad for s in ss)])
    names = [n for n, _ in compiled(name).torch_cell.STATES]
    labels = ["outputs", *(f"final {n}" for n in names), "d_x", *(f"d_{n}0" for n in names)]
    for a, b, what in zip(results[1], results[0], labels):
        close(a, b, what)
    expected = spec_state_dict(name, ref, grads=True)
    got = {k: v.grad for k, v in ours.named_parameters()}
    assert set(got) == set(expected)
    for k in expected:
        close(got[k], expected[k], f"d_{k}")


# --------------------------------------------------------------------------- constructor and shapes


def test_third_positional_is_num_layers(compiled):
    lstm = compiled("lstm").LSTM(2, 8, 2)
    assert lstm.num_layers == 2 and lstm.batch_first is False
    assert {k for k in lstm.state_dict() if k.startswith("W_ii")} == {"W_ii_l0", "W_ii_l1"}
    assert lstm.W_ii_l1.shape == (8, 8)  # layer 1 reads layer 0's output
    bi = compiled("lstm").LSTM(2, 8, 2, bidirectional=True)
    assert bi.W_ii_l1_reverse.shape == (8, 16)
    assert {k for k in bi.state_dict() if k.startswith("W_ii")} == {
        "W_ii_l0", "W_ii_l0_reverse", "W_ii_l1", "W_ii_l1_reverse"}
    assert "W_ii" in compiled("lstm").LSTM(2, 8).state_dict()  # defaults keep the spec names
    lstmp = compiled("lstmp").LSTMP(2, 8, 2, proj_size=3, bidirectional=True)
    assert lstmp.W_ii_l1.shape == (8, 6)  # 2 directions * proj_size


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_layers": True}, TypeError, "num_layers must be an int"),
        ({"num_layers": 2.0}, TypeError, "num_layers must be an int"),
        ({"num_layers": 0}, ValueError, "num_layers must be at least 1"),
        ({"batch_first": 2}, TypeError, "batch_first must be True or False"),
        ({"bidirectional": 1}, TypeError, "bidirectional must be True or False"),
        ({"dropout": 1.5}, ValueError, r"dropout must be in \[0, 1\]"),
        ({"dropout": "0.1"}, TypeError, "dropout must be a number"),
        ({"hidden_size": 8.0}, TypeError, "hidden_size must be an int"),
    ],
)
def test_wrong_constructor_arguments(compiled, kwargs, error, match):
    kw = {"input_size": 2, "hidden_size": 8, **kwargs}
    with pytest.raises(error, match=match):
        compiled("lstm").LSTM(**kw)


def test_batch_first_is_keyword_only(compiled):
    with pytest.raises(TypeError):
        compiled("lstm").LSTM(2, 8, 1, True)


TWO_INPUTS = """
cell Two {
  input x[I], y[I]
  state h[H]
  param W[H, I], V[H, I], U[H, H]
  h' = tanh(W @ x + V @ y + U @ h)
}
"""


def test_several_inputs_take_one_layer():
    (cc,) = compile_source(Source("two.cell", TWO_INPUTS))
    pkg = load_package(cc.module_name, cc.files)
    with pytest.raises(ValueError, match="2 inputs .* num_layers=1"):
        pkg.Two(3, 4, 2)
    layer = pkg.Two(3, 4, bidirectional=True).double()  # one layer, both directions: fine
    x, y = torch.randn(5, 2, 3, dtype=DT), torch.randn(5, 2, 3, dtype=DT)
    out, h = layer((x, y), lengths=[5, 3])
    assert out.shape == (5, 2, 8) and h.shape == (2, 2, 4)
    assert torch.all(out[3:, 1] == 0)


def test_states_as_torch_nn_shapes_them(compiled):
    torch.manual_seed(0)
    ref = nn.LSTM(I, H).to(DT)
    ours = ours_from_torch(compiled("lstm"), "lstm", ref)
    x = torch.randn(T, B, I, dtype=DT)
    out, (h, c) = ours(x)
    assert h.shape == (1, B, H) and c.shape == (1, B, H)
    close(h[-1], out[-1], "h[-1] is the last step's output")
    # [B, size] initial states are still taken with one layer and one direction
    h0, c0 = torch.randn(B, H, dtype=DT), torch.randn(B, H, dtype=DT)
    a = ours(x, (h0, c0))
    b = ours(x, (h0[None], c0[None]))
    close(a[0], b[0])
    with pytest.raises(ValueError, match=r"must be \[1, 4, 5\]"):
        ours(x, (torch.randn(2, B, H, dtype=DT), c0[None]))
    two = ours_from_torch(compiled("lstm"), "lstm", nn.LSTM(I, H, 2).to(DT))
    with pytest.raises(ValueError, match=r"must be \[2, 4, 5\]"):
        two(x, (h0, c0))


@pytest.mark.parametrize("name", ["lstm", "torch_gru"])
def test_unbatched_input(compiled, name):
    torch.manual_seed(0)
    ref = torch_module(name, 2, True)
    ours = ours_from_torch(compiled(name), name, ref)
    x = torch.randn(T, I, dtype=DT)
    s0 = [torch.randn(4, n, dtype=DT) for n in state_sizes(name)]
    out_r, fin_r = ref(x, pack_state(s0))
    out_o, fin_o = ours(x, pack_state(s0))
    close(out_o, out_r)
    for a, b in zip(fin_o if isinstance(fin_o, tuple) else (fin_o,), fin_r if isinstance(fin_r, tuple) else (fin_r,)):
        assert a.shape == b.shape == (4, H)
        close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", [LENGTHS, [2, 3, 1, 3]], ids=["longest=T", "all shorter than T"])
def test_lengths_semantics(compiled, lengths, backend):
    """A sequence's state stops at its end, its outputs past it are zeros, and the layer gives
    the same as running that sequence alone (both directions), also when no sequence is T long
    (steps where no row runs); float32 too."""
    torch.manual_seed(0)
    ours = compiled("lstm").LSTM(I, H, 2, bidirectional=True, backend=backend).to(DT)
    for dtype in (DT, torch.float32):
        ours = ours.to(dtype)
        x = torch.randn(T, B, I, dtype=dtype)
        out, (h, c) = ours(x, lengths=lengths)
        tol = {} if dtype == DT else {"rtol": 1e-5, "atol": 1e-6}
        for b, n in enumerate(lengths):
            assert torch.all(out[n:, b] == 0)
            o1, (h1, c1) = ours(x[:n, b : b + 1])
            torch.testing.assert_close(out[:n, b : b + 1], o1, **(tol or {"rtol": RTOL, "atol": ATOL}))
            torch.testing.assert_close(h[:, b : b + 1], h1, **(tol or {"rtol": RTOL, "atol": ATOL}))
            torch.testing.assert_close(c[:, b : b + 1], c1, **(tol or {"rtol": RTOL, "atol": ATOL}))
    ours = ours.to(DT)
    x = torch.randn(T, B, I, dtype=DT)
    with pytest.raises(ValueError, match="lengths must be in"):
        ours(x, lengths=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="one entry per batch element"):
        ours(x, lengths=[1, 2])


def test_dropout_between_layers(compiled):
    """Training mode draws torch.nn's masks in torch.nn's order (the same numbers under the
    same seed); evaluation mode and the last layer have none."""
    torch.manual_seed(0)
    ref = torch_module("lstm", 3, True, dropout=0.4)
    ours = ours_from_torch(compiled("lstm"), "lstm", ref, backend="generated")
    x = torch.randn(T, B, I, dtype=DT)
    torch.manual_seed(5)
    out_r, _ = ref(x)
    torch.manual_seed(5)
    out_o, _ = ours(x)
    close(out_o, out_r)
    ref.eval()
    ours.eval()
    close(ours(x)[0], ref(x)[0])
    plain = ours_from_torch(compiled("lstm"), "lstm", torch_module("lstm", 3, True))
    plain.load_state_dict(ours.state_dict())
    close(ours(x)[0], plain(x)[0])


def test_numpy_sequence_lengths(compiled):
    """numpy_cell's sequence functions take lengths= (any order) and agree with the torch layer."""
    pkg = compiled("lstm")
    torch.manual_seed(0)
    ours = pkg.LSTM(I, H).to(DT)
    params = {k: v.detach().numpy() for k, v in ours.named_parameters()}
    x = torch.randn(T, B, I, dtype=DT, requires_grad=True)
    h0, c0 = torch.randn(B, H, dtype=DT, requires_grad=True), torch.randn(B, H, dtype=DT, requires_grad=True)
    out, (h, c) = ours(x, (h0, c0), lengths=LENGTHS)
    n_out, (n_h, n_c) = pkg.numpy_cell.forward_sequence(params, x.detach().numpy(), (h0.detach().numpy(), c0.detach().numpy()), lengths=LENGTHS)
    np.testing.assert_allclose(n_out, out.detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(n_h, h[0].detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(n_c, c[0].detach().numpy(), rtol=1e-12, atol=1e-13)
    gen = np.random.default_rng(0)
    d_out, d_h, d_c = gen.normal(size=out.shape), gen.normal(size=(B, H)), gen.normal(size=(B, H))
    torch.autograd.backward([out, h[0], c[0]], [torch.tensor(d_out), torch.tensor(d_h), torch.tensor(d_c)])
    dp, dx, (dh0, dc0) = pkg.numpy_cell.backward_sequence(
        params, x.detach().numpy(), (h0.detach().numpy(), c0.detach().numpy()), d_out, (d_h, d_c), lengths=LENGTHS)
    np.testing.assert_allclose(dx, x.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dh0, h0.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dc0, c0.grad.numpy(), rtol=1e-10, atol=1e-12)
    for k, p in ours.named_parameters():
        np.testing.assert_allclose(dp[k], p.grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=k)


# --------------------------------------------------------------------------- a model that trains


class Classifier(nn.Module):
    """Embedding -> 2-layer bidirectional LSTM over a PackedSequence -> linear head on the last
    layer's final states of both directions (h[-2:], as torch.nn code writes it)."""

    def __init__(self, rnn):
        super().__init__()
        self.embed = nn.Embedding(20, I)
        self.rnn = rnn
        self.head = nn.Linear(2 * H, 3)

    def forward(self, tokens, lengths):
        packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True, enforce_sorted=False)
        out, (h, _) = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True)
        pooled = out.sum(1) / lengths[:, None].to(out.dtype)
        return self.head(torch.cat([h[-2], h[-1]], -1)) + pooled.sum(-1, keepdim=True)


@pytest.mark.parametrize("backend", ["auto", "generated"])
def test_model_trains_as_with_torch_nn(compiled, backend):
    torch.manual_seed(0)
    ref_rnn = nn.LSTM(I, H, 2, batch_first=True, bidirectional=True).to(DT)
    ours_rnn = ours_from_torch(compiled("lstm"), "lstm", ref_rnn, backend=backend)
    ref, ours = Classifier(ref_rnn).to(DT), Classifier(ours_rnn).to(DT)
    ours.embed.load_state_dict(ref.embed.state_dict())
    ours.head.load_state_dict(ref.head.state_dict())
    opts = [torch.optim.Adam(m.parameters(), lr=0.05) for m in (ref, ours)]
    gen = torch.Generator().manual_seed(3)
    losses = {0: [], 1: []}
    for _ in range(4):
        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        tokens = torch.randint(0, 20, (B, T), generator=gen)
        labels = torch.randint(0, 3, (B,), generator=gen)
        for i, (m, opt) in enumerate(zip((ref, ours), opts)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(tokens, lengths), labels)
            loss.backward()
            opt.step()
            losses[i].append(loss.item())
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-9)
    final = spec_state_dict("lstm", ref_rnn)
    for k, v in ours_rnn.state_dict().items():
        close(v, final[k], k)
