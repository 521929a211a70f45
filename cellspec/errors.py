"""Source spans and the one error type every stage raises for a bad spec.

A :class:`SpecError` carries the span of the offending text and renders as
``file:line:col: message`` followed by the source line and a caret, which is what the CLI
prints (never a traceback).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    """The text of one ``.cell`` file and the name it is reported under."""

    filename: str
    text: str

    def lines(self) -> list[str]:
        """The lines as the parser counts them: ends of line are \\n, \\r\\n or a lone \\r
        (and nothing else: a form feed or U+2028 does not start a line)."""
        return normalize_newlines(self.text).split("\n")

    def line(self, lineno: int) -> str:
        lines = self.lines()
        if 1 <= lineno <= len(lines):
            return lines[lineno - 1]
        return ""


def normalize_newlines(text: str) -> str:
    """``\\r\\n`` and lone ``\\r`` become ``\\n``; columns within a line are unchanged."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


@dataclass(frozen=True)
class Span:
    """A position in a source file: 1-based line and column, plus the length to underline."""

    source: Source
    line: int
    col: int
    length: int = 1

    def __repr__(self) -> str:
        return f"Span({self.source.filename}:{self.line}:{self.col})"


class SpecError(Exception):
    """A problem with a spec, located at a span of its source."""

    def __init__(self, message: str, span: Span | None = None, filename: str | None = None):
        super().__init__(message)
        self.message = message
        self.span = span
        self.filename = filename if filename is not None else (span.source.filename if span else "<spec>")

    @property
    def line(self) -> int:
        return self.span.line if self.span else 0

    @property
    def col(self) -> int:
        return self.span.col if self.span else 0

    def render(self) -> str:
        """``file:line:col: message``, the source line and a caret under the column."""
        if self.span is None:
            return f"{self.filename}: {self.message}"
        text = self.span.source.line(self.span.line)
        # the caret line copies the tabs of the source line, so the caret lines up whatever the
        # terminal's tab width
        pad = "".join("\t" if ch == "\t" else " " for ch in text[: self.span.col - 1])
        pad += " " * (self.span.col - 1 - len(pad))
        caret = pad + "^" * max(1, min(self.span.length, len(text) - self.span.col + 1))
        return f"{self.filename}:{self.span.line}:{self.span.col}: {self.message}\n    {text}\n    {caret}"

    def __str__(self) -> str:
        return self.render()

    def _repr_pretty_(self, p, cycle) -> None:
        """IPython and Jupyter show the rendered error (position, line, caret), not repr()."""
        p.text(self.render())
