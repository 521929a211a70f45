"""backend="auto" on the CPU: the fused CPU kernel (the .cu file's g++ build) where it builds,
agreeing with the pure-torch engine; the torch engine, silently, where no compiler exists."""

from __future__ import annotations

import contextlib
import re
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from conftest import load_module

from cellspec.runtime import kernels, native

HAVE_CXX = native.which_cxx() is not None
ROOT = Path(__file__).resolve().parent.parent


def _run(m, x):
    m.zero_grad()
    x = x.detach().requires_grad_(True)
    out, final = m(x)
    final = final if isinstance(final, tuple) else (final,)
    (out.square().sum() + sum(f.sum() for f in final)).backward()
    return [out.detach(), *[f.detach() for f in final], x.grad, *[p.grad.clone() for p in m.parameters()]]


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
@pytest.mark.parametrize("module", ["lstm", "torch_gru", "sru"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_is_fused_and_agrees(module, dtype):
    pkg = load_module(module)
    cls = getattr(pkg.torch_cell, pkg.torch_cell.CELL)
    torch.manual_seed(0)
    m = cls(5, 7, dtype=dtype)
    x = torch.randn(pkg.torch_cell.MIN_NATIVE_STEPS, 3, 5, dtype=dtype)
    assert m._resolve_backend((x,), m._zero_state((None,) * len(pkg.torch_cell.STATES), x)) == "fused"
    if pkg.torch_cell.MIN_NATIVE_STEPS > 1:
        assert m._resolve_backend((x[:1],), m._zero_state((None,) * len(pkg.torch_cell.STATES), x)) == "generated"  # short: torch engine
    fused = _run(m, x)
    m.backend = "generated"
    ref = _run(m, x)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
@pytest.mark.parametrize("module", ["lstm", "torch_gru"])
def test_states_and_final_gradients_start_in_the_library(module, monkeypatch):
    """The library copies in the initial states and the final states' gradients (the call's last
    pointers), or zeros where they are NULL: a state left None reaches it as NULL and gets no
    gradient; an unused final state's gradient stays None (not materialized). Given states and
    used finals agree with the torch engine, gradients of the states included; None states with
    the results of explicit zeros."""
    pkg = load_module(module)
    tc = pkg.torch_cell
    cls = getattr(tc, tc.CELL)
    torch.manual_seed(4)
    m = cls(5, 7, dtype=torch.float64)
    T = max(6, tc.MIN_NATIVE_STEPS)
    x = torch.randn(T, 3, 5, dtype=torch.float64)
    n_state = len(tc.STATES)
    starts = []
    call = kernels.Library.__call__

    def recording(self, name, dims, tensors):
        starts.append((name, [t is None for t in tensors[-n_state:]]))
        return call(self, name, dims, tensors)

    monkeypatch.setattr(kernels.Library, "__call__", recording)

    def results(backend, state, use_final):
        m.backend = backend
        m.zero_grad()
        xg = x.detach().requires_grad_(True)
        st = None if state is None else tuple(s.detach().requires_grad_(True) for s in state)
        out, final = m(xg, None if st is None else st[0] if n_state == 1 else st)
        final = final if isinstance(final, tuple) else (final,)
        loss = out.square().sum() + (sum((f * f.detach().cos()).sum() for f in final) if use_final else 0)
        loss.backward()
        return [out, *final, xg.grad, *(p.grad for p in m.parameters()), *(() if st is None else (s.grad for s in st))]

    given = tuple(torch.randn(1, 3, 7, dtype=torch.float64) for _ in range(n_state))
    for use_final in (True, False):
        starts.clear()
        fused = results("fused", given, use_final)
        assert starts == [("forward", [False] * n_state), ("backward", [not use_final] * n_state)]
        ref = results("generated", given, use_final)
        for a, b in zip(fused, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    starts.clear()
    none = results("fused", None, False)
    assert starts == [("forward", [True] * n_state), ("backward", [True] * n_state)]
    zeros = results("fused", tuple(torch.zeros_like(s) for s in given), False)
    for a, b in zip(none, zeros[: len(none)], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():  # inference: the same pointers
        starts.clear()
        m(x)
        m(x, given[0] if n_state == 1 else given)
        assert starts == [("inference", [True] * n_state), ("inference", [False] * n_state)]


def _every_result(m, x, lengths):
    """``_run``'s results; then with ``lengths``: the output, x's and every param's gradient;
    then inference without and with ``lengths``."""
    plain = _run(m, x)
    m.zero_grad()
    xp = x.detach().requires_grad_(True)
    out, _ = m(xp, lengths=lengths)
    out.square().sum().backward()
    with torch.no_grad():
        infer = [*m(x), *m(x, lengths=lengths)]
    infer = [t for v in infer for t in (v if isinstance(v, tuple) else (v,))]
    return plain + [out.detach(), xp.grad, *[p.grad.clone() for p in m.parameters()]] + infer


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
@pytest.mark.parametrize("module", ["lstm", "antisymmetric_rnn", "sru", "slstm"])
def test_chunks_of_steps_agree(module, monkeypatch):
    """40 steps of 29 rows: the library runs the work ahead of the steps in several chunks
    (Library.chunk_steps < T: checked, the test would not exercise them otherwise), each overwriting
    the one chunk of the ring buffers (ir.Loop.ring; in the forward too for the LSTM, in
    inference only where the forward saves the hoisted product), and inference keeping two steps
    of the states no output shows (Function.last_only: the LSTM's c, the sLSTM's c, n and m):
    outputs, final states, inference and every gradient agree with the PyTorch engine in
    float64, with and without variable lengths."""
    pkg = load_module(module)
    tc = pkg.torch_cell
    cls = getattr(tc, tc.CELL)
    torch.manual_seed(3)
    m = cls(6, 64, dtype=torch.float64, backend="fused")
    T, B = 40, 29
    x = torch.randn(T, B, 6, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    lib = tc._native_library(x, (), dict(m.named_parameters()), required="fused")
    chunks = []

    def chunk_steps(*args, real=lib.chunk_steps):
        chunks.append(real(*args))
        return chunks[-1]

    monkeypatch.setattr(lib, "chunk_steps", chunk_steps)

    fused = _every_result(m, x, lengths)
    assert chunks and all(1 < c < T for c in chunks)  # several chunks, forward and inference
    m.backend = "generated"
    ref = _every_result(m, x, lengths)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@contextlib.contextmanager
def _two_threads():
    """Two threads for torch and the native library; after, the thread count as it was and the
    loops' team mode back to the default (``set_loop_team(1)``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        kernels.set_loop_team(1)
        torch.set_num_threads(threads)


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
@pytest.mark.parametrize("module", ["lstm", "torch_gru", "layer_norm_lstm", "slstm", "antisymmetric_rnn", "cifg_lstm"])
def test_loop_team_agrees_with_fork_per_op(module):
    """With two threads, every time loop run as one team of threads (``set_loop_team(3)`` forces
    it at this small size; each op's work shared by ``cs_for``, the held states' copies by one
    thread, ``cs_once``) gives exactly the results of a fork per op (``set_loop_team(0)``):
    outputs, final states, every gradient and inference, with and without variable lengths, in
    several chunks of steps; and the team did run (``Library.team_loops``). With each thread
    running the steps on its own rows of the batch (``set_loop_team(2)``: rows 0-3 and 4-6 of
    7, ``Library.split_loops``) the results are the same up to rounding: a thread's 3 rows are
    one tile of the own GEMM's kernel that sums over k in two halves, where the shared loop's
    7 rows sum in one."""
    pkg = load_module(module)
    tc = pkg.torch_cell
    cls = getattr(tc, tc.CELL)
    torch.manual_seed(5)
    m = cls(6, 64, backend="fused")  # float32: a team needs the own GEMM (and at H = 64 the work ahead runs in chunks, packed)
    T, B = 80, 7
    x = torch.randn(T, B, 6)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    lib = tc._native_library(x, (), dict(m.named_parameters()), required="fused")
    if not lib.own_gemm():
        pytest.skip("no own GEMM on this CPU (AVX-512): no loop runs as a team")

    with _two_threads():
        kernels.set_loop_team(0)
        before, split_before = lib.team_loops(), lib.split_loops()
        off = _every_result(m, x, lengths)
        assert lib.team_loops() == before
        kernels.set_loop_team(3)
        shared = _every_result(m, x, lengths)
        ran = lib.team_loops() - before
        assert lib.split_loops() == split_before, "set_loop_team(3) shares each op's work"
        kernels.set_loop_team(2)
        split = _every_result(m, x, lengths)
        split_ran = lib.split_loops() - split_before
    # two forwards, two backwards, two inferences; the antisymmetric RNN's forwards run the work
    # ahead of the steps in one chunk (not packed: no team)
    assert ran >= (2 if module == "antisymmetric_rnn" else 6), f"{ran} loops ran as a team"
    assert split_ran >= (2 if module == "antisymmetric_rnn" else 6), f"{split_ran} loops ran on rows of their own"
    assert len(shared) == len(off) == len(split)
    for a, b, c in zip(shared, off, split):
        if module == "layer_norm_lstm":  # its row sums vectorise differently where cs_for's team
            # loop inlines them: rounding only (both are as close to float64 as each other)
            assert (a - b).abs().max() <= 1e-4 * b.abs().max()
        else:
            assert torch.equal(a, b)
        assert (c - b).abs().max() <= 1e-4 * b.abs().max() + 1e-6  # 1e-6: sums that cancel to ~1e-6 (a bias's gradient)


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
@pytest.mark.parametrize("module", ["lstm", "torch_gru", "layer_norm_lstm"])
def test_rows_of_their_own_exact_in_whole_tiles(module):
    """Where the library chooses it (``set_loop_team(1)``, two threads, 8 rows, small weights),
    a team's threads run the steps on rows of their own (4 each: ``Library.split_loops``
    counts the loops), and the results are those of a fork per op to the bit: every tile of the
    own GEMM's kernel has 4 rows or more either way, and sums over k in the same order."""
    pkg = load_module(module)
    tc = pkg.torch_cell
    cls = getattr(tc, tc.CELL)
    torch.manual_seed(6)
    m = cls(5, 128, backend="fused")  # H = 128: a step's GEMM forks at 8 rows (the team pays)
    T, B = 24, 8
    x = torch.randn(T, B, 5)
    lib = tc._native_library(x, (), dict(m.named_parameters()), required="fused")
    if not lib.own_gemm():
        pytest.skip("no own GEMM on this CPU (AVX-512): no loop runs as a team")
    with _two_threads():
        kernels.set_loop_team(0)
        off = _every_result(m, x, None)
        before = lib.split_loops()
        kernels.set_loop_team(1)
        on = _every_result(m, x, None)
        ran = lib.split_loops() - before
    assert ran >= 3, f"{ran} loops ran on rows of their own"  # forward, backward, inference at least
    for a, b in zip(on, off):
        if module == "layer_norm_lstm":  # its row sums vectorise differently in the team's loop (above)
            assert (a - b).abs().max() <= 1e-4 * b.abs().max()
        else:
            assert torch.equal(a, b)


def test_auto_without_compiler_falls_back_quietly(monkeypatch, caplog):
    pkg = load_module("elman")
    m = pkg.torch_cell.Elman(4, 6)
    x = torch.randn(max(2, pkg.torch_cell.MIN_NATIVE_STEPS), 2, 4)

    def no_build(*args, **kwargs):
        raise kernels.KernelError("no C++ compiler found (simulated)")

    monkeypatch.setattr(kernels, "library", no_build)
    monkeypatch.setattr(pkg.torch_cell, "_LIBRARIES", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level("DEBUG", logger="cellspec"):
            assert m._resolve_backend((x,), m._zero_state((None,) * len(pkg.torch_cell.STATES), x)) == "generated"
            m(x)
            m(x)
    notes = [r for r in caplog.records if r.name == "cellspec"]
    assert len(notes) == 1 and notes[0].levelname == "DEBUG" and "simulated" in notes[0].getMessage()


def test_auto_keeps_engine_for_other_dtypes():
    pkg = load_module("elman")
    m = pkg.torch_cell.Elman(4, 6, dtype=torch.bfloat16)
    x = torch.randn(pkg.torch_cell.MIN_NATIVE_STEPS, 2, 4, dtype=torch.bfloat16)
    assert m._resolve_backend((x,), m._zero_state((None,) * len(pkg.torch_cell.STATES), x)) == "generated"


def test_first_build_says_so_once(monkeypatch, tmp_path, caplog):
    """The first use of a cell's native kernels builds them (seconds): one INFO line says so;
    a cached build says nothing."""
    monkeypatch.setenv("CELLSPEC_CACHE", str(tmp_path))
    source = '#include <stdint.h>\nextern "C" int cs_probe_build(void) { return 7; }\n'
    with caplog.at_level("INFO", logger="cellspec"):
        native.build_host(source, "probe")
        native.build_host(source, "probe")
    notes = [r.getMessage() for r in caplog.records if r.name == "cellspec" and "building" in r.getMessage()]
    assert len(notes) == 1 and "first use" in notes[0]


def test_warm_up_runs_every_entry_point():
    """warm_up() (for CUDA graph capture) runs forward, inference and backward once per dtype."""
    pkg = load_module("lstm")
    m = pkg.torch_cell.LSTM(3, 4)
    calls = []
    lib = pkg.torch_cell._native_library(torch.zeros(1, 1, 3), (torch.zeros(1, 4),) * 2,
                                         dict(m.named_parameters()), required="fused")
    orig = type(lib).__call__

    def spy(self, name, dims, tensors):
        calls.append((name, tensors[0].dtype))
        return orig(self, name, dims, tensors)

    type(lib).__call__ = spy
    try:
        assert m.warm_up((torch.float32, torch.float64)) == "fused"
    finally:
        type(lib).__call__ = orig
    assert sorted(calls, key=str) == sorted(((n, d) for n in ("forward", "backward", "inference")
                                             for d in (torch.float32, torch.float64)), key=str)


def _own_gemm_library(pkg):
    cu = next(p.name for p in Path(pkg.torch_cell.__file__).parent.glob("*.cu"))
    return kernels.library(pkg.torch_cell.__file__, cu, torch.device("cpu"))


def _under_own_gemm(own, m, x, lengths):
    """With ``kernels.set_own_gemm(own)``: ``_run``'s results; the output, x's and every param's
    gradient with ``lengths``; inference without and with them."""
    kernels.set_own_gemm(own)
    try:
        plain = _run(m, x)
        m.zero_grad()
        xp = x.detach().requires_grad_(True)
        out, _ = m(xp, lengths=lengths)
        out.square().sum().backward()
        varlen = [out.detach(), xp.grad, *[p.grad.clone() for p in m.parameters()]]
        with torch.no_grad():  # the inference loop (its own step functions)
            infer = [m(x)[0], m(x, lengths=lengths)[0]]
    finally:
        kernels.set_own_gemm(True)
    return plain, varlen, infer


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
@pytest.mark.parametrize("module", ["lstm", "torch_gru"])
@pytest.mark.parametrize("batch, hidden, steps", [(1, 5, 8), (1, 37, 8), (13, 37, 8), (29, 64, 8), (29, 37, 40), (33, 21, 8)])
def test_own_gemm_agrees_with_blas(module, batch, hidden, steps):
    """The float products by the library's own AVX-512 GEMM (every tile height 1..12, partial
    32-column panels, fewer rows per step under variable lengths; with H = 64 the step's GEMM
    and element function fused, two blocks of 32 units; with 40 steps the weight
    gradients too, T·B = 1160 rows in three k-blocks, and the hoisted products in chunks of
    steps; the hoisted products and dx = dg @ W_ih from 16 rows: T·B = 104 with batch 13)
    against MKL's SGEMM for the same products, forward and every gradient; and the split of
    ``"steps"`` (own 4: a step's products and the weight gradients own, a chunk's products of
    256 rows and more MKL's: with batch 29 and 40 steps) against both."""
    pkg = load_module(module)
    lib = _own_gemm_library(pkg)
    if not lib.own_gemm():
        pytest.skip("this CPU build has no own GEMM (not x86-64 with AVX-512)")
    cls = getattr(pkg.torch_cell, pkg.torch_cell.CELL)
    torch.manual_seed(batch)
    m = cls(7, hidden, backend="fused")
    T = max(steps, pkg.torch_cell.MIN_NATIVE_STEPS)
    x = torch.randn(T, batch, 7)
    lengths = torch.randint(1, T + 1, (batch,))
    lengths[0] = T
    results = {}
    for own in ("always", False, "steps"):  # "always": batches of 32 rows and more too on any CPU (cs_for_batch)
        plain, varlen, infer = _under_own_gemm(own, m, x, lengths)
        results[own] = plain + varlen + infer
    for a, b, c in zip(results["always"], results[False], results["steps"]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(c, b, rtol=2e-5, atol=2e-5)
    # and the own path is really different code: same values, not the same bits everywhere
    assert any(not torch.equal(a, b) for a, b in zip(results["always"], results[False])) or hidden < 8


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
@pytest.mark.parametrize("module", ["lstm", "layer_norm_lstm"])
def test_workspace_never_leaks_into_results(module):
    """The scratch buffers kept between native calls (the module's workspace) are never part of
    what a call returns or saves: a second call, forward and backward, leaves the first call's
    outputs, states and gradients as they were, and a call after release_workspace() agrees."""
    pkg = load_module(module)
    tc = pkg.torch_cell
    cls = getattr(tc, tc.CELL)
    torch.manual_seed(1)
    m = cls(6, 9, backend="fused")
    T = max(8, tc.MIN_NATIVE_STEPS)
    x1, x2 = torch.randn(T, 3, 6), torch.randn(T, 3, 6)
    first = _run(m, x1)
    kept = [t.clone() for t in first]
    with torch.no_grad():
        inf1 = m(x1)[0]
    inf1_kept = inf1.clone()
    _run(m, x2)
    with torch.no_grad():
        m(x2)
    for a, b in zip(first, kept):
        assert torch.equal(a, b)
    assert torch.equal(inf1, inf1_kept)
    assert getattr(tc._WORKSPACE, "buffers", None), "the native path keeps its scratch buffers"
    tc.release_workspace()
    assert not tc._WORKSPACE.buffers
    again = _run(m, x1)
    for a, b in zip(again, kept):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
def test_result_pool_reuses_only_unreferenced_buffers(monkeypatch):
    """The buffers a native call returns or saves come from a per-thread pool (``_pooled``): a
    later call gets one back only once nothing references it. Held as an output, a view, a
    detached alias, a NumPy array or a graph not yet differentiated, it keeps its values while
    later calls run (each of those later calls agrees with the PyTorch engine); dropped, its
    memory is what the next call returns (the pool is in use: this test fails if it is not), also
    after a call larger than every buffer kept."""
    pkg = load_module("lstm")
    tc = pkg.torch_cell
    if not tc._CAN_POOL:
        pytest.skip("this torch lacks the reference counts the pool checks")
    monkeypatch.setattr(tc, "POOL_MIN_BYTES", 0)  # pool the small buffers of this test too
    tc.release_workspace()
    cls = getattr(tc, tc.CELL)
    torch.manual_seed(4)
    m = cls(6, 9, backend="fused")
    ref = cls(6, 9, backend="generated")
    ref.load_state_dict(m.state_dict())
    xs = [torch.randn(7, 3, 6, requires_grad=True) for _ in range(6)]

    def fwd(module, x):
        return module(x)[0]

    held = {
        "output": fwd(m, xs[0]),
        "view": fwd(m, xs[1])[2:],
        "detached": fwd(m, xs[2]).detach(),
        "numpy": fwd(m, xs[3]).detach().numpy(),
    }
    pending = fwd(m, xs[4])  # its graph keeps the saved buffers until backward
    kept = {k: torch.as_tensor(v).detach().clone() for k, v in held.items()}  # (a clone with a graph keeps it)
    later = [fwd(m, xs[5]) for _ in range(3)]
    for out in later:
        torch.testing.assert_close(out, fwd(ref, xs[5]), rtol=1e-5, atol=1e-6)
    for k, v in held.items():
        assert torch.equal(torch.as_tensor(v), kept[k]), f"a held {k} was overwritten"
    pending.square().sum().backward()
    grad = xs[4].grad.clone()
    xs[4].grad = None
    fwd(ref, xs[4]).square().sum().backward()
    torch.testing.assert_close(grad, xs[4].grad, rtol=1e-5, atol=1e-6)

    del held, later, pending, out
    first = fwd(m, xs[0])
    ptr = first.data_ptr()
    del first
    again = fwd(m, xs[1])
    assert again.data_ptr() == ptr, "a dropped output's memory is reused by the next call"
    del again
    longer = torch.randn(11, 3, 6)  # larger than every pooled buffer: replaces a free one
    ptr = fwd(m, longer).data_ptr()
    pooled = tc._WORKSPACE.pool[("forward", "s_h")]
    assert any(b.data_ptr() <= ptr < b.data_ptr() + b.numel() * b.element_size() for b in pooled), \
        "a larger buffer is kept in place of a smaller one"
    assert fwd(m, longer).data_ptr() == ptr
    tc.release_workspace()
    assert not tc._WORKSPACE.pool


def test_host_simd_options_widest_first(monkeypatch):
    """AVX-512 first where the CPU has it, then AVX2, then the plain vector-math flags; a CPU
    without AVX-512 never gets its flags."""
    cxx = native.which_cxx()
    if cxx is None or not native.host_simd_options(cxx):
        pytest.skip("no vectorised host build here (not GCC on x86-64 Linux with libmvec)")
    for flags, expect in [
        ({"avx2", "fma", "avx512f", "avx512dq"}, [native.AVX512_FLAGS, native.AVX2_FLAGS, ()]),
        ({"avx2", "fma"}, [native.AVX2_FLAGS, ()]),
        (set(), [()]),
    ]:
        monkeypatch.setattr(native, "_cpu_flags", lambda flags=flags: flags)
        native.host_simd_options.cache_clear()
        try:
            got = native.host_simd_options(cxx)
        finally:
            native.host_simd_options.cache_clear()
        assert got == tuple(native.SIMD_FLAGS + f for f in expect)


def _vector_paths(path):
    """{element function: whether its host loop has the cs_v16 path} of a spec's .cu."""
    from cellspec.driver import compile_file

    files = compile_file(path)[0].files
    cu = next(text for name, text in files.items() if str(name).endswith(".cu"))
    found = re.finditer(r"static inline void (\w+)_host\(int64_t _rows, int64_t _cols[^\n]*\n\{\n(#ifdef CS_V16)?", cu)
    return {m.group(1): m.group(2) is not None for m in found}


def test_vector_path_where_it_replaces_libm_calls():
    """An element function takes the 16-float path where the omp simd loop would call libmvec
    (sigmoid, tanh, exp) and every op it calls has a vector overload: the LSTM's forward and
    inference step and its backward step (tanh of the cell), not torch.nn GRU's backward step
    (arithmetic only) nor IndRNN's (relu); sLSTM's exp of a difference of maxima does."""
    assert _vector_paths(ROOT / "specs" / "lstm.cell") == {
        "lstm_forward_fwd0_H": True, "lstm_inference_fwd0_H": True, "lstm_backward_bwd0_H": True}
    assert _vector_paths(ROOT / "specs" / "torch_gru.cell") == {
        "torch_gru_forward_fwd0_H": True, "torch_gru_inference_fwd0_H": True, "torch_gru_backward_bwd0_H": False}
    assert not any(_vector_paths(ROOT / "specs" / "ind_rnn.cell").values())
    assert _vector_paths(ROOT / "specs" / "slstm.cell")["slstm_inference_fwd0_H"]


def _run_avx512_program(tmp_path, program):
    """Build a C++ program that includes the generated LSTM's .cu (its prelude: cs_v16 and the
    op table's overloads) with the AVX-512 host build's flags, run it, return its stdout; skip
    where this machine has no AVX-512 host build."""
    cxx = native.which_cxx()
    options = [o for o in native.host_simd_options(cxx) if o == native.SIMD_FLAGS + native.AVX512_FLAGS]
    if not options:
        pytest.skip("no AVX-512 host build here")
    src = tmp_path / "program.cpp"
    src.write_text(program.replace("GENERATED", str(ROOT / "generated" / "lstm" / "lstm.cu")))
    exe = tmp_path / "program"
    subprocess.run([cxx, "-O2", "-fopenmp", *options[0], str(src), "-o", str(exe), *native.SIMD_LIBS],
                   check=True, capture_output=True, timeout=300)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=300).stdout


_ULP_PROGRAM = r"""
#include "GENERATED"
#include <cstdio>
#include <cstring>
#include <cmath>
// distance in units in the last place: floats in bit-pattern order
static int64_t ordered(float f) { int32_t i; memcpy(&i, &f, 4); return i < 0 ? (int64_t)INT32_MIN - i : i; }
static double ref(int k, double x) { return k == 0 ? exp(x) : k == 1 ? tanh(x) : (x >= 0 ? 1 / (1 + exp(-x)) : exp(x) / (1 + exp(x))); }
static cs_v16 run(int k, cs_v16 v) { return k == 0 ? cs_exp(v) : k == 1 ? cs_tanh(v) : cs_sigmoid(v); }
int main() {
    const float special[32] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1e-45f, -1e-45f, 88.72f, 88.73f,
                               -87.3f, -103.9f, -104.5f, 0.625f, -0.625f, 9.1f, -9.1f,
                               // the edges of tanh's table: its intervals, where it saturates, past its end
                               0.62499994f, 0.74999994f, 0.75f, 1.0f, 2.0f, 7.9999995f, 8.0f, 9.0109129f,
                               9.01091385f, -9.01091385f, 9.9999990f, 10.0f, 1e30f, -1e30f, 3.4e38f, -3.4e38f};
    for (int k = 0; k < 3; ++k) {
        int64_t worst = 0, nan = 0;
        auto check = [&](const float* in) {  // 16 inputs
            float out[16];
            _mm512_storeu_ps(out, run(k, _mm512_loadu_ps(in)).v);
            for (int i = 0; i < 16; ++i) {
                const float e = (float)ref(k, (double)in[i]);
                if (std::isnan(e) || std::isnan(out[i])) { nan += std::isnan(e) != std::isnan(out[i]); continue; }
                const int64_t d = ordered(e) - ordered(out[i]);
                if (d > worst || -d > worst) worst = d < 0 ? -d : d;
                if (e == 0.0f && out[i] == 0.0f && std::signbit(e) != std::signbit(out[i])) ++nan;
            }
        };
        float in[16];
        for (uint64_t b = 0, n = 0; b < (1ull << 32); b += 97) {  // every 97th float (the last few dropped)
            const uint32_t u = (uint32_t)b;
            memcpy(&in[n], &u, 4);
            if (++n < 16) continue;
            n = 0;
            check(in);
        }
        check(special);  // every special value (a loop that appended them to the samples dropped 14)
        check(special + 16);
        printf("%lld %lld\n", (long long)worst, (long long)nan);
    }
}
"""


_EXACT_PROGRAM = r"""
#include "GENERATED"
#include <cstdio>
#include <cstring>
#include <cmath>
#include <vector>
// the same bits, or NaN both
static bool same(float a, float b) { return (std::isnan(a) && std::isnan(b)) || memcmp(&a, &b, 4) == 0; }
template <typename S, typename V>
static int check(const char* name, const std::vector<float>& a, const std::vector<float>& b, const std::vector<float>& c, S scalar, V vector) {
    int bad = 0;
    for (size_t i = 0; i < a.size(); i += 16) {
        float out[16];
        _mm512_storeu_ps(out, vector(cs_v16(_mm512_loadu_ps(&a[i])), cs_v16(_mm512_loadu_ps(&b[i])), cs_v16(_mm512_loadu_ps(&c[i]))).v);
        for (int j = 0; j < 16; ++j)
            if (!same(out[j], scalar(a[i + j], b[i + j], c[i + j]))) ++bad;
    }
    printf("%s %d\n", name, bad);
    return bad;
}
int main() {
    const float v[] = {0.0f, -0.0f, 1.0f, -1.0f, 0.5f, -3.0f, 3.0f, 2.9999998f, 6.0f, -6.0f, INFINITY, -INFINITY,
                       NAN, 1e-45f, -1e-45f, 1e30f, -2.5f};
    const int n = sizeof(v) / sizeof(v[0]);
    std::vector<float> a, b, c;  // every triple of the values, padded to 16 lanes
    for (int i = 0; i < n; ++i) for (int j = 0; j < n; ++j) for (int k = 0; k < n; ++k) { a.push_back(v[i]); b.push_back(v[j]); c.push_back(v[k]); }
    while (a.size() % 16) { a.push_back(0.0f); b.push_back(0.0f); c.push_back(0.0f); }
#define U_(f) check(#f, a, b, c, [](float x, float, float) { return f(x); }, [](cs_v16 x, cs_v16, cs_v16) { return f(x); })
#define B_(f) check(#f, a, b, c, [](float x, float y, float) { return f(x, y); }, [](cs_v16 x, cs_v16 y, cs_v16) { return f(x, y); })
#define T_(f) check(#f, a, b, c, [](float x, float y, float z) { return f(x, y, z); }, [](cs_v16 x, cs_v16 y, cs_v16 z) { return f(x, y, z); })
    U_(cs_relu); U_(cs_sqrt); U_(cs_softsign); U_(cs_abs); U_(cs_hard_sigmoid); U_(cs_positive); U_(cs_sign);
    U_(cs_inside_open3); B_(cs_min); B_(cs_max); B_(cs_less_tie); T_(cs_clip); T_(cs_clip_pass); T_(cs_clip_low);
    T_(cs_clip_high);
}
"""


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
def test_vector_overloads_of_exact_ops_equal_the_scalar_ones(tmp_path):
    """relu, sqrt, softsign, abs, hard_sigmoid, min, max, clip and the derivative masks on 16
    floats (cs_v16) give the scalar helpers' results bit for bit, NaN where they give NaN and the
    sign of a zero kept, over every triple of 17 values (zeros of both signs, infinities, NaN, a
    subnormal, the kinks at 0, +-3 and 6)."""
    out = _run_avx512_program(tmp_path, _EXACT_PROGRAM).split()
    counts = dict(zip(out[::2], (int(v) for v in out[1::2])))
    assert len(counts) == 15
    assert counts == {k: 0 for k in counts}, counts


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
def test_vector_math_within_two_ulp(tmp_path):
    """The AVX-512 build's exp, tanh and sigmoid on 16 floats (cs_v16, what element functions of
    only such math run on): within 2 ulp of the float64 result over every 97th float (and 0, -0,
    infinities, NaN, subnormals, the edges of exp's range), NaN exactly where float64 has it, the
    sign of a zero kept (libmvec's functions, which the other builds call: <= 4 ulp)."""
    rows = [tuple(int(v) for v in line.split()) for line in _run_avx512_program(tmp_path, _ULP_PROGRAM).split("\n") if line]
    assert len(rows) == 3
    for name, (ulp, mismatches) in zip(("exp", "tanh", "sigmoid"), rows):
        assert mismatches == 0, f"{name}: NaN or signed zero where float64 has none"
        assert ulp <= 2, f"{name}: {ulp} ulp"


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
def test_avx2_build_agrees_with_default(monkeypatch):
    """The AVX2 build (what a CPU without AVX-512 gets, and without the own GEMM) runs the LSTM to
    the default build's results: forward, every gradient."""
    cxx = native.which_cxx()
    if not any(o == native.SIMD_FLAGS + native.AVX512_FLAGS for o in native.host_simd_options(cxx)):
        pytest.skip("the default build here is not the AVX-512 one")
    pkg = load_module("lstm")
    cls = getattr(pkg.torch_cell, pkg.torch_cell.CELL)
    torch.manual_seed(3)
    m = cls(5, 19)
    x = torch.randn(9, 4, 5)
    default = _run(m, x)
    cu = next(p for p in Path(pkg.torch_cell.__file__).parent.glob("*.cu"))
    monkeypatch.setattr(native, "host_simd_options", lambda cxx: (native.SIMD_FLAGS + native.AVX2_FLAGS,))
    kernels.set_own_gemm(False)
    try:
        so = native.build_host(cu.read_text(), cu.stem)
        lib = kernels.Library(native.load_library(str(so)), cu.stem, "cpu")
        monkeypatch.setattr(pkg.torch_cell, "_LIBRARIES", {("cpu", None): lib})
        avx2 = _run(m, x)
    finally:
        kernels.set_own_gemm(True)
    for a, b in zip(default, avx2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


_KEPT_SCRATCH_CHECK = r"""
#include "lstm.cu"
#include <stdio.h>
#include <thread>
static int fails = 0;
#define CHECK(c) do { if (!(c)) { printf("failed: %s (line %d)\n", #c, __LINE__); ++fails; } } while (0)
static int kept_count() { int n = 0; for (int i = 0; i < CS_KEPT; ++i) n += cs_kept.p[i] != 0; return n; }
int main()
{
    void* a = cs_take(1000);
    CHECK(a && ((uintptr_t)a % 64) == 0);
    memset(a, 1, 1000);
    cs_give(a);
    CHECK(kept_count() == 1);
    CHECK(cs_take(500) == a);  // a kept block large enough comes back
    CHECK(kept_count() == 0);
    cs_give(a);
    void* big = cs_take(5000);  // none large enough kept: a new one
    CHECK(big && big != a);
    cs_give(big);
    CHECK(cs_take(800) == a);  // the smallest that fits
    cs_give(a);
    void* blocks[CS_KEPT + 1];
    cs_kept.release();
    CHECK(kept_count() == 0);
    for (int i = 0; i <= CS_KEPT; ++i) blocks[i] = cs_take(1024 * (size_t)(i + 1));
    for (int i = 0; i <= CS_KEPT; ++i) cs_give(blocks[i]);
    CHECK(kept_count() == CS_KEPT);  // the largest CS_KEPT are kept, the smallest freed
    for (int i = 0; i < CS_KEPT; ++i) CHECK(cs_kept.p[i] != blocks[0]);
    CHECK(cs_take(1024) == blocks[1]);
    cs_give(blocks[1]);
    void* huge = cs_take(CS_KEPT_MAX + 1);  // never written: address space only
    CHECK(huge != 0);
    cs_give(huge);
    for (int i = 0; i < CS_KEPT; ++i) CHECK(cs_kept.p[i] != huge);  // too large to keep
    std::thread([] { CHECK(kept_count() == 0); void* b = cs_take(64); cs_give(b); CHECK(kept_count() == 1); }).join();
    CHECK(kept_count() == CS_KEPT);  // another thread's blocks are its own
    cs_kept.release();
    CHECK(kept_count() == 0);
    printf(fails ? "FAILED\n" : "ok\n");
    return fails != 0;
}
"""


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
def test_kept_scratch_blocks(tmp_path):
    """The packed-operand scratch a CPU build keeps between calls (``cs_take``/``cs_give`` in the
    generated ``.cu``): a given block comes back for a request it fits (the smallest that does),
    each thread keeps its own, at most CS_KEPT of them (the largest), none over CS_KEPT_MAX, and
    ``release`` frees them; through the module, ``release_workspace()`` reaches the library."""
    import subprocess

    cu = Path(__file__).resolve().parent.parent / "generated" / "lstm" / "lstm.cu"
    (tmp_path / "lstm.cu").write_text(cu.read_text())
    (tmp_path / "check.cpp").write_text(_KEPT_SCRATCH_CHECK)
    exe = tmp_path / "check"
    build = subprocess.run([native.which_cxx(), "-x", "c++", "-O1", "-fopenmp", "-pthread", str(tmp_path / "check.cpp"),
                            "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr

    pkg = load_module("lstm")
    tc = pkg.torch_cell
    m = getattr(tc, tc.CELL)(6, 9, backend="fused")
    x = torch.randn(8, 3, 6)
    first = _run(m, x)
    lib = tc._LIBRARIES[("cpu", None)]
    calls = []
    real = lib.release_scratch
    lib.release_scratch = lambda: (calls.append(1), real())
    try:
        tc.release_workspace()
    finally:
        del lib.release_scratch
    assert calls == [1]
    for a, b in zip(_run(m, x), first):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
def test_param_grads_are_rows_of_their_dw_block():
    """A weight stack's dW GEMM writes its matrices' gradients in place (the glue allocates them
    as the rows of its scratch: the split copies become no-ops) only where it gives each matrix
    its first contribution. GradBlocks: [W_c, W_a] on h comes first and is such a block; the
    stack [W_a, W_b, W_c, W_d] on x then adds to W_a and W_c, so its scratch stays a buffer of
    its own. The gradients, accumulated over two backward calls, are the PyTorch engine's."""
    from conftest import TEST_SPECS, compiled_cells

    from cellspec.backends import native_render

    cc = compiled_cells(str(TEST_SPECS / "grad_blocks.cell"))[0]
    _, glue = native_render.render(cc.program, "", "0", "grad_blocks.cell")
    assert glue["backward"]["grads_block"] == {"dw_W_c_W_a": "W_c_W_a"}
    pkg = load_module(cc.module_name)
    cls = getattr(pkg.torch_cell, pkg.torch_cell.CELL)
    torch.manual_seed(4)
    fused = cls(6, 6, backend="fused").double()  # x[H]: input_size = hidden_size
    engine = cls(6, 6, backend="generated").double()
    engine.load_state_dict(fused.state_dict())
    x = torch.randn(12, 3, 6, dtype=torch.float64)
    for m in (fused, engine):
        for _ in range(2):
            out, _ = m(x)
            out.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), engine.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    storage = {n: p.grad.untyped_storage().data_ptr() for n, p in fused.named_parameters()}
    assert storage["W_c"] == storage["W_a"]  # rows of one block (the first backward's, kept as .grad)
    assert storage["W_b"] != storage["W_c"]


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
def test_chunk_steps_by_rows_weights_and_l2(monkeypatch):
    """Steps per chunk of the hoisted work: ~64 Ki floats of results; at least 256 rows where the
    chunk's weight is over 1 MiB, or where it and the steps' weights fit in a core's L2 together
    (the LSTM at (64, 32, 256): 2 steps with a 1 MiB L2, 8 with 2 MiB); never more than T; all T
    for a module generated before the steps' weights were passed, as before."""
    lib = _own_gemm_library(load_module("lstm"))
    lstm = lambda T, B, H: lib.chunk_steps(T, B, B * 4 * H, 4 * H * H, 4 * H * H)  # noqa: E731
    for l2, expected in ((1 << 20, 2), (2 << 20, 8)):
        monkeypatch.setattr(kernels, "l2_bytes", lambda l2=l2: l2)
        assert lstm(64, 32, 256) == expected
        assert lstm(256, 64, 512) == 4  # 4 MiB weights: 256 rows either way
        assert lstm(16, 1, 128) == 16  # 128 steps would write 64 Ki floats: T
    assert lstm(512, 8, 128) == 32  # 512 KiB of weights in a 2 MiB L2: 256 rows, not 16
    monkeypatch.setattr(kernels, "l2_bytes", lambda: 256 << 10)
    assert lstm(512, 8, 128) == 16
    assert lib.chunk_steps(64, 32, 32 * 1024, 1 << 18) == 2  # no steps' weights given: the old rule


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [8, 33])
def test_own_gemm_chosen_by_cpu_batch_and_loop(batch, threads, monkeypatch):
    """By default (``set_own_gemm(True)``) a call runs the own GEMM on AMD CPUs, and elsewhere for
    batches under 32 rows (with one thread only for the products of a step's rows and the weight
    gradients, ``"steps"``: MKL's for the hoisted product's and dx's chunks of 256 rows), MKL's
    from 32 but in a forward or inference with two threads or more and at most 1 MiB of step
    weights (there it runs as a team; ``cs_for_batch``), and with one thread the weight gradients
    (``"weight_grads"``: a backward whose products MKL runs): each function's results are, to
    the bit, those of its forced choice (the training step's: forced for the forward, then for
    the backward). The work behind the backward's steps runs as one chunk of all 40 steps: in
    chunks of 8 (264 rows) the own kernel's weight gradients and MKL's agree to the bit, and the
    choice would not show."""
    monkeypatch.setattr(kernels, "BEHIND_ROWS", 1 << 20)
    pkg = load_module("lstm")
    lib = _own_gemm_library(pkg)
    if not lib.own_gemm():
        pytest.skip("this CPU build has no own GEMM (not x86-64 with AVX-512)")
    torch.manual_seed(batch)
    m = pkg.torch_cell.LSTM(37, 128, backend="fused")
    x = torch.randn(40, batch, 37)  # (with H = 64 at batch 8 MKL and the own kernel agree to the bit)

    def run(forward, backward):
        m.zero_grad()
        xg = x.clone().requires_grad_(True)
        try:
            kernels.set_own_gemm(forward)
            with torch.no_grad():
                infer = m(x)[0]
            out, (h, c) = m(xg)
            kernels.set_own_gemm(backward)
            (out.square().sum() + h.sum() + c.sum()).backward()
        finally:
            kernels.set_own_gemm(True)
        return [infer, out.detach(), xg.grad, *[p.grad.clone() for p in m.parameters()]]

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        auto = run(True, True)
        forced = {(f, b): run(f, b) for f in ("always", False, "steps") for b in ("always", False, "weight_grads", "steps")}
    finally:
        torch.set_num_threads(saved)
    amd = "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
    if amd or (batch < 32 and threads > 1):
        choice = ("always", "always")
    elif batch < 32:
        choice = ("steps", "steps")
    else:
        choice = ("always" if threads > 1 else False, "weight_grads" if threads == 1 else False)
    expected = forced[choice]
    assert all(torch.equal(a, b) for a, b in zip(auto, expected))
    pairs = [((False, False), ("always", "always"))]  # the choices show
    if batch > 32:  # (at batch 8 the forwards and the weight gradients agree to the bit)
        pairs += [((False, False), ("always", False)), ((False, False), (False, "weight_grads"))]
    else:  # the hoisted product's and dx's chunks of 256 rows on MKL, the steps' on the own kernel
        pairs += [(("steps", "steps"), ("always", "always")), (("steps", "steps"), (False, False))]
    for one, other in pairs:
        assert not all(torch.equal(a, b) for a, b in zip(forced[one], forced[other]))


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
@pytest.mark.parametrize("module", ["lstm", "torch_gru", "suffix_gru"])
@pytest.mark.parametrize("steps, batch", [(41, 3), (200, 3)])
def test_weight_grads_in_one_pass_with_the_bias_sums(module, steps, batch):
    """cs_own_weight_grads (``set_own_gemm("weight_grads")``: MKL for the products, the own
    kernel for the weight gradients): every dW of one adjoint from one pass over it (the LSTM's
    W_hh and W_ih share dg; torch.nn's GRU's read two runs of one buffer, [H, 4H) and [0, 3H),
    each packed per block of rows), its column sums from the same pass (the GRU's [0, H), which
    the first run does not cover, summed from the block; tests/specs/shared_adjoint_suffix.cell:
    the runs the other way round, [0, 3H) and [H, 4H), the block's sums for [3H, 4H)). 4H = 148 columns (12 slivers and 4
    columns; H = 37, no multiple of 16), T·B = 123 rows (a tail of 3 after the rows taken four at
    a time) or 600 (three chunks of steps behind the loop, 86, 86 and 28 steps: the pass's sums and
    dW add up over them, the last steps first), variable lengths (rows of zeros). The bias
    gradients are, to the bit, the row sums of the BLAS path (the pass sums each column in row
    order, chunk after chunk, as cs_rowsum_host does); the weight gradients agree to float
    rounding."""
    pkg = load_module(module)
    lib = _own_gemm_library(pkg)
    if not lib.own_gemm():
        pytest.skip("this CPU build has no own GEMM (not x86-64 with AVX-512)")
    cu = next(Path(pkg.torch_cell.__file__).parent.glob("*.cu")).read_text()
    passes = re.findall(r"^ +CS_WEIGHT_GRADS\((\w+), .*$", cu, re.M)
    assert len(passes) == 1  # both stacks' dW from one pass, which gives the biases their sums
    (line,) = [ln for ln in cu.splitlines() if ln.strip().startswith("CS_WEIGHT_GRADS(wg_")]
    assert line.count("{b_") == 2 and ", 1, cs_more, {" in line  # the sums wanted; chunks after the first add up
    if module == "torch_gru":  # the recurrent stack's run starts H columns in
        assert "{b_s_h + tc * n_B * (n_H), n_H, n_H, b_dw_W_hr_W_hz_W_hn, n_H, n_H}" in line
    if module == "suffix_gru":  # the input stack's run starts H columns in
        assert "{b_x_x + tc * n_B * (n_I), n_I, n_I, b_dw_W_ir_W_iz_W_in, n_I, n_H}" in line
    assert len(re.findall(r"^ +CS_COLSUM\(", cu, re.M)) == 4 and not re.search(r"^ +CS_ROWSUM\(", cu, re.M)
    assert len(re.findall(r"^ +CS_COLSUM_END\(", cu, re.M)) == 4
    cls = getattr(pkg.torch_cell, pkg.torch_cell.CELL)
    torch.manual_seed(steps)
    m = cls(7, 37, backend="fused")
    x = torch.randn(steps, batch, 7)
    lengths = torch.tensor([steps, steps - 5, 9])
    results = {own: _under_own_gemm(own, m, x, lengths)[:2] for own in ("weight_grads", False)}
    names = [n for n, _ in m.named_parameters()]
    n_out = len(results[False][0]) - len(names)
    for (a_plain, a_var), (b_plain, b_var) in [(results["weight_grads"], results[False])]:
        for got, want, skip in ((a_plain, b_plain, n_out), (a_var, b_var, 2)):
            torch.testing.assert_close(got[:skip], want[:skip], rtol=0, atol=0)  # the same products before
            for name, g, w in zip(names, got[skip:], want[skip:]):
                if g.dim() == 1:
                    assert torch.equal(g, w), name
                else:
                    torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)
