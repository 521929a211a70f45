"""SymPy printers for the pointwise math: NumPy, PyTorch and C++/CUDA.

Each is a subclass of a SymPy code printer; the three differ only by their target name, under
which every cell function's spelling is looked up in the op table (:mod:`cellspec.model.ops`). Symbols print through a name map (spec names, mangled per language). Small integer
powers are expanded (``x*x``), floats print as the shortest round-trip literal, and the C
printer writes float32 through its type alias and literal suffix, never by string replacement.
"""

from __future__ import annotations

import sympy as sp
from sympy.printing.c import C99CodePrinter
from sympy.printing.pycode import PythonCodePrinter

from cellspec.model import functions as fn
from cellspec.model import ops


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


def _call(printer, expr) -> str:
    """A function application spelled as the op table says for the printer's target; a loud
    error for a function with no entry (SymPy's own ``Abs``, ``sign``, ...) or no spelling for
    the target."""
    try:
        name = ops.of(expr).spell[printer.target]
    except KeyError:
        raise NotImplementedError(
            f"{type(printer).__name__} has no rule for {type(expr).__name__} (no op table entry "
            f"or no {printer.target!r} spelling)"
        ) from None
    return f"{name}({', '.join(printer._print(a) for a in expr.args)})"


class _PythonArrayPrinter(PythonCodePrinter):
    """Shared by NumPy and PyTorch: array expressions in Python syntax."""

    target = ""

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
        if isinstance(expr, sp.Function):  # before SymPy's own _print_Abs, _print_Min, ...
            return self._print_Function(expr)
        return super()._print(expr, **kwargs)

    def _print_Pow(self, expr, rational=False):
        s = _expanded_power(self, expr, "1", ops.of(fn.Sqrt).spell[self.target])
        if s is not None:
            return s
        base, exp = expr.args
        b = self._print(base)
        if not (base.is_Symbol or isinstance(base, fn.CellFunction)):
            b = f"({b})"
        return f"{b}**{self._print_Float(sp.Float(exp)) if not exp.is_Integer else int(exp)}"

    def _print_Function(self, expr):
        return _call(self, expr)


class NumPyPrinter(_PythonArrayPrinter):
    target = "numpy"


class TorchPrinter(_PythonArrayPrinter):
    target = "torch"


class CudaPrinter(C99CodePrinter):
    """C++ for ``__host__ __device__`` functions; ``real`` is the math type alias (float or
    double) and float literals carry its suffix through ``literal_suffix``."""

    target = "c"


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
        if isinstance(expr, sp.Function):  # before SymPy's own _print_Abs, _print_Min, ...
            return self._print_Function(expr)
        return super()._print(expr, **kwargs)

    def _print_Pow(self, expr, rational=False):
        s = _expanded_power(self, expr, self._literal(1.0), ops.of(fn.Sqrt).spell["c"])
        if s is not None:
            return s
        base, exp = expr.args
        return f"cs_pow({self._print(base)}, {self._literal(float(exp))})"

    def _print_Function(self, expr):
        return _call(self, expr)
