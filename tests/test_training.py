"""A few optimisation steps: generated LSTM / TorchGRU against torch.nn.LSTM / torch.nn.GRU.

Identical initial weights (copied by name), identical data and an identical readout; after every
step the losses agree to float64 round-off, they go down, and the final weights agree.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

try:
    from tests import references as R
except ImportError:  # pragma: no cover
    import references as R

DT = torch.float64
I, H, B, T = 3, 8, 6, 10
STEPS = 5
RTOL, ATOL = 1e-9, 1e-12


def _data(batch_first):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(T, B, I, dtype=DT, generator=g)
    # target: a smooth function of the running sum of the inputs
    y = torch.sin(x.cumsum(0).sum(-1, keepdim=True) / 3)
    if batch_first:
        x, y = x.transpose(0, 1).contiguous(), y.transpose(0, 1).contiguous()
    return x, y


class _Model(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(H, 1).to(DT)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out)


def _optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1)
    return torch.optim.Adam(params, lr=0.01)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("backend", [None, "autograd"], ids=["generated", "autograd"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tbi", "bti"])
@pytest.mark.parametrize("name", ["lstm", "torch_gru"])
def test_training_matches_torch_nn(compiled, name, batch_first, backend, opt):
    pkg = compiled(name)
    torch.manual_seed(0)
    ref_rnn = R.make_torch_module(name, I, H, layer=True, batch_first=batch_first)
    kw = {"batch_first": batch_first}
    if backend is not None:
        kw["backend"] = backend
    gen_rnn = getattr(pkg, R.CELLS[name])(I, H, **kw).to(DT)
    gen_rnn.load_state_dict(R.params_from_torch(name, ref_rnn), strict=True)

    ref, gen = _Model(ref_rnn), _Model(gen_rnn)
    gen.head.load_state_dict(ref.head.state_dict())
    opt_r, opt_g = _optimizer(opt, ref.parameters()), _optimizer(opt, gen.parameters())
    x, y = _data(batch_first)

    losses_r, losses_g = [], []
    for _ in range(STEPS):
        for model, o, losses in ((ref, opt_r, losses_r), (gen, opt_g, losses_g)):
            o.zero_grad()
            loss = torch.mean((model(x) - y) ** 2)
            loss.backward()
            o.step()
            losses.append(loss.item())

    torch.testing.assert_close(torch.tensor(losses_g), torch.tensor(losses_r), rtol=RTOL, atol=0)
    assert losses_g[-1] < losses_g[0], losses_g
    if opt == "sgd":
        assert all(b < a for a, b in itertools.pairwise(losses_g)), losses_g

    final_r = R.params_from_torch(name, ref_rnn)
    final_g = dict(gen_rnn.state_dict())
    assert final_g.keys() == final_r.keys()
    for k in final_r:
        torch.testing.assert_close(final_g[k], final_r[k], rtol=RTOL, atol=ATOL, msg=k)
    torch.testing.assert_close(gen.head.weight, ref.head.weight, rtol=RTOL, atol=ATOL)
