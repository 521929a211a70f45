"""``cellspec show``: print one intermediate of the pipeline, for reading and debugging, or the
cell for people: its equations (LaTeX, Markdown) or its data-flow diagram (SVG, DOT)."""

from __future__ import annotations

from cellspec.driver import STAGES, compile_source, front, read_source
from cellspec.errors import SpecError
from cellspec.frontend.semantics import ROW
from cellspec.program.text import mask_text, prepared_text


def _schedule_text(cc) -> str:
    s = cc.schedule
    lines = [f"cell {cc.checked.name}: {len(s.stages)} per-step stage(s)"]
    if cc.checked.consts:
        lines.append("  consts: " + ", ".join(f"{c.name} = {c.value!r}" for c in cc.checked.consts))
    for mk in s.model.masks:
        lines.append(f"  mask drawn per call: {mk.key} [T, B, {mk.size}] = {mask_text(mk)}")
    for pr in s.model.prepared:
        lines.append(f"  prepared before the loop: {pr.key} [{', '.join(pr.shape)}] = {prepared_text(pr)}")
    if len(s.hoisted_levels) > 1:  # in the order they run: each level's values, then its GEMMs
        for lv in s.hoisted_levels:
            for v in lv.values:
                lines.append(f"  hoisted pointwise (level {lv.index}): {v.key} = {v.expr}")
            for g in lv.gemms:
                lines.append(f"  hoisted GEMM over T*B rows (level {lv.index}): "
                             f"{', '.join(f'{p.key} = {p.matrix} @ {p.operand}' for p in g.projections)}")
    else:
        for g in s.hoisted_gemms:
            lines.append(f"  hoisted GEMM over T*B rows: {', '.join(f'{p.matrix} @ {p.operand}' for p in g.projections)}")
        for v in s.hoisted_values:
            lines.append(f"  hoisted pointwise: {v.key} = {v.expr}")
    for st in s.stages:
        lines.append(f"  stage {st.index}:")
        for g in st.gemms:
            lines.append(f"    GEMM: {', '.join(f'{p.key} = {p.matrix} @ {p.operand}' for p in g.projections)}")
        for v in st.values:
            row = "   (row scalar)" if v.size == ROW else ""
            lines.append(f"    {v.key} = {v.expr}{row}")
    lines.append(f"  saved per step: {', '.join(cc.backward.saved) or '(nothing)'}")
    return "\n".join(lines)


def _backward_text(cc) -> str:
    b = cc.backward
    lines = [f"cell {cc.checked.name}: backward"]
    for st in b.stages:
        lines.append(f"  stage {st.index} backward:")
        lines += [f"    {a.target} = {a.expr}" for a in st.assigns]
        for g in st.gemms:
            d_ops = "; ".join(f"d_{o}" for o in g.operands)
            d_ps = "; ".join(", ".join("d_" + p.key for p in g.of(o)) for o in g.operands)
            if len(g.operands) > 1:
                d_ops, d_ps = f"[{d_ops}]", f"[{d_ps}]"
            lines.append(f"    GEMM: {d_ops} += [{d_ps}] @ [{', '.join(g.matrices)}]")
    lines.append("  leaves:")
    lines += [f"    {a.target} = {a.expr}" for a in b.leaf_assigns]
    if b.hoisted_assigns or b.hoisted_leaf_assigns:
        lines.append("  hoisted (whole sequence):")
        lines += [f"    {a.target} = {a.expr}" for a in b.hoisted_assigns + b.hoisted_leaf_assigns]
    return "\n".join(lines)


def show(path: str, stage: str, cell: str | None = None) -> str:
    if stage not in STAGES:
        raise SpecError(f"unknown stage '{stage}'; one of {', '.join(STAGES)}", filename=path)
    source = read_source(path)
    if stage in ("ast", "checked"):
        spec, checked = front(source)
        items = spec.cells if stage == "ast" else checked
        return "\n\n".join(repr(c) for c in items if cell is None or c.name == cell)
    out = []
    for cc in compile_source(source):
        if cell is not None and cc.checked.name != cell:
            continue
        if stage == "model":
            m = cc.model
            out.append(
                "\n".join(
                    [f"cell {m.cell.name}"]
                    + [f"  projection {p.key} = {p.matrix} @ {p.operand}" for p in m.projections]
                    + [f"  value {v.key} = {v.expr}" for v in m.values]
                )
            )
        elif stage == "schedule":
            out.append(_schedule_text(cc))
        elif stage == "backward":
            out.append(_backward_text(cc))
        elif stage == "program":
            from cellspec.program import text

            out.append(text.render(cc.program))
        else:
            files = {k: v for k, v in cc.files.items() if stage in k or (stage == "cuda" and k.endswith(".cu"))}
            out.append("\n".join(f"# ---- {k}\n{v}" for k, v in sorted(files.items())))
    if cell is not None and not out:
        raise SpecError(f"no cell named '{cell}' in this file", filename=path)
    return "\n\n".join(out)


#: the formats of ``cellspec show --format``: ``text`` is a pipeline stage (``--stage``)
FORMATS = ("text", "latex", "markdown", "svg", "dot")


def show_format(path: str, fmt: str, cell: str | None = None) -> str:
    """The cell(s) of a spec as LaTeX equations, Markdown, an SVG diagram or DOT source.

    LaTeX, Markdown and DOT hold every cell of the file (or the one ``cell`` names); an SVG file
    is one drawing, so a file with several cells needs ``cell``."""
    from cellspec.present import diagram, latex

    if fmt not in FORMATS or fmt == "text":
        raise SpecError(f"unknown format '{fmt}'; one of {', '.join(FORMATS[1:])}", filename=path)
    cells = compile_source(read_source(path), ())
    names = [c.checked.name for c in cells]
    if cell is not None:
        cells = [c for c in cells if c.checked.name == cell]
        if not cells:
            raise SpecError(
                f"no cell named '{cell}' in this file; it has {', '.join(names)}", filename=path
            )
    if fmt == "svg":
        if len(cells) > 1:
            raise SpecError(
                f"{len(cells)} cells in this file ({', '.join(names)}); "
                "an SVG shows one: choose it with --cell",
                filename=path,
            )
        return diagram.to_svg(cells[0])
    renderers = {"latex": latex.cell_latex, "markdown": latex.cell_markdown, "dot": diagram.to_dot}
    return "\n\n".join(renderers[fmt](c).rstrip("\n") for c in cells) + "\n"
