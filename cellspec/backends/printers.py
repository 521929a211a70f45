"""SymPy printers for the pointwise math: NumPy, PyTorch and C++/CUDA.

Each is a subclass of a SymPy code printer with one ``_print_<Function>`` method per cell
function. Symbols print through a name map (spec names, mangled per language). Small integer
powers are expanded (``x*x``), floats print as the shortest round-trip literal, and the C
printer writes float32 through its type alias and literal suffix, never by string replacement.
"""

from __future__ import annotations

from typing import ClassVar

import sympy as sp
from sympy.printing.c import C99CodePrinter
from sympy.printing.pycode import PythonCodePrinter

from cellspec.model import functions as fn


def _expanded_power(printer, expr: sp.Pow, one: str, sqrt: str) -> str | None:
    base, exp = expr.args
    b = printer._print(base)
    if not (base.is_Symbol or isinstance(base, fn.CellFunction)):
        b = f"({b})"
    if exp.is_Integer:
        n = int(exp)
        if 1 <= n <= 4:
            return "*".join([b] * n) if n == 1 else "(" + "*".join([b] * n) + ")"
        if -4 <= n <= -1:
            m = -n
            denom = b if m == 1 else "(" + "*".join([b] * m) + ")"
            return f"({one}/{denom})"
    if exp == sp.Rational(1, 2) or (exp.is_Float and float(exp) == 0.5):
        return f"{sqrt}({printer._print(base)})"
    if exp == -sp.Rational(1, 2) or (exp.is_Float and float(exp) == -0.5):
        return f"({one}/{sqrt}({printer._print(base)}))"
    return None


class _PythonArrayPrinter(PythonCodePrinter):
    """Shared by NumPy and PyTorch: array expressions in Python syntax."""

    lib = ""
    calls: ClassVar[dict[type, str]] = {}

    def __init__(self, names: dict[str, str]):
        super().__init__({"fully_qualified_modules": False, "standard": "python3"})
        self.names = names

    def _print_Symbol(self, expr):
        return self.names.get(expr.name, expr.name)

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Integer(self, expr):
        return str(int(expr))

    def _print_Rational(self, expr):
        return f"{expr.p}/{expr.q}"

    def _print(self, expr, **kwargs):
        if isinstance(expr, fn.CellFunction):  # before SymPy's own _print_Abs, _print_Min, ...
            return self._print_Function(expr)
        return super()._print(expr, **kwargs)

    def _print_Pow(self, expr, rational=False):
        s = _expanded_power(self, expr, "1", self.sqrt_name)
        if s is not None:
            return s
        base, exp = expr.args
        b = self._print(base)
        if not (base.is_Symbol or isinstance(base, fn.CellFunction)):
            b = f"({b})"
        return f"{b}**{self._print_Float(sp.Float(exp)) if not exp.is_Integer else int(exp)}"

    def _print_Function(self, expr):
        name = self.calls.get(type(expr))
        if name is None:
            raise NotImplementedError(f"{type(self).__name__} has no rule for {type(expr).__name__}")
        return f"{name}({', '.join(self._print(a) for a in expr.args)})"


class NumPyPrinter(_PythonArrayPrinter):
    sqrt_name = "np.sqrt"
    calls: ClassVar[dict[type, str]] = {
        fn.Sigmoid: "_sigmoid",
        fn.Tanh: "np.tanh",
        fn.Exp: "_exp",
        fn.Log: "np.log",
        fn.Sqrt: "np.sqrt",
        fn.Relu: "_relu",
        fn.Abs: "np.abs",
        fn.Softplus: "_softplus",
        fn.Softsign: "_softsign",
        fn.HardSigmoid: "_hard_sigmoid",
        fn.Min: "np.minimum",
        fn.Max: "np.maximum",
        fn.Clip: "_clip",
        fn.Positive: "_positive",
        fn.Sign: "np.sign",
        fn.InsideOpen3: "_inside_open3",
        fn.LessTie: "_less_tie",
        fn.ClipPass: "_clip_pass",
        fn.ClipLow: "_clip_low",
        fn.ClipHigh: "_clip_high",
    }


