"""Semantic analysis: names, assignment rules and symbolic shapes.

Input: one :class:`~cellspec.frontend.ast.Cell`. Output: a :class:`CheckedCell` in which every
name is known to be defined before use, every state is updated exactly once, every ``@`` has
a parameter matrix on its left with a matching inner size, and every elementwise operation
combines vectors of equal size. The first violation raises a SpecError at its span.
"""

from __future__ import annotations

import keyword
import os
import re
from dataclasses import dataclass, field

from cellspec.backends.naming import PYTHON_RESERVED
from cellspec.errors import Span, SpecError
from cellspec.frontend import ast
from cellspec.model import ops

#: Initialisers and their numeric arguments.
INITIALISERS: dict[str, int] = {"fill": 1, "zeros": 0, "ones": 0, "uniform": 2, "normal": 2, "orthogonal": 0}

DEFAULT_SIZES = {"I": "input_size", "H": "hidden_size"}

#: Constructor arguments of the generated modules that a size may not take.
RESERVED_ARGUMENTS = {"self", "batch_first", "device", "dtype", "backend", "input_size", "hidden_size",
                      "num_layers", "dropout", "bidirectional"}

#: attributes of torch.nn.Module and of the generated modules: a param registered under one of
#: these names would shadow it, so such names are refused for params.
MODULE_ATTRIBUTES = frozenset(
    ["T_destination", "add_module", "apply", "bfloat16", "buffers", "call_super_init", "children", "compile", "cpu", "cuda", "double", "dump_patches", "eval", "extra_repr", "float", "forward", "get_buffer", "get_extra_state", "get_parameter", "get_submodule", "half", "ipu", "load_state_dict", "modules", "mtia", "named_buffers", "named_children", "named_modules", "named_parameters", "parameters", "register_backward_hook", "register_buffer", "register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook", "register_full_backward_pre_hook", "register_load_state_dict_post_hook", "register_load_state_dict_pre_hook", "register_module", "register_parameter", "register_state_dict_post_hook", "register_state_dict_pre_hook", "requires_grad_", "set_extra_state", "set_submodule", "share_memory", "state_dict", "to", "to_empty", "train", "training", "type", "xpu", "zero_grad", "input_size", "hidden_size", "batch_first", "backend", "sizes", "reset_parameters", "num_layers", "dropout", "bidirectional", "flatten_parameters"]
)

#: names at the top level of the generated torch_cell module and package __init__: a cell's
#: class names (NAME, NAMECell) may not be one of them.
GENERATED_MODULE_NAMES = frozenset(
    ["math", "torch", "F", "nn", "importlib", "CELL", "SIZES", "INPUTS", "STATES", "PARAMS", "OUTPUTS", "INITS", "SAVED", "BACKENDS", "step", "numpy_cell", "torch_cell", "EQUATIONS_LATEX", "equations"]
)

#: package names a cell may not have: the modules the generated code imports, which a package of
#: that name would shadow when the output folder is on sys.path.
RESERVED_PACKAGES = frozenset({"torch", "numpy", "math", "importlib", "cellspec"})

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def snake_case(name: str) -> str:
    """``PeepholeLSTM`` → ``peephole_lstm``, ``GRU`` → ``gru``, ``TorchGRU`` → ``torch_gru``."""
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
    s = re.sub(r"(?<=[A-Z])(?=[A-Z][a-z])", "_", s)
    return re.sub(r"_+", "_", s).lower().strip("_") or "cell"


#: the "size" of a row scalar (a reduction: one number per row), which combines with a vector of
#: any size as a number does
ROW = "row"

#: the row reductions the front end and lowering know (their op entries say "row_reduction")
REDUCTIONS = ("sum", "mean", "layer_norm")

#: names of the matrix-expression builtins left of '@' (``transpose(W)``, ``eye``)
MATRIX_BUILTINS = ("transpose", "eye")

#: argument names of the numpy_cell functions: a const (a keyword of each) may not take one
NUMPY_ARGUMENTS = frozenset({"params", "x", "state", "d_output", "d_new_state", "d_outputs", "d_final_state",
                             "lengths", "training", "rng", "masks"})


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[str, ...]  # size symbols, [out, in] for matrices, () for a scalar param
    init: ast.Init | None
    span: object

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) == 2

    @property
    def is_scalar(self) -> bool:
        return len(self.shape) == 0


@dataclass(frozen=True)
class Const:
    """``const dt = 0.042``: a named number, a keyword argument of the generated code."""

    name: str
    value: float
    span: object


@dataclass(frozen=True)
class Vector:
    name: str
    size: str
    span: object


@dataclass(frozen=True)
class Assignment:
    """``target = expr``; ``key`` is the target as written (``h'`` for a state update)."""

    key: str
    size: str
    expr: ast.Expr
    span: object
    line: int
    text: str  # the spec line, stripped, for comments in generated code


