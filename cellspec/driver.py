"""The driver: runs the pipeline stage by stage and can keep every intermediate.

    .cell text ─► parse (Lark → AST) ─► check (names, shapes) ─► lower (SymPy cell model)
              ─► schedule (GEMM + pointwise stages) ─► derive (backward program)
              ─► render (NumPy / PyTorch / CUDA sources)

Each stage is a function with a typed input and output (see its module). ``compile_source``
returns a :class:`CompiledCell` per cell holding all of them, which ``cellspec show`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cellspec.errors import Source, Span, SpecError, normalize_newlines
from cellspec.frontend import ast
from cellspec.frontend.parser import parse
from cellspec.frontend.semantics import CheckedCell, check_file
from cellspec.model.gradients import Backward, derive
from cellspec.model.lower import CellModel, lower
from cellspec.model.schedule import Schedule, schedule
from cellspec.program.ir import Program
from cellspec.program.plan import plan

STAGES = ("ast", "checked", "model", "schedule", "backward", "program", "numpy", "torch", "cuda")
#: what `cellspec compile` writes: the NumPy module, the PyTorch modules, the .cu file
TARGETS = ("numpy", "torch", "cuda")


@dataclass
class CompiledCell:
    """Every intermediate of one cell, and the generated files (name → text)."""

    checked: CheckedCell
    model: CellModel
    schedule: Schedule
    backward: Backward
    program: Program
    files: dict[str, str] = field(default_factory=dict)

    @property
    def module_name(self) -> str:
        return self.checked.module_name


def read_source(path: str | Path) -> Source:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise SpecError(f"cannot read: {e.strerror or e}", filename=str(path)) from None
    # a UTF-8 byte order mark (as some Windows editors write) is not part of the text
    skip = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        # point at the first bad byte: the text before it is valid UTF-8
        shown = Source(str(path), raw[skip:].decode("utf-8", errors="replace"))
        before = normalize_newlines(raw[skip : skip + e.start].decode("utf-8"))
        line = before.count("\n") + 1
        col = len(before) - (before.rfind("\n") + 1) + 1
        raise SpecError(
            f"the file is not UTF-8 text (byte 0x{raw[skip + e.start]:02x} at offset {skip + e.start})",
            Span(shown, line, col),
        ) from None
    return Source(str(path), text)


def front(source: Source) -> tuple[ast.SpecFile, list[CheckedCell]]:
    spec = parse(source)
    return spec, check_file(spec)


def compile_source(source: Source, targets: tuple[str, ...] = TARGETS) -> list[CompiledCell]:
    """Compile every cell of one source for the given targets; raise SpecError for a bad spec."""
    _, checked = front(source)
    out = []
    for c in checked:
        model = lower(c)
        sched = schedule(model)
        back = derive(sched)
        prog = plan(sched, back)
        out.append(CompiledCell(c, model, sched, back, prog, render_files(sched, back, prog, targets)))
    return out


def render_files(sched: Schedule, back: Backward, prog: Program, targets: tuple[str, ...]) -> dict[str, str]:
    """The generated files of one cell for an explicit list of targets (nothing registers
    itself: the bytes depend only on the spec and the compiler version)."""
    from cellspec import __version__
    from cellspec.backends import native_render, numpy_backend, torch_backend
    from cellspec.backends.context import _cell_text

    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown target(s) {unknown}; one of {TARGETS}")
    files: dict[str, str] = {}
    cell = sched.model.cell
    glue = None
    if "cuda" in targets:
        text, loops = native_render.render(prog, _cell_text(cell), __version__, cell.filename)
        files[f"{cell.module_name}.cu"] = text
        glue = native_render.glue_context(prog, loops, text)
    if "numpy" in targets:
        files["numpy_cell.py"] = numpy_backend.render(sched, back, prog)
    if "torch" in targets:
        files.update(torch_backend.render(sched, back, prog, glue))
    return files


def compile_file(path: str | Path, targets: tuple[str, ...] = TARGETS) -> list[CompiledCell]:
    return compile_source(read_source(path), targets)
