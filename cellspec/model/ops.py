"""The op table: every operation of the language, declared once.

One :class:`OpSpec` per operation holds what the rest of the compiler needs to know about it:
its arity and argument kinds (front end), its shape rule and whether it ends a stage (lowering
and scheduling), its derivative rule (the SymPy class in :mod:`cellspec.model.functions`, whose
``fdiff`` is the rule), its spelling and helper source per target (printers, the generated
modules' helpers, the ``.cu`` prelude), the torch ``out=`` variant (the PyTorch engine) and its
tags for the random-cell generator. Adding an elementwise function is one SymPy class (its value
and derivative) and one entry here, plus its tests.

Targets are ``"numpy"``, ``"torch"`` and ``"c"`` (C++ for the CUDA kernels and their CPU build).
A spelling names what the printed code calls; where that is a helper of the generated code
(``_sigmoid``, ``_clip``, ``cs_sigmoid``) the entry also carries the helper's source, and
``needs`` lists the helpers that source calls (another op's helper or one of :data:`SUPPORT`).

Nothing registers itself at import: :data:`OPS` is this literal table. :func:`extended` swaps in
a longer table for the duration of a ``with`` block (tests of a new op use it), and every
consumer reads the table when it runs, never at import.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import sympy as sp

from cellspec.model import functions as fn

TARGETS: tuple[str, ...] = ("numpy", "torch", "c")

#: shape rules: "elementwise" (arguments broadcast to one vector size, the result has it),
#: "projection" (``matrix @ vector``), "row_reduction" (one number per row: sum, mean,
#: layer_norm) and "random" (dropout, variational_dropout, zoneout: lowering turns each call into
#: elementwise math with a mask the generated layer draws, see model/lower.py).
SHAPE_RULES: tuple[str, ...] = ("elementwise", "projection", "row_reduction", "random")

#: argument kinds: "vector_or_number" (a vector of the call's size, or a number), "number" (a
#: number only, e.g. an epsilon), "rate" (a number or a const: a probability), and for ``@``
#: "matrix" and "vector".
ARG_KINDS: tuple[str, ...] = ("vector_or_number", "number", "rate", "matrix", "vector")

#: tags the random-cell generator draws its vocabulary from: "squash" (bounded output for any
#: finite input), "safe" (bounded growth on bounded input), "needs-positive-domain" (only for
#: arguments bounded away from zero), "needs-bounded-argument" (overflows on large arguments).
FUZZ_TAGS: tuple[str, ...] = ("squash", "safe", "needs-positive-domain", "needs-bounded-argument")

_V = "vector_or_number"

#: most arguments of a joint reduction (``mean(a, b, ...)``)
MAX_REDUCED = 16


@dataclass(frozen=True)
class OpSpec:
    """One operation: what the front end, lowering, scheduler, deriver and printers need."""

    name: str | None  # language name; None for derivative-only masks (Positive, LessTie, ...)
    cls: type[fn.CellFunction] | None  # SymPy class (its fdiff is the derivative); None for @
    min_args: int
    max_args: int
    arg_kinds: tuple[str, ...]  # per argument, see ARG_KINDS
    shape_rule: str  # see SHAPE_RULES
    ends_stage: bool  # its result is only ready in the next stage (a GEMM)
    spell: dict[str, str]  # target -> the name printed code calls
    helper: dict[str, str] = field(default_factory=dict)  # target -> helper source, if any
    needs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # target -> helpers it calls
    torch_out: str | None = None  # torch function with an ``out=`` variant computing the op
    fuzz: frozenset[str] = frozenset()  # see FUZZ_TAGS
    simd: str | None = None  # C++ overload of spell["c"] on cs_v16 (16 floats, AVX-512 host build)
    libm: bool = False  # its C helper calls a libm function (libmvec, a call per vector, in omp simd)

    def __post_init__(self) -> None:
        if self.shape_rule not in SHAPE_RULES:
            raise ValueError(f"op {self.name or self.cls}: unknown shape rule {self.shape_rule!r}")
        if not 0 <= self.min_args <= self.max_args or len(self.arg_kinds) != self.max_args:
            raise ValueError(f"op {self.name or self.cls}: arity and argument kinds disagree")
        if any(k not in ARG_KINDS for k in self.arg_kinds):
            raise ValueError(
                f"op {self.name or self.cls}: unknown argument kind in {self.arg_kinds}"
            )
        if not self.fuzz <= set(FUZZ_TAGS):
            raise ValueError(
                f"op {self.name or self.cls}: unknown fuzz tags {set(self.fuzz) - set(FUZZ_TAGS)}"
            )
        if self.simd is not None and f"cs_v16 {self.spell['c']}(cs_v16" not in self.simd:
            raise ValueError(f"op {self.name or self.cls}: the simd source does not overload {self.spell['c']}")
        for target, source in self.helper.items():
            if f"{self.spell[target]}(" not in source:
                raise ValueError(
                    f"op {self.name or self.cls}: the {target} helper does not define "
                    f"{self.spell[target]}"
                )

    def __hash__(self) -> int:
        """Entries go in sets and dict keys (a generated hash would fail on the dict fields)."""
        return hash((self.name, self.cls, self.shape_rule))

    @property
    def title(self) -> str:
        """The language name, or the SymPy class name of a derivative-only op."""
        return self.name or (self.cls.__name__ if self.cls else "?")


def _unary(name: str, cls, spell: dict[str, str], **kw) -> OpSpec:
    return OpSpec(name, cls, 1, 1, (_V,), "elementwise", False, spell, **kw)


def _derivative_mask(cls, spell: dict[str, str], **kw) -> OpSpec:
    n = int(max(cls.nargs))  # SymPy keeps a class's nargs as a set
    return OpSpec(None, cls, n, n, (_V,) * n, "elementwise", False, spell, **kw)


# -------------------------------------------------------------- helpers several ops call
#: helpers that are no op's spelling but that op helpers (or the printers) call, per target
SUPPORT: dict[str, dict[str, str]] = {
    "numpy": {
        "_mask": '''def _mask(cond, *like):
    """A boolean condition as 0/1 in the floating dtype of the arrays it came from."""
    return cond.astype(np.result_type(*[a for a in like if isinstance(a, np.ndarray)] or [float]))''',
    },
    "torch": {
        "_tensors": '''def _tensors(*values):
    """Numbers as tensors like the first tensor among values."""
    like = next(v for v in values if isinstance(v, torch.Tensor))
    return tuple(v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=like.dtype, device=like.device) for v in values)''',
    },
    "c": {
        "cs_log1p": """__host__ __device__ inline float cs_log1p(float z) { return log1pf(z); }
