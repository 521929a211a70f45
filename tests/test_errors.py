"""Every rule of the .cell language: a spec that breaks it is refused with a SpecError at the
offending token, with a clear message, rendered as ``file:line:col: message`` + line + caret.

Each case marks the token the error must point at with ``⟦...⟧``; the markers are removed before
the spec is parsed, and the error's line, column and underline length are compared with them.
"""

from __future__ import annotations

import re

import pytest

from cellspec.driver import front
from cellspec.errors import Source, Span, SpecError
from cellspec.frontend.parser import MAX_DEPTH

# A cell that is fine; cases replace its body (or all of it).
BODY = """\
  input x[I]
  state h[H]
  param W[H, I], U[H, H], b[H]
"""
STEP = "  h' = tanh(W @ x + U @ h + b)\n"


def cell(*lines: str, head: str = BODY) -> str:
    return "cell C {\n" + head + "".join(line + "\n" for line in lines) + "}\n"


def locate(marked: str) -> tuple[str, int, int, int]:
    """Strip the ⟦ ⟧ markers: (source, line, col, length) of the marked text."""
    start = marked.index("⟦")
    end = marked.index("⟧")
    text = marked[:start] + marked[start + 1 : end] + marked[end + 1 :]
    before = marked[:start]
    line = before.count("\n") + 1
    col = start - (before.rfind("\n") + 1) + 1
    return text, line, col, end - start - 1


def refuse(text: str, filename: str = "t.cell") -> SpecError:
    with pytest.raises(SpecError) as info:
        front(Source(filename, text))
    return info.value


def assert_refused(marked: str, message: str) -> SpecError:
    text, line, col, length = locate(marked)
    e = refuse(text)
    assert re.search(message, e.message), f"message {e.message!r} does not match {message!r}"
    assert (e.line, e.col) == (line, col), f"{e.render()}\nexpected {line}:{col}"
    assert e.span.length == length, f"{e.render()}\nexpected an underline of {length}"
    return e


def test_the_base_cell_is_valid():
    (checked,) = front(Source("t.cell", cell(STEP.rstrip())))[1]
    assert checked.name == "C"


# ------------------------------------------------------------------------------ syntax errors
SYNTAX = {
    "missing close paren": (cell("  h' = tanh(W @ x + U @ h + b", "⟦}⟧")[:-2], r"unexpected '\}'; expected '\)' or ','"),
    "missing open paren": (cell("  h' = tanh W @ x + U @ h + b)"), None),
    "stray character": (cell("  h' = tanh(W @ x + U @ h + b) ⟦$⟧"), r"unexpected character '\$'"),
    "non-ASCII character": (cell("  h' = tanh(W @ x + U @ h + b) ⟦é⟧"), r"unexpected character 'é'"),
    "unbalanced close paren": (cell("  h' = tanh(W @ x + U @ h + b)⟦)⟧"), r"unexpected '\)'"),
    "two expressions in a row": (cell("  h' = tanh(W @ x + U @ h + b) ⟦3⟧"), r"unexpected '3'"),
    "operator without operand": (cell("  h' = tanh(W @ x + ⟦*⟧ U @ h + b)"), r"unexpected '\*'"),
    "cell name is a number": ("cell ⟦3⟧ {}\n", r"unexpected '3'; expected a name"),
    "missing size bracket": ("cell C {\n  input x ⟦I⟧]\n}\n", r"unexpected 'I'; expected '\['"),
    "variable exponent": (cell("  h' = tanh(W @ x + U @ h + b) ^ ⟦h⟧"), r"unexpected 'h'; expected .*a number"),
    "statement keyword misspelt": (cell("  paramm ⟦V⟧[H]", STEP.rstrip()), r"unexpected 'V'"),
    "chained power": (cell("  h' = tanh(W @ x + U @ h + b) ^ 2 ⟦^⟧ 3"), r"unexpected '\^': a power cannot be raised again without parentheses"),
    # the lexer reads the second ** as '*' (a product) then '*'
    "chained power with **": (cell("  h' = tanh(W @ x + U @ h + b) ** 2 *⟦*⟧ 3"), r"unexpected '\*'"),
    "keyword assigned": (cell("  ⟦output⟧ = tanh(W @ x + U @ h + b)", STEP.rstrip()), r"'output' starts a declaration and cannot be assigned"),
    "keyword assigned (size)": (cell("  ⟦size⟧ = tanh(W @ x + U @ h + b)", STEP.rstrip()), r"'size' starts a declaration"),
    "unary plus": (cell("  h' = ⟦+⟧tanh(W @ x + U @ h + b)"), r"unexpected '\+'"),
}


@pytest.mark.parametrize("name", sorted(SYNTAX))
def test_syntax_error(name):
    marked, message = SYNTAX[name]
    if message is None:  # the position is checked elsewhere; only the refusal here
        assert "unexpected" in refuse(marked).message
        return
    assert_refused(marked, message)


def test_missing_paren_points_at_the_token_after():
    text = "cell C {\n" + BODY + "  h' = tanh(W @ x + U @ h + b\n  output h'\n}\n"
    e = refuse(text)
    assert (e.line, e.col) == (6, 3)
    assert e.message.startswith("unexpected 'output'")


