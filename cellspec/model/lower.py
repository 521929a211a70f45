"""Lowering: checked cell → cell model of projections and pointwise SymPy values.

Input: :class:`~cellspec.frontend.semantics.CheckedCell`. Output: :class:`CellModel`.

Every ``A @ v`` becomes a :class:`Projection` whose result is a fresh per-element symbol; every
vector name becomes a per-element SymPy symbol, so the rest of each line is scalar SymPy. A
projection whose operand is a compound expression gets a synthetic :class:`Value` for the
operand (``U_c_in = r*h``). Identical projections (same matrix, same operand) are shared.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import sympy as sp

from cellspec.errors import SpecError
from cellspec.frontend import ast
from cellspec.frontend.semantics import ROW, CheckedCell, Param, Vector
from cellspec.model import functions as fn
from cellspec.model import ops


@dataclass(frozen=True)
class Leaf:
    """A per-step quantity the step reads but does not compute: an input, a previous state,
    or a vector param."""

    key: str
    size: str
    kind: str  # "input" | "state" | "param" | "const" | "mask" (a random op's mask: no gradient)


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


@dataclass(frozen=True)
class Term:
    """One term of a prepared param: ``coef * source`` (``source.T`` when ``transpose``).
    ``coef`` is SymPy over const symbols; ``source`` is a spec param (a matrix, or a scalar
    param broadcast to a vector), or None: the identity (``eye``) of a matrix, ones of a vector."""

    coef: sp.Expr
    source: str | None
    transpose: bool = False


@dataclass(frozen=True)
class Prepared:
    """A param of the engine formed from spec params and consts once per call, before the time
    loop: a matrix expression left of ``@`` (``W - transpose(W) - gamma * eye``), or a scalar
    param or const broadcast to the vectors of one size (``dt`` read at size H is ``dt_H``).
    Its gradient goes back to the spec params of its terms (see :func:`gradient_terms`)."""

    key: str
    shape: tuple[str, ...]
    terms: tuple[Term, ...]
    text: str  # what the spec wrote, for comments and ``cellspec show``
    line: int


@dataclass(frozen=True)
class Mask:
    """One call of a random op: a per-step input ``key`` of the engine (``[T, B, size]``) that the
    generated layer draws once per call and the backward reads but never differentiates.

    ``dropout``: ``Bernoulli(1 - p) / (1 - p)`` in training, 1 in evaluation (the value reads
    ``v * key``); ``variational``: the same drawn once per sequence, ``[B, size]`` repeated at every
    step; ``zoneout``: ``Bernoulli(p)`` in training, ``p`` in evaluation (the value reads
    ``key * old + (1 - key) * new``). ``rate`` is a number or a const's name."""

    key: str
    size: str
    kind: str  # "dropout" | "variational" | "zoneout"
    rate: float | str
    line: int
    text: str


