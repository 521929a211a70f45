"""The op table (cellspec/model/ops.py): every entry complete and consistent across targets,
derivative rules against central differences and torch autograd, helper selection from SymPy
expressions, and a new function added as one entry compiled end to end."""

from __future__ import annotations

import itertools
import math
import re
import shutil

import numpy as np
import pytest
import sympy as sp
import torch
import torch.nn.functional as F
from conftest import TEST_SPECS, spec_paths

from cellspec.backends.printers import CudaPrinter, NumPyPrinter, TorchPrinter
from cellspec.driver import compile_source
from cellspec.errors import Source, SpecError
from cellspec.model import functions as fn
from cellspec.model import ops
from cellspec.verify import randomcell

ELEMENTWISE = [o for o in ops.OPS if o.shape_rule == "elementwise"]
PRINTERS = {"numpy": NumPyPrinter, "torch": TorchPrinter, "c": CudaPrinter}


def _ids(o: ops.OpSpec) -> str:
    return o.title


def _symbols(n: int) -> list[sp.Symbol]:
    return [sp.Symbol(f"a{i}", real=True) for i in range(n)]


def _namespace(target: str) -> dict:
    """Every helper of target exec'd into one namespace with what the generated modules import."""
    apps = [o.cls(*_symbols(o.max_args)) for o in ELEMENTWISE]
    ns: dict = {"np": np, "torch": torch, "F": F}
    for source in ops.helpers(target, apps):
        exec(source, ns)  # noqa: S102 - the generated helpers, as a generated module runs them
    return ns


# ------------------------------------------------------------------------------ completeness
def test_table_api_and_order():
    assert [o.name for o in ops.OPS if o.name][:13] == [
        "sigmoid",
        "tanh",
        "relu",
        "exp",
        "log",
        "sqrt",
        "softplus",
        "softsign",
        "abs",
        "hard_sigmoid",
        "min",
        "max",
        "clip",
    ]
    assert ops.by_name("clip").cls is fn.Clip
    assert ops.of(fn.Positive).name is None
    a, b = _symbols(2)
    assert ops.of(fn.LessTie(a, b)).cls is fn.LessTie
    with pytest.raises(KeyError):
        ops.by_name("cube")
    assert ops.language_functions()["clip"] == (3, 3)
    assert "@" not in ops.language_functions()
    matmul = ops.by_name("@")
    assert (matmul.ends_stage, matmul.shape_rule, matmul.arg_kinds) == (
        True,
        "projection",
        ("matrix", "vector"),
    )
    assert not any(o.ends_stage for o in ELEMENTWISE)
    assert len(set(ops.OPS)) == len(ops.OPS) and {ops.by_name("tanh"): 1}[ops.of(fn.Tanh)] == 1


@pytest.mark.parametrize("op", ELEMENTWISE, ids=_ids)
def test_entry_complete(op):
    """A spelling per target that each printer prints and that resolves: a helper defined in
    the namespace of the NumPy/torch helpers, an importable torch/NumPy function, or a C
    function of the .cu prelude."""
    assert isinstance(op.cls, type) and issubclass(op.cls, fn.CellFunction)
    assert op.cls.value is not None  # constant arguments fold
    assert op.min_args <= op.max_args == len(op.arg_kinds)
    args = _symbols(op.max_args)
    app = op.cls(*args)
    for target, printer in PRINTERS.items():
        spell = op.spell[target]
        assert printer({}).doprint(app) == f"{spell}({', '.join(a.name for a in args)})"
    for target in ("numpy", "torch"):
        assert callable(eval(op.spell[target], _namespace(target))), target
    prelude = ops.c_prelude()
    assert re.search(rf"\b{op.spell['c']}\((float|double|T) ", prelude), op.spell["c"]


