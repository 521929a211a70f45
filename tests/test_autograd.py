"""Autograd and torch completeness of the generated modules (issue 11): double backward
(gradgradcheck, a gradient penalty against torch.nn.LSTM), torch.func (grad, vjp, jacrev, vmap),
torch.compile(fullgraph=True) and torch.export, parametrizations, mixed dtypes, and
DistributedDataParallel over two CPU processes.

Every backend is checked: "generated" (the PyTorch engine with the generated backward), "fused"
(the native library's CPU build) and "autograd" (the reference); "auto" where it picks one of
them. Sizes are tiny and float64 so that finite differences are exact enough and fast.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.parametrize as P
from conftest import compiled_cells, load_module, spec_paths
from torch import nn
from torch.func import functional_call, grad, jacrev, vjp, vmap

try:  # tests/ as a package or as a plain directory on sys.path
    from tests import references as R
except ImportError:  # pragma: no cover
    import references as R

DT = torch.float64
ALL = [cc.module_name for p in spec_paths(tests=True) for cc in compiled_cells(str(p))]
SHIPPED = [cc.module_name for p in spec_paths() for cc in compiled_cells(str(p))]
# the heavy every-spec matrices run one of the LSTMs with random ops (zoneout_lstm, with fixed
# masks): the other two run the same mask machinery; tests/test_randomness.py covers all three
_SAME_MACHINERY = ("variational_lstm", "layer_norm_basic_lstm")
ALL = [m for m in ALL if m not in _SAME_MACHINERY]
SHIPPED = [m for m in SHIPPED if m not in _SAME_MACHINERY]
BACKENDS = ["generated", "fused", "autograd"]


# ------------------------------------------------------------------------------------ helpers
def _sizes(mod) -> dict[str, int]:
    """Tiny sizes: 3 for the input, 2 for every other size symbol."""
    return {s: (3 if i == 0 else 2) for i, s in enumerate(mod.SIZES)}


def build(module: str, layer: bool, backend: str, dtype=DT, seed: int = 0):
    """(generated torch module, model, sizes): random N(0, 0.5) params, like verify.check."""
    mod = load_module(module).torch_cell
    if backend not in mod.BACKENDS:
        pytest.skip(f"{module} has no backend {backend!r}")
    sizes = _sizes(mod)
    names = list(mod.SIZES.items())
    kwargs = {a: sizes[s] for s, a in names[2:]}
    cls = getattr(mod, mod.CELL if layer else mod.CELL + "Cell")
    model = cls(sizes[names[0][0]], sizes[names[1][0]], backend=backend, dtype=dtype, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
    if getattr(mod, "MASKS", None):  # random ops: training mode with masks fixed for every call
        model._masks = _fixed_masks(mod, model)
    return mod, model, sizes


def _fixed_masks(mod, model):
    """A stand-in for the layer's mask draw: the same training-mode masks at every call of one
    shape (a zoneout mask of 0/1, a dropout mask of 0/2), so a function of the params is
    deterministic for gradcheck, torch.func and vmap."""
    cache = {}

    def masks(T, B, like, layer=0):
        key = (T, B, layer, like.dtype, like.device)
        if key not in cache:
            gen = torch.Generator().manual_seed(7 + layer)
            out = []
            for kind, size, _ in mod.MASKS.values():
                n = model._layer_sizes[layer][size]
                m = (torch.rand(T, B, n, generator=gen, dtype=torch.float64) < 0.5).to(like.dtype)
                out.append((m if kind == "zoneout" else m * 2).to(like.device))
            cache[key] = tuple(out)
        return cache[key]

    return masks


def inputs(mod, sizes, T: int | None, B: int = 2, dtype=DT, seed: int = 1):
    """Random inputs and states ([T, B, n] / [B, n]), requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    lead = (T, B) if T is not None else (B,)
    xs = [
        torch.randn(*lead, sizes[s], generator=gen, dtype=dtype).requires_grad_()
        for _, s in mod.INPUTS
    ]
    states = [
        (torch.randn(B, sizes[s], generator=gen, dtype=dtype) * 0.5).requires_grad_()
        for _, s in mod.STATES
    ]
    return xs, states