@dataclass
class CellModel:
    """The cell as the engine runs it. ``cell.params`` are the engine's params: the spec's vector
    and matrix params that the math reads directly, then the prepared ones; ``spec_cell`` is the
    cell as checked (its params are the trained ones, its consts the keyword arguments)."""

    cell: CheckedCell
    leaves: dict[str, Leaf]
    values: list[Value]
    projections: list[Projection]
    next_state: dict[str, str]  # state name -> value key of its next value
    outputs: list[str]  # value keys
    symbols: dict[str, sp.Symbol] = field(default_factory=dict)
    prepared: list[Prepared] = field(default_factory=list)
    spec_cell: CheckedCell | None = None
    masks: list[Mask] = field(default_factory=list)  # the engine's last inputs, in this order

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
        taken |= {c.name for c in cell.consts}
        self.namer = Namer(taken)
        self.prepared: list[Prepared] = []
        self.masks: list[Mask] = []
        #: consts and scalar params: placeholder symbols until the size they are read at is known
        self.scalars: dict[str, sp.Symbol] = {c.name: sp.Symbol(c.name, real=True) for c in cell.consts}
        self.scalars.update({p.name: sp.Symbol(p.name, real=True) for p in cell.params if p.is_scalar})
        self.const_symbols = {c.name: sp.Symbol(c.name, real=True) for c in cell.consts}
        self.direct: set[str] = set()  # spec params the math reads directly
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
            if len(p.shape) == 1:
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

    # ------------------------------------------------------------------ reductions
    def reduced(self, e: ast.Expr, func: str) -> tuple[sp.Expr, str]:
        """A reduction's argument, lowered at its own size (consts broadcast to it)."""
        lowered = self.lower(e)
        if lowered.is_Number:
            raise SpecError(f"the argument of {func}() simplifies to the constant {lowered}", e.span)
        size = self.size_of_expr(lowered)
        return self.broadcast(lowered, size), size

    def row_value(self, preferred: str, expr: sp.Expr) -> sp.Symbol:
        """A synthetic row scalar (a value of size ROW); identical ones are shared."""
        existing = next((v for v in self.values if v.spec_key == "" and v.size == ROW and v.expr == expr), None)
        if existing is None:
            existing = Value(self.namer.fresh(preferred), "", ROW, expr, *self.current)
            self.values.append(existing)
            self.sym(existing.key)
        return self.symbols[existing.key]

    def mean(self, args: list[tuple[sp.Expr, str]], preferred: str = "mean") -> sp.Symbol:
        """``mean(a, b, ...)``: the sum of every unit of every argument times 1/N, N the number
        of units (the factor is a prepared vector of each argument's size)."""
        count = sum((sp.Symbol(s, integer=True, positive=True) for _, s in args), sp.S.Zero)
        terms = []
        for expr, size in args:
            term = Term(1 / count, None)
            key = next((p.key for p in self.prepared if p.shape == (size,) and p.terms == (term,)), None)
            if key is None:
                key = self.namer.fresh(f"inv_n_{size}")
                self.prepared.append(Prepared(key, (size,), (term,), f"1/({count})", self.current[0]))
                self.leaf(key, size, "const")
            terms.append(fn.RowSum(expr * self.symbols[key]))
        return self.row_value(preferred, sp.Add(*terms))

    def reduction(self, e: ast.Call) -> sp.Expr:
        if e.func == "sum":
            args = [self.reduced(a, e.func)[0] for a in e.args]
            return self.row_value("sum", sp.Add(*(fn.RowSum(a) for a in args)))
        if e.func == "mean":
            return self.mean([self.reduced(a, e.func) for a in e.args])
        # layer_norm(v, eps) = (v - mean(v)) / sqrt(mean((v - mean(v))^2) + eps)
        v, size = self.reduced(e.args[0], e.func)
        eps = sp.Float(e.args[1].value) if len(e.args) == 2 else sp.Float(1e-5)
        mu = self.mean([(v, size)])
        var = self.mean([((v - mu) ** 2, size)], "var")
        rstd = self.row_value("rstd", 1 / ops.by_name("sqrt").cls(var + eps))
        return (v - mu) * rstd

    def random(self, e: ast.Call) -> sp.Expr:
        """A random op as elementwise math with a mask of its own (see :class:`Mask`)."""
        vectors = [self.reduced(a, e.func) for a in e.args[:-1]]
        size = vectors[0][1]
        rate = e.args[-1]
        while isinstance(rate, ast.Inline):
            rate = rate.body
        rate = rate.value if isinstance(rate, ast.Number) else rate.name
        kind = {"dropout": "dropout", "variational_dropout": "variational", "zoneout": "zoneout"}[e.func]
        first = e.args[-2] if kind == "zoneout" else e.args[0]  # what is masked: the old state, or v
        while isinstance(first, ast.Inline):
            first = first.body
        stem = first.name if isinstance(first, ast.Name) and not first.primed else kind
        key = self.namer.fresh(f"{'keep' if kind == 'zoneout' else 'mask'}_{stem}")
        self.masks.append(Mask(key, size, kind, rate, *self.current))
        self.leaf(key, size, "mask")
        m = self.symbols[key]
        if kind == "zoneout":  # both of one size (semantics), each broadcast by reduced()
            (new, _), (old, _) = vectors
            return m * old + (1 - m) * new
        return vectors[0][0] * m

    def broadcast(self, expr: sp.Expr, size: str) -> sp.Expr:
        """``expr`` (of a vector of ``size``) with each const and scalar param replaced by the
        prepared vector that holds it at that size."""
        found = [s for s in self.scalars.values() if s in expr.free_symbols]
        if not found:
            return expr
        subs = {}
        for s in sorted(found, key=lambda x: x.name):
            name = s.name
            key = next((p.key for p in self.prepared if p.shape == (size,) and p.text == name), None)
            if key is None:
                key = self.namer.fresh(f"{name}_{size}")
                term = Term(sp.S.One, name) if name not in self.const_symbols else Term(self.const_symbols[name], None)
                self.prepared.append(Prepared(key, (size,), (term,), name, self.current[0]))
                kind = "const" if name in self.const_symbols else "param"
                self.leaf(key, size, kind)
            subs[s] = self.symbols[key]
        return expr.xreplace(subs)

    def run(self) -> CellModel:
        for a in self.cell.assignments:
            self.current = (a.line, a.text)
            expr = self.broadcast(self.lower(a.expr), a.size)
            key = self.key_of_spec[a.key]
            if expr.is_Number:  # a = h - h: readers see the number, not a name bound to a scalar
                self.constants[key] = expr
            self.values.append(Value(key, a.key, a.size, expr, a.line, a.text))
            self.sym(key)
        next_state = {s.name: self.key_of_spec[s.name + "'"] for s in self.cell.states}
        outputs = [self.key_of_spec[k] for k in self.cell.outputs]
        self.direct |= {p.matrix for p in self.projections}
        self.direct |= {p.name for p in self.cell.params if len(p.shape) == 1}
        engine = [p for p in self.cell.params if p.name in self.direct]
        engine += [Param(p.key, p.shape, None, None) for p in self.prepared]
        inputs = self.cell.inputs + [Vector(k.key, k.size, None) for k in self.masks]
        cell = dataclasses.replace(self.cell, params=engine, inputs=inputs)
        return CellModel(cell, self.leaves, self.values, self.projections, next_state, outputs, self.symbols,
                         self.prepared, self.cell, self.masks)

    def lower(self, e: ast.Expr) -> sp.Expr:
        if isinstance(e, ast.Number):
            if e.value.is_integer() and abs(e.value) < 2**31 and all(ch.isdigit() for ch in e.text):
                return sp.Integer(int(e.value))
            return sp.Float(e.value)
        if isinstance(e, ast.Name):
            if not e.primed and e.name in self.scalars:
                return self.scalars[e.name]
            key = self.key_of_spec[e.key] if e.primed else e.name
            return self.constants[key] if key in self.constants else self.sym(key)
        if isinstance(e, ast.Inline):
            return self.lower(e.body)
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
            if ops.by_name(e.func).shape_rule == "row_reduction":
                return self.reduction(e)
            if ops.by_name(e.func).shape_rule == "random":
                return self.random(e)
            return ops.by_name(e.func).cls(*(self.lower(x) for x in e.args))
        if isinstance(e, ast.MatMul):
            return self.projection(e)
        raise TypeError(e)  # pragma: no cover

    def matrix_terms(self, m: ast.Expr, coef: sp.Expr, transpose: bool) -> list[Term]:
        """The terms of a matrix expression left of '@' (checked by semantics)."""
        if isinstance(m, ast.Inline):
            return self.matrix_terms(m.body, coef, transpose)
        if isinstance(m, ast.Name):
            return [Term(coef, None if m.name == "eye" else m.name, transpose)]
        if isinstance(m, ast.Call):  # transpose(...)
            return self.matrix_terms(m.args[0], coef, not transpose)
        if isinstance(m, ast.Neg):
            return self.matrix_terms(m.operand, -coef, transpose)
        if m.op in "+-":
            sign = 1 if m.op == "+" else -1
            return self.matrix_terms(m.left, coef, transpose) + self.matrix_terms(m.right, sign * coef, transpose)
        if m.op == "*":
            factor_left = self.factor(m.left)
            if factor_left is not None:
                return self.matrix_terms(m.right, coef * factor_left, transpose)
            return self.matrix_terms(m.left, coef * self.factor(m.right), transpose)
        return self.matrix_terms(m.left, coef / self.factor(m.right), transpose)

    def size_of_expr(self, expr: sp.Expr) -> str:
        """The size of a lowered vector expression (from any vector symbol it reads)."""
        for sym in sorted(expr.free_symbols, key=lambda x: x.name):
            if sym.name in self.leaves:
                return self.leaves[sym.name].size
            for v in self.values:
                if v.key == sym.name and v.size != ROW:  # a row scalar broadcasts
                    return v.size
            for p in self.projections:
                if p.key == sym.name:
                    return p.out_size
        raise SpecError("the operand of '@' is a number", None)  # pragma: no cover - semantics refuses it

    def factor(self, e: ast.Expr) -> sp.Expr | None:
        """A scaling factor (numbers and consts), or None for a matrix."""
        if isinstance(e, ast.Number):
            return self.lower(e)
        if isinstance(e, ast.Name):
            return self.const_symbols.get(e.name) if not e.primed else None
        if isinstance(e, ast.Inline):
            return self.factor(e.body)
        if isinstance(e, ast.Neg):
            f = self.factor(e.operand)
            return None if f is None else -f
        if isinstance(e, ast.Pow):
            f = self.factor(e.base)
            exp = sp.Integer(int(e.exponent)) if e.exponent.is_integer() else sp.Float(e.exponent)
            return None if f is None else f**exp
        if isinstance(e, ast.BinOp):
            a, b = self.factor(e.left), self.factor(e.right)
            if a is None or b is None:
                return None
            return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[e.op]
        return None

    def matrix(self, e: ast.MatMul, in_size: str) -> tuple[str, Param]:
        """The param (spec or prepared) left of '@'."""
        m = e.matrix
        while isinstance(m, ast.Inline):
            m = m.body
        if isinstance(m, ast.Name) and m.name != "eye":
            return m.name, self.cell.param(m.name)
        terms = self.merge(self.matrix_terms(m, sp.S.One, False))
        shape = None
        for t in terms:
            if t.source is not None:
                p = self.cell.param(t.source).shape
                shape = (p[1], p[0]) if t.transpose else p
                break
        shape = shape or (in_size, in_size)
        existing = next((p for p in self.prepared if p.terms == terms and p.shape == shape), None)
        if existing is None:
            first = next((t.source for t in terms if t.source is not None), "eye")
            key = self.namer.fresh(f"{first}_mat")
            existing = Prepared(key, shape, terms, self.current[1], self.current[0])
            self.prepared.append(existing)
        return existing.key, Param(existing.key, shape, None, None)

    @staticmethod
    def merge(terms: list[Term]) -> tuple[Term, ...]:
        """Terms with the same source and orientation added up; zero terms dropped; sorted."""
        acc: dict[tuple, sp.Expr] = {}
        for t in terms:
            acc[(t.source or "", t.transpose)] = acc.get((t.source or "", t.transpose), sp.S.Zero) + t.coef
        out = [Term(c, src or None, tr) for (src, tr), c in sorted(acc.items()) if sp.simplify(c) != 0]
        return tuple(out)

    def projection(self, e: ast.MatMul) -> sp.Symbol:
        lowered = self.lower(e.operand)
        try:
            in_size = self.size_of_expr(lowered)
        except SpecError:  # W @ softsign(h - h): no vector left after simplification
            raise SpecError(
                f"the operand of '@' simplifies to the constant {lowered}; "
                f"write the constant's projection another way (e.g. as a param vector)",
                e.span,
            ) from None
        matrix, param = self.matrix(e, in_size)
        operand_expr = self.broadcast(lowered, param.shape[1])
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
            self.leaves[operand_expr.name].kind in ("param", "const")
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