@pytest.mark.parametrize(
    "text, line, col, message",
    [
        ("cell C {\n  input x[I]\n", 2, 13, "unexpected end of file; the cell is not closed with '}'"),
        ("cell C {\n  input x[I]\n\n  # trailing comment\n\n", 2, 13, "the cell is not closed"),
        ("cell C {\n  input x[I]\n  state h[H]\n  h' = tanh(x", 4, 14, "unexpected end of file; a '(' is not closed"),
        ("cell C {\n  input x[", 2, 11, "unexpected end of file"),
        ("cell", 1, 5, "unexpected end of file"),
        ("cell C {\n  state h[H]\n  h' = h +", 3, 11, "unexpected end of file"),
    ],
)
def test_unexpected_end_of_file(text, line, col, message):
    e = refuse(text)
    assert message in e.message
    assert (e.line, e.col) == (line, col), e.render()


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "   \t\n"])
def test_empty_file(text):
    e = refuse(text)
    assert "defines no cell" in e.message
    assert (e.line, e.col) == (1, 1)
    assert e.render().startswith("t.cell:1:1: the file defines no cell")


@pytest.mark.parametrize("nest", ["tanh(", "-"])
def test_nesting_too_deep(nest):
    depth = MAX_DEPTH + 50
    closing = ")" * depth if nest.endswith("(") else ""
    text = cell("  h' = tanh(W @ x + U @ h + b) + " + nest * depth + "h" + closing)
    e = refuse(text)
    assert "nested too deeply" in e.message and "split it into named intermediates" in e.message
    assert e.line == 5
    assert e.render().count("\n") == 2


def test_parentheses_alone_do_not_nest():
    depth = MAX_DEPTH + 50
    front(Source("t.cell", cell("  h' = tanh(W @ x + U @ h + b) + " + "(" * depth + "h" + ")" * depth)))


def test_deep_but_allowed_nesting_is_accepted():
    text = cell("  h' = tanh(W @ x + U @ h + b) + " + "(" * 20 + "h" + ")" * 20)
    front(Source("t.cell", text))


