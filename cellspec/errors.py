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

    def line(self, lineno: int) -> str:
        lines = self.text.splitlines()
        if 1 <= lineno <= len(lines):
            return lines[lineno - 1]
        return ""


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
        text = self.span.source.line(self.span.line).replace("\t", " ")
        caret = " " * (self.span.col - 1) + "^" * max(1, min(self.span.length, len(text) - self.span.col + 1))
        return f"{self.filename}:{self.span.line}:{self.span.col}: {self.message}\n    {text}\n    {caret}"

    def __str__(self) -> str:
        return self.render()
