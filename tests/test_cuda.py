"""The CUDA back end: every generated .cu compiles with nvcc (sm_80 and sm_90), its CPU build
agrees with NumPy (whole sequences and single steps, forward and every gradient, float64 and
float32), the PyTorch custom ops (CPU build underneath here) agree with the generated modules,
and every failure mode gives a clear error.

nvcc missing: the compile tests skip, unless CELLSPEC_REQUIRE_NVCC=1 (CI), where they fail.
"""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import compiled_cells, load_module, spec_paths

from cellspec.driver import compile_file
from cellspec.runtime import native
from cellspec.runtime.cache import entry, key_of
from cellspec.verify import check

CELLS = [cc for p in spec_paths(tests=True) for cc in compiled_cells(str(p))]
PATHS = {cc.module_name: p for p in spec_paths(tests=True) for cc in compiled_cells(str(p))}
MODULES = [cc.module_name for cc in CELLS]
BY_MODULE = dict(zip(MODULES, CELLS))
NVCC_FLAGS = ("-c", "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90")
REQUIRE_NVCC = os.environ.get("CELLSPEC_REQUIRE_NVCC") == "1"


def cu(cc) -> str:
    return cc.files[f"{cc.module_name}.cu"]


# ------------------------------------------------------------------------------------ nvcc


def _nvcc(nvcc: str, cells: list, flags: tuple[str, ...] = NVCC_FLAGS) -> str | None:
    """Compile the .cu files of cells as one translation unit (a file that #includes each of
    them: the CUDA headers are parsed once), cached; the error text or None."""
    sources = {f"{cc.module_name}.cu": cu(cc) for cc in cells}
    key = key_of("nvcc-object", *(f"{k}\n{v}" for k, v in sorted(sources.items())),
                 native.compiler_version(nvcc), " ".join(flags))

    def build(tmp):
        for name, text in sources.items():
            (tmp / name).write_text(text)
        unit = tmp / "unit.cu"
        unit.write_text("".join(f'#include "{name}"\n' for name in sorted(sources)))
        proc = subprocess.run([nvcc, *flags, str(unit), "-o", str(tmp / "unit.o")],
                              check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])

    try:
        entry("nvcc-object", key, build)
    except RuntimeError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def nvcc_results():
    """module -> nvcc error or None. The files are compiled in one unit per core, in
    parallel; a unit that fails is recompiled file by file to name the culprit."""
    nvcc = native.which_nvcc()
    if nvcc is None:
        if REQUIRE_NVCC:
            pytest.fail("nvcc not found but CELLSPEC_REQUIRE_NVCC=1")
        pytest.skip("nvcc not found (set CELLSPEC_REQUIRE_NVCC=1 to make this a failure)")
    n = max(1, min(len(CELLS), os.cpu_count() or 1))
    chunks = [CELLS[i::n] for i in range(n)]
    with ThreadPoolExecutor(n) as pool:
        errors = list(pool.map(lambda c: _nvcc(nvcc, c), chunks))
    results = {}
    for chunk, err in zip(chunks, errors):
        for cc in chunk:
            results[cc.module_name] = None if err is None else _nvcc(nvcc, [cc])
    return results


@pytest.mark.parametrize("module", MODULES)
def test_nvcc_compiles_for_sm80_and_sm90(nvcc_results, module):
    err = nvcc_results[module]
    assert err is None, f"nvcc failed on {module}.cu:\n{err}"


@pytest.mark.parametrize("module", MODULES)
def test_cu_is_deterministic_and_self_contained(module):
    cc = BY_MODULE[module]
    again = next(c for c in compile_file(PATHS[module]) if c.module_name == module)
    assert cu(again) == cu(cc)
    text = cu(cc)
    includes = [line for line in text.splitlines() if line.startswith("#include")]
    assert all(("<" in line) for line in includes), includes  # system headers only
    assert "#ifdef __CUDACC__" in text and "__global__" in text


# ------------------------------------------------------------------------------------ CPU build


def _host(cc, p: check.Problem, dtype_name: str) -> check.Results:
    if native.which_cxx() is None and native.which_nvcc() is None:
        pytest.skip("no C++ compiler")
    return check.run_native(p, cc, dtype_name)


def _assert_close(errs: dict[str, float], tol: float, what: str) -> None:
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"{what}: " + ", ".join(f"{k} {v:.1e}" for k, v in bad.items()) + f" > {tol:.0e}"