def test_helper_sources_define_their_spelling_and_needs_resolve():
    for target in ("numpy", "torch", "c"):
        defined = set(ops.SUPPORT[target]) | {
            o.spell[target] for o in ops.OPS if target in o.helper
        }
        for o in ops.OPS:
            assert set(o.needs.get(target, ())) <= defined, (o.title, target)
    # numpy/torch: every helper a cell could need execs, and defines what it says
    for target in ("numpy", "torch"):
        ns = _namespace(target)
        for o in ELEMENTWISE:
            if target in o.helper:
                assert o.spell[target] in ns


def test_c_prelude_orders_helpers_after_what_they_call():
    prelude = ops.c_prelude()
    names = re.findall(r"\b(cs_[a-z0-9_]+)\((?:float|double|T) ", prelude)
    first = {}
    for i, n in enumerate(names):
        first.setdefault(n, i)
    for o in ops.OPS:
        for need in o.needs.get("c", ()):
            assert first[need] < first[o.spell["c"]], (need, o.title)
    assert set(ops.SUPPORT["c"]) <= set(first)


def test_front_end_and_fuzz_vocabulary_follow_the_table():
    names = list(ops.language_functions())
    elementwise = [n for n in names if ops.by_name(n).shape_rule == "elementwise"]
    assert randomcell.UNARY == [n for n in elementwise if ops.by_name(n).max_args == 1]
    assert randomcell.MULTI == [n for n in elementwise if ops.by_name(n).max_args > 1]
    assert set(randomcell.SQUASH) <= set(randomcell.SAFE_UNARY)
    assert randomcell.POSITIVE_DOMAIN == ["log", "sqrt"] and randomcell.BOUNDED_ARGUMENT == ["exp"]
    # the spec that tests every function on every back end calls every function of the table
    text = (TEST_SPECS / "cuda_functions.cell").read_text()
    random = {n for n in names if ops.by_name(n).shape_rule == "random"}
    assert random == {"dropout", "variational_dropout", "zoneout"}
    assert {n for n in names if re.search(rf"\b{n}\(", text)} == set(names) - random
    # the random ops (whose masks the check fixes) are called by the shipped specs
    shipped = "".join(p.read_text() for p in (TEST_SPECS.parent.parent / "specs").glob("*.cell"))
    assert {n for n in random if re.search(rf"\b{n}\(", shipped)} == random


def test_a_function_name_is_reserved():
    with pytest.raises(SpecError, match="has the name of a built-in function"):
        compile_source(
            Source(
                "t.cell",
                "cell C {\n input x[I]\n state softsign[H]\n param W[H, I]\n"
                " softsign' = W @ x\n output softsign'\n}\n",
            ),
            targets=(),
        )


# ------------------------------------------------------------------------------ numerics
UNARY_POINTS = [-1e3, -5.0, -3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0, 5.0, 1e3]
POSITIVE_POINTS = [1e-3, 0.25, 0.5, 1.0, 3.0, 5.0, 1e3]
PAIR_POINTS = [-2.0, -1.0, 0.0, 1.0, 2.0]


def _points(op: ops.OpSpec) -> list[tuple[float, ...]]:
    if op.max_args == 1:
        pts = POSITIVE_POINTS if "needs-positive-domain" in op.fuzz else UNARY_POINTS
        if "needs-bounded-argument" in op.fuzz:  # exp(1e3) overflows the float reference
            pts = [x for x in pts if abs(x) <= 5]
        return [(x,) for x in pts]
    return list(itertools.product(PAIR_POINTS, repeat=op.max_args))  # ties and lo > hi included


def _value(op: ops.OpSpec, pt: tuple[float, ...]) -> float:
    return float(op.cls.value(*pt))


