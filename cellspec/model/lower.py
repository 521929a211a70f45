"""Lowering: checked cell → cell model of projections and pointwise SymPy values.

Input: :class:`~cellspec.frontend.semantics.CheckedCell`. Output: :class:`CellModel`.

Every ``A @ v`` becomes a :class:`Projection` whose result is a fresh per-element symbol; every
vector name becomes a per-element SymPy symbol, so the rest of each line is scalar SymPy. A
projection whose operand is a compound expression gets a synthetic :class:`Value` for the
operand (``U_c_in = r*h``). Identical projections (same matrix, same operand) are shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from cellspec.errors import SpecError
from cellspec.frontend import ast
from cellspec.frontend.semantics import CheckedCell
from cellspec.model import ops


@dataclass(frozen=True)
class Leaf:
    """A per-step quantity the step reads but does not compute: an input, a previous state,
    or a vector param."""

    key: str
    size: str
    kind: str  # "input" | "state" | "param"


@dataclass
class Value:
    """A vector computed by the step. ``spec_key`` is the name in the spec (``h'``), or ''
    for a synthetic projection operand."""

    key: str
    spec_key: str
    size: str
    expr: sp.Expr
    line: int
    text: str
    stage: int = 0  # set by the scheduler; -1 = hoisted (whole sequence, before the loop)


@dataclass
class Projection:
    """``matrix @ operand``: a GEMM over the batch; ``key`` names its result."""

    key: str
    matrix: str
    operand: str  # key of a Leaf or a Value
    out_size: str
    in_size: str
    line: int
    stage: int = 0  # set by the scheduler; -1 = hoisted


@dataclass
class CellModel:
    cell: CheckedCell
    leaves: dict[str, Leaf]
    values: list[Value]
    projections: list[Projection]
    next_state: dict[str, str]  # state name -> value key of its next value
    outputs: list[str]  # value keys
    symbols: dict[str, sp.Symbol] = field(default_factory=dict)

    def symbol(self, key: str) -> sp.Symbol:
        return self.symbols[key]

    def value(self, key: str) -> Value:
        return next(v for v in self.values if v.key == key)

    def size_of(self, key: str) -> str:
        if key in self.leaves:
            return self.leaves[key].size
        for v in self.values:
            if v.key == key:
                return v.size
        for p in self.projections:
            if p.key == key:
                return p.out_size
        raise KeyError(key)


class Namer:
    """Hands out names that clash with nothing already taken (appending _2, _3, ...)."""

    def __init__(self, taken: set[str]):
        self.taken = set(taken)

    def fresh(self, preferred: str) -> str:
        name = preferred
        n = 2
        while name in self.taken:
            name = f"{preferred}_{n}"
            n += 1
        self.taken.add(name)
        return name


class _Lowerer:
    def __init__(self, cell: CheckedCell):
        self.cell = cell
        taken = {v.name for v in cell.inputs} | {v.name for v in cell.states} | {p.name for p in cell.params}
        taken |= {a.key for a in cell.assignments if not a.key.endswith("'")}
        self.namer = Namer(taken)
        self.symbols: dict[str, sp.Symbol] = {}
        self.leaves: dict[str, Leaf] = {}
        self.values: list[Value] = []
        self.projections: list[Projection] = []
        self.key_of_spec: dict[str, str] = {}  # spec key (h') -> model key (h_next)
        self.current: tuple[int, str] = (0, "")
        self.constants: dict[str, sp.Expr] = {}  # value key -> its number, for values that fold
        for v in cell.inputs:
            self.leaf(v.name, v.size, "input")
        for v in cell.states:
            self.leaf(v.name, v.size, "state")
        for p in cell.params:
            if not p.is_matrix:
                self.leaf(p.name, p.shape[0], "param")
        for a in cell.assignments:
            if a.key.endswith("'"):
                self.key_of_spec[a.key] = self.namer.fresh(a.key[:-1] + "_next")
            else:
                self.key_of_spec[a.key] = a.key

    def leaf(self, key: str, size: str, kind: str) -> None:
        self.leaves[key] = Leaf(key, size, kind)
        self.symbols[key] = sp.Symbol(key, real=True)

    def sym(self, key: str) -> sp.Symbol:
        if key not in self.symbols:
            self.symbols[key] = sp.Symbol(key, real=True)
        return self.symbols[key]

    def run(self) -> CellModel:
        for a in self.cell.assignments:
            self.current = (a.line, a.text)
            expr = self.lower(a.expr)
            key = self.key_of_spec[a.key]
            if expr.is_Number:  # a = h - h: readers see the number, not a name bound to a scalar
                self.constants[key] = expr
            self.values.append(Value(key, a.key, a.size, expr, a.line, a.text))
            self.sym(key)
        next_state = {s.name: self.key_of_spec[s.name + "'"] for s in self.cell.states}
        outputs = [self.key_of_spec[k] for k in self.cell.outputs]
        return CellModel(self.cell, self.leaves, self.values, self.projections, next_state, outputs, self.symbols)

    def lower(self, e: ast.Expr) -> sp.Expr:
        if isinstance(e, ast.Number):
            if e.value.is_integer() and abs(e.value) < 2**31 and all(ch.isdigit() for ch in e.text):
                return sp.Integer(int(e.value))
            return sp.Float(e.value)
        if isinstance(e, ast.Name):
            key = self.key_of_spec[e.key] if e.primed else e.name
            return self.constants[key] if key in self.constants else self.sym(key)
        if isinstance(e, ast.Neg):
            return -self.lower(e.operand)
        if isinstance(e, ast.Pow):
            base = self.lower(e.base)
            exp = sp.Integer(int(e.exponent)) if e.exponent.is_integer() else sp.Float(e.exponent)
            # SymPy rewrites (h*h)^0.5 with its own Abs (Abs(h)**1.0), which no op entry spells
            # and whose derivative is SymPy's sign: use the language's abs, which has both
            return (base**exp).replace(sp.Abs, ops.by_name("abs").cls)
        if isinstance(e, ast.BinOp):
            a, b = self.lower(e.left), self.lower(e.right)
            return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b}[e.op]()
        if isinstance(e, ast.Call):
            return ops.by_name(e.func).cls(*(self.lower(x) for x in e.args))
        if isinstance(e, ast.MatMul):
            return self.projection(e)
        raise TypeError(e)  # pragma: no cover

    def projection(self, e: ast.MatMul) -> sp.Symbol:
        matrix = e.matrix.name
        param = self.cell.param(matrix)
        operand_expr = self.lower(e.operand)
        if operand_expr.is_Number:
            raise SpecError(
                f"the operand of '@' simplifies to the constant {operand_expr}; "
                f"write the constant's projection another way (e.g. as a param vector)",
                e.span,
            )
        # an input, a state or a computed value is the operand itself; a vector param (the same
        # for every row) gets a synthetic operand value like a compound expression, so that it
        # is broadcast over the rows (and its gradient summed back) as any hoisted value is
        is_vector_param = operand_expr.is_Symbol and self.leaves.get(operand_expr.name, None) is not None and (
            self.leaves[operand_expr.name].kind == "param"
        )
        # a projection result (W @ (U @ h)) also gets a synthetic operand value (W_in = U_h): a
        # projection's adjoint comes from the values that read it, and now one does
        is_projection = operand_expr.is_Symbol and any(p.key == operand_expr.name for p in self.projections)
        if isinstance(operand_expr, sp.Symbol) and not is_vector_param and not is_projection:
            operand = operand_expr.name
        else:
            existing = next(
                (v for v in self.values if v.spec_key == "" and v.expr == operand_expr), None
            )
            if existing is None:
                key = self.namer.fresh(f"{matrix}_in")
                existing = Value(key, "", param.shape[1], operand_expr, *self.current)
                self.values.append(existing)
                self.sym(key)
            operand = existing.key
        for p in self.projections:
            if p.matrix == matrix and p.operand == operand:
                return self.symbols[p.key]
        synthetic = any(v.key == operand and v.spec_key == "" for v in self.values)
        preferred = f"{matrix}_out" if synthetic else f"{matrix}_{operand}"
        key = self.namer.fresh(preferred)
        self.projections.append(
            Projection(key, matrix, operand, param.shape[0], param.shape[1], self.current[0])
        )
        return self.sym(key)


def lower(cell: CheckedCell) -> CellModel:
    """Lower a checked cell to projections and SymPy values (see module docstring)."""
    return _Lowerer(cell).run()