__host__ __device__ inline double cs_log1p(double z) { return log1p(z); }""",
        "cs_pow": """__host__ __device__ inline float cs_pow(float a, float b) { return powf(a, b); }
__host__ __device__ inline double cs_pow(double a, double b) { return pow(a, b); }""",
    },
}

#: helpers the printers' own spelling of a power needs (``x**0.5`` is ``sqrt``, ``x**1.5`` is
#: ``cs_pow`` in C), by target
POWER_NEEDS: dict[str, tuple[str, ...]] = {"numpy": (), "torch": (), "c": ("cs_pow", "cs_sqrt")}


def _c_overloads(name: str, f32: str, f64: str) -> str:
    return (
        f"__host__ __device__ inline float {name}(float z) {{ return {f32}(z); }}\n"
        f"__host__ __device__ inline double {name}(double z) {{ return {f64}(z); }}"
    )


# ------------------------------------------------------------------------------ the table
OPS: tuple[OpSpec, ...] = (
    _unary(
        "sigmoid",
        fn.Sigmoid,
        {"numpy": "_sigmoid", "torch": "torch.sigmoid", "c": "cs_sigmoid"},
        libm=True,
        helper={
            "numpy": '''def _sigmoid(z):
    """1 / (1 + exp(-z)), without overflow for large |z|."""
    return np.exp(-np.logaddexp(0.0, -z))''',
            "c": """// 1 / (1 + exp(-z)) without overflow: one exp of -|z|
template <typename T> __host__ __device__ inline T cs_sigmoid(T z) {
    const T e = cs_exp(-cs_abs(z));
    const T s = T(1) / (T(1) + e);
    return z >= T(0) ? s : e * s;
}""",
        },
        needs={"c": ("cs_exp", "cs_abs")},
        simd="""// the same on 16 floats: e = exp(-|z|), then one division, 1 / (1 + e) or e / (1 + e)