@pytest.mark.parametrize("op", ELEMENTWISE, ids=_ids)
def test_spellings_agree_with_value(op):
    """The NumPy and torch spellings (helpers included) and the SymPy value on points with the
    kinks (0, ±3, ties, lo > hi), in float64."""
    pts = _points(op)
    want = np.array([_value(op, p) for p in pts])
    cols = list(zip(*pts))
    np_ns, t_ns = _namespace("numpy"), _namespace("torch")
    got_np = eval(op.spell["numpy"], np_ns)(*(np.array(c) for c in cols))
    got_t = eval(op.spell["torch"], t_ns)(*(torch.tensor(c, dtype=torch.float64) for c in cols))
    np.testing.assert_allclose(got_np, want, rtol=1e-13, atol=0)
    np.testing.assert_allclose(got_t.numpy(), want, rtol=1e-13, atol=0)


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
def test_c_spellings_agree_with_value(tmp_path):
    """Every C helper of the prelude, built with g++ in double, on the same points."""
    import subprocess

    cases = [(op, pt) for op in ELEMENTWISE for pt in _points(op)]
    lines = [
        f'    printf("%.17g\\n", {op.spell["c"]}({", ".join(f"double({x!r})" for x in pt)}));'
        for op, pt in cases
    ]
    src = tmp_path / "ops.cpp"
    src.write_text(
        "#include <math.h>\n#include <stdio.h>\n#define __host__\n#define __device__\n"
        + ops.c_prelude()
        + "\nint main() {\n"
        + "\n".join(lines)
        + "\n    return 0;\n}\n"
    )
    exe = tmp_path / "ops"
    subprocess.run(
        ["g++", "-std=c++14", "-O1", "-Wall", "-Werror", "-o", str(exe), str(src)], check=True
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()
    assert len(out) == len(cases)
    for (op, pt), text in zip(cases, out):
        assert float(text) == pytest.approx(_value(op, pt), rel=1e-13, abs=0), (op.title, pt)


def _derivative(op: ops.OpSpec, pt: tuple[float, ...], i: int) -> float:
    args = _symbols(op.max_args)
    d = op.cls(*args).fdiff(i + 1)
    return float(d.subs(dict(zip(args, pt))))  # cell functions fold on numbers


SMOOTH_UNARY = [-2.7, -0.8, 0.3, 1.9, 3.4]


def _smooth_points(op: ops.OpSpec) -> list[tuple[float, ...]]:
    if op.max_args == 1:
        return [(x,) for x in SMOOTH_UNARY if x > 0 or "needs-positive-domain" not in op.fuzz]
    if op.max_args == 2:
        return [(-1.3, 0.4), (0.4, -1.3), (2.2, 2.9)]
    return [(x, lo, hi) for x in (-2.7, 0.3, 3.4) for lo, hi in ((-1.0, 1.0), (2.0, -1.0))]


@pytest.mark.parametrize("op", ELEMENTWISE, ids=_ids)
def test_derivative_rule_matches_central_differences(op):
    h = 1e-6
    for pt in _smooth_points(op):
        for i in range(op.max_args):
            up = list(pt)
            dn = list(pt)
            up[i] += h
            dn[i] -= h
            fd = (_value(op, tuple(up)) - _value(op, tuple(dn))) / (2 * h)
            assert math.isclose(_derivative(op, pt, i), fd, rel_tol=1e-6, abs_tol=1e-7), (pt, i)


@pytest.mark.parametrize("op", [o for o in ELEMENTWISE if o.name], ids=_ids)
def test_derivative_rule_matches_torch_autograd_at_kinks(op):
    """At every point, kinks included, the rule gives what autograd gives through the torch
    spelling (PyTorch's conventions: relu'(0) = 0, ties split in half, clamp's hi wins)."""
    ns = _namespace("torch")
    f = eval(op.spell["torch"], ns)
    for pt in _points(op):
        if any(abs(x) >= 1e3 for x in pt):
            continue
        xs = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in pt]
        grads = torch.autograd.grad(f(*xs), xs, allow_unused=True)
        for i, g in enumerate(grads):
            got = 0.0 if g is None else float(g)
            assert _derivative(op, pt, i) == pytest.approx(got, rel=1e-12, abs=0), (pt, i)


