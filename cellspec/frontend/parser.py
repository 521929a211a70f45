"""Parse ``.cell`` text into the typed AST.

Input: a :class:`~cellspec.errors.Source`. Output: :class:`~cellspec.frontend.ast.SpecFile`.
Syntax errors become :class:`~cellspec.errors.SpecError` with the position of the offending
token. Nesting is bounded (``MAX_DEPTH``) so that no input can exhaust the recursion limit.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import lark
from lark import Token, Transformer, Tree

from cellspec.errors import Source, Span, SpecError, normalize_newlines
from cellspec.frontend import ast

MAX_DEPTH = 200
MAX_SOURCE_CHARS = 1_000_000

_TERMINAL_NAMES = {
    "NAME": "a name",
    "PRIMED": "a primed name",
    "NUMBER": "a number",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "COMMA": "','",
    "EQUAL": "'='",
    "PLUS": "'+'",
    "MINUS": "'-'",
    "STAR": "'*'",
    "SLASH": "'/'",
    "AT": "'@'",
    "POW": "'^'",
    "CELL": "'cell'",
    "INPUT": "'input'",
    "STATE": "'state'",
    "PARAM": "'param'",
    "SIZE": "'size'",
    "OUTPUT": "'output'",
    "CONST": "'const'",
    "DEF": "'def'",
    "$END": "end of file",
}


_STATEMENT_KEYWORDS = ("input", "state", "param", "size", "output", "const", "def")


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    grammar = resources.files("cellspec.frontend").joinpath("grammar.lark").read_text()
    return lark.Lark(grammar, parser="lalr", maybe_placeholders=True)


def _span(source: Source, tok: Token) -> Span:
    return Span(source, tok.line, tok.column, max(1, len(str(tok))))


def _describe(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    return repr(str(tok))


def _expected(names: set[str]) -> str:
    readable = sorted({_TERMINAL_NAMES.get(n, n.lower()) for n in names})
    if len(readable) > 6:
        return ""
    return "; expected " + " or ".join(readable)


def _token_span(source: Source, line: int | None, col: int | None) -> Span:
    """The span at line:col; without a line, just after the last token of the file (not on a
    trailing blank or comment line)."""
    if line is None or line < 1:
        lines = source.lines()
        for i in range(len(lines) - 1, -1, -1):
            content = lines[i].split("#", 1)[0].rstrip()
            if content:
                return Span(source, i + 1, len(content) + 1)
        return Span(source, 1, 1)
    return Span(source, line, col or 1)


def _unclosed(text: str) -> str:
    """What an unexpected end of file leaves open: a '(' or '[' or the cell's '{'."""
    code = "\n".join(line.split("#", 1)[0] for line in text.split("\n"))
    for open_, close, what in (("(", ")", "a '(' is not closed"), ("[", "]", "a '[' is not closed"),
                               ("{", "}", "the cell is not closed with '}'")):
        if code.count(open_) > code.count(close):
            return "; " + what
    return ""


def _check_depth(source: Source, tree: Tree) -> None:
    """Refuse trees deeper than MAX_DEPTH, iteratively (no recursion)."""
    stack: list[tuple[Tree | Token, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Tree):
            if depth > MAX_DEPTH:
                tok = next((t for t in node.scan_values(lambda v: isinstance(v, Token))), None)
                span = _span(source, tok) if tok is not None else _token_span(source, None, None)
                raise SpecError(
                    f"expression nested too deeply (more than {MAX_DEPTH} levels); "
                    "split it into named intermediates",
                    span,
                )
            stack.extend((child, depth + 1) for child in node.children if child is not None)


class _ToAst(Transformer):
    """Lark tree → AST nodes. Cells are assembled from their statements in order."""

    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    # -- expressions
    def number(self, c):
        (tok,) = c
        return ast.Number(float(tok), str(tok), _span(self.source, tok))

    def name(self, c):
        (tok,) = c
        return ast.Name(str(tok), False, _span(self.source, tok))

    def primed(self, c):
        (tok,) = c
        return ast.Name(str(tok)[:-1], True, _span(self.source, tok))

    def binop(self, c):
        left, op, right = c
        return ast.BinOp(str(op), left, right, _span(self.source, op))

    def matmul(self, c):
        left, op, right = c
        return ast.MatMul(left, right, _span(self.source, op))

    def neg(self, c):
        op, operand = c
        return ast.Neg(operand, _span(self.source, op))

    def exponent(self, c):
        sign = c[0]
        num = c[1]
        text = ("-" if sign is not None else "") + str(num)
        return float(text), text

    def pow(self, c):
        base, op, (value, text) = c
        return ast.Pow(base, value, text, _span(self.source, op))

    def call(self, c):
        tok, *args = c
        args = tuple(a for a in args if a is not None)
        return ast.Call(str(tok), args, _span(self.source, tok))

    # -- declarations
    def vec_decl(self, c):
        name, size = c
        return ast.VectorDecl(str(name), ast.SizeRef(str(size), _span(self.source, size)), _span(self.source, name))

    def input_decl(self, c):
        return ("input", tuple(c))

    def state_decl(self, c):
        return ("state", tuple(c))

    def signed_number(self, c):
        sign, num = c
        return -float(num) if sign is not None else float(num), (sign or num)

    def init_number(self, c):
        ((value, tok),) = c
        return ast.Init("fill", (value,), _span(self.source, tok))

    def init_named(self, c):
        (tok,) = c
        return ast.Init(str(tok), (), _span(self.source, tok))

    def init_call(self, c):
        tok, *args = c
        values = tuple(v for v, _ in (a for a in args if a is not None))
        return ast.Init(str(tok), values, _span(self.source, tok))

    def dims(self, c):
        return tuple(ast.SizeRef(str(t), _span(self.source, t)) for t in c)

    def param_item(self, c):
        name, dims, init = c
        return ast.ParamDecl(str(name), dims or (), init, _span(self.source, name))

    def const_item(self, c):
        name, (value, _tok) = c
        return ast.ConstDecl(str(name), value, repr(value), _span(self.source, name))

    def const_decl(self, c):
        return ("const", tuple(c))

    def def_decl(self, c):
        name, *rest = c
        body = rest[-1]
        args = tuple(ast.Name(str(t), False, _span(self.source, t)) for t in rest[:-1] if t is not None)
        return ast.Def(str(name), args, body, _span(self.source, name), 0)

    def param_decl(self, c):
        return ("param", tuple(c))

    def size_decl(self, c):
        sym, arg = c
        return ("size", (ast.SizeDecl(str(sym), str(arg), _span(self.source, sym), _span(self.source, arg)),))

    def target(self, c):
        (tok,) = c
        if tok.type == "PRIMED":
            return ast.Name(str(tok)[:-1], True, _span(self.source, tok))
        return ast.Name(str(tok), False, _span(self.source, tok))

    def output_decl(self, c):
        return ("output", (ast.Output(tuple(c), c[0].span),))

    def assign(self, c):
        target, expr = c
        return ("assign", (ast.Assign(target, expr, target.span),))

    def cell(self, c):
        name, *stmts = c
        groups: dict[str, list] = {"input": [], "state": [], "param": [], "size": [], "const": [], "assign": [],
                                   "output": []}
        for kind, items in stmts:
            groups[kind].extend(items)
        return ast.Cell(
            name=str(name),
            span=_span(self.source, name),
            inputs=tuple(groups["input"]),
            states=tuple(groups["state"]),
            params=tuple(groups["param"]),
            sizes=tuple(groups["size"]),
            assigns=tuple(groups["assign"]),
            consts=tuple(groups["const"]),
            outputs=tuple(groups["output"]),
            source_lines={i + 1: line for i, line in enumerate(self.source.lines())},
        )

    def start(self, c):
        return tuple(c)


def parse(source: Source) -> ast.SpecFile:
    """Parse one file. Raises SpecError on any syntax error."""
    if len(source.text) > MAX_SOURCE_CHARS:
        raise SpecError(f"spec file is larger than {MAX_SOURCE_CHARS} characters", Span(source, 1, 1))
    try:
        # lark counts lines by \n only: parse with \r\n and lone \r as \n (columns unchanged)
        text = normalize_newlines(source.text)
        tree = _parser().parse(text)
    except lark.UnexpectedCharacters as e:
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
        raise SpecError(f"unexpected character {ch!r}", _token_span(source, e.line, e.column)) from None
    except lark.UnexpectedToken as e:
        tok = e.token
        if tok.type == "$END":
            span = _token_span(source, None, None)
        else:
            span = _span(source, tok)
        if tok.type == "EQUAL":
            before = source.line(tok.line)[: tok.column - 1].strip()
            if before in _STATEMENT_KEYWORDS:
                raise SpecError(
                    f"'{before}' starts a declaration and cannot be assigned; choose another name",
                    Span(source, tok.line, source.line(tok.line).index(before) + 1, len(before)),
                ) from None
        if tok.type == "POW":
            raise SpecError(
                f"unexpected {_describe(tok)}: a power cannot be raised again without parentheses; "
                "write (a ^ 2) ^ 3",
                span,
            ) from None
        if tok.type == "$END" and (_unclosed(text) or not _expected(set(e.expected))):
            raise SpecError(f"unexpected end of file{_unclosed(text)}", span) from None
        raise SpecError(f"unexpected {_describe(tok)}{_expected(set(e.expected))}", span) from None
    except lark.UnexpectedEOF as e:
        raise SpecError(
            f"unexpected end of file{_expected(set(e.expected))}", _token_span(source, None, None)
        ) from None
    _check_depth(source, tree)
    try:
        cells = _ToAst(source).transform(tree)
    except lark.exceptions.VisitError as e:  # pragma: no cover - a transformer bug, not user input
        if isinstance(e.orig_exc, SpecError):
            raise e.orig_exc from None
        raise
    defs = tuple(
        ast.Def(d.name, d.args, d.body, d.span, i) for i, d in enumerate(cells) if isinstance(d, ast.Def)
    )
    order = tuple(i for i, c in enumerate(cells) if isinstance(c, ast.Cell))
    return ast.SpecFile(source, tuple(c for c in cells if isinstance(c, ast.Cell)), defs, order)