inline cs_v16 cs_sigmoid(cs_v16 z) {
    const __m512 e = cs_v16_exp_neg(_mm512_or_ps(z.v, _mm512_set1_ps(-0.0f)));
    const __mmask16 pos = _mm512_cmp_ps_mask(z.v, _mm512_setzero_ps(), _CMP_GE_OQ);
    return _mm512_div_ps(_mm512_mask_blend_ps(pos, e, _mm512_set1_ps(1.0f)), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}""",
        torch_out="torch.sigmoid",
        fuzz=frozenset({"squash", "safe"}),
    ),
    _unary(
        "tanh",
        fn.Tanh,
        {"numpy": "np.tanh", "torch": "torch.tanh", "c": "cs_tanh"},
        libm=True,
        helper={"c": _c_overloads("cs_tanh", "tanhf", "tanh")},
        simd="""// tanh on 16 floats: Cephes's odd polynomial below |z| = 0.625; above, a degree-5 polynomial in
// t = |z| - mid on each of 16 quarter-octaves [0.625, 0.75), ..., [8, 10), picked by the exponent and
// the top two mantissa bits of |z| (one vpermps per coefficient), and 1 from 9.0109139 (where tanh
// rounds to 1); the sign of z. No exp and no division (the exp-based form took ~0.2 ns more per unit
// of the LSTM's element function). Table: python benchmarks/fit_tanh_table.py (<= 1.07 ulp).
alignas(64) static const float cs_tanh_tab[7][16] = {
    {0.6875f, 0.8125f, 0.9375f, 1.125f, 1.375f, 1.625f, 1.875f, 2.25f, 2.75f, 3.25f, 3.75f, 4.5f, 5.5f, 6.5f, 7.5f, 9.0f},
    {0.596373558f, 0.670967102f, 0.734071493f, 0.809301078f, 0.879826725f, 0.925346255f, 0.954045236f, 0.978026092f, 0.991859734f, 0.996997654f, 0.998894453f, 0.999753177f, 0.999966621f, 0.99999547f, 0.999999404f, 0.99999994f},
    {0.644338608f, 0.549803197f, 0.461138994f, 0.345031768f, 0.225904971f, 0.143734366f, 0.0897976384f, 0.043464914f, 0.0162142925f, 0.00599571783f, 0.00220989343f, 0.000493536005f, 6.68071298e-05f, 9.04162334e-06f, 1.22365543e-06f, 6.10875546e-08f},
    {-0.384266406f, -0.368899882f, -0.338509142f, -0.279237121f, -0.198758736f, -0.133004621f, -0.0856711045f, -0.0425082408f, -0.0160811003f, -0.00597717939f, -0.00220723939f, -0.000492609572f, -6.66951673e-05f, -9.02671763e-06f, -1.22164272e-06f, -5.85736011e-08f},
    {0.0143862478f, 0.0642516762f, 0.0947768092f, 0.110976212f, 0.0995720699f, 0.0751642808f, 0.0518018305f, 0.02708783f, 0.0105461106f, 0.00396090234f, 0.00146825553f, 0.000328297843f, 4.4467386e-05f, 6.01868624e-06f, 8.14553061e-07f, 5.08996258e-08f},
    {0.119441099f, 0.0798982009f, 0.0433629788f, 0.00370061747f, -0.0210951548f, -0.0251212381f, -0.0208489299f, -0.0123903118f, -0.00515112886f, -0.00197949936f, -0.000739873154f, -0.000172551066f, -2.3398492e-05f, -3.16748901e-06f, -4.28688566e-07f, -1.32617684e-09f},
    {-0.061518047f, -0.0626643747f, -0.0530744679f, -0.0321104601f, -0.00955475867f, 0.00137856428f, 0.00459587295f, 0.00397614716f, 0.0019167451f, 0.000771511346f, 0.000293064397f, 6.87046122e-05f, 9.33461433e-06f, 1.26397106e-06f, 1.71072173e-07f, 2.27187815e-08f},
};
inline cs_v16 cs_tanh(cs_v16 z) {
    const __m512 a = cs_v16_abs(z.v), s = _mm512_mul_ps(a, a);
    const __m512i q = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_castps_si512(a), 21), _mm512_set1_epi32(0x3F200000 >> 21));  // 0.625's bits
#define CS_TAB_(j) _mm512_permutexvar_ps(q, _mm512_load_ps(cs_tanh_tab[j]))
    const __m512 t = _mm512_sub_ps(a, CS_TAB_(0));  // exact: a and mid within a factor of 2
    __m512 p = CS_TAB_(6);
    p = _mm512_fmadd_ps(p, t, CS_TAB_(5));
    p = _mm512_fmadd_ps(p, t, CS_TAB_(4));
    p = _mm512_fmadd_ps(p, t, CS_TAB_(3));
    p = _mm512_fmadd_ps(p, t, CS_TAB_(2));
    p = _mm512_fmadd_ps(p, t, CS_TAB_(1));