# ------------------------------------------------------------------------------ names
NAMES = {
    "unknown name": (cell("  h' = tanh(W @ x + U @ h + ⟦q⟧)"), r"^unknown name 'q'$"),
    "unknown primed name": (cell("  h' = tanh(W @ x + U @ h + ⟦q'⟧)"), r"^unknown name 'q'$"),
    "use before assignment": (
        cell("  a = ⟦z⟧ * 2", "  z = tanh(W @ x + U @ h + b)", "  h' = a"),
        r"'z' is used before it is assigned \(on line 6\)",
    ),
    "self reference": (cell("  a = ⟦a⟧ + tanh(W @ x + U @ h + b)", "  h' = a"), r"'a' is used before it is assigned"),
    "assigned twice": (
        cell("  a = tanh(W @ x + U @ h + b)", "  ⟦a⟧ = a * 2", "  h' = a"),
        r"'a' is already assigned; names are assigned once",
    ),
    "state updated twice": (cell(STEP.rstrip(), "  ⟦h'⟧ = h"), r"state 'h' is updated twice"),
    "state never updated": (
        cell("  h' = tanh(W @ x + U @ h + b)", head="  input x[I]\n  state h[H], ⟦c⟧[H]\n  param W[H, I], U[H, H], b[H]\n"),
        r"state 'c' is never updated; add a line c' = \.\.\.",
    ),
    "prime on an input": (cell("  a = tanh(W @ x + U @ h + b)", "  h' = a + ⟦x'⟧"), r"only states take a prime; 'x' is not a state"),
    "prime on a param": (cell("  h' = tanh(W @ x + U @ h + ⟦b'⟧)"), r"only states take a prime; 'b' is not a state"),
    "prime on an intermediate": (
        cell("  a = tanh(W @ x + U @ h + b)", "  h' = ⟦a'⟧"),
        r"only states take a prime; 'a' is not a state",
    ),
    "updating an undeclared state": (cell(STEP.rstrip(), "  ⟦g'⟧ = h"), r"^unknown state 'g'; declare it with 'state g\[H\]'$"),
    "assigning a primed param": (cell("  ⟦b'⟧ = tanh(W @ x + U @ h + b)", STEP.rstrip()), r"only states take a prime; 'b' is not a state"),
    "prime read before its update": (
        cell("  a = ⟦h'⟧ * 2", "  h' = tanh(W @ x + U @ h + b) + 0 * a"),
        r"^h' is used before it is assigned$",
    ),
    "state assigned without prime": (cell("  ⟦h⟧ = tanh(W @ x + U @ h + b)"), r"'h' is a state; its update is written h' = \.\.\."),
    "input assigned": (cell("  ⟦x⟧ = tanh(W @ x + U @ h + b)", STEP.rstrip()), r"'x' is an input and cannot be assigned"),
    "param assigned": (cell("  ⟦b⟧ = tanh(W @ x + U @ h + b)", STEP.rstrip()), r"'b' is a param and cannot be assigned"),
    "declared twice": (
        cell(STEP.rstrip(), head="  input x[I]\n  state h[H], ⟦x⟧[H]\n  param W[H, I], U[H, H], b[H]\n"),
        r"'x' is already declared as an input",
    ),
    "function used as a name": (cell("  h' = tanh(W @ x + U @ h + b) + ⟦tanh⟧"), r"'tanh' is a function; call it as tanh\(\.\.\.\)"),
    "constant assignment": (cell("  ⟦k⟧ = 1 + 2", STEP.rstrip()), r"'k' is a constant; an assignment needs at least one vector"),
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_name_rule(name):
    assert_refused(*NAMES[name])


# ------------------------------------------------------------------------------ shapes
SHAPES = {
    "@ with a vector param": (
        cell("  h' = tanh(W @ x + U @ h + b + b ⟦@⟧ x)"),
        r"the left side of '@' must be a param matrix or a matrix expression \(.*\), not the vector param 'b'",
    ),
    "@ with an input": (cell("  h' = tanh(W @ x + U @ h + b + x ⟦@⟧ x)"), r"not the input 'x'"),
    "@ with a state": (cell("  h' = tanh(W @ x + U @ h + b + h ⟦@⟧ h)"), r"not the state 'h'"),
    "@ with an expression": (cell("  h' = tanh(W @ x + U @ h + b + (U @ h) ⟦@⟧ h)"), r"not an expression"),
    "@ with a number": (cell("  h' = tanh(W @ x + U @ h + b + 2 ⟦@⟧ h)"), r"not an expression"),
    "@ with an unknown name": (cell("  h' = tanh(W @ x + U @ h + b + V ⟦@⟧ h)"), r"not the unknown name 'V'"),
    "@ after a product groups from the left": (
        cell("  h' = tanh(W @ x + U @ h + b) + b * U ⟦@⟧ h"),
        r"not an expression; '\*', '/' and '@' group from the left: write \.\.\. \* \(U @ \.\.\.\)",
    ),
    "@ with a number on the right": (cell("  h' = tanh(W @ x + U @ h + b + U ⟦@⟧ 2)"), r"right side of '@' must be a vector"),
    "@ inner size mismatch": (
        cell("  h' = tanh(W ⟦@⟧ h + U @ h + b + W @ x)"),
        r"size mismatch: W is \[H, I\] but its operand has size H",
    ),
    "elementwise size mismatch": (
        cell("  h' = tanh(W @ x + U @ h + b ⟦+⟧ x)"),
        r"size mismatch: '\+' of a vector of size H and one of size I",
    ),
    "elementwise mismatch with *": (cell("  h' = tanh(W @ x + U @ h + b) ⟦*⟧ x"), r"'\*' of a vector of size H and one of size I"),
    "matrix used elementwise": (cell("  h' = tanh(W @ x + U @ h + b + ⟦U⟧)"), r"'U' is a matrix; use it on the left of '@'"),
    "matrix as a function argument": (cell("  h' = tanh(⟦W⟧)"), r"'W' is a matrix"),
    "update of the wrong size": (
        cell("  ⟦h'⟧ = x", head="  input x[I]\n  state h[H]\n  param W[H, I], U[H, H], b[H]\n  a = tanh(W @ x + U @ h + b)\n"),
        r"h' has size I but state 'h' has size H",
    ),
    "function arguments of different sizes": (cell("  h' = ⟦max⟧(W @ x + U @ h + b, x)"), r"size mismatch: arguments of max\(\) have sizes H, I"),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_rule(name):
    assert_refused(*SHAPES[name])


# ------------------------------------------------------------------------------ functions
@pytest.mark.parametrize(
    "call, message",
    [
        ("⟦tanhh⟧(W @ x + U @ h + b)", r"^unknown function 'tanhh'; the functions are abs, .*, zoneout$"),
        ("⟦softmax⟧(W @ x + U @ h + b)", r"^unknown function 'softmax'; the functions are .*sigmoid"),
        ("⟦tanh⟧(W @ x + U @ h + b, b)", r"tanh\(\) takes 1 argument\(s\), got 2"),
        ("⟦tanh⟧()", r"tanh\(\) takes 1 argument\(s\), got 0"),
        ("⟦max⟧(W @ x + U @ h + b)", r"max\(\) takes 2 argument\(s\), got 1"),
        ("⟦clip⟧(W @ x + U @ h + b, 0)", r"clip\(\) takes 3 argument\(s\), got 2"),
    ],
)
def test_function_rule(call, message):
    assert_refused(cell("  h' = " + call), message)


# ------------------------------------------------------------------------------ random ops
RANDOM_HEAD = BODY + "  param alpha = 0.5\n  const p = 0.25\n"


@pytest.mark.parametrize(
    "line, message",
    [
        ("  h' = tanh(dropout(W @ x + U @ h + b, ⟦b⟧))", r"argument 2 of dropout\(\) is its rate: a number or a const, not a vector of size H"),
        ("  h' = tanh(dropout(W @ x + U @ h + b, ⟦1.5⟧))", r"the rate of dropout\(\) must be in \[0, 1\], got 1.5"),
        ("  h' = tanh(dropout(W @ x + U @ h + b, ⟦alpha⟧))", r"a number or a const, not an expression; a trained rate is not supported"),
        ("  h' = tanh(dropout(W @ x + U @ h + b, p ⟦*⟧ 2))", r"argument 2 of dropout\(\) is its rate: a number or a const"),
        ("  h' = ⟦dropout⟧(0.5, p)", r"argument 1 of dropout\(\) must be a vector, not a number"),
        ("  h' = ⟦zoneout⟧(W @ x, x, p)", r"size mismatch: arguments of zoneout\(\) have sizes H, I"),
        ("  h' = ⟦zoneout⟧(W @ x + U @ h + b, h)", r"zoneout\(\) takes 3 argument\(s\), got 2"),
        ("  h' = h + ⟦variational_dropout⟧(sum(h), p)", r"argument 1 of variational_dropout\(\) must be a vector, not a row scalar"),
        ("  const q = 1.5\n  h' = tanh(dropout(W @ x + U @ h + b, ⟦q⟧))", r"the rate of dropout\(\) must be in \[0, 1\]; const 'q' defaults to 1.5"),
    ],
)
def test_random_op_rule(line, message):
    assert_refused(cell(line, head=RANDOM_HEAD), message)


# ------------------------------------------------------------------------------ sizes and params
DECLS = {
    "unknown size symbol": (
        "cell C {\n  input x[I]\n  state h[⟦K⟧]\n  param W[K, I]\n  h' = W @ x\n}\n",
        r"unknown size 'K'; declare it with 'size K = <argument_name>'",
    ),
    "unknown size in a param": (
        "cell C {\n  input x[I]\n  state h[H]\n  param W[H, ⟦J⟧]\n  h' = W @ x\n}\n",
        r"unknown size 'J'",
    ),
    "size declared twice": (
        "cell C {\n  input x[I]\n  size P = p\n  size ⟦P⟧ = q\n  state h[P]\n  param W[P, I]\n  h' = W @ x\n}\n",
        r"size 'P' is declared twice",
    ),
    "H declared twice": (
        "cell C {\n  input x[I]\n  size H = a\n  size ⟦H⟧ = b\n  state h[H]\n  param W[H, I]\n  h' = W @ x\n}\n",
        r"size 'H' is declared twice",
    ),
    "size declared and unused": (
        "cell C {\n  input x[I]\n  size ⟦P⟧ = p\n  state h[H]\n  param W[H, I]\n  h' = W @ x\n}\n",
        r"size 'P' is declared but never used",
    ),
    "two sizes, one argument": (
        (
            "cell C {\n  input x[I]\n  size P = p\n  size Q = ⟦p⟧\n  state h[P], c[Q]\n  param W[P, I], V[Q, I]\n"
            "  h' = W @ x\n  c' = V @ x\n}\n"
        ),
        r"argument 'p' already names size 'P'",
    ),
    "size argument is a keyword": (
        "cell C {\n  input x[I]\n  size P = ⟦class⟧\n  state h[P]\n  param W[P, I]\n  h' = W @ x\n}\n",
        r"'class' cannot be a constructor argument name",
    ),
    "size argument is a module argument": (
        "cell C {\n  input x[I]\n  size P = ⟦batch_first⟧\n  state h[P]\n  param W[P, I]\n  h' = W @ x\n}\n",
        r"'batch_first' is already an argument of the generated modules",
    ),
    "size argument is a layer argument": (
        "cell C {\n  input x[I]\n  size P = ⟦num_layers⟧\n  state h[P]\n  param W[P, I]\n  h' = W @ x\n}\n",
        r"'num_layers' is already an argument of the generated modules",
    ),
    "param with 3 dims": (
        "cell C {\n  input x[I]\n  state h[H]\n  param ⟦W⟧[H, I, I]\n  h' = x\n}\n",
        r"param 'W' has 3 dimensions; a param is a number \(no shape\), a vector \[N\] or a matrix \[M, N\]",
    ),
    "param named like a size argument": (
        "cell C {\n  input x[I]\n  size P = proj\n  state h[P]\n  param W[P, I], ⟦proj⟧[P]\n  h' = W @ x + proj\n}\n",
        r"param 'proj' has the name of the constructor argument of size 'P'",
    ),
    "param named like a size symbol": (
        "cell C {\n  input x[I]\n  state h[H]\n  param ⟦H⟧[H, I]\n  h' = H @ x\n}\n",
        r"param 'H' has the name of a size symbol",
    ),
    "unknown initialiser": (
        "cell C {\n  input x[I]\n  state h[H]\n  param W[H, I] = ⟦xavier⟧\n  h' = W @ x\n}\n",
        r"unknown initialiser 'xavier'; use a number or one of zeros, ones, uniform, normal, orthogonal",
    ),
    "unknown initialiser call": (
        "cell C {\n  input x[I]\n  state h[H]\n  param W[H, I] = ⟦kaiming⟧(2)\n  h' = W @ x\n}\n",
        r"unknown initialiser 'kaiming'",
    ),
    "uniform with one argument": (
        "cell C {\n  input x[I]\n  state h[H]\n  param W[H, I] = ⟦uniform⟧(1)\n  h' = W @ x\n}\n",
        r"initialiser 'uniform' takes 2 argument\(s\), got 1",
    ),
    "normal with three arguments": (
        "cell C {\n  input x[I]\n  state h[H]\n  param W[H, I] = ⟦normal⟧(0, 1, 2)\n  h' = W @ x\n}\n",
        r"initialiser 'normal' takes 2 argument\(s\), got 3",
    ),
    "zeros with an argument": (
        "cell C {\n  input x[I]\n  state h[H]\n  param W[H, I] = ⟦zeros⟧(1)\n  h' = W @ x\n}\n",
        r"initialiser 'zeros' takes 0 argument\(s\), got 1",
    ),
    "orthogonal on a vector": (
        "cell C {\n  input x[I]\n  state h[H]\n  param W[H, I], b[H] = ⟦orthogonal⟧\n  h' = W @ x + b\n}\n",
        r"'orthogonal' initialises a matrix; this param is a vector",
    ),
    "no input": ("cell ⟦C⟧ {\n  state h[H]\n  h' = h\n}\n", r"cell 'C' has no input; declare one with 'input x\[I\]'"),
    "no state": ("cell ⟦C⟧ {\n  input x[I]\n}\n", r"cell 'C' has no state; declare one with 'state h\[H\]'"),
    "unused param": (
        "cell C {\n  input x[I]\n  state h[H]\n  param W[H, I], ⟦b⟧[H]\n  h' = W @ x\n}\n",
        r"param 'b' is declared but never used",
    ),
    "unused input": (
        "cell C {\n  input x[I], ⟦y⟧[I]\n  state h[H]\n  param W[H, I]\n  h' = W @ x\n}\n",
        r"input 'y' is declared but never used",
    ),
    "the only input unused": (
        "cell C {\n  input ⟦x⟧[I]\n  state h[H]\n  h' = h\n}\n",
        r"input 'x' is declared but never used",
    ),
}


@pytest.mark.parametrize("name", sorted(DECLS))
def test_declaration_rule(name):
    assert_refused(*DECLS[name])


# ------------------------------------------------------------------------------ output
OUTPUTS = {
    "unknown name": (cell(STEP.rstrip(), "  output ⟦q⟧"), r"unknown name 'q' in output"),
    "previous state": (cell(STEP.rstrip(), "  output ⟦h⟧"), r"output 'h' is the previous state; output the next value h'"),
    "an input": (cell(STEP.rstrip(), "  output ⟦x⟧"), r"output 'x' is an input; outputs are computed names"),
    "a param": (cell(STEP.rstrip(), "  output ⟦b⟧"), r"output 'b' is a param"),
    "primed non-state": (cell(STEP.rstrip(), "  output ⟦x'⟧"), r"only states take a prime; 'x' is not a state"),
    "duplicate": (cell(STEP.rstrip(), "  output h', ⟦h'⟧"), r"^h' is listed twice in output$"),
    "duplicate intermediate": (
        cell("  a = tanh(W @ x + U @ h + b)", "  h' = a", "  output a, ⟦a⟧"),
        r"'a' is listed twice in output",
    ),
    "two output statements": (
        cell(STEP.rstrip(), "  output h'", "  output ⟦h'⟧"),
        r"a cell has one 'output' statement \(list several names with commas\)",
    ),
}


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_output_rule(name):
    assert_refused(*OUTPUTS[name])


# ------------------------------------------------------------------------------ reserved names
@pytest.mark.parametrize("bad", ["_x", "a__b", "_", "x__"])
def test_reserved_intermediate_names(bad):
    assert_refused(
        cell(f"  ⟦{bad}⟧ = tanh(W @ x + U @ h + b)", f"  h' = {bad}"),
        rf"intermediate '{re.escape(bad)}': names starting with '_' or containing '__' are reserved",
    )


@pytest.mark.parametrize("kind, head", [
    ("input", "  input ⟦_x⟧[I]\n  state h[H]\n  param W[H, I]\n"),
    ("state", "  input x[I]\n  state ⟦h__1⟧[H]\n  param W[H, I]\n"),
    ("param", "  input x[I]\n  state h[H]\n  param ⟦_W⟧[H, I]\n"),
])
def test_reserved_declared_names(kind, head):
    assert_refused(cell("  h' = x", head=head), rf"^{kind} '_?\w+': names starting with '_' or containing '__' are reserved")


@pytest.mark.parametrize("attr", ["forward", "parameters", "state_dict", "training", "hidden_size", "reset_parameters", "to",
                                  "num_layers", "bidirectional", "flatten_parameters"])
def test_param_shadowing_a_module_attribute(attr):
    assert_refused(
        f"cell C {{\n  input x[I]\n  state h[H]\n  param ⟦{attr}⟧[H, I]\n  h' = {attr} @ x\n}}\n",
        rf"param '{attr}' would shadow the attribute '{attr}' of the generated torch.nn.Module; rename it",
    )


@pytest.mark.parametrize("name", ["tanh", "clip"])
def test_declared_name_of_a_function(name):
    assert_refused(
        f"cell C {{\n  input ⟦{name}⟧[I]\n  state h[H]\n  param W[H, I]\n  h' = W @ {name}\n}}\n",
        rf"input '{name}' has the name of a built-in function",
    )


def test_python_keywords_are_fine_as_spec_names():
    # generated code mangles them (lambda -> lambda_); they are valid spec names
    text = "cell C {\n  input x[I]\n  state h[H]\n  param W[H, I]\n  lambda = W @ x\n  h' = lambda\n}\n"
    front(Source("t.cell", text))


# ------------------------------------------------------------------------------ cell names
ONE = "  input x[I]\n  state h[H]\n  param W[H, I]\n  h' = W @ x\n"


@pytest.mark.parametrize(
    "first, second, message",
    [
        ("C", "C", r"cell 'C' has the same module name 'c' as an earlier cell"),
        ("FooBar", "Foo_Bar", r"cell 'Foo_Bar' has the same module name 'foo_bar' as an earlier cell"),
        ("GRU", "Gru", r"same module name 'gru'"),
    ],
)
def test_cell_names_colliding_in_one_file(first, second, message):
    marked = f"cell {first} {{\n{ONE}}}\n\ncell ⟦{second}⟧ {{\n{ONE}}}\n"
    assert_refused(marked, message)


@pytest.mark.parametrize(
    "name, message",
    [
        ("_C", r"names starting with '_' or containing '__' are reserved"),
        ("A__B", r"names starting with '_' or containing '__' are reserved"),
        ("class", r"would clash with a Python keyword or built-in"),
        ("None", r"would clash with a Python keyword or built-in"),
        ("float", r"would clash with a Python keyword or built-in"),
        ("torch", r"would clash"),
        ("nn", r"would clash"),
        ("step", r"would clash"),
        ("Lambda", r"package name 'lambda' is a Python keyword"),
        ("Math", r"package name 'math' is a Python keyword or the name of a module the generated code imports"),
        ("Numpy", r"package name 'numpy'"),
    ],
)
def test_cell_names_the_generated_code_cannot_use(name, message):
    assert_refused(f"cell ⟦{name}⟧ {{\n{ONE}}}\n", message)


def test_several_distinct_cells_in_one_file():
    _, checked = front(Source("t.cell", f"cell A {{\n{ONE}}}\ncell B {{\n{ONE}}}\n"))
    assert [c.name for c in checked] == ["A", "B"]


def test_first_error_in_file_order():
    e = refuse(f"cell A {{\n{ONE}}}\ncell B {{\n  input x[I]\n  state h[H]\n  h' = q\n}}\n")
    assert (e.line, e.message) == (10, "unknown name 'q'")


# ------------------------------------------------------------------------------ rendering
def test_render_format():
    e = assert_refused(cell("  h' = tanh(W @ x + U @ h + ⟦q⟧)"), "unknown name 'q'")
    lines = e.render().split("\n")
    assert lines[0] == "t.cell:5:29: unknown name 'q'"
    assert lines[1] == "    " + "  h' = tanh(W @ x + U @ h + q)"
    assert lines[2] == "    " + " " * 28 + "^"
    assert str(e) == e.render()
    assert len(lines) == 3


def test_render_underlines_the_whole_token():
    e = assert_refused(cell("  h' = ⟦tanhh⟧(W @ x + U @ h + b)"), "unknown function")
    caret = e.render().split("\n")[2]
    assert caret == "    " + " " * 7 + "^^^^^"


def test_render_uses_the_file_name():
    e = refuse("cell C {\n  input x[I]\n  state h[H]\n  h' = q\n}\n", filename="specs/my cell.cell")
    assert e.render().startswith("specs/my cell.cell:4:8: unknown name 'q'\n")


def _caret_column(line: str, caret_line: str, tab: int = 8) -> tuple[int, int]:
    """Display columns of the caret and of the character above it, with tabs expanded."""
    pos = caret_line.index("^")
    return len(caret_line[:pos].expandtabs(tab)), len(line[:pos].expandtabs(tab))


@pytest.mark.parametrize("tab", [4, 8])
def test_render_with_tabs(tab):
    marked = "cell C {\n\tinput x[I]\n\tstate h[H]\n\tparam W[H, I]\n\th' =\tW @\t⟦q⟧\n}\n"
    e = assert_refused(marked, "unknown name 'q'")
    header, line, caret = e.render().split("\n")
    assert header == "t.cell:5:11: unknown name 'q'"
    assert line == "    \th' =\tW @\tq"
    # whatever the tab width, the caret is under the q
    caret_col, q_col = _caret_column(line, caret, tab)
    assert line.expandtabs(tab)[q_col] == "q"
    assert caret_col == q_col


@pytest.mark.parametrize("newline", ["\r\n", "\r"])
def test_crlf_and_cr_files(newline):
    text, line, col, _ = locate(cell("  h' = tanh(W @ x + U @ h + ⟦q⟧)"))
    e = refuse(text.replace("\n", newline))
    assert (e.line, e.col) == (line, col) == (5, 29)
    _header, src, caret = e.render().split("\n")
    assert "\r" not in e.render()
    assert src == "      h' = tanh(W @ x + U @ h + q)"
    assert caret == "    " + " " * 28 + "^"


def test_crlf_syntax_error_and_eof():
    e = refuse("cell C {\r\n  input x[I]\r\n  state h[H]\r\n  h' = tanh(x $)\r\n}\r\n")
    assert (e.line, e.col, e.message) == (4, 15, "unexpected character '$'")
    e = refuse("cell C {\r\n  input x[I]\r\n")
    assert (e.line, e.col) == (2, 13)


def test_other_line_separators_do_not_shift_lines():
    # a form feed is whitespace and U+2028 may sit in a comment: neither starts a line
    text = "cell C {\n  # a comment with \u2028 in it\n  input x[I]\f\n  state h[H]\n  h' = q\n}\n"
    e = refuse(text)
    assert (e.line, e.col) == (5, 8)
    assert e.render().split("\n")[1] == "      h' = q"


def test_render_at_end_of_line():
    e = refuse("cell C {\n  input x[I]\n")
    _header, src, caret = e.render().split("\n")
    assert src == "      input x[I]"
    assert caret == "    " + " " * 12 + "^"


def test_render_without_a_span():
    assert SpecError("cannot read: No such file", filename="x.cell").render() == "x.cell: cannot read: No such file"


def test_render_span_past_the_end_of_its_line():
    src = Source("f.cell", "abc\n")
    assert SpecError("m", Span(src, 1, 4, 5)).render() == "f.cell:1:4: m\n    abc\n       ^"


# ------------------------------------------------------------------------------ valid specs
def _shipped_specs():
    from pathlib import Path

    root = Path(__file__).resolve().parent
    return sorted((root.parent / "specs").glob("*.cell")) + sorted((root / "specs").glob("*.cell"))


@pytest.mark.parametrize("path", _shipped_specs(), ids=lambda p: p.name)
def test_shipped_specs_pass_the_front_end(path):
    _, checked = front(Source(str(path), path.read_text(encoding="utf-8")))
    assert checked


def test_contract_forms_are_accepted():
    # forms shown in the language contract and this reference
    text = """\
cell Forms {
  input x[I]
  size P = proj_size
  state h[P], c[H]
  param W[H, I], U[H, P], b[H] = 1.0, V[P, H] = orthogonal
  param s[H] = uniform(-0.1, 0.1), t[H] = normal(0, 0.5), z[H] = zeros, o[H] = ones, n[H] = -2
  r = sigmoid(W @ x + U @ h + b)                # comment
  q = -0.5 * r ^ 2 + -r ** 2 + r ^ -1 + r ^ (-2) + r ^ 0.5 + 1e-5 + .5 + 1.
  m = min(r, q) + max(r, 0) + clip(q, -1, 1) + hard_sigmoid(q) + relu(q) + abs(q) + softplus(q)
  k = softsign(m) + exp(-m) + log(1 + exp(m)) + sqrt(1 + m * m) + tanh(m) / (1 + s * s)
  c' = r * c + (1 - r) * k * t + z + o + n
  h' = V @ (r * tanh(c'))
  output h', c', r
}
"""
    (checked,) = front(Source("forms.cell", text))[1]
    assert checked.outputs == ["h'", "c'", "r"]
    assert list(checked.sizes) == ["I", "H", "P"]


# ------------------------------------------------------------------------------ reading files
def test_read_source_skips_a_byte_order_mark(tmp_path):
    from cellspec.driver import read_source

    p = tmp_path / "bom.cell"
    p.write_bytes(b"\xef\xbb\xbfcell C {\r\n  input x[I]\r\n  state h[H]\r\n  h' = q\r\n}\r\n")
    e = refuse(read_source(p).text)
    assert (e.line, e.col, e.message) == (4, 8, "unknown name 'q'")


@pytest.mark.parametrize("prefix", [b"", b"\xef\xbb\xbf"])
def test_read_source_locates_a_bad_byte(tmp_path, prefix):
    from cellspec.driver import read_source

    p = tmp_path / "bad.cell"
    p.write_bytes(prefix + b"cell C {\n  # \xc3\xa9 ok, then \xff\n}\n")
    with pytest.raises(SpecError) as info:
        read_source(p)
    e = info.value
    offset = len(prefix) + len(b"cell C {\n  # \xc3\xa9 ok, then ")
    assert e.message == f"the file is not UTF-8 text (byte 0xff at offset {offset})"
    assert (e.line, e.col) == (2, 16)
    header, line, caret = e.render().split("\n")
    assert header == f"{p}:2:16: {e.message}"
    assert line == "      # é ok, then \ufffd" and caret == "    " + " " * 15 + "^"


# ---------------------------------------------------------------- consts, scalar params, defs, matrix expressions
def _with_const(*lines: str, const: str = "  const dt = 0.5\n") -> str:
    return cell(*lines, head=BODY + const)


REACH = {
    "const declared twice": (
        _with_const(STEP.rstrip(), const="  const dt = 0.5, ⟦dt⟧ = 0.1\n"),
        r"const 'dt' is declared twice",
    ),
    "const declared as a param too": (
        _with_const(STEP.rstrip(), const="  const dt = 0.5\n  param ⟦dt⟧[H]\n"),
        r"'dt' is already declared as a const",
    ),
    "const used as a matrix": (
        _with_const("  h' = tanh(W @ x + dt ⟦@⟧ h + b)"),
        r"the left side of '@' must be a param matrix or a matrix expression .*not the const 'dt'",
    ),
    "const assigned": (
        _with_const(STEP.rstrip(), "  ⟦dt⟧ = h"),
        r"'dt' is a const and cannot be assigned",
    ),
    "const named like a module argument": (
        _with_const(STEP.rstrip(), const="  const ⟦training⟧ = 1\n"),
        r"const 'training' would be a keyword argument of the generated modules and functions",
    ),
    "const named like a numpy_cell argument": (
        _with_const(STEP.rstrip(), const="  const ⟦params⟧ = 1\n"),
        r"const 'params' would be a keyword argument",
    ),
    "scalar param orthogonal": (
        cell(STEP.rstrip() + " * a", head=BODY + "  param a = ⟦orthogonal⟧\n"),
        r"'orthogonal' initialises a matrix; this param is a number",
    ),
    "scalar param left of @": (
        cell("  h' = tanh(W @ x + a ⟦@⟧ h + U @ h + b)", head=BODY + "  param a\n"),
        r"not the scalar param 'a'",
    ),
    "unknown function left of @": (
        cell("  h' = tanh(W @ x + ⟦skew⟧(U) @ h + b)"),
        r"^unknown function 'skew'; the functions are abs, .*zoneout$",
    ),
    "function of a matrix left of @": (
        cell("  h' = tanh(W @ x + tanh(U) ⟦@⟧ h + b)"),
        r"must be a param matrix or a matrix expression",
    ),
    "matrix scaled by a vector": (
        cell("  h' = tanh(W @ x + (b * U) ⟦@⟧ h + b)"),
        r"must be a param matrix or a matrix expression",
    ),
    "matrix shapes differ": (
        cell("  h' = tanh((W ⟦+⟧ U) @ x + b)"),
        r"shape mismatch: '\+' of a \[H, I\] matrix and a \[H, H\] matrix",
    ),
    "eye added to a non-square matrix": (
        cell("  h' = tanh((W ⟦+⟧ eye) @ x + U @ h + b)"),
        r"eye is square but the matrix it is added to is \[H, I\]",
    ),
    "transpose outside @": (
        cell("  h' = tanh(W @ x + U @ h + b) + ⟦transpose⟧(b)"),
        r"transpose\(\) is a matrix expression; use it on the left of '@'",
    ),
    "transposed size mismatch": (
        cell("  h' = tanh(transpose(W) ⟦@⟧ x + U @ h + b)"),
        r"size mismatch: the matrix is \[I, H\] but its operand has size I",
    ),
    "def recursion": (
        "def f(v) = ⟦f⟧(v) + 1\n" + cell("  h' = f(W @ x + U @ h + b)"),
        r"def 'f' calls itself; a def cannot be recursive",
    ),
    "def uses a later def": (
        "def f(v) = ⟦g⟧(v)\ndef g(v) = v\n" + cell("  h' = f(W @ x + U @ h + b)"),
        r"unknown function 'g' in def 'f' \(a def calls built-in functions and defs above it\)",
    ),
    "def unknown argument": (
        "def f(v) = v * ⟦w⟧\n" + cell("  h' = f(W @ x + U @ h + b)"),
        r"unknown argument 'w' in def 'f'; its body may use only its arguments \(v\)",
    ),
    "def reusing a built-in name": (
        "def ⟦tanh⟧(v) = v\n" + cell(STEP.rstrip()),
        r"def 'tanh' has the name of a built-in function",
    ),
    "def defined twice": (
        "def f(v) = v\ndef ⟦f⟧(v) = v\n" + cell(STEP.rstrip()),
        r"def 'f' is defined twice \(first on line 1\)",
    ),
    "def argument twice": (
        "def f(v, ⟦v⟧) = v\n" + cell(STEP.rstrip()),
        r"argument 'v' of def 'f' is listed twice",
    ),
    "def called with too many arguments": (
        "def f(v) = v\n" + cell("  h' = ⟦f⟧(W @ x, U @ h) + b"),
        r"f\(\) takes 1 argument\(s\), got 2",
    ),
    "error in a def body names the call site": (
        "def f(u, v) = u ⟦+⟧ v\n" + cell("  h' = tanh(f(W @ x, x) + U @ h + b)"),
        r"size mismatch: '\+' of a vector of size H and one of size I \(in f\(\) called at line 6, column 13\)",
    ),
    "def used by a cell before it": (
        cell("  h' = ⟦f⟧(W @ x + U @ h + b)") + "def f(v) = v\n",
        r"unknown function 'f'",
    ),
    "intermediate named like a def": (
        "def f(v) = v\n" + cell(STEP.rstrip(), "  ⟦f⟧ = h"),
        r"intermediate 'f' has the name of the def on line 1",
    ),
    "row scalar as a state": (
        cell("  ⟦h'⟧ = mean(W @ x + U @ h + b)"),
        r"h' would be a row scalar \(one number per row, from a reduction\); a state is a vector",
    ),
    "row scalar as an output": (
        cell(STEP.rstrip(), "  m = mean(h')", "  output h', ⟦m⟧"),
        r"output 'm' is a row scalar \(one number per row\); outputs are vectors",
    ),
    "row scalar right of @": (
        cell("  h' = tanh(W @ x + U ⟦@⟧ sum(h) + b)"),
        r"the right side of '@' must be a vector, not a row scalar",
    ),
    "layer_norm with a vector eps": (
        cell("  h' = ⟦layer_norm⟧(W @ x + U @ h, b)"),
        r"the eps of layer_norm\(\) must be a number, not a vector of size H",
    ),
    "layer_norm with a row scalar eps": (
        cell("  h' = ⟦layer_norm⟧(W @ x + U @ h, mean(h))"),
        r"the eps of layer_norm\(\) must be a number, not a row scalar",
    ),
    "layer_norm with a zero eps": (
        cell("  h' = layer_norm(W @ x + U @ h, ⟦0⟧)"),
        r"the eps of layer_norm\(\) must be positive",
    ),
    "mean of a number": (
        cell("  h' = tanh(W @ x + U @ h + b) + ⟦mean⟧(2)"),
        r"argument 1 of mean\(\) must be a vector, not a number",
    ),
    "mean of a row scalar": (
        cell("  h' = tanh(W @ x + U @ h + b) + ⟦mean⟧(h, sum(h))"),
        r"argument 2 of mean\(\) must be a vector, not a row scalar",
    ),
    "row scalar reads a const": (
        _with_const(STEP.rstrip(), "  m = mean(h') * ⟦dt⟧"),
        r"a row scalar cannot read the const 'dt' outside a reduction yet",
    ),
    "layer_norm with three arguments": (
        cell("  h' = ⟦layer_norm⟧(h, 1e-5, 2)"),
        r"layer_norm\(\) takes 1 to 2 argument\(s\), got 3",
    ),
    "a def's body reads a next state": (
        "def f(v) = v * ⟦h'⟧\n" + cell(STEP.rstrip()),
        r"a def's body cannot refer to a next state",
    ),
}


@pytest.mark.parametrize("name", sorted(REACH))
def test_reach_rule(name):
    assert_refused(*REACH[name])


def test_a_number_times_a_matrix_is_a_matrix_expression():
    """``2 * U @ h`` groups as ``(2 * U) @ h``, which is 2 * (U @ h): accepted."""
    (checked,) = front(Source("t.cell", cell("  h' = tanh(W @ x + b) + 2 * U @ h")))[1]
    assert checked.name == "C"


@pytest.mark.parametrize(
    "line",
    [
        "  h' = tanh(W @ x + U ⟦@⟧ softsign(h - h) + b)",  # fuzz seed 481: no vector left after simplification
        "  h' = tanh(W @ x + U ⟦@⟧ (h * 0) + b)",
    ],
)
def test_operand_that_simplifies_to_a_constant(line):
    """An operand of '@' that SymPy simplifies to a number is refused at the '@', with the
    documented message (it used to surface as an error with no position)."""
    from cellspec.driver import compile_source

    text, ln, col, length = locate(cell(line))
    with pytest.raises(SpecError) as info:
        compile_source(Source("t.cell", text), ("numpy",))
    e = info.value
    assert re.search(r"^the operand of '@' simplifies to the constant 0(\.0)?; write the constant's projection", e.message)
    assert (e.line, e.col, e.span.length) == (ln, col, length), e.render()