def pack(items):
    return items[0] if len(items) == 1 else tuple(items)


def flat(out, state) -> tuple[torch.Tensor, ...]:
    out = out if isinstance(out, tuple) else (out,)
    state = state if isinstance(state, tuple) else (state,)
    return (*out, *state)


def functional(mod, model, n_x: int, n_s: int):
    """f(*xs, *states, *params) -> every output and final state, through functional_call."""
    names = [n for n, _ in model.named_parameters()]

    def f(*args):
        xs, states, params = args[:n_x], args[n_x : n_x + n_s], args[n_x + n_s :]
        return flat(*functional_call(model, dict(zip(names, params)), (pack(xs), pack(states))))

    return f


def reference(model, backend: str = "autograd"):
    """A copy of ``model`` running another backend (same params)."""
    ref = copy.deepcopy(model)
    ref.backend = backend
    return ref


def _check_derivatives(module: str, layer: bool, backend: str, T: int) -> None:
    mod, model, sizes = build(module, layer, backend)
    xs, states = inputs(mod, sizes, T if layer else None)
    args = (*xs, *states, *(p.detach().requires_grad_() for p in model.parameters()))
    f = functional(mod, model, len(xs), len(states))
    assert torch.autograd.gradcheck(f, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, args, fast_mode=True)


# ------------------------------------------------------------------------- double backward
@pytest.mark.parametrize(
    "module,backend,layer,T",
    [(m, b, True, 3) for m in ("lstm", "gru") for b in BACKENDS]
    + [(m, b, False, None) for m in ("lstm", "gru") for b in BACKENDS]
    + [("gru", "generated", True, 9), ("elman", "fused", True, 9)],
)
def test_gradgradcheck_quick(module, backend, layer, T):
    """gradcheck and gradgradcheck: a quick subset (the whole matrix is marked slow)."""
    _check_derivatives(module, layer, backend, T)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("module", ALL)
@pytest.mark.parametrize("layer,T", [(True, 3), (True, 9), (False, None)])
def test_gradgradcheck_every_spec(module, backend, layer, T):
    _check_derivatives(module, layer, backend, T)


@pytest.mark.parametrize("backend", ["generated", "fused", "auto"])
def test_create_graph_gradient_requires_grad(backend):
    """The silent failure of the issue: a create_graph gradient that does not require grad."""
    mod, model, sizes = build("lstm", True, backend)
    xs, _ = inputs(mod, sizes, 9)
    out, _ = model(xs[0])
    (g,) = torch.autograd.grad(out.square().sum(), xs[0], create_graph=True)
    assert g.requires_grad and g.grad_fn is not None


@pytest.mark.parametrize("backend", ["generated", "fused", "auto", "autograd"])
def test_gradient_penalty_matches_torch_nn_lstm(backend):
    """Done means: a gradient penalty through the generated LSTM, weights copied from
    torch.nn.LSTM by name, matches torch.nn.LSTM's to 1e-9 in float64."""
    torch.manual_seed(0)
    ref = nn.LSTM(3, 4, dtype=DT)
    mod = load_module("lstm").torch_cell
    model = mod.LSTM(3, 4, backend=backend, dtype=DT)
    with torch.no_grad():
        for k, v in R.lstm_params_from_torch(ref).items():
            getattr(model, k).copy_(v)
    x = torch.randn(9, 2, 3, dtype=DT)
    h0, c0 = torch.randn(2, 2, 4, dtype=DT) * 0.5

    def penalty(m, state):
        xr = x.clone().requires_grad_()
        out, (h, c) = m(xr, state)
        loss = out.tanh().sum() + (h * c).sum()
        (gx,) = torch.autograd.grad(loss, xr, create_graph=True)
        pen = gx.square().sum()
        pen.backward()
        return pen

    pen_ref = penalty(ref, (h0[None], c0[None]))
    pen = penalty(model, (h0, c0))
    assert abs(pen.item() - pen_ref.item()) <= 1e-9 * abs(pen_ref.item())
    ref_grads = R.grads_from_torch("lstm", ref)
    for k, g in ref_grads.items():
        assert torch.allclose(getattr(model, k).grad, g, rtol=1e-9, atol=1e-12), k