#undef CS_TAB_
    // |z| >= 10 (and infinity) wraps around the table; NaN stays NaN through t
    const __m512 large = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(9.01091385f), _CMP_GE_OQ), p, _mm512_set1_ps(1.0f));
    __m512 r = _mm512_set1_ps(-5.70498872745e-3f);
    r = _mm512_fmadd_ps(r, s, _mm512_set1_ps(2.06390887954e-2f));
    r = _mm512_fmadd_ps(r, s, _mm512_set1_ps(-5.37397155531e-2f));
    r = _mm512_fmadd_ps(r, s, _mm512_set1_ps(1.33314422036e-1f));
    r = _mm512_fmadd_ps(r, s, _mm512_set1_ps(-3.33332819422e-1f));
    const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(r, s), a, a);
    const __mmask16 lt = _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.625f), _CMP_LT_OQ);
    return _mm512_or_ps(_mm512_mask_blend_ps(lt, large, small), _mm512_and_ps(z.v, _mm512_set1_ps(-0.0f)));
}""",
        torch_out="torch.tanh",
        fuzz=frozenset({"squash", "safe"}),
    ),
    _unary(
        "relu",
        fn.Relu,
        {"numpy": "_relu", "torch": "torch.relu", "c": "cs_relu"},
        helper={
            "numpy": """def _relu(z):
    return np.maximum(z, 0)""",
            "c": "template <typename T> __host__ __device__ inline T cs_relu(T z) { return cs_max(z, T(0)); }",
        },
        simd="inline cs_v16 cs_relu(cs_v16 z) { return cs_v16_max(z, 0.0f); }",
        needs={"c": ("cs_max",)},
        fuzz=frozenset({"safe"}),
    ),
    _unary(
        "exp",
        fn.Exp,
        {"numpy": "_exp", "torch": "torch.exp", "c": "cs_exp"},
        libm=True,
        helper={
            "numpy": '''def _exp(z):
    """exp(z); overflows to inf (as torch.exp does) without a RuntimeWarning."""
    with np.errstate(over="ignore"):
        return np.exp(z)''',
            "c": _c_overloads("cs_exp", "expf", "exp"),
        },
        simd="inline cs_v16 cs_exp(cs_v16 z) { return cs_v16_exp(z.v); }",
        torch_out="torch.exp",
        fuzz=frozenset({"needs-bounded-argument"}),
    ),
    _unary(
        "log",
        fn.Log,
        {"numpy": "np.log", "torch": "torch.log", "c": "cs_log"},
        libm=True,
        helper={"c": _c_overloads("cs_log", "logf", "log")},
        torch_out="torch.log",
        fuzz=frozenset({"needs-positive-domain"}),
    ),
    _unary(
        "sqrt",
        fn.Sqrt,
        {"numpy": "np.sqrt", "torch": "torch.sqrt", "c": "cs_sqrt"},
        helper={"c": _c_overloads("cs_sqrt", "sqrtf", "sqrt")},
        simd="inline cs_v16 cs_sqrt(cs_v16 z) { return _mm512_sqrt_ps(z.v); }",
        torch_out="torch.sqrt",
        fuzz=frozenset({"needs-positive-domain"}),
    ),
    _unary(
        "softplus",
        fn.Softplus,
        {"numpy": "_softplus", "torch": "F.softplus", "c": "cs_softplus"},
        libm=True,
        helper={
            "numpy": '''def _softplus(z):
    """log(1 + exp(z)) in the stable form max(z, 0) + log1p(exp(-|z|))."""
    return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))''',
            "c": """// log(1 + exp(z)) = max(z, 0) + log1p(exp(-|z|))
