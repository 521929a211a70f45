"""Front-end fuzzing: random and mutated text is accepted or refused with a SpecError.

Mutations of the shipped specs (delete/insert/swap characters and tokens, random bytes and
unicode, huge numbers, deep nesting, 100k-term sums, very long lines): every input must either
compile through the front end or raise :class:`SpecError` rendering ``file:line:col: message``
with the source line and a caret — never another exception — within a time bound.
``CELLSPEC_FUZZ_TEXTS=N`` sets the number of random mutations (default 1500).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cellspec.driver import front
from cellspec.errors import Source, SpecError

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.cell"))
N_TEXTS = int(os.environ.get("CELLSPEC_FUZZ_TEXTS", "1500"))
TIME_BOUND = 20.0  # seconds per input: generous for a loaded CI machine (a 400k-char sum takes ~3 s)
TOKENS = ["cell", "input", "state", "param", "size", "output", "{", "}", "[", "]", "(", ")", ",", "=",
          "+", "-", "*", "/", "@", "^", "**", "'", "h'", "x", "H", "I", "1e309", "0", "sigmoid(",
          "#", "\n", "\t", "\r\n", "\r", "é", "∑", "\u200b", "\x00", "lambda", "__init__", "_x",
          # language reach: defs, consts, scalar params, reductions, matrix expressions
          "def f(a) = a\n", "def", "const", "const k = 2\n", "param s = 1\n", "f(", "mean(", "sum(",
          "layer_norm(", "transpose(", "eye", " - transpose(W) ", ", 1e-5)"]
ERROR_RE = re.compile(r"^[^\n]*:\d+:\d+: [^\n]+\n    [^\n]*\n    [ \t]*\^+$")


def mutate(text: str, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 4)):
        k = rng.randrange(8)
        i = rng.randrange(len(text) + 1)
        if k == 0 and text:  # delete a run of characters
            text = text[:i] + text[i + rng.randint(1, 8):]
        elif k == 1:  # insert a token
            text = text[:i] + rng.choice(TOKENS) + text[i:]
        elif k == 2 and len(text) > 2:  # swap two characters
            j = rng.randrange(len(text))
            a, b = sorted((i % len(text), j))
            text = text[:a] + text[b] + text[a + 1:b] + text[a] + text[b + 1:]
        elif k == 3:  # random unicode / control characters
            text = text[:i] + "".join(chr(rng.randrange(0, 0x3000)) for _ in range(rng.randint(1, 3))) + text[i:]
        elif k == 4:  # swap two whitespace-separated tokens
            words = re.split(r"(\s+)", text)
            if len(words) > 3:
                a, b = rng.randrange(0, len(words), 2), rng.randrange(0, len(words), 2)
                words[a], words[b] = words[b], words[a]
                text = "".join(words)
        elif k == 5:  # a huge or odd number
            text = text[:i] + rng.choice(["1e999", "9" * 400, "0.0000", "1e-400", ".5e", "1.2.3"]) + text[i:]
        elif k == 6:  # duplicate a line
            lines = text.split("\n")
            j = rng.randrange(len(lines))
            lines.insert(j, lines[rng.randrange(len(lines))])
            text = "\n".join(lines)
        else:  # truncate
            text = text[:i]
    return text


def check_input(text: str, name: str = "fuzz.cell") -> str:
    """'ok' or 'error'; fails the test for any other exception or a badly rendered error."""
    t0 = time.perf_counter()
    try:
        front(Source(name, text))
        outcome = "ok"
    except SpecError as e:
        rendered = e.render()
        if e.span is not None:
            assert ERROR_RE.match(rendered), rendered
            assert rendered.startswith(f"{name}:{e.line}:{e.col}: ")
        else:
            assert rendered.startswith(f"{name}: ")
        outcome = "error"
    dt = time.perf_counter() - t0
    assert dt < TIME_BOUND, f"{dt:.1f} s for an input of {len(text)} characters"
    return outcome


@pytest.mark.slow
def test_mutated_specs():
    rng = random.Random(int(os.environ.get("CELLSPEC_FUZZ_SEED", "0")))
    texts = [p.read_text() for p in SPECS]
    counts = {"ok": 0, "error": 0}
    for n in range(N_TEXTS):
        text = mutate(rng.choice(texts), rng)
        try:
            counts[check_input(text)] += 1
        except AssertionError as e:
            raise AssertionError(f"input {n}:\n{text!r}\n{e}") from None
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"input {n} raised {type(e).__name__}: {e}\n{text!r}") from None
    print(f"front-end fuzz: {N_TEXTS} mutated inputs, {counts}")
    assert counts["error"] > N_TEXTS // 4


@pytest.mark.slow
def test_random_bytes_and_tokens():
    rng = random.Random(1)
    for n in range(300):
        if n % 2:
            text = "".join(rng.choice(TOKENS) + rng.choice([" ", "", "\n"]) for _ in range(rng.randint(0, 60)))
        else:
            text = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))).decode("utf-8", "replace")
        check_input(text)


HEAD = "cell Big {\n  input x[I]\n  state h[H]\n  param W[H, I]\n"

EXTREMES = {
    "parens_5000": HEAD + "  h' = " + "(" * 5000 + "h" + ")" * 5000 + " + W @ x\n}\n",
    "unclosed_parens_5000": HEAD + "  h' = " + "(" * 5000 + "h\n}\n",
    "neg_5000": HEAD + "  h' = " + "-" * 5000 + "h + W @ x\n}\n",
    "calls_5000": HEAD + "  h' = " + "tanh(" * 5000 + "h" + ")" * 5000 + " + W @ x\n}\n",
    "sum_100k": HEAD + "  h' = W @ x" + " + h" * 100_000 + "\n}\n",
    "product_100k": HEAD + "  h' = W @ x" + " * h" * 100_000 + "\n}\n",
    "long_line": HEAD + "  h' = W @ x + h" + " " * 200_000 + "# " + "x" * 200_000 + "\n}\n",
    "huge_number": HEAD + "  h' = W @ x + h * " + "9" * 5000 + "\n}\n",
    "overflow_number": HEAD + "  h' = W @ x + h * 1e99999\n}\n",
    "huge_exponent": HEAD + "  h' = W @ x + h ^ 1e400\n}\n",
    "many_cells": "".join(HEAD.replace("Big", f"C{i}") + "  h' = tanh(W @ x + h)\n}\n" for i in range(300)),
    "too_large": "#" * 2_000_000,
    "crlf_tabs": HEAD.replace("\n", "\r\n").replace("  ", "\t") + "\th' = tanh(W @ x + h)\r\n}\r\n",
    "nul": HEAD + "  h' = \x00\n}\n",
    "bom": "\ufeff" + HEAD + "  h' = tanh(W @ x + h)\n}\n",
    "empty": "",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXTREMES))
def test_extreme_inputs(name):
    check_input(EXTREMES[name])


def test_caret_alignment_with_tabs_and_crlf():
    text = "cell A {\r\n\tinput x[I]\r\n\tstate h[H]\r\n\th' = tanh(q + h)\r\n}\r\n"
    with pytest.raises(SpecError) as info:
        front(Source("a.cell", text))
    e = info.value
    assert (e.line, e.col) == (4, 12)
    src, caret = e.render().split("\n")[1:3]
    assert src[caret.index("^")] == "q"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["parens_5000", "sum_100k", "nul", "huge_exponent", "too_large"])
def test_cli_compile_of_hostile_text(tmp_path, name):
    spec = tmp_path / f"{name}.cell"
    spec.write_text(EXTREMES[name] if name != "sum_100k" else EXTREMES[name] + "cell Bad { }\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "cellspec", "compile", str(spec), "-o", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    if r.returncode == 0:  # accepted: then it wrote complete packages
        assert out.is_dir()
        return
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() or not any(out.iterdir())