# ------------------------------------------------------------------------------ used_ops / helpers
def test_used_ops_from_expressions_in_table_order():
    x, y, z = _symbols(3)
    exprs = [fn.Relu(x) + fn.Sigmoid(y) * fn.Clip(z, -1, 1), fn.Positive(x) * 2, x + y]
    assert [o.title for o in ops.used_ops(exprs)] == ["sigmoid", "relu", "clip", "Positive"]
    assert ops.used_ops([x * y, sp.Integer(2)]) == []

    class NoEntry(fn.CellFunction):
        nargs = 1

    with pytest.raises(KeyError, match="NoEntry"):
        ops.used_ops([NoEntry(x) + 1])
    with pytest.raises(NotImplementedError, match="NoEntry"):
        NumPyPrinter({}).doprint(NoEntry(x))


def test_sympy_own_functions_are_refused_loudly():
    """SymPy's Abs/sign have no entry: printing them the SymPy way gave `abs(h)` and, for the
    derivative, `0.0 if h == 0 else copysign(1, h)`, which fails on arrays."""
    (x,) = _symbols(1)
    for e in (sp.Abs(x), sp.sign(x) * 2):
        with pytest.raises(KeyError):
            ops.used_ops([e])
        for printer in PRINTERS.values():
            with pytest.raises(NotImplementedError, match="no rule"):
                printer({}).doprint(e)


def test_power_of_a_square_lowers_to_the_language_abs():
    """SymPy turns (h*h)^0.5 into Abs(h)**1.0; lowering uses the table's abs (value, derivative
    and spellings), and the cell agrees across back ends and finite differences."""
    from cellspec.verify.check import check_cell

    text = (
        "cell P {\n input x[I]\n state h[H]\n param W[H, I]\n"
        " h' = tanh(W @ x + (h * h) ^ 0.5 + (h * h) ^ 1.5)\n output h'\n}\n"
    )
    (cc,) = compile_source(Source("p.cell", text))
    expr = cc.model.values[0].expr
    assert not expr.atoms(sp.Abs) and len(expr.atoms(fn.Abs)) == 1
    report = check_cell(cc, T=3, B=2, fd=True)
    assert report.ok, report.table()


def test_helpers_include_dependencies_first_and_only_what_is_used():
    x, y = _symbols(2)

    def defined(target, exprs):
        return [
            re.search(r"(?:def |inline \w+ )(\w+)\(", h).group(1)
            for h in ops.helpers(target, exprs)
        ]

    assert defined("numpy", [fn.Tanh(x)]) == []
    assert defined("numpy", [fn.Positive(x) + fn.Sigmoid(y)]) == ["_sigmoid", "_mask", "_positive"]
    assert defined("torch", [fn.Min(x, y)]) == ["_tensors", "_minimum"]
    assert defined("torch", [fn.Sigmoid(x)]) == []
    assert defined("c", [fn.Softplus(x)]) == [
        "cs_max",
        "cs_log1p",
        "cs_exp",
        "cs_abs",
        "cs_softplus",
    ]
    assert defined("c", [x ** sp.Float(1.5)]) == ["cs_pow", "cs_sqrt"]
    with pytest.raises(KeyError):
        ops.helpers("fortran", [x])


@pytest.mark.parametrize("path", spec_paths(tests=True), ids=lambda p: p.stem)
def test_generated_modules_define_exactly_the_helpers_they_call(path):
    """Helper selection from the SymPy expressions matches the printed code: every helper the
    module defines is called in it, and every helper it calls is defined."""
    from conftest import compiled_cells

    known = {o.spell[t] for o in ops.OPS for t in ("numpy", "torch") if t in o.helper}
    known |= set(ops.SUPPORT["numpy"]) | set(ops.SUPPORT["torch"])
    for cc in compiled_cells(str(path)):
        for file in ("numpy_cell.py", "torch_cell.py"):
            text = cc.files[file]
            defs = set(re.findall(r"^def (_\w+)\(", text, re.MULTILINE)) & known
            calls = {
                n for n in known if re.search(rf"(?<![\w.]){n}\(", text.replace(f"def {n}(", ""))
            }
            assert defs == calls, (file, defs ^ calls)