# ------------------------------------------------------------------------------ torch.func
def _loss(model, names):
    def loss(params, x):
        out, state = functional_call(model, params, (x,))
        return out.square().sum() + sum(
            s.sum() for s in (state if isinstance(state, tuple) else (state,))
        )

    return loss


@pytest.mark.parametrize("backend", ["generated", "fused", "auto", "autograd"])
@pytest.mark.parametrize("module", ["lstm", "gru"])
def test_torch_func_grad_vjp_jacrev(module, backend):
    mod, model, sizes = build(module, True, backend)
    xs, _ = inputs(mod, sizes, 9)
    x = xs[0].detach()
    params = {k: v.detach() for k, v in model.named_parameters()}
    ref = reference(model)
    # grad of a loss w.r.t. the params, against plain autograd
    g = grad(_loss(model, params))(params, x)
    loss = _loss(ref, params)(dict(ref.named_parameters()), x)
    expected = torch.autograd.grad(loss, list(ref.parameters()))
    for (k, _), e in zip(ref.named_parameters(), expected):
        torch.testing.assert_close(g[k], e, rtol=1e-10, atol=1e-12)
    # vjp w.r.t. the input
    out, pull = vjp(lambda x: functional_call(model, params, (x,))[0], x)
    v = torch.ones_like(out)
    (dx,) = pull(v)
    xr = x.clone().requires_grad_()
    (dx_ref,) = torch.autograd.grad(ref(xr)[0], xr, v)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-12)
    # jacrev (vmap over the backward) of the last output w.r.t. the input
    jac = jacrev(lambda x: functional_call(model, params, (x,))[0][-1])(x)
    jac_ref = torch.autograd.functional.jacobian(lambda x: ref(x)[0][-1], x)
    torch.testing.assert_close(jac, jac_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["generated", "fused", "auto", "autograd"])
@pytest.mark.parametrize("module", ["lstm", "gru"])
def test_vmap_over_parameter_sets(module, backend):
    """vmap over 3 parameter sets equals 3 separate runs (outputs and grads)."""
    mod, model, sizes = build(module, True, backend)
    xs, _ = inputs(mod, sizes, 9)
    x = xs[0].detach()
    base = {k: v.detach() for k, v in model.named_parameters()}
    stacked = {k: torch.stack([v, v * 1.1, v * 0.9 + 0.01]) for k, v in base.items()}
    out = vmap(lambda p: functional_call(model, p, (x,))[0])(stacked)
    grads = vmap(grad(_loss(model, base)), in_dims=(0, None))(stacked, x)
    for i in range(3):
        p_i = {k: v[i] for k, v in stacked.items()}
        torch.testing.assert_close(
            out[i], model.__class__.forward(_with(model, p_i), x)[0], rtol=1e-12, atol=1e-12
        )
        g_i = grad(_loss(model, base))(p_i, x)
        for k in base:
            torch.testing.assert_close(grads[k][i], g_i[k], rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["generated", "fused"])
@pytest.mark.parametrize("layer", [True, False])
@pytest.mark.parametrize("module", ALL)
def test_torch_func_every_spec(module, backend, layer):
    """torch.func.grad against plain autograd and vmap over 3 parameter sets against 3 runs,
    for every shipped and test spec, cell and layer."""
    mod, model, sizes = build(module, layer, backend)
    xs, states = inputs(mod, sizes, 9 if layer else None)
    x, s = pack([a.detach() for a in xs]), pack([a.detach() for a in states])
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(m, p):
        return sum(o.square().sum() for o in flat(*functional_call(m, p, (x, s))))

    g = grad(lambda p: loss(model, p))(params)
    ref = reference(model)
    expected = torch.autograd.grad(loss(ref, dict(ref.named_parameters())), list(ref.parameters()))
    for (k, _), e in zip(ref.named_parameters(), expected):
        torch.testing.assert_close(g[k], e, rtol=1e-9, atol=1e-12)
    stacked = {k: torch.stack([v, v * 1.1, v * 0.9 + 0.01]) for k, v in params.items()}
    out = vmap(lambda p: flat(*functional_call(model, p, (x, s))))(stacked)
    for i in range(3):
        want = flat(*functional_call(ref, {k: v[i] for k, v in stacked.items()}, (x, s)))
        for a, b in zip(out, want):
            torch.testing.assert_close(a[i], b, rtol=1e-10, atol=1e-12)