class TorchPrinter(_PythonArrayPrinter):
    sqrt_name = "torch.sqrt"
    calls: ClassVar[dict[type, str]] = {
        fn.Sigmoid: "torch.sigmoid",
        fn.Tanh: "torch.tanh",
        fn.Exp: "torch.exp",
        fn.Log: "torch.log",
        fn.Sqrt: "torch.sqrt",
        fn.Relu: "torch.relu",
        fn.Abs: "torch.abs",
        fn.Softplus: "F.softplus",
        fn.Softsign: "F.softsign",
        fn.HardSigmoid: "_hard_sigmoid",
        fn.Min: "_minimum",
        fn.Max: "_maximum",
        fn.Clip: "_clip",
        fn.Positive: "_positive",
        fn.Sign: "torch.sign",
        fn.InsideOpen3: "_inside_open3",
        fn.LessTie: "_less_tie",
        fn.ClipPass: "_clip_pass",
        fn.ClipLow: "_clip_low",
        fn.ClipHigh: "_clip_high",
    }


class CudaPrinter(C99CodePrinter):
    """C++ for ``__host__ __device__`` functions; ``real`` is the math type alias (float or
    double) and float literals carry its suffix through ``literal_suffix``."""

    calls: ClassVar[dict[type, str]] = {
        fn.Sigmoid: "cs_sigmoid",
        fn.Tanh: "cs_tanh",
        fn.Exp: "cs_exp",
        fn.Log: "cs_log",
        fn.Sqrt: "cs_sqrt",
        fn.Relu: "cs_relu",
        fn.Abs: "cs_abs",
        fn.Softplus: "cs_softplus",
        fn.Softsign: "cs_softsign",
        fn.HardSigmoid: "cs_hard_sigmoid",
        fn.Min: "cs_min",
        fn.Max: "cs_max",
        fn.Clip: "cs_clip",
        fn.Positive: "cs_positive",
        fn.Sign: "cs_sign",
        fn.InsideOpen3: "cs_inside_open3",
        fn.LessTie: "cs_less_tie",
        fn.ClipPass: "cs_clip_pass",
        fn.ClipLow: "cs_clip_low",
        fn.ClipHigh: "cs_clip_high",
    }

    def __init__(self, names: dict[str, str], literal_suffix: str = ""):
        super().__init__()
        self.names = names
        self.literal_suffix = literal_suffix

    def _print_Symbol(self, expr):
        return self.names.get(expr.name, expr.name)

    def _literal(self, value: float) -> str:
        text = repr(float(value))
        if "e" not in text and "." not in text and "inf" not in text and "nan" not in text:
            text += ".0"
        return f"real({text}{self.literal_suffix})"

    def _print_Float(self, expr):
        return self._literal(float(expr))

    def _print_Integer(self, expr):
        return self._literal(float(int(expr)))

    def _print_Rational(self, expr):
        return f"{self._literal(expr.p)}/{self._literal(expr.q)}"

    def _print(self, expr, **kwargs):
        if isinstance(expr, fn.CellFunction):  # before SymPy's own _print_Abs, _print_Min, ...
            return self._print_Function(expr)
        return super()._print(expr, **kwargs)

    def _print_Pow(self, expr, rational=False):
        s = _expanded_power(self, expr, self._literal(1.0), "cs_sqrt")
        if s is not None:
            return s
        base, exp = expr.args
        return f"cs_pow({self._print(base)}, {self._literal(float(exp))})"

    def _print_Function(self, expr):
        name = self.calls.get(type(expr))
        if name is None:
            raise NotImplementedError(f"CudaPrinter has no rule for {type(expr).__name__}")
        return f"{name}({', '.join(self._print(a) for a in expr.args)})"