@dataclass
class CheckedCell:
    name: str
    module_name: str
    filename: str
    sizes: dict[str, str]  # size symbol -> constructor argument, in constructor order
    inputs: list[Vector]
    states: list[Vector]
    params: list[Param]
    assignments: list[Assignment]
    outputs: list[str]  # keys of assignments (``h'`` or an intermediate)
    source_text: str = field(repr=False, default="")
    line: int = 1  # line of the 'cell' keyword's name
    consts: list[Const] = field(default_factory=list)

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def const(self, name: str) -> Const:
        return next(c for c in self.consts if c.name == name)


def _err(msg: str, span) -> SpecError:
    return SpecError(msg, span)


class _Checker:
    def __init__(self, cell: ast.Cell, defs: dict[str, ast.Def] | None = None):
        self.cell = cell
        self.defs: dict[str, ast.Def] = dict(defs or {})
        self.sizes: dict[str, str] = dict(DEFAULT_SIZES)
        self.used_sizes: set[str] = set()
        self.kinds: dict[str, str] = {}  # name -> input|state|param|intermediate
        self.size_of: dict[str, str] = {}
        self.params: dict[str, Param] = {}
        self.assigned: dict[str, int] = {}  # key -> order
        self.used_names: set[str] = set()

    # -------------------------------------------------------------- declarations
    def check_identifier(self, name: str, span, what: str) -> None:
        if "__" in name or name.startswith("_"):
            raise _err(
                f"{what} '{name}': names starting with '_' or containing '__' are reserved for generated code",
                span,
            )
        if name in ops.language_functions() or name in MATRIX_BUILTINS:
            raise _err(f"{what} '{name}' has the name of a built-in function", span)
        if name in self.defs:
            raise _err(f"{what} '{name}' has the name of the def on line {self.defs[name].span.line}", span)
        if name in self.sizes or name in ("I", "H"):
            raise _err(f"{what} '{name}' has the name of a size symbol", span)

    def declare(self, name: str, kind: str, span) -> None:
        self.check_identifier(name, span, kind)
        if name in self.kinds:
            raise _err(f"'{name}' is already declared as {_article(self.kinds[name])}", span)
        self.kinds[name] = kind

    def size(self, ref: ast.SizeRef) -> str:
        if ref.symbol not in self.sizes:
            raise _err(
                f"unknown size '{ref.symbol}'; declare it with 'size {ref.symbol} = <argument_name>' "
                "(only I and H are predefined)",
                ref.span,
            )
        self.used_sizes.add(ref.symbol)
        return ref.symbol

    def run(self) -> CheckedCell:
        cell = self.cell
        seen_args: dict[str, str] = {}
        for decl in cell.sizes:
            if decl.symbol in seen_args.values() or (decl.symbol in self.sizes and decl.symbol not in DEFAULT_SIZES):
                raise _err(f"size '{decl.symbol}' is declared twice", decl.span)
            if decl.symbol in DEFAULT_SIZES and decl.symbol in seen_args.values():
                raise _err(f"size '{decl.symbol}' is declared twice", decl.span)
            if keyword.iskeyword(decl.argument) or "__" in decl.argument:
                raise _err(f"'{decl.argument}' cannot be a constructor argument name", decl.argument_span)
            if decl.argument in PYTHON_RESERVED or decl.argument in GENERATED_MODULE_NAMES:
                raise _err(
                    f"'{decl.argument}' cannot be a constructor argument name: inside the generated "
                    "constructor it would shadow the Python built-in or module-level name it uses",
                    decl.argument_span,
                )
            if (decl.argument in RESERVED_ARGUMENTS or decl.argument in MODULE_ATTRIBUTES) and DEFAULT_SIZES.get(
                decl.symbol
            ) != decl.argument:
                raise _err(
                    f"'{decl.argument}' is already an argument of the generated modules; choose another name",
                    decl.argument_span,
                )
            if decl.argument in seen_args:
                raise _err(f"argument '{decl.argument}' already names size '{seen_args[decl.argument]}'", decl.argument_span)
            seen_args[decl.argument] = decl.symbol
            self.sizes[decl.symbol] = decl.argument
        # I and H keep their default arguments unless redeclared; a redeclared argument may not
        # collide with the other default.
        args = list(self.sizes.values())
        if len(set(args)) != len(args):
            dup = next(a for a in args if args.count(a) > 1)
            decl = next(d for d in cell.sizes if d.argument == dup)
            raise _err(f"argument '{dup}' names two sizes", decl.argument_span)

        consts = self.check_consts()
        self.const_values = {c.name: c.value for c in consts}
        inputs = []
        for v in cell.inputs:
            self.declare(v.name, "input", v.span)
            self.size_of[v.name] = self.size(v.size)
            inputs.append(Vector(v.name, v.size.symbol, v.span))
        states = []
        for v in cell.states:
            self.declare(v.name, "state", v.span)
            self.size_of[v.name] = self.size(v.size)
            states.append(Vector(v.name, v.size.symbol, v.span))
        for p in cell.params:
            self.declare(p.name, "param", p.span)
            if p.name in MODULE_ATTRIBUTES:
                raise _err(
                    f"param '{p.name}' would shadow the attribute '{p.name}' of the generated "
                    "torch.nn.Module; rename it",
                    p.span,
                )
            if p.name in self.sizes.values():
                raise _err(
                    f"param '{p.name}' has the name of the constructor argument of size "
                    f"'{next(k for k, v in self.sizes.items() if v == p.name)}'; rename one of them",
                    p.span,
                )
            if len(p.dims) not in (0, 1, 2):
                raise _err(
                    f"param '{p.name}' has {len(p.dims)} dimensions; a param is a number (no shape), "
                    "a vector [N] or a matrix [M, N]",
                    p.span,
                )
            shape = tuple(self.size(d) for d in p.dims)
            if p.init is not None:
                self.check_init(p, shape)
            self.params[p.name] = Param(p.name, shape, p.init, p.span)
            if len(shape) == 1:
                self.size_of[p.name] = shape[0]
        if not inputs:
            raise _err(f"cell '{cell.name}' has no input; declare one with 'input x[I]'", cell.span)
        if not states:
            raise _err(f"cell '{cell.name}' has no state; declare one with 'state h[H]'", cell.span)

        assignments = []
        for order, a in enumerate(cell.assigns):
            expanded = self.expand(a.expr, ())
            size = self.expr(expanded)
            t = a.target
            if t.primed:
                if t.name not in self.kinds:
                    raise _err(f"unknown state '{t.name}'; declare it with 'state {t.name}[H]'", t.span)
                if self.kinds.get(t.name) != "state":
                    raise _err(f"only states take a prime; '{t.name}' is not a state", t.span)
                if t.key in self.assigned:
                    raise _err(f"state '{t.name}' is updated twice", t.span)
                if size == ROW:
                    raise _err(
                        f"{_q(t.key)} would be a row scalar (one number per row, from a reduction); a "
                        "state is a vector: combine the row scalar with a vector",
                        t.span,
                    )
                if size is not None and size != self.size_of[t.name]:
                    raise _err(
                        f"{_q(t.key)} has size {size} but state '{t.name}' has size {self.size_of[t.name]}",
                        t.span,
                    )
            else:
                if t.name in self.kinds:
                    kind = self.kinds[t.name]
                    if kind == "state":
                        raise _err(f"'{t.name}' is a state; its update is written {t.name}' = ...", t.span)
                    if kind == "intermediate":
                        raise _err(f"'{t.name}' is already assigned; names are assigned once", t.span)
                    raise _err(f"'{t.name}' is {_article(kind)} and cannot be assigned", t.span)
                self.check_identifier(t.name, t.span, "intermediate")
                self.kinds[t.name] = "intermediate"
            if size is None:
                raise _err(
                    f"{_q(t.key)} is a constant; an assignment needs at least one vector", t.span
                )
            if size == ROW:
                self.check_row_value(expanded)
            self.size_of[t.key] = size
            self.assigned[t.key] = order
            line = a.span.line
            assignments.append(
                Assignment(t.key, size, expanded, a.span, line, cell.source_lines.get(line, "").strip())
            )

        for s in states:
            if s.name + "'" not in self.assigned:
                raise _err(f"state '{s.name}' is never updated; add a line {s.name}' = ...", s.span)

        if len(cell.outputs) > 1:
            raise _err("a cell has one 'output' statement (list several names with commas)", cell.outputs[1].span)
        outputs: list[str] = []
        if cell.outputs:
            for n in cell.outputs[0].names:
                if n.primed:
                    if self.kinds.get(n.name) != "state":
                        raise _err(f"only states take a prime; '{n.name}' is not a state", n.span)
                else:
                    kind = self.kinds.get(n.name)
                    if kind is None:
                        raise _err(f"unknown name '{n.name}' in output", n.span)
                    if kind == "state":
                        raise _err(
                            f"output '{n.name}' is the previous state; output the next value {n.name}'",
                            n.span,
                        )
                    if kind != "intermediate":
                        raise _err(f"output '{n.name}' is {_article(kind)}; outputs are computed names", n.span)
                    if self.size_of.get(n.name) == ROW:
                        raise _err(
                            f"output '{n.name}' is a row scalar (one number per row); outputs are vectors",
                            n.span,
                        )
                if n.key in outputs:
                    raise _err(f"{_q(n.key)} is listed twice in output", n.span)
                outputs.append(n.key)
        else:
            outputs.append(states[0].name + "'")

        for name, p in self.params.items():
            if name not in self.used_names:
                raise _err(f"param '{name}' is declared but never used", p.span)
        for v in inputs:
            if v.name not in self.used_names:
                raise _err(f"input '{v.name}' is declared but never used", v.span)

        sizes = {}
        for sym in ("I", "H"):
            sizes[sym] = self.sizes[sym]
        for sym, arg in self.sizes.items():
            if sym not in sizes:
                if sym not in self.used_sizes:
                    decl = next(d for d in cell.sizes if d.symbol == sym)
                    raise _err(f"size '{sym}' is declared but never used", decl.span)
                sizes[sym] = arg
        # the generated code reads every size from an input or a param: a size only states have
        # could not be known for a zero initial state (state=None)
        bound = {v.size for v in inputs} | {d for p in self.params.values() for d in p.shape}
        for v in states:
            if v.size not in bound:
                raise _err(
                    f"size '{v.size}' of state '{v.name}' is not the size of any input or param, so the "
                    "generated code cannot tell it from its arguments; give an input or a param that size",
                    v.span,
                )
        return CheckedCell(
            name=cell.name,
            module_name=snake_case(cell.name),
            filename=os.path.basename(cell.span.source.filename),  # generated code must not depend on the path typed
            sizes=sizes,
            inputs=inputs,
            states=states,
            params=list(self.params.values()),
            assignments=assignments,
            outputs=outputs,
            source_text=cell.span.source.text,
            line=cell.span.line,
            consts=consts,
        )

    def check_consts(self) -> list[Const]:
        """``const`` declarations: names that are keyword arguments of every generated function."""
        out: list[Const] = []
        for c in self.cell.consts:
            if c.name in self.kinds and self.kinds[c.name] == "const":
                raise _err(f"const '{c.name}' is declared twice", c.span)
            self.declare(c.name, "const", c.span)
            if (
                keyword.iskeyword(c.name)
                or c.name in PYTHON_RESERVED
                or c.name in GENERATED_MODULE_NAMES
                or c.name in RESERVED_ARGUMENTS
                or c.name in MODULE_ATTRIBUTES
                or c.name in NUMPY_ARGUMENTS
                or c.name in self.sizes.values()
            ):
                raise _err(
                    f"const '{c.name}' would be a keyword argument of the generated modules and "
                    "functions, where that name is taken; rename it",
                    c.span,
                )
            out.append(Const(c.name, c.value, c.span))
        return out

    # ------------------------------------------------------------------- defs
    def expand(self, e: ast.Expr, stack: tuple[str, ...]) -> ast.Expr:
        """``e`` with every call of a ``def`` replaced by an :class:`ast.Inline` of its body."""
        if isinstance(e, ast.Call):
            args = tuple(self.expand(a, stack) for a in e.args)
            d = self.defs.get(e.func)
            if d is None:
                return ast.Call(e.func, args, e.span)
            if e.func in stack:
                chain = " -> ".join((*stack, e.func))
                raise _err(f"def '{e.func}' calls itself ({chain}); a def cannot be recursive", e.span)
            if len(args) != len(d.args):
                raise _err(f"{e.func}() takes {len(d.args)} argument(s), got {len(args)}", e.span)
            binding = {a.name: x for a, x in zip(d.args, args)}
            body = self.expand(_substitute(d.body, binding), (*stack, e.func))
            return ast.Inline(e.func, body, e.span)
        if isinstance(e, ast.BinOp):
            return ast.BinOp(e.op, self.expand(e.left, stack), self.expand(e.right, stack), e.span)
        if isinstance(e, ast.MatMul):
            return ast.MatMul(self.expand(e.matrix, stack), self.expand(e.operand, stack), e.span)
        if isinstance(e, ast.Neg):
            return ast.Neg(self.expand(e.operand, stack), e.span)
        if isinstance(e, ast.Pow):
            return ast.Pow(self.expand(e.base, stack), e.exponent, e.exponent_text, e.span)
        return e

    def check_init(self, p: ast.ParamDecl, shape: tuple[str, ...]) -> None:
        init = p.init
        if init.kind not in INITIALISERS:
            known = ", ".join(k for k in INITIALISERS if k != "fill")
            raise _err(f"unknown initialiser '{init.kind}'; use a number or one of {known}", init.span)
        want = INITIALISERS[init.kind]
        if len(init.args) != want:
            raise _err(f"initialiser '{init.kind}' takes {want} argument(s), got {len(init.args)}", init.span)
        if init.kind == "orthogonal" and len(shape) != 2:
            what = "a vector" if shape else "a number"
            raise _err(f"'orthogonal' initialises a matrix; this param is {what}", init.span)

    # --------------------------------------------------------------- expressions
    def expr(self, e: ast.Expr) -> str | None:
        """Size symbol of an expression, or None for a pure number (which broadcasts)."""
        if isinstance(e, ast.Number):
            return None
        if isinstance(e, ast.Name):
            return self.name(e)
        if isinstance(e, ast.Neg):
            return self.expr(e.operand)
        if isinstance(e, ast.Pow):
            return self.expr(e.base)
        if isinstance(e, ast.BinOp):
            left = self.expr(e.left)
            right = self.expr(e.right)
            return self.combine(e, f"'{e.op}'", [left, right])
        if isinstance(e, ast.Inline):
            return self.inline(e, lambda body: self.expr(body))
        if isinstance(e, ast.MatMul):
            shape = self.matrix(e.matrix, e.span)
            inner = self.expr(e.operand)
            if inner is None:
                raise _err("the right side of '@' must be a vector, not a number", e.span)
            if inner == ROW:
                raise _err("the right side of '@' must be a vector, not a row scalar (one number per row)",
                           e.span)
            if shape is None:  # eye alone: the identity of the operand's size
                return inner
            if inner != shape[1]:
                what = e.matrix.name if isinstance(e.matrix, ast.Name) else "the matrix"
                raise _err(
                    f"size mismatch: {what} is [{shape[0]}, {shape[1]}] but its operand has size {inner}",
                    e.span,
                )
            return shape[0]
        if isinstance(e, ast.Call):
            arity = ops.language_functions().get(e.func)
            if e.func == "transpose":
                raise _err("transpose() is a matrix expression; use it on the left of '@'", e.span)
            if arity is None:
                raise _err(self.unknown_function(e.func), e.span)
            lo, hi = arity
            if not lo <= len(e.args) <= hi:
                want = str(lo) if lo == hi else f"{lo} to {hi}"
                raise _err(f"{e.func}() takes {want} argument(s), got {len(e.args)}", e.span)
            op = ops.by_name(e.func)
            if op.shape_rule == "row_reduction" and e.func in REDUCTIONS:
                return self.reduction(e, op)
            if op.shape_rule == "random":
                return self.random(e, op)
            if op.shape_rule != "elementwise":
                raise NotImplementedError(f"the front end has no rule for {op.shape_rule!r} op {e.func}()")
            sizes = [self.expr(a) for a in e.args]
            for i, (kind, size) in enumerate(zip(op.arg_kinds, sizes)):
                if kind == "number" and size is not None:
                    raise _err(f"argument {i + 1} of {e.func}() must be a number, not a vector of size {size}", e.span)
                scalar = _scalar_param_in(e.args[i], self.params) if kind == "number" else None
                if scalar is not None:
                    raise _err(
                        f"argument {i + 1} of {e.func}() must be a number or a const, not the trained "
                        f"scalar param '{scalar}'",
                        e.span,
                    )
            return self.combine(e, f"{e.func}()", sizes)
        raise TypeError(e)  # pragma: no cover

    def combine(self, e, what: str, sizes: list[str | None]) -> str | None:
        """The size of an elementwise combination: vectors of one size, with numbers and row
        scalars broadcast (a row scalar alone stays a row scalar)."""
        known = sorted({s for s in sizes if s is not None and s != ROW})
        if len(known) > 1:
            if what.startswith("'"):
                raise _err(f"size mismatch: {what} of a vector of size {known[0]} and one of size {known[1]}",
                           e.span)
            raise _err(f"size mismatch: arguments of {what} have sizes {', '.join(known)}", e.span)
        if known:
            return known[0]
        return ROW if ROW in sizes else None

    def reduction(self, e: ast.Call, op) -> str:
        """``sum``/``mean`` (a row scalar) and ``layer_norm`` (a vector of its argument's size)."""
        vectors = e.args if e.func != "layer_norm" else e.args[:1]
        sizes = []
        for i, a in enumerate(vectors):
            size = self.expr(a)
            if size is None or size == ROW:
                what = "a number" if size is None else "a row scalar"
                raise _err(f"argument {i + 1} of {e.func}() must be a vector, not {what}", e.span)
            sizes.append(size)
        if e.func == "layer_norm":
            if len(e.args) == 2:
                eps = e.args[1]
                if not isinstance(eps, ast.Number):
                    size = self.expr(eps)
                    what = (f"a vector of size {size}" if size not in (None, ROW) else
                            "a row scalar" if size == ROW else "an expression")
                    raise _err(f"the eps of layer_norm() must be a number, not {what}", e.span)
                if eps.value <= 0:
                    raise _err("the eps of layer_norm() must be positive", eps.span)
            return sizes[0]
        return ROW

    def random(self, e: ast.Call, op) -> str:
        """``dropout(v, p)``, ``variational_dropout(v, p)``, ``zoneout(new, old, p)``: vectors of
        one size, and a rate ``p`` that is a number in [0, 1] or a const (checked when the
        layer runs)."""
        sizes = []
        for i, (kind, a) in enumerate(zip(op.arg_kinds, e.args)):
            if kind == "rate":
                self.rate(e, a, i)
                continue
            size = self.expr(a)
            if size is None or size == ROW:
                what = "a number" if size is None else "a row scalar (one number per row)"
                raise _err(f"argument {i + 1} of {e.func}() must be a vector, not {what}", e.span)
            sizes.append(size)
        return self.combine(e, f"{e.func}()", sizes)

    def rate(self, e: ast.Call, a: ast.Expr, i: int) -> None:
        """The probability of a random op: a number in [0, 1] or a const's name."""
        while isinstance(a, ast.Inline):
            a = a.body
        if isinstance(a, ast.Number):
            if not 0 <= a.value <= 1:
                raise _err(f"the rate of {e.func}() must be in [0, 1], got {a.text}", a.span)
            return
        if isinstance(a, ast.Name) and not a.primed and self.kinds.get(a.name) == "const":
            self.used_names.add(a.name)
            value = self.const_values.get(a.name)
            if value is not None and not 0 <= value <= 1:
                raise _err(f"the rate of {e.func}() must be in [0, 1]; const '{a.name}' defaults to {value!r}", a.span)
            return
        size = self.expr(a)
        what = (f"a vector of size {size}" if size not in (None, ROW) else "a row scalar" if size == ROW
                else "an expression")
        hint = "; a trained rate is not supported" if _scalar_param_in(a, self.params) else ""
        raise _err(f"argument {i + 1} of {e.func}() is its rate: a number or a const, not {what}{hint}", a.span)

    def check_row_value(self, e: ast.Expr) -> None:
        """A named row scalar reads consts and scalar params only inside reductions (there they
        are read per unit); outside them a row scalar has no unit to read them at."""
        if isinstance(e, ast.Call) and e.func in REDUCTIONS:
            return
        if isinstance(e, ast.Name) and not e.primed:
            kind = self.kinds.get(e.name)
            if kind == "const" or (kind == "param" and self.params[e.name].is_scalar):
                raise _err(
                    f"a row scalar cannot read the {'const' if kind == 'const' else 'scalar param'} "
                    f"'{e.name}' outside a reduction yet; scale the vectors it is combined with instead",
                    e.span,
                )
            return
        for child in _children(e):
            self.check_row_value(child)

    def name(self, n: ast.Name) -> str:
        if n.primed:
            if n.name not in self.kinds and not any(a.target.name == n.name for a in self.cell.assigns):
                raise _err(f"unknown name '{n.name}'", n.span)
            if self.kinds.get(n.name) != "state":
                raise _err(f"only states take a prime; '{n.name}' is not a state", n.span)
            if n.key not in self.assigned:
                raise _err(f"{_q(n.key)} is used before it is assigned", n.span)
            return self.size_of[n.key]
        kind = self.kinds.get(n.name)
        if kind is None:
            later = next((a for a in self.cell.assigns if not a.target.primed and a.target.name == n.name), None)
            if later is not None:
                raise _err(
                    f"'{n.name}' is used before it is assigned (on line {later.span.line})", n.span
                )
            if n.name in ops.language_functions():
                raise _err(f"'{n.name}' is a function; call it as {n.name}(...)", n.span)
            raise _err(f"unknown name '{n.name}'", n.span)
        if kind == "intermediate" and n.name not in self.assigned:
            raise _err(f"'{n.name}' is used before it is assigned", n.span)
        if kind == "param" and self.params[n.name].is_matrix:
            raise _err(f"'{n.name}' is a matrix; use it on the left of '@'", n.span)
        self.used_names.add(n.name)
        if kind == "const" or (kind == "param" and self.params[n.name].is_scalar):
            return None  # a number: broadcast like one
        return self.size_of[n.name]

    def unknown_function(self, func: str) -> str:
        known = sorted([*ops.language_functions(), *self.defs])
        return f"unknown function '{func}'; the functions are {', '.join(known)}"

    def inline(self, e: ast.Inline, check):
        """Check the expanded body of a def's call; an error inside names the call site."""
        try:
            return check(e.body)
        except SpecError as err:
            if err.span is not None and err.span.line == e.span.line and err.span.col >= e.span.col:
                raise  # in an argument at the call site
            raise SpecError(
                f"{err.message} (in {e.func}() called at line {e.span.line}, column {e.span.col})", err.span
            ) from None

    # ----------------------------------------------------------- matrix expressions
    def matrix(self, m: ast.Expr, at) -> tuple[str, str] | None:
        """Shape of the matrix expression left of '@' (None for ``eye`` alone, whose size the
        operand fixes)."""
        if isinstance(m, ast.Inline):
            return self.inline(m, lambda body: self.matrix(body, at))
        if isinstance(m, ast.Name) and not m.primed:
            if m.name == "eye" and m.name not in self.kinds:
                return None
            p = self.params.get(m.name)
            if p is not None and p.is_matrix:
                self.used_names.add(m.name)
                return p.shape
        if isinstance(m, ast.Call):
            if m.func == "transpose":
                if len(m.args) != 1:
                    raise _err(f"transpose() takes 1 argument(s), got {len(m.args)}", m.span)
                inner = self.matrix(m.args[0], at)
                return None if inner is None else (inner[1], inner[0])
            if m.func not in ops.language_functions() and m.func not in self.defs:
                raise _err(self.unknown_function(m.func), m.span)
        if isinstance(m, ast.Neg):
            return self.matrix(m.operand, at)
        if isinstance(m, ast.BinOp) and m.op in "+-":
            left, right = self.matrix(m.left, at), self.matrix(m.right, at)
            if left is not None and right is not None and left != right:
                raise _err(
                    f"shape mismatch: '{m.op}' of a [{left[0]}, {left[1]}] matrix and a "
                    f"[{right[0]}, {right[1]}] matrix",
                    m.span,
                )
            shape = left or right
            if shape is not None and shape[0] != shape[1] and (left is None or right is None):
                raise _err(f"eye is square but the matrix it is added to is [{shape[0]}, {shape[1]}]", m.span)
            return shape
        if isinstance(m, ast.BinOp) and m.op in "*/":
            if m.op == "*" and self.is_factor(m.left):
                return self.matrix(m.right, at)
            if self.is_factor(m.right):
                return self.matrix(m.left, at)
        what = _describe_operand(m, self.kinds, self.params)
        hint = ""
        if isinstance(m, ast.BinOp) and isinstance(m.right, ast.Name) and m.right.name in self.params:
            # a * W @ x groups as (a * W) @ x
            hint = f"; '*', '/' and '@' group from the left: write ... {m.op} ({m.right.name} @ ...)"
        raise _err(
            f"the left side of '@' must be a param matrix or a matrix expression (param matrices, "
            f"'+', '-', numbers, consts, transpose(W), eye), not {what}{hint}",
            at,
        )

    def is_factor(self, e: ast.Expr) -> bool:
        """A number that scales a matrix: numbers and consts under + - * / and powers."""
        if isinstance(e, ast.Number):
            return True
        if isinstance(e, ast.Name):
            if not e.primed and self.kinds.get(e.name) == "const":
                self.used_names.add(e.name)
                return True
            return False
        if isinstance(e, ast.Neg):
            return self.is_factor(e.operand)
        if isinstance(e, ast.Pow):
            return self.is_factor(e.base)
        if isinstance(e, ast.BinOp):
            return self.is_factor(e.left) and self.is_factor(e.right)
        if isinstance(e, ast.Inline):
            return self.is_factor(e.body)
        return False