def _with(model, params):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for k, v in params.items():
            getattr(m, k).copy_(v)
    return m


# ----------------------------------------------------------------------- compile and export
def _compile_check(module: str, backend: str, T: int = 9) -> None:
    torch._dynamo.reset()
    mod, model, sizes = build(module, True, backend, dtype=torch.float32)
    if getattr(mod, "MASKS", None):  # the layer's own draw (evaluation: constant masks) is traced
        del model._masks
        model.eval()
    xs, _ = inputs(mod, sizes, T, dtype=torch.float32)
    x = pack([a.detach() for a in xs])
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():  # the forward alone (inference)
        for a, b in zip(flat(*compiled(x)), flat(*model(x))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    got = flat(*compiled(x))
    sum(o.square().sum() for o in got).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = flat(*model(x))
    sum(o.square().sum() for o in want).backward()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # float32 through two engines (compiled: the PyTorch engine; eager: the native library): a
    # layer norm with eps 1e-12 (TensorFlow's) amplifies round-off in its gradient (`cellspec
    # check` raises its float32 tolerance there by the same conditioning rule). With H = 2 a
    # gradient whose exact value is ~5e-6 (W_o) is round-off of the order of 1e-4 in either engine,
    # so there the absolute tolerance is relative to the largest gradient of the layer.
    rtol, atol = 1e-4, 1e-5
    if module.startswith(("layer_norm", "haste_layer_norm")):
        rtol, atol = 2e-3, 1e-4 * max(p.grad.abs().max().item() for p in model.parameters())
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=rtol, atol=max(atol, 1e-5))


@pytest.mark.parametrize(
    "module,backend", [("lstm", "auto"), ("gru", "generated"), ("lstm", "fused")]
)
def test_compile_fullgraph_quick(module, backend):
    _compile_check(module, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "generated", "fused"])
@pytest.mark.parametrize("module", SHIPPED)
def test_compile_fullgraph_every_shipped_cell(module, backend):
    _compile_check(module, backend)


@pytest.mark.parametrize("backend", ["auto", "generated", "fused"])
def test_export_inference_model(backend):
    """torch.export of an inference model (a generated layer and a linear head)."""
    _, layer, _ = build("lstm", True, backend, dtype=torch.float32)
    head = nn.Linear(2, 1)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = layer, head

        def forward(self, x):
            return self.head(self.rnn(x)[0][-1])

    model = Model().eval()
    x = torch.randn(9, 2, 3)
    with torch.no_grad():
        ep = torch.export.export(model, (x,))
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ parametrizations
class Skew(nn.Module):
    def forward(self, a):
        return a.triu(1) - a.triu(1).T


def _elman_pair(backend):
    """A generated Elman layer and torch.nn.RNN with the same weights."""
    torch.manual_seed(0)
    ref = nn.RNN(3, 4, dtype=DT)
    model = load_module("elman").torch_cell.Elman(3, 4, backend=backend, dtype=DT)
    with torch.no_grad():
        for k, v in R.elman_params_from_torch(ref).items():
            getattr(model, k).copy_(v)
    return model, ref


