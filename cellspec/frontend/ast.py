"""The typed syntax tree of a ``.cell`` file; every node carries the span it came from.

Input: nothing (data only). Produced by :mod:`cellspec.frontend.parser`, consumed by
:mod:`cellspec.frontend.semantics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cellspec.errors import Source, Span


# ----------------------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Number:
    value: float
    text: str
    span: Span


@dataclass(frozen=True)
class Name:
    """A vector name; ``primed`` is True for ``h'`` (the next value of state ``h``)."""

    name: str
    primed: bool
    span: Span

    @property
    def key(self) -> str:
        return self.name + ("'" if self.primed else "")


@dataclass(frozen=True)
class BinOp:
    op: str  # one of + - * /
    left: Expr
    right: Expr
    span: Span  # the operator


@dataclass(frozen=True)
class MatMul:
    matrix: Expr
    operand: Expr
    span: Span  # the '@'


@dataclass(frozen=True)
class Neg:
    operand: Expr
    span: Span


@dataclass(frozen=True)
class Pow:
    base: Expr
    exponent: float
    exponent_text: str
    span: Span  # the operator


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple[Expr, ...]
    span: Span  # the function name


@dataclass(frozen=True)
class Inline:
    """A call of a ``def``, expanded: ``body`` is the def's body with the call's arguments in
    place of its parameters (semantic analysis makes these; the parser never does)."""

    func: str
    body: Expr
    span: Span  # the call's function name


Expr = Number | Name | BinOp | MatMul | Neg | Pow | Call | Inline


# ---------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class SizeRef:
    symbol: str
    span: Span


@dataclass(frozen=True)
class VectorDecl:
    """``x[I]`` in an ``input`` or ``state`` declaration."""

    name: str
    size: SizeRef
    span: Span


@dataclass(frozen=True)
class Init:
    """A parameter's initial value: ``number`` (fill), or a named initialiser with numeric args."""

    kind: str  # "fill" | "zeros" | "ones" | "uniform" | "normal" | "orthogonal" | unknown names
    args: tuple[float, ...]
    span: Span


@dataclass(frozen=True)
class ParamDecl:
    name: str
    dims: tuple[SizeRef, ...]
    init: Init | None
    span: Span


@dataclass(frozen=True)
class SizeDecl:
    symbol: str
    argument: str
    span: Span
    argument_span: Span


@dataclass(frozen=True)
class ConstDecl:
    """``const dt = 0.042``: a named number of the cell, a keyword argument of the modules."""

    name: str
    value: float
    text: str
    span: Span


@dataclass(frozen=True)
class Assign:
    target: Name
    expr: Expr
    span: Span  # the target


@dataclass(frozen=True)
class Output:
    names: tuple[Name, ...]
    span: Span


@dataclass(frozen=True)
class Cell:
    name: str
    span: Span
    inputs: tuple[VectorDecl, ...] = ()
    states: tuple[VectorDecl, ...] = ()
    params: tuple[ParamDecl, ...] = ()
    sizes: tuple[SizeDecl, ...] = ()
    assigns: tuple[Assign, ...] = ()
    consts: tuple[ConstDecl, ...] = ()
    outputs: tuple[Output, ...] = ()
    source_lines: dict[int, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Def:
    """``def name(a, b) = expr`` at file level; ``order`` is its position among the file's
    cells and defs (a cell may call the defs before it)."""

    name: str
    args: tuple[Name, ...]
    body: Expr
    span: Span
    order: int


@dataclass(frozen=True)
class SpecFile:
    source: Source
    cells: tuple[Cell, ...]
    defs: tuple[Def, ...] = ()
    #: position of each cell among the file's cells and defs (parallel to ``cells``)
    cell_order: tuple[int, ...] = ()
