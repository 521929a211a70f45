"""The language's elementwise functions as SymPy functions, one derivative rule each.

Derivatives follow PyTorch's conventions at kinks (relu'(0) = 0, abs'(0) = 0, clip passes the
gradient on its closed interval, hard_sigmoid on its open one, min/max split ties in half), and
are written in terms of the function's own value where that is cheaper (sigmoid' = s(1 - s),
tanh' = 1 - y²), so that the backward can read a saved output instead of recomputing.

Helper functions that exist only in derivatives (masks such as ``Positive``) are also here. A
function with no derivative rule raises loudly instead of letting SymPy guess. Everything else
about a function (its language name and arity, its spelling per target, its helpers) is its
entry in the op table, :mod:`cellspec.model.ops`.
"""

from __future__ import annotations

import math

import sympy as sp


class CellFunction(sp.Function):
    """Base class: never auto-evaluates, and refuses to differentiate without a rule."""

    def fdiff(self, argindex=1):  # pragma: no cover - each subclass defines its rule
        raise NotImplementedError(f"no derivative rule for {type(self).__name__} (argument {argindex})")

    #: the function on Python floats, for constant arguments (None: stay symbolic)
    value = None

    @classmethod
    def eval(cls, *args):
        """A constant argument (``softsign(h - h)`` is ``softsign(0)``) folds to a number, so that
        no back end ever applies an array function to a plain number."""
        if cls.value is None or not all(a.is_Number and a.is_finite for a in args):
            return None
        try:
            v = cls.value(*(float(a) for a in args))
        except (OverflowError, ValueError, ZeroDivisionError):
            return None
        return sp.Float(v) if math.isfinite(v) else None


class Sigmoid(CellFunction):
    value = staticmethod(lambda x: 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x)))
    nargs = 1

    def fdiff(self, argindex=1):
        return self * (1 - self)


class Tanh(CellFunction):
    value = staticmethod(math.tanh)
    nargs = 1

    def fdiff(self, argindex=1):
        return 1 - self**2


class Exp(CellFunction):
    value = staticmethod(math.exp)
    nargs = 1

    def fdiff(self, argindex=1):
        return self


class Log(CellFunction):
    value = staticmethod(math.log)
    nargs = 1

    def fdiff(self, argindex=1):
        return 1 / self.args[0]


class Sqrt(CellFunction):
    value = staticmethod(math.sqrt)
    nargs = 1

    def fdiff(self, argindex=1):
        return 1 / (2 * self)


class Relu(CellFunction):
    value = staticmethod(lambda x: max(x, 0.0))
    nargs = 1

    def fdiff(self, argindex=1):
        return Positive(self.args[0])


class Abs(CellFunction):
    value = staticmethod(abs)
    nargs = 1

    def fdiff(self, argindex=1):
        return Sign(self.args[0])


class Softplus(CellFunction):
    """log(1 + exp(x)), evaluated in the stable form max(x, 0) + log1p(exp(-|x|))."""

    value = staticmethod(lambda x: max(x, 0.0) + math.log1p(math.exp(-abs(x))))
    nargs = 1

    def fdiff(self, argindex=1):
        return Sigmoid(self.args[0])


class Softsign(CellFunction):
    """x / (1 + |x|)."""

    value = staticmethod(lambda x: x / (1 + abs(x)))
    nargs = 1

    def fdiff(self, argindex=1):
        return 1 / (1 + Abs(self.args[0])) ** 2


class HardSigmoid(CellFunction):
    """clip(x / 6 + 1/2, 0, 1), PyTorch's hardsigmoid."""

    value = staticmethod(lambda x: min(max(x / 6 + 0.5, 0.0), 1.0))
    nargs = 1

    def fdiff(self, argindex=1):
        return InsideOpen3(self.args[0]) / 6


class Min(CellFunction):
    value = staticmethod(min)
    nargs = 2

    def fdiff(self, argindex=1):
        a, b = self.args
        return LessTie(a, b) if argindex == 1 else LessTie(b, a)


class Max(CellFunction):
    value = staticmethod(max)
    nargs = 2

    def fdiff(self, argindex=1):
        a, b = self.args
        return LessTie(b, a) if argindex == 1 else LessTie(a, b)


class Clip(CellFunction):
    """min(max(x, lo), hi) with torch.clamp's gradients (hi wins when lo > hi)."""

    value = staticmethod(lambda x, lo, hi: min(max(x, lo), hi))
    nargs = 3

    def fdiff(self, argindex=1):
        x, lo, hi = self.args
        if argindex == 1:
            return ClipPass(x, lo, hi)
        if argindex == 2:
            return ClipLow(x, lo, hi)
        return ClipHigh(x, lo, hi)


# ------------------------------------------------------------- derivative-only helpers (masks)
class Mask(CellFunction):
    """A 0/1 (or 0/0.5/1) valued function; its own derivative is zero almost everywhere."""

    def fdiff(self, argindex=1):
        return sp.S.Zero


class Positive(Mask):
    """1 where x > 0, else 0 (relu' with relu'(0) = 0)."""

    nargs = 1
    value = staticmethod(lambda x: float(x > 0))


class Sign(Mask):
    """-1, 0 or 1 (abs' with abs'(0) = 0)."""

    nargs = 1
    value = staticmethod(lambda x: float((x > 0) - (x < 0)))


class InsideOpen3(Mask):
    """1 where -3 < x < 3 (hardsigmoid')."""

    nargs = 1
    value = staticmethod(lambda x: float(-3 < x < 3))


class LessTie(Mask):
    """1 where a < b, 1/2 where a == b, 0 elsewhere (torch.minimum/maximum split ties)."""

    nargs = 2
    value = staticmethod(lambda a, b: 1.0 if a < b else 0.5 if a == b else 0.0)


class ClipPass(Mask):
    """1 where lo <= x <= hi."""

    nargs = 3
    value = staticmethod(lambda x, lo, hi: float(lo <= x <= hi))


class ClipLow(Mask):
    """1 where x < lo and lo < hi (torch.clamp's gradient to its lower bound)."""

    nargs = 3
    value = staticmethod(lambda x, lo, hi: float(x < lo < hi))


class ClipHigh(Mask):
    """1 where x > hi or lo > hi (torch.clamp's gradient to its upper bound)."""

    nargs = 3
    value = staticmethod(lambda x, lo, hi: float(x > hi or lo > hi))


class RowSum(CellFunction):
    """The sum of a vector expression over its units: one number per row (a *row scalar*).

    Lowering makes every ``sum``/``mean`` (and the statistics of ``layer_norm``) a value whose
    expression is a sum of ``RowSum`` terms. Its argument is per unit, so the derivative of the
    row value with respect to one unit of a vector the argument reads is the argument's own
    derivative (``fdiff`` is 1, and the chain rule supplies the rest); with respect to a row
    scalar the argument reads it is summed over the units (:mod:`cellspec.model.gradients`)."""

    nargs = 1

    def fdiff(self, argindex=1):
        return sp.S.One