def _q(key: str) -> str:
    """A name for a message: 'r' quoted, a primed key such as h' bare (no 'h'' quote clash)."""
    return key if key.endswith("'") else f"'{key}'"


def _article(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _substitute(e: ast.Expr, binding: dict[str, ast.Expr]) -> ast.Expr:
    """A def's body with its parameters replaced by the call's arguments."""
    if isinstance(e, ast.Name):
        return binding.get(e.name, e) if not e.primed else e
    if isinstance(e, ast.BinOp):
        return ast.BinOp(e.op, _substitute(e.left, binding), _substitute(e.right, binding), e.span)
    if isinstance(e, ast.MatMul):
        return ast.MatMul(_substitute(e.matrix, binding), _substitute(e.operand, binding), e.span)
    if isinstance(e, ast.Neg):
        return ast.Neg(_substitute(e.operand, binding), e.span)
    if isinstance(e, ast.Pow):
        return ast.Pow(_substitute(e.base, binding), e.exponent, e.exponent_text, e.span)
    if isinstance(e, ast.Call):
        return ast.Call(e.func, tuple(_substitute(a, binding) for a in e.args), e.span)
    return e


def _children(e: ast.Expr) -> tuple:
    if isinstance(e, ast.BinOp):
        return (e.left, e.right)
    if isinstance(e, ast.MatMul):
        return (e.matrix, e.operand)
    if isinstance(e, ast.Neg):
        return (e.operand,)
    if isinstance(e, ast.Pow):
        return (e.base,)
    if isinstance(e, ast.Call):
        return e.args
    if isinstance(e, ast.Inline):
        return (e.body,)
    return ()


def _scalar_param_in(e: ast.Expr, params: dict[str, Param]) -> str | None:
    """The name of a scalar param that ``e`` reads, if any."""
    if isinstance(e, ast.Name):
        p = params.get(e.name)
        return e.name if p is not None and p.is_scalar and not e.primed else None
    children: tuple = ()
    if isinstance(e, ast.BinOp):
        children = (e.left, e.right)
    elif isinstance(e, ast.MatMul):
        children = (e.matrix, e.operand)
    elif isinstance(e, (ast.Neg,)):
        children = (e.operand,)
    elif isinstance(e, ast.Pow):
        children = (e.base,)
    elif isinstance(e, ast.Call):
        children = e.args
    elif isinstance(e, ast.Inline):
        children = (e.body,)
    return next((n for n in (_scalar_param_in(c, params) for c in children) if n), None)


def _describe_operand(m: ast.Expr, kinds: dict[str, str], params: dict[str, Param]) -> str:
    if isinstance(m, ast.Name):
        kind = kinds.get(m.name)
        if kind == "param":
            if params[m.name].is_scalar:
                return f"the scalar param '{m.name}'"
            return f"the vector param '{m.name}'"
        if kind is None:
            return f"the unknown name '{m.name}'"
        return f"the {kind} '{m.key}'"
    return "an expression"


def check(cell: ast.Cell, defs: dict[str, ast.Def] | None = None) -> CheckedCell:
    """Check one parsed cell (``defs``: the file's defs it may call); raise SpecError at the
    first problem."""
    return _Checker(cell, defs).run()


def check_defs(defs: tuple[ast.Def, ...]) -> None:
    """File-level rules of ``def``: a new name, distinct identifiers as arguments, a body over
    its arguments and functions defined before it."""
    seen: dict[str, ast.Def] = {}
    for d in defs:
        if d.name in ops.language_functions() or d.name in MATRIX_BUILTINS:
            raise _err(f"def '{d.name}' has the name of a built-in function; choose another name", d.span)
        if "__" in d.name or d.name.startswith("_"):
            raise _err(f"def '{d.name}': names starting with '_' or containing '__' are reserved", d.span)
        if d.name in seen:
            raise _err(f"def '{d.name}' is defined twice (first on line {seen[d.name].span.line})", d.span)
        names: set[str] = set()
        for a in d.args:
            if a.name in names:
                raise _err(f"argument '{a.name}' of def '{d.name}' is listed twice", a.span)
            if a.name in ops.language_functions() or a.name in MATRIX_BUILTINS:
                raise _err(f"argument '{a.name}' of def '{d.name}' has the name of a built-in function", a.span)
            names.add(a.name)
        _check_body(d, d.body, names, seen)
        seen[d.name] = d


def _check_body(d: ast.Def, e: ast.Expr, args: set[str], earlier: dict[str, ast.Def]) -> None:
    if isinstance(e, ast.Name):
        if e.primed:
            raise _err(f"a def's body cannot refer to a next state ('{e.name}\''); pass it as an argument", e.span)
        if e.name not in args and e.name != "eye":
            raise _err(
                f"unknown argument '{e.name}' in def '{d.name}'; its body may use only its arguments "
                f"({', '.join(a.name for a in d.args) or 'none'})",
                e.span,
            )
        return
    if isinstance(e, ast.Call):
        if e.func == d.name:
            raise _err(f"def '{d.name}' calls itself; a def cannot be recursive", e.span)
        if e.func not in ops.language_functions() and e.func not in earlier and e.func != "transpose":
            known = sorted([*ops.language_functions(), *earlier])
            raise _err(
                f"unknown function '{e.func}' in def '{d.name}' (a def calls built-in functions and defs "
                f"above it); the functions are {', '.join(known)}",
                e.span,
            )
        for a in e.args:
            _check_body(d, a, args, earlier)
        return
    for child in (getattr(e, f, None) for f in ("left", "right", "matrix", "operand", "base")):
        if child is not None:
            _check_body(d, child, args, earlier)


def check_file(spec: ast.SpecFile) -> list[CheckedCell]:
    """Check every cell of a file; cell names must be distinct and modules too."""
    seen: dict[str, ast.Cell] = {}
    out = []
    check_defs(spec.defs)
    defs_before: dict[int, dict[str, ast.Def]] = {}
    for cell, order in zip(spec.cells, spec.cell_order or (0,) * len(spec.cells)):
        defs_before[id(cell)] = {d.name: d for d in spec.defs if d.order < order}
    if not spec.cells:
        raise SpecError("the file defines no cell; start one with 'cell NAME { ... }'", Span(spec.source, 1, 1))
    for cell in spec.cells:
        module = snake_case(cell.name)
        if "__" in cell.name or cell.name.startswith("_"):
            raise _err(
                f"cell '{cell.name}': names starting with '_' or containing '__' are reserved for generated code",
                cell.span,
            )
        if cell.name in PYTHON_RESERVED or cell.name in GENERATED_MODULE_NAMES or (
            cell.name + "Cell" in GENERATED_MODULE_NAMES
        ):
            raise _err(
                f"cell '{cell.name}': the generated classes '{cell.name}' and '{cell.name}Cell' would "
                "clash with a Python keyword or built-in, or a name of the generated module; rename the cell",
                cell.span,
            )
        if keyword.iskeyword(module) or module in RESERVED_PACKAGES:
            raise _err(
                f"cell '{cell.name}': its package name '{module}' is a Python keyword or the name of "
                "a module the generated code imports; rename the cell",
                cell.span,
            )
        if module in seen:
            raise _err(f"cell '{cell.name}' has the same module name '{module}' as an earlier cell", cell.span)
        seen[module] = cell
        out.append(check(cell, defs_before.get(id(cell), {})))
    return out