# ------------------------------------------------------------------------------ a new function
class Cube(fn.CellFunction):
    """x³: a throwaway function showing what adding one takes."""

    nargs = 1
    value = staticmethod(lambda x: x**3)

    def fdiff(self, argindex=1):
        return 3 * self.args[0] ** 2


CUBE = ops.OpSpec(
    "cube",
    Cube,
    1,
    1,
    ("vector_or_number",),
    "elementwise",
    False,
    {"numpy": "_cube", "torch": "_cube", "c": "cs_cube"},
    helper={
        "numpy": "def _cube(z):\n    return z * z * z",
        "torch": "def _cube(z):\n    return z * z * z",
        "c": "template <typename T> __host__ __device__ inline T cs_cube(T z) { return z * z * z; }",
    },
)

CUBE_SPEC = """cell Cubic {
  input x[I]
  state h[H]
  param W[H, I], U[H, H], b[H]
  h' = tanh(0.5 * cube(W @ x + U @ h + b) + h)
  output h'
}
"""


def test_a_new_function_is_one_entry():
    """With one more entry (and its SymPy class), a spec calling it compiles and agrees across
    NumPy, the generated torch backward, autograd, finite differences (and the .cu CPU build
    where g++ is present); outside the block the language does not know it."""
    from cellspec.verify.check import check_cell

    with ops.extended(CUBE):
        (cc,) = compile_source(Source("cubic.cell", CUBE_SPEC))
        assert (
            "def _cube(z)" in cc.files["numpy_cell.py"]
            and "def _cube(z)" in cc.files["torch_cell.py"]
        )
        assert "cs_cube(" in next(v for k, v in cc.files.items() if k.endswith(".cu"))
        report = check_cell(cc, T=3, B=2, fd=True)
        assert report.ok, report.table()
        assert {"torch", "autograd", "fd"} <= set(report.columns)
        if shutil.which("g++"):
            assert "cuda-host" in report.columns  # the .cu file's CPU build, with cs_cube
    with pytest.raises(SpecError, match="unknown function 'cube'"):
        compile_source(Source("cubic.cell", CUBE_SPEC), targets=())


class Scale(fn.CellFunction):
    nargs = 2
    value = staticmethod(lambda x, k: k * x)

    def fdiff(self, argindex=1):
        return self.args[1] if argindex == 1 else self.args[0]


def test_number_only_arguments_and_unimplemented_shape_rules_are_refused():
    spell = {"numpy": "_scale", "torch": "_scale", "c": "cs_scale"}
    scale = ops.OpSpec(
        "scale", Scale, 2, 2, ("vector_or_number", "number"), "elementwise", False, spell
    )
    with ops.extended(scale):
        ok = "cell C {\n input x[I]\n state h[I]\n h' = scale(x, 2 * 0.5) + h\n output h'\n}\n"
        compile_source(Source("t.cell", ok), targets=())
        bad = ok.replace("scale(x, 2 * 0.5)", "scale(x, h)")
        with pytest.raises(SpecError, match="argument 2 of scale\\(\\) must be a number"):
            compile_source(Source("t.cell", bad), targets=())
    rowsum = ops.OpSpec(
        "rowsum", Scale, 2, 2, ("vector_or_number",) * 2, "row_reduction", False, spell
    )
    with ops.extended(rowsum):
        text = "cell C {\n input x[I]\n state h[I]\n h' = rowsum(x, h)\n output h'\n}\n"
        with pytest.raises(NotImplementedError, match="row_reduction"):
            compile_source(Source("t.cell", text), targets=())