@pytest.mark.parametrize("T", [1, 5], ids=["step", "sequence"])
@pytest.mark.parametrize("module", MODULES)
def test_host_build_matches_numpy(module, T):
    cc = BY_MODULE[module]
    p = check.make_problem(load_module(module), T=T, B=3, seed=2)
    ref = check.run_numpy(p)
    _assert_close(check.compare(_host(cc, p, "float64"), ref), 1e-9, f"{module} float64")
    _assert_close(check.compare(_host(cc, p, "float32"), ref), 2e-5, f"{module} float32")


def test_check_has_the_native_columns():
    assert check.TOLERANCES["cuda-host"] == 1e-9 and check.TOLERANCES["cuhost-f32"] == 2e-5
    report = check.check_cell(BY_MODULE["elman"], fd=False)
    assert "cuda-host" in report.columns and "cuhost-f32" in report.columns
    assert report.skipped.get("gpu") == "no GPU" or "gpu" in report.columns


# ------------------------------------------------------------------------------------ torch ops


@pytest.mark.parametrize("module", ["lstm", "cuda_stages"])
def test_fused_backend_module_matches_generated(module):
    """backend='fused' runs the whole sequence in the native library (CPU build)."""
    pkg = load_module(module)
    mod = pkg.torch_cell
    sizes = {s: n for s, n in zip(mod.SIZES, (3, 5, 2, 4))}
    extra = {a: sizes[s] for s, a in list(mod.SIZES.items())[2:]}
    torch.manual_seed(0)
    first, second = list(mod.SIZES)[:2]
    a = getattr(mod, mod.CELL)(sizes[first], sizes[second], **extra, backend="fused").double()
    b = getattr(mod, mod.CELL)(sizes[first], sizes[second], **extra, backend="generated").double()
    b.load_state_dict(a.state_dict())
    xs = [torch.randn(4, 2, sizes[s], dtype=torch.double) for _, s in mod.INPUTS]
    x = xs[0] if len(xs) == 1 else tuple(xs)
    ya, sa = a(x)
    yb, sb = b(x)
    flat = lambda v: list(v) if isinstance(v, tuple) else [v]
    for u, v in zip(flat(ya) + flat(sa), flat(yb) + flat(sb)):
        assert torch.allclose(u, v, rtol=1e-12, atol=1e-12)
    la = sum(t.square().sum() for t in flat(ya) + flat(sa))
    lb = sum(t.square().sum() for t in flat(yb) + flat(sb))
    ga = torch.autograd.grad(la, list(a.parameters()))
    gb = torch.autograd.grad(lb, list(b.parameters()))
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, rtol=1e-10, atol=1e-12)


def test_custom_op_opcheck():
    pkg = load_module("elman")
    fwd = pkg.torch_cell._OPS[0]
    torch.manual_seed(0)
    xs = [torch.randn(3, 2, 3, requires_grad=True)]
    st = [torch.randn(2, 4, requires_grad=True)]
    ps = [torch.randn(4, 3), torch.randn(4, 4), torch.randn(4), torch.randn(4)]
    for q in ps:
        q.requires_grad_()
    torch.library.opcheck(fwd, (xs, st, ps), test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compile_fullgraph_fused_batch_first_matches_eager():
    """torch.compile traces the native library's custom ops (fake shapes and strides rendered
    from the same program), forward and backward, with batch_first (a transposed input)."""
    pkg = load_module("lstm")
    torch.manual_seed(0)
    m = pkg.torch_cell.LSTM(4, 5, batch_first=True, backend="fused").double()
    x = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)

    def f(x):
        out, state = m(x)
        return out.square().sum() + sum(s.sum() for s in state)

    ref = f(x)
    g_ref = torch.autograd.grad(ref, [x, *m.parameters()])
    got = torch.compile(f, fullgraph=True)(x)
    g = torch.autograd.grad(got, [x, *m.parameters()])
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    for u, v in zip(g, g_ref):
        assert torch.allclose(u, v, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------ errors


def test_unsupported_dtype_is_a_clear_error():
    pkg = load_module("elman")
    m = pkg.torch_cell.Elman(3, 4, backend="fused").to(torch.float16)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        m(torch.randn(2, 2, 3, dtype=torch.float16))


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    pkg = load_module("elman")
    m = pkg.torch_cell.Elman(3, 4, backend="cuda")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        m(torch.randn(2, 2, 3))


def test_no_nvcc_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(native, "which_nvcc", lambda: None)
    with pytest.raises(native.NativeBuildError, match="nvcc not found"):
        native.build_cuda("// nothing", "x", ("90",))


def test_auto_backend_picks_cuda_for_cuda_tensors():
    pkg = load_module("gru")
    with open(pkg.torch_cell.__file__) as f:
        text = f.read()
    assert "cuda" in pkg.torch_cell.BACKENDS
    assert 'return "cuda" if xs[0].is_cuda else "fused"' in text