def _same_step(model, ref, params, ref_params):
    x = torch.randn(9, 2, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    out = model(x)[0]
    out_ref = ref(x)[0]
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for p, q in zip(params, ref_params):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_skew_symmetric_recurrent_matrix(backend):
    model, ref = _elman_pair(backend)
    P.register_parametrization(model, "W_hh", Skew())
    P.register_parametrization(ref, "weight_hh_l0", Skew())
    _same_step(
        model,
        ref,
        [model.parametrizations.W_hh.original],
        [ref.parametrizations.weight_hh_l0.original],
    )


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_weight_norm(backend):
    model, ref = _elman_pair(backend)
    wn = nn.utils.parametrizations.weight_norm
    wn(model, "W_ih")
    wn(ref, "weight_ih_l0")
    mp, rp = model.parametrizations.W_ih, ref.parametrizations.weight_ih_l0
    _same_step(model, ref, [mp.original0, mp.original1], [rp.original0, rp.original1])


@pytest.mark.parametrize("kind", ["orthogonal", "spectral_norm"])
@pytest.mark.parametrize("backend", ["generated", "fused"])
def test_other_parametrizations_match_autograd(kind, backend):
    """orthogonal and spectral_norm run on every backend, gradients reaching the originals."""
    model, _ = _elman_pair(backend)
    getattr(nn.utils.parametrizations, kind)(model, "W_hh")
    ref = reference(model)
    x = torch.randn(9, 2, 3, dtype=DT)
    outs = []
    for m in (model, ref):
        out = m(x)[0]
        out.square().sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    originals = [(n, p) for n, p in model.named_parameters() if "parametrizations" in n]
    assert originals
    ref_params = dict(ref.named_parameters())
    for n, p in originals:
        torch.testing.assert_close(p.grad, ref_params[n].grad, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- mixed dtypes
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("layer", [True, False])
def test_mixed_dtypes_refused_like_torch_nn(backend, layer):
    """float64 params with a float32 input: the ValueError torch.nn.LSTM raises, on every
    backend (never a silent cast, never an internal error); likewise a float32 state."""
    mod, model, sizes = build("lstm", layer, backend)
    xs, states = inputs(mod, sizes, 9 if layer else None)
    with pytest.raises(
        ValueError,
        match=r"input.*dtype \(torch.float32\) does not match weight dtype \(torch.float64\)",
    ):
        model(xs[0].float())
    with pytest.raises(
        ValueError, match=r"state.*dtype \(torch.float32\) does not match weight dtype"
    ):
        model(xs[0].detach(), (states[0].detach().float(), states[1].detach()))
    with pytest.raises(
        ValueError, match=r"input dtype \(torch.float32\) does not match weight dtype"
    ):
        nn.LSTM(3, 2, dtype=DT)(torch.randn(9, 2, 3))  # the behaviour matched


@pytest.mark.parametrize("backend", ["auto", "generated", "autograd"])
def test_autocast_is_not_a_dtype_mismatch(backend):
    """Under torch.autocast a 16-bit input with float32 params is by design (as for torch.nn)."""
    mod, model, sizes = build("lstm", True, backend, dtype=torch.float32)
    xs, _ = inputs(mod, sizes, 9, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = model(xs[0].detach().bfloat16())
    assert torch.isfinite(out.float()).all()


# ----------------------------------------------------------------------------- distributed
@pytest.mark.parametrize("backend", ["auto"])
def test_ddp_two_processes_same_step_as_one(backend, tmp_path):
    """DistributedDataParallel over two CPU processes (gloo), each on half the batch, takes the
    same SGD step as one process on the whole batch."""
    import ddp_worker
    import torch.multiprocessing as mp

    _, model, _ = build("lstm", True, backend)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = torch.randn(9, 4, 3, dtype=DT)
    result = tmp_path / "rank0.pt"
    for attempt in range(3):
        result.unlink(missing_ok=True)
        try:
            mp.start_processes(
                ddp_worker.run,
                args=(2, f"file://{tmp_path / f'rendezvous{attempt}'}", backend, x, state, str(result)),
                nprocs=2,
                join=True,
                start_method="spawn",
            )
            break
        except mp.ProcessExitedException as e:
            # A worker killed by SIGABRT in gloo's teardown ("terminate called without an active
            # exception": once in CI at stop 19, two runs in three one afternoon of stop 28, with
            # the code of a commit that passed four in four minutes before). Rank 0 saves its
            # state after the step, whose allreduce needed both ranks: with that file written the
            # step was taken, and it is compared below. A Python error in a worker fails the test;
            # a crash before the file gets another try, three in all.
            if e.signal_name is None:
                raise
            if result.exists():
                break
            if attempt == 2:
                raise
    got = torch.load(str(result))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out, _ = model(x)
    out.square().mean().backward()
    opt.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-12, atol=1e-14)