def test_bad_entries_are_refused_loudly():
    spell = {"numpy": "_cube", "torch": "_cube", "c": "cs_cube"}
    with pytest.raises(ValueError, match="shape rule"):
        ops.OpSpec("cube", Cube, 1, 1, ("vector_or_number",), "pointwise", False, spell)
    with pytest.raises(ValueError, match="arity"):
        ops.OpSpec("cube", Cube, 1, 2, ("vector_or_number",), "elementwise", False, spell)
    with pytest.raises(ValueError, match="does not define"):
        ops.OpSpec(
            "cube",
            Cube,
            1,
            1,
            ("vector_or_number",),
            "elementwise",
            False,
            spell,
            helper={"numpy": "def _cubed(z):\n    return z ** 3"},
        )
    needs_nothing = ops.OpSpec(
        "cube",
        Cube,
        1,
        1,
        ("vector_or_number",),
        "elementwise",
        False,
        spell,
        needs={"numpy": ("_nowhere",)},
    )
    no_c = ops.OpSpec(
        "cube",
        Cube,
        1,
        1,
        ("vector_or_number",),
        "elementwise",
        False,
        {"numpy": "_cube", "torch": "_cube"},
    )
    two_args = ops.OpSpec(
        "cube", Cube, 2, 2, ("vector_or_number",) * 2, "elementwise", False, spell
    )
    for entries, message in [
        ((CUBE, CUBE), "appears twice"),
        ((needs_nothing,), "needs undefined"),
        ((no_c,), "no spelling for c"),
        ((two_args,), "arity 2..2 but Cube takes"),
    ]:
        with pytest.raises(ValueError, match=message), ops.extended(*entries):
            pass
    assert ops.OPS[-1].cls is not Cube  # the table is back as it was


def test_simd_ok_only_for_math_with_vector_overloads():
    """An element function runs on cs_v16 (16 floats, the AVX-512 host build) only where every
    node of its math has an overload there: arithmetic, powers the C printer writes as products,
    and the ops with a ``simd`` source (each of which must overload its C spelling)."""
    z, c = sp.symbols("z c")
    assert ops.simd_ok([fn.Sigmoid(z) * c + fn.Tanh(c) ** 2, fn.Exp(-z) / (1 + z)])
    assert ops.simd_ok([fn.Relu(z) * fn.Positive(z), fn.Max(z, c)])
    assert not ops.simd_ok([fn.Softplus(z)])  # no vector overload: the omp simd loop
    assert ops.vector_pays([fn.Max(z, c) * fn.Exp(z)])  # exp: a libmvec call in the omp simd loop
    assert not ops.vector_pays([fn.Relu(z) * c])  # no call to save
    assert not ops.vector_pays([fn.Softplus(z)])
    assert not ops.simd_ok([z ** sp.Rational(3, 2)])  # cs_pow
    assert not ops.simd_ok([z ** 5])
    for o in ops.OPS:
        if o.simd is not None:
            assert f"cs_v16 {o.spell['c']}(cs_v16" in o.simd
    assert "#ifdef CS_V16" in ops.c_prelude()


def test_vector_tanh_table_within_its_documented_error():
    """The table of the AVX-512 tanh (its ``simd`` entry), read back from the op table and
    evaluated as the C++ does over every float of its 16 intervals (``benchmarks/fit_tanh_table.py``,
    which made it): within 1.1 units of the float spacing of float64's tanh, as documented; and
    the table's layout is the script's (the mid of each interval first)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "fit_tanh_table.py"
    spec = importlib.util.spec_from_file_location("fit_tanh_table", path)
    fit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit)
    source = next(o.simd for o in ops.OPS if o.simd and "cs_tanh_tab" in o.simd)
    body = source[source.index("cs_tanh_tab[7][16] = {"):source.index("};")]
    rows = [[np.float32(v.rstrip("f")) for v in row.split(",")] for row in re.findall(r"\{([^{}]+)\}", body)]
    assert len(rows) == 7 and all(len(r) == 16 for r in rows)
    mids, coefs = np.array(rows[0], dtype=np.float32), np.array(rows[1:], dtype=np.float32).T
    assert list(mids) == [np.float32((lo + hi) / 2) for lo, hi in fit.intervals()]
    errors = fit.errors(mids, coefs)
    assert max(errors) <= 1.1, errors
    worse = coefs.copy()
    worse[3, 0] = np.nextafter(np.nextafter(worse[3, 0], np.float32(2)), np.float32(2))  # 2 ulp off c0
    assert fit.errors(mids, worse)[3] > 1.1  # the check sees a coefficient two ulp off