template <typename T> __host__ __device__ inline T cs_softplus(T z) {
    return cs_max(z, T(0)) + cs_log1p(cs_exp(-cs_abs(z)));
}""",
        },
        needs={"c": ("cs_max", "cs_log1p", "cs_exp", "cs_abs")},
        fuzz=frozenset({"safe"}),
    ),
    _unary(
        "softsign",
        fn.Softsign,
        {"numpy": "_softsign", "torch": "F.softsign", "c": "cs_softsign"},
        helper={
            "numpy": """def _softsign(z):
    return z / (1 + np.abs(z))""",
            "c": "template <typename T> __host__ __device__ inline T cs_softsign(T z) { return z / (T(1) + cs_abs(z)); }",
        },
        simd="inline cs_v16 cs_softsign(cs_v16 z) { return z / (cs_v16(1.0f) + cs_v16_abs(z.v)); }",
        needs={"c": ("cs_abs",)},
        fuzz=frozenset({"squash", "safe"}),
    ),
    _unary(
        "abs",
        fn.Abs,
        {"numpy": "np.abs", "torch": "torch.abs", "c": "cs_abs"},
        helper={"c": _c_overloads("cs_abs", "fabsf", "fabs")},
        simd="inline cs_v16 cs_abs(cs_v16 z) { return cs_v16_abs(z.v); }",
        torch_out="torch.abs",
        fuzz=frozenset({"safe"}),
    ),
    _unary(
        "hard_sigmoid",
        fn.HardSigmoid,
        {"numpy": "_hard_sigmoid", "torch": "_hard_sigmoid", "c": "cs_hard_sigmoid"},
        helper={
            "numpy": '''def _hard_sigmoid(z):
    """clip(z / 6 + 1/2, 0, 1), PyTorch's hardsigmoid."""
    return np.clip(z / 6 + 0.5, 0, 1)''',
            "torch": '''def _hard_sigmoid(z):
    """F.hardsigmoid's values and kinks (gradient 1/6 on the open interval (-3, 3)), but with an
    exact 1/6: torch's own backward uses a float32 1/6 even in float64 (3e-8 relative)."""
    return torch.where((z > -3) & (z < 3), z / 6 + 0.5, (z >= 3).to(z.dtype))''',
            "c": """// PyTorch's hardsigmoid: clip(z / 6 + 1/2, 0, 1)
template <typename T> __host__ __device__ inline T cs_hard_sigmoid(T z) { return cs_clip(z / T(6) + T(0.5), T(0), T(1)); }""",
        },
        simd="inline cs_v16 cs_hard_sigmoid(cs_v16 z) { return cs_v16_min(cs_v16_max(z / cs_v16(6.0f) + cs_v16(0.5f), 0.0f), 1.0f); }",
        needs={"c": ("cs_clip",)},
        fuzz=frozenset({"squash", "safe"}),
    ),
    OpSpec(
        "min",
        fn.Min,
        2,
        2,
        (_V, _V),
        "elementwise",
        False,
        {"numpy": "np.minimum", "torch": "_minimum", "c": "cs_min"},
        helper={
            "torch": """def _minimum(a, b):
    a, b = _tensors(a, b)
    return torch.minimum(a, b)""",
            "c": """template <typename T> __host__ __device__ inline T cs_min(T a, T b) {
    return (a != a || b != b) ? a + b : (b < a ? b : a);
}""",
        },
        needs={"torch": ("_tensors",)},
        simd="inline cs_v16 cs_min(cs_v16 a, cs_v16 b) { return cs_v16_min(a, b); }",
    ),
    OpSpec(
        "max",
        fn.Max,
        2,
        2,
        (_V, _V),
        "elementwise",
        False,
        {"numpy": "np.maximum", "torch": "_maximum", "c": "cs_max"},
        helper={
            "torch": """def _maximum(a, b):
    a, b = _tensors(a, b)
    return torch.maximum(a, b)""",
            "c": """template <typename T> __host__ __device__ inline T cs_max(T a, T b) {
    return (a != a || b != b) ? a + b : (b > a ? b : a);
}""",
        },
        needs={"torch": ("_tensors",)},
        simd="inline cs_v16 cs_max(cs_v16 a, cs_v16 b) { return cs_v16_max(a, b); }",
    ),
    OpSpec(
        "clip",
        fn.Clip,
        3,
        3,
        (_V, _V, _V),
        "elementwise",
        False,
        {"numpy": "_clip", "torch": "_clip", "c": "cs_clip"},
        helper={
            "numpy": '''def _clip(z, lo, hi):
    """min(max(z, lo), hi), as torch.clamp (hi wins when lo > hi)."""
    return np.minimum(np.maximum(z, lo), hi)''',
            "torch": '''def _clip(z, lo, hi):
    """torch.clamp with tensor or number bounds (hi wins when lo > hi)."""
    if not isinstance(lo, torch.Tensor) and not isinstance(hi, torch.Tensor):
        return torch.clamp(z, lo, hi)
    # broadcast first: torch.clamp's backward fails when a bound is wider than z ([H] vs [B, H])
    z, lo, hi = torch.broadcast_tensors(*_tensors(z, lo, hi))
    return torch.clamp(z, lo, hi)''',
            "c": """// clip(z, lo, hi) = min(max(z, lo), hi), as torch.clamp (hi wins when lo > hi)
template <typename T> __host__ __device__ inline T cs_clip(T z, T lo, T hi) { return cs_min(cs_max(z, lo), hi); }""",
        },
        needs={"torch": ("_tensors",), "c": ("cs_min", "cs_max")},
        simd="inline cs_v16 cs_clip(cs_v16 z, cs_v16 lo, cs_v16 hi) { return cs_v16_min(cs_v16_max(z, lo), hi); }",
    ),
    OpSpec(
        "@",
        None,
        2,
        2,
        ("matrix", "vector"),
        "projection",
        True,
        # infix, over a batch of rows: operand @ matrix.T; in C the GEMMs are the host's BLAS
        # calls (the kernels are pointwise), so there is no C spelling
        {"numpy": "@", "torch": "@"},
    ),
    # ------------------------------------------------ derivative-only masks (no language name)
    _derivative_mask(
        fn.Positive,
        {"numpy": "_positive", "torch": "_positive", "c": "cs_positive"},
        helper={
            "numpy": '''def _positive(z):
    """1 where z > 0 (relu', 0 at 0 as in PyTorch)."""
    return _mask(z > 0, z)''',
            "torch": '''def _positive(z):
    """1 where z > 0 (relu', 0 at 0 as in PyTorch)."""
    return (z > 0).to(z.dtype)''',
            "c": """// derivative masks: 1 or 0 (or 1/2 for ties) in the math type
template <typename T> __host__ __device__ inline T cs_positive(T z) { return z > T(0) ? T(1) : T(0); }""",
        },
        simd="inline cs_v16 cs_positive(cs_v16 z) { return cs_v16_ones(_mm512_cmp_ps_mask(z.v, _mm512_setzero_ps(), _CMP_GT_OQ)); }",
        needs={"numpy": ("_mask",)},
    ),
    _derivative_mask(
        fn.Sign,
        {"numpy": "np.sign", "torch": "torch.sign", "c": "cs_sign"},
        helper={
            "c": "template <typename T> __host__ __device__ inline T cs_sign(T z) { return z > T(0) ? T(1) : (z < T(0) ? T(-1) : z); }",
        },
        simd="""inline cs_v16 cs_sign(cs_v16 z) {
    const __m512 r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z.v, _mm512_setzero_ps(), _CMP_LT_OQ), z.v, _mm512_set1_ps(-1.0f));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z.v, _mm512_setzero_ps(), _CMP_GT_OQ), r, _mm512_set1_ps(1.0f));
}""",
    ),
    _derivative_mask(
        fn.InsideOpen3,
        {"numpy": "_inside_open3", "torch": "_inside_open3", "c": "cs_inside_open3"},
        helper={
            "numpy": '''def _inside_open3(z):
    """1 where -3 < z < 3 (hard_sigmoid', open interval as in PyTorch)."""
    return _mask((z > -3) & (z < 3), z)''',
            "torch": '''def _inside_open3(z):
    """1 where -3 < z < 3 (hardsigmoid', open interval as in PyTorch)."""
    return ((z > -3) & (z < 3)).to(z.dtype)''',
            "c": "template <typename T> __host__ __device__ inline T cs_inside_open3(T z) { return (z > T(-3) && z < T(3)) ? T(1) : T(0); }",
        },
        simd="""inline cs_v16 cs_inside_open3(cs_v16 z) {
    return cs_v16_ones(_mm512_cmp_ps_mask(z.v, _mm512_set1_ps(-3.0f), _CMP_GT_OQ) & _mm512_cmp_ps_mask(z.v, _mm512_set1_ps(3.0f), _CMP_LT_OQ));
}""",
        needs={"numpy": ("_mask",)},
    ),
    _derivative_mask(
        fn.LessTie,
        {"numpy": "_less_tie", "torch": "_less_tie", "c": "cs_less_tie"},
        helper={
            "numpy": '''def _less_tie(a, b):
    """1 where a < b, 1/2 where a == b: min/max split ties as torch.minimum/maximum do."""
    return _mask(a < b, a, b) + 0.5 * _mask(a == b, a, b)''',
            "torch": '''def _less_tie(a, b):
    """1 where a < b, 1/2 where a == b: min/max split ties as torch.minimum/maximum do."""
    a, b = _tensors(a, b)
    return (a < b).to(a.dtype) + 0.5 * (a == b).to(a.dtype)''',
            "c": "template <typename T> __host__ __device__ inline T cs_less_tie(T a, T b) { return a < b ? T(1) : (a == b ? T(0.5) : T(0)); }",
        },
        simd="""inline cs_v16 cs_less_tie(cs_v16 a, cs_v16 b) {
    const __m512 tie = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ), _mm512_set1_ps(0.5f));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ), tie, _mm512_set1_ps(1.0f));
}""",
        needs={"numpy": ("_mask",), "torch": ("_tensors",)},
    ),
    _derivative_mask(
        fn.ClipPass,
        {"numpy": "_clip_pass", "torch": "_clip_pass", "c": "cs_clip_pass"},
        helper={
            "numpy": '''def _clip_pass(z, lo, hi):
    """d clip / dz: 1 where lo <= z <= hi."""
    return _mask((z >= lo) & (z <= hi), z, lo, hi)''',
            "torch": '''def _clip_pass(z, lo, hi):
    """d clip / dz: 1 where lo <= z <= hi."""
    z, lo, hi = _tensors(z, lo, hi)
    return ((z >= lo) & (z <= hi)).to(z.dtype)''',
            "c": "template <typename T> __host__ __device__ inline T cs_clip_pass(T z, T lo, T hi) { return (z >= lo && z <= hi) ? T(1) : T(0); }",
        },
        simd="""inline cs_v16 cs_clip_pass(cs_v16 z, cs_v16 lo, cs_v16 hi) {
    return cs_v16_ones(_mm512_cmp_ps_mask(z.v, lo.v, _CMP_GE_OQ) & _mm512_cmp_ps_mask(z.v, hi.v, _CMP_LE_OQ));
}""",
        needs={"numpy": ("_mask",), "torch": ("_tensors",)},
    ),
    _derivative_mask(
        fn.ClipLow,
        {"numpy": "_clip_low", "torch": "_clip_low", "c": "cs_clip_low"},
        helper={
            "numpy": '''def _clip_low(z, lo, hi):
    """d clip / dlo as torch.clamp: 1 where z < lo < hi."""
    return _mask((z < lo) & (lo < hi), z, lo, hi)''',
            "torch": '''def _clip_low(z, lo, hi):
    """d clip / dlo as torch.clamp: 1 where z < lo < hi."""
    z, lo, hi = _tensors(z, lo, hi)
    return ((z < lo) & (lo < hi)).to(z.dtype)''',
            "c": "template <typename T> __host__ __device__ inline T cs_clip_low(T z, T lo, T hi) { return (z < lo && lo < hi) ? T(1) : T(0); }",
        },
        simd="""inline cs_v16 cs_clip_low(cs_v16 z, cs_v16 lo, cs_v16 hi) {
    return cs_v16_ones(_mm512_cmp_ps_mask(z.v, lo.v, _CMP_LT_OQ) & _mm512_cmp_ps_mask(lo.v, hi.v, _CMP_LT_OQ));
}""",
        needs={"numpy": ("_mask",), "torch": ("_tensors",)},
    ),
    _derivative_mask(
        fn.ClipHigh,
        {"numpy": "_clip_high", "torch": "_clip_high", "c": "cs_clip_high"},
        helper={
            "numpy": '''def _clip_high(z, lo, hi):
    """d clip / dhi as torch.clamp: 1 where z > hi or lo > hi."""
    return _mask((z > hi) | (lo > hi), z, lo, hi)''',
            "torch": '''def _clip_high(z, lo, hi):
    """d clip / dhi as torch.clamp: 1 where z > hi or lo > hi."""
    z, lo, hi = _tensors(z, lo, hi)
    return ((z > hi) | (lo > hi)).to(z.dtype)''',
            "c": "template <typename T> __host__ __device__ inline T cs_clip_high(T z, T lo, T hi) { return (z > hi || lo > hi) ? T(1) : T(0); }",
        },
        simd="""inline cs_v16 cs_clip_high(cs_v16 z, cs_v16 lo, cs_v16 hi) {
    return cs_v16_ones(_mm512_cmp_ps_mask(z.v, hi.v, _CMP_GT_OQ) | _mm512_cmp_ps_mask(lo.v, hi.v, _CMP_GT_OQ));
}""",
        needs={"numpy": ("_mask",), "torch": ("_tensors",)},
    ),
    # ---- row reductions: one number per row. The language's sum/mean/layer_norm lower to
    # RowSum arithmetic (model/lower.py), so they have no SymPy class of their own; RowSum is
    # printed by the Python printers and laid out as a reduction loop by the native renderer.
    OpSpec("sum", None, 1, MAX_REDUCED, ("vector",) * MAX_REDUCED, "row_reduction", False, {}),
    OpSpec("mean", None, 1, MAX_REDUCED, ("vector",) * MAX_REDUCED, "row_reduction", False, {}),
    OpSpec("layer_norm", None, 1, 2, ("vector", "number"), "row_reduction", False, {}),
    # ---- randomness during training: each call becomes a mask of its own (a per-step input of
    # the engine that the layer draws, with no gradient) and elementwise math with it:
    # dropout(v, p) -> v * m, zoneout(new, old, p) -> m * old + (1 - m) * new (model/lower.py)
    OpSpec("dropout", None, 2, 2, ("vector", "rate"), "random", False, {}),
    OpSpec("variational_dropout", None, 2, 2, ("vector", "rate"), "random", False, {}),
    OpSpec("zoneout", None, 3, 3, ("vector", "vector", "rate"), "random", False, {}),
    OpSpec(
        None,
        fn.RowSum,
        1,
        1,
        ("vector",),
        "row_reduction",
        False,
        {"numpy": "_rowsum", "torch": "_rowsum"},
        helper={
            "numpy": '''def _rowsum(v):
    """Sum over the units (last axis), one number per row: [..., 1]."""
    return np.sum(v, axis=-1, keepdims=True)''',
            "torch": '''def _rowsum(v):
    """Sum over the units (last axis), one number per row: [..., 1]."""
    return torch.sum(v, -1, keepdim=True)''',
        },
    ),
)


# ------------------------------------------------------------------------------ look-ups
def _check(table: tuple[OpSpec, ...]) -> None:
    """Loud errors for a table that would print wrong code: duplicate names or classes, an arity
    the SymPy class does not take, a helper need that nothing defines, an elementwise op without
    a SymPy class or a spelling."""
    names = [o.name for o in table if o.name is not None]
    classes = [o.cls for o in table if o.cls is not None]
    if len(set(names)) != len(names) or len(set(classes)) != len(classes):
        raise ValueError("op table: an op name or SymPy class appears twice")
    for o in table:
        if o.cls is not None and not all(
            n in o.cls.nargs for n in range(o.min_args, o.max_args + 1)
        ):
            raise ValueError(
                f"op {o.title}: arity {o.min_args}..{o.max_args} but {o.cls.__name__} takes {o.cls.nargs}"
            )
        if o.shape_rule == "elementwise":
            if o.cls is None:
                raise ValueError(f"op {o.title}: an elementwise op needs its SymPy class")
            missing = [t for t in TARGETS if not o.spell.get(t)]
            if missing:
                raise ValueError(f"op {o.title}: no spelling for {', '.join(missing)}")
        for target, needs in o.needs.items():
            defined = set(SUPPORT.get(target, {})) | {
                p.spell[target] for p in table if target in p.helper
            }
            if not set(needs) <= defined:
                raise ValueError(
                    f"op {o.title}: {target} helper needs undefined {set(needs) - defined}"
                )


_check(OPS)


def by_name(name: str) -> OpSpec:
    """The entry of a language name (``"sigmoid"``, ``"@"``); KeyError if there is none."""
    for o in OPS:
        if o.name == name:
            return o
    raise KeyError(f"no op named {name!r}")


def of(cls_or_expr) -> OpSpec:
    """The entry of a SymPy function class or of an application of one; KeyError (a loud
    error, never a guess) for a function the table does not know."""
    cls = cls_or_expr if isinstance(cls_or_expr, type) else type(cls_or_expr)
    for o in OPS:
        if o.cls is cls:
            return o
    raise KeyError(f"no op entry for {cls.__name__}")


def language_functions() -> dict[str, tuple[int, int]]:
    """Function names callable in a .cell file -> (min, max) number of arguments."""
    return {
        o.name: (o.min_args, o.max_args)
        for o in OPS
        if o.name is not None and o.name.isidentifier()
    }


def used_ops(exprs: Iterable[sp.Expr]) -> list[OpSpec]:
    """The ops applied anywhere in these SymPy expressions, in table order. Every function
    application must have an entry (KeyError otherwise, also for SymPy's own functions such as
    ``Abs``: no printer spells them the way the table does)."""
    found: set[type] = set()
    for e in exprs:
        for a in sp.sympify(e).atoms(sp.Function):
            found.add(of(a).cls)  # of() raises for a function with no entry
    return [o for o in OPS if o.cls in found]


def _sources(target: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Helper name -> (source, helpers it calls) for one target: op helpers, then support."""
    out = {
        o.spell[target]: (o.helper[target], o.needs.get(target, ()))
        for o in OPS
        if target in o.helper
    }
    for name, source in SUPPORT.get(target, {}).items():
        out.setdefault(name, (source, ()))
    return out


def _closure(target: str, roots: Iterable[str]) -> list[str]:
    """Helper sources for roots and what they call, each after the helpers it calls."""
    sources = _sources(target)
    done: list[str] = []

    def add(name: str) -> None:
        if name in done:
            return
        needs = sources[name][1]
        for n in needs:
            add(n)
        done.append(name)

    for r in roots:
        add(r)
    return [sources[n][0] for n in done]


def helpers(target: str, exprs: Iterable[sp.Expr]) -> list[str]:
    """Helper sources that code printing these SymPy expressions for target ('numpy', 'torch'
    or 'c') needs, each after those it calls; in table order otherwise."""
    if target not in TARGETS:
        raise KeyError(f"unknown target {target!r}")
    exprs = [sp.sympify(e) for e in exprs]
    roots = [o.spell[target] for o in used_ops(exprs) if target in o.helper]
    if any(e.atoms(sp.Pow) for e in exprs):
        roots += list(POWER_NEEDS[target])
    return _closure(target, roots)


def c_prelude() -> str:
    """Every C helper (each after those it calls), for the ``.cu`` prelude; then, for the AVX-512
    host build (``CS_V16``), the ops' overloads on 16 floats."""
    roots = [o.spell["c"] for o in OPS if "c" in o.helper] + list(SUPPORT["c"])
    simd = [o.simd for o in OPS if o.simd is not None]
    return "\n".join(_closure("c", roots) + ["#ifdef CS_V16"] + simd + ["#endif  // CS_V16"])


def vector_pays(exprs: Iterable[sp.Expr]) -> bool:
    """Whether an element function of these expressions runs faster on ``cs_v16`` than in the
    ``omp simd`` loop: it can (:func:`simd_ok`), and it calls an op whose scalar C calls libm
    (libmvec there: a call per vector, every live vector spilled around it). Without such a call
    the ``omp simd`` loop has no call either (IndRNN's relu: 1.00-1.05 of it on cs_v16)."""
    exprs = [sp.sympify(e) for e in exprs]
    return simd_ok(exprs) and any(o.libm for o in used_ops(exprs))


def simd_ok(exprs: Iterable[sp.Expr]) -> bool:
    """Whether C code printing these expressions runs on ``cs_v16``: only symbols, numbers, sums,
    products, integer powers the printer writes as products (|n| <= 4) and ops with a ``simd``
    overload."""
    for e in exprs:
        for node in sp.preorder_traversal(sp.sympify(e)):
            if isinstance(node, sp.Function):
                if of(node).simd is None:
                    return False
            elif isinstance(node, sp.Pow):
                if not (node.exp.is_Integer and 1 <= abs(int(node.exp)) <= 4):
                    return False
            elif not isinstance(node, (sp.Symbol, sp.Number, sp.Add, sp.Mul)):
                return False
    return True


@contextlib.contextmanager
def extended(*entries: OpSpec) -> Iterator[tuple[OpSpec, ...]]:
    """Within the block, :data:`OPS` is the table followed by entries (tests of a new op use
    this to compile specs with it before it is added to the literal table)."""
    global OPS
    old = OPS
    table = old + tuple(entries)
    _check(table)
    OPS = table
    try:
        yield table
    finally:
        OPS = old
