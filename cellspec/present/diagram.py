"""A cell as a data-flow diagram: a standalone SVG (laid out here) or Graphviz DOT source.

Input: a :class:`~cellspec.driver.CompiledCell`. The graph has the step's inputs and previous
states on the left, then the hoisted GEMMs (run once over the whole sequence), then each stage of
the schedule (its stacked GEMMs, then its pointwise values), then the outputs. A GEMM box names
its matrices (the params it multiplies by); a value box names the vector params it reads; next
states are drawn as states. Stages are shaded bands, so the schedule is visible.

The SVG layout is a layered left-to-right drawing computed here (columns by band and by longest
path inside a band, rows ordered by the barycentre of their inputs), so drawing needs nothing
but Python: no Graphviz. ``--format dot`` gives the same graph to users who have Graphviz.
Output is deterministic: the same spec gives the same bytes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from html import escape

import sympy as sp
from sympy.printing.str import StrPrinter

from cellspec.model import functions as fn

#: fill, stroke of each kind of node
_STYLE = {
    "input": ("#dbeafe", "#1d4ed8"),
    "state": ("#dcfce7", "#15803d"),
    "gemm": ("#ffedd5", "#c2410c"),
    "value": ("#fef9c3", "#a16207"),
    "operand": ("#f3f4f6", "#4b5563"),
    "next": ("#bbf7d0", "#15803d"),
    "output": ("#f3e8ff", "#7e22ce"),
    "mask": ("#fce7f3", "#be185d"),
}

#: short names of the functions, for node labels
_SHORT = {
    fn.Sigmoid: "σ",
    fn.Tanh: "tanh",
    fn.Exp: "exp",
    fn.Log: "log",
    fn.Sqrt: "sqrt",
    fn.Relu: "relu",
    fn.Abs: "abs",
    fn.Softplus: "softplus",
    fn.Softsign: "softsign",
    fn.HardSigmoid: "hard_sigmoid",
    fn.Min: "min",
    fn.Max: "max",
    fn.Clip: "clip",
}


@dataclass(frozen=True)
class Node:
    """One box: ``lines`` are its label (the first in bold), ``title`` its hover text."""

    id: str
    kind: str  # input | state | gemm | value | operand | next | output
    lines: tuple[str, ...]
    band: int  # 0 = inputs and states, 1 = hoisted, 2 + k = stage k, last = outputs
    title: str


@dataclass(frozen=True)
class Graph:
    name: str
    nodes: tuple[Node, ...]
    edges: tuple[tuple[str, str], ...]  # (from id, to id)
    bands: tuple[str, ...]  # band titles, in band order


def _shape(expr: sp.Expr) -> str:
    """A value's outermost operation, for its label: ``σ(…)``, ``tanh(…)``, ``×``, ``+``."""
    if isinstance(expr, fn.CellFunction) and type(expr) in _SHORT:
        return f"{_SHORT[type(expr)]}(…)"
    if isinstance(expr, sp.Mul):
        return "× (elementwise)"
    if isinstance(expr, sp.Add):
        return "+ (elementwise)"
    if isinstance(expr, sp.Pow):
        return "power"
    return "pointwise"


class _ShortPrinter(StrPrinter):
    """Expressions as short text for a label: spec names, ``W@x`` for projections, ``σ``."""

    def __init__(self, names: dict[str, str]):
        super().__init__()
        self.names = names

    def _print_Symbol(self, expr):
        return self.names.get(expr.name, expr.name)

    def _print_Function(self, expr):
        head = _SHORT.get(type(expr), type(expr).__name__.lower())
        return f"{head}({', '.join(self._print(a) for a in expr.args)})"


#: a value's whole expression is shown in its box up to this many characters
_SHORT_EXPR = 20


def _clip(text: str, n: int = _SHORT_EXPR) -> str:
    """At most n characters: longer text ends in an ellipsis (the box's tooltip has it whole)."""
    return text if len(text) <= n else text[: n - 1] + "…"


def build_graph(cc) -> Graph:
    """The cell's data flow as nodes and edges (see the module docstring)."""
    m, s = cc.model, cc.schedule
    nodes: list[Node] = []
    edges: list[tuple[str, str]] = []
    n_stages = len(s.stages)
    out_band = 2 + n_stages
    bands = ["inputs and states", "hoisted (whole sequence)"] + [
        f"stage {st.index}" for st in s.stages
    ]
    bands.append("outputs")
    spec_name = {v.key: v.spec_key for v in m.values if v.spec_key}
    next_of = {k: st for st, k in m.next_state.items()}
    producer: dict[str, str] = {}  # model key -> node id that produces it
    short_names = dict(spec_name)
    short = _ShortPrinter(short_names)
    for v in m.values:  # in model order: an operand is named before what reads it
        if not v.spec_key:
            short_names[v.key] = (
                short.doprint(v.expr) if v.expr.is_Symbol else f"({short.doprint(v.expr)})"
            )
        for p in m.projections:
            if p.operand in short_names and p.key not in short_names:
                short_names[p.key] = f"{p.matrix}@{short_names[p.operand]}"
    for p in m.projections:  # operands that are leaves
        short_names.setdefault(p.key, f"{p.matrix}@{short_names.get(p.operand, p.operand)}")

    for key, leaf in m.leaves.items():
        if leaf.kind in ("input", "state"):
            nid = f"leaf_{key}"
            label = f"{key}  (t-1)" if leaf.kind == "state" else key
            nodes.append(
                Node(
                    nid, leaf.kind, (label, f"[{leaf.size}]"), 0, f"{leaf.kind} {key}[{leaf.size}]"
                )
            )
            producer[key] = nid
    for mk in m.masks:  # a random op's mask: drawn per call, read like an input
        nid = f"leaf_{mk.key}"
        what = {"dropout": "dropout", "variational": "variational dropout", "zoneout": "zoneout"}[mk.kind]
        nodes.append(Node(nid, "mask", (mk.key, f"{what} p={mk.rate} [{mk.size}]"), 0,
                          f"mask {mk.key}[{mk.size}]: {what}, rate {mk.rate} (line {mk.line})"))
        producer[mk.key] = nid
    vector_params = {k for k, leaf in m.leaves.items() if leaf.kind == "param"}

    def reads(expr: sp.Expr) -> list[str]:
        return sorted(str(x) for x in expr.free_symbols)

    def add_value(v, band: int) -> None:
        nid = f"value_{v.key}"
        if v.spec_key == "":
            kind = "operand"
            lines = (_clip(short.doprint(v.expr)), f"operand [{v.size}]")
        else:
            kind = "next" if v.key in next_of else "value"
            text = short.doprint(v.expr)
            if v.expr.is_Symbol:  # h' = W @ (...): the projection itself, shortened
                lines = (f"{spec_name[v.key]} = {_clip(text)}",)
            elif len(text) <= _SHORT_EXPR:
                lines = (f"{spec_name[v.key]} = {text}",)
            else:
                lines = (f"{spec_name[v.key]} = {_shape(v.expr)}",)
                params = [r for r in reads(v.expr) if r in vector_params]
                if params:
                    lines += ("+ " + ", ".join(params),)
        title = f"{cc.checked.filename}:{v.line}  {v.text.strip()}" if v.text else v.key
        nodes.append(Node(nid, kind, lines, band, title))
        producer[v.key] = nid

    def add_group(g, band: int, tag: str) -> None:
        nid = f"gemm_{tag}_{g.key}"
        mats = ", ".join(g.matrices)

        def shown(o: str) -> str:
            if o in m.leaves or o in spec_name:
                return spec_name.get(o, o)
            return _clip(short_names[o])  # a synthetic operand (U @ (r * h)): what it computes

        operand = shown(g.operands[0]) if len(g.operands) == 1 else "[" + "; ".join(map(shown, g.operands)) + "]"
        lines = ("GEMM", f"[{mats}] @ {operand}")
        title = "; ".join(f"{p.key} = {p.matrix} @ {p.operand}" for p in g.projections)
        nodes.append(Node(nid, "gemm", lines, band, title))
        for p in g.projections:
            producer[p.key] = nid

    for v in s.hoisted_values:
        add_value(v, 1)
    for g in s.hoisted_gemms:
        add_group(g, 1, "hoisted")
    for st in s.stages:
        for g in st.gemms:
            add_group(g, 2 + st.index, f"s{st.index}")
        for v in st.values:
            add_value(v, 2 + st.index)
    for i, key in enumerate(m.outputs):
        nid = f"output_{i}"
        nodes.append(
            Node(nid, "output", (f"output {spec_name.get(key, key)}",), out_band, f"output {i}")
        )
        edges.append((producer[key], nid))

    # edges: operands into GEMMs, everything a value reads into the value
    groups = list(s.hoisted_gemms) + [g for st in s.stages for g in st.gemms]
    for g in groups:
        tag = (
            "hoisted"
            if g in s.hoisted_gemms
            else f"s{next(st.index for st in s.stages if g in st.gemms)}"
        )
        for o in g.operands:
            edges.append((producer[o], f"gemm_{tag}_{g.key}"))
    for v in list(s.hoisted_values) + [v for st in s.stages for v in st.values]:
        for r in reads(v.expr):
            if r in producer and (producer[r], f"value_{v.key}") not in edges:
                edges.append((producer[r], f"value_{v.key}"))
    used_bands = sorted({n.band for n in nodes})
    # drop an empty hoisted band, keeping band numbers dense
    remap = {b: i for i, b in enumerate(used_bands)}
    nodes = [Node(n.id, n.kind, n.lines, remap[n.band], n.title) for n in nodes]
    bands = [bands[b] for b in used_bands]
    return Graph(cc.checked.name, tuple(nodes), tuple(edges), tuple(bands))


# ------------------------------------------------------------------------------------ layout
_CHAR_W = 7.4  # width of one character of the 12 px monospace font
_LINE_H = 16
_PAD_X, _PAD_Y = 10, 7
_COL_GAP = 56
_ROW_GAP = 18
_MARGIN = 24
_BAND_TOP = 44  # room for the title and the band labels


@dataclass(frozen=True)
class Box:
    node: Node
    x: float
    y: float
    w: float
    h: float


def _columns(g: Graph) -> dict[str, int]:
    """Column of each node: bands left to right, inside a band the longest path from the band's
    entry (so a value reading another value of its stage sits to its right)."""
    preds: dict[str, list[str]] = {n.id: [] for n in g.nodes}
    for a, b in g.edges:
        preds[b].append(a)
    band = {n.id: n.band for n in g.nodes}
    depth: dict[str, int] = {}

    def d(nid: str) -> int:
        if nid not in depth:
            inner = [p for p in preds[nid] if band[p] == band[nid]]
            depth[nid] = 1 + max((d(p) for p in inner), default=-1)
        return depth[nid]

    width = {}
    for n in g.nodes:
        width[n.band] = max(width.get(n.band, 0), d(n.id) + 1)
    start, offset = 0, {}
    for b in sorted(width):
        offset[b] = start
        start += width[b]
    return {n.id: offset[n.band] + depth[n.id] for n in g.nodes}


@dataclass(frozen=True)
class Layered:
    """The graph with every edge that skips columns routed through one waypoint per column it
    crosses (shared by the edges of one source: they leave as a bundle)."""

    col: dict[str, int]  # real nodes and waypoints
    segments: tuple[tuple[str, str], ...]  # edges between neighbouring columns
    routes: tuple[tuple[str, ...], ...]  # per graph edge: source, waypoints, target


def _layer(g: Graph) -> Layered:
    col = dict(_columns(g))
    segments: list[tuple[str, str]] = []
    routes = []
    for a, b in g.edges:
        route = [a]
        for c in range(col[a] + 1, col[b]):
            w = f"~{a}~{c}"  # a waypoint id: '~' is in no node id
            col[w] = c
            route.append(w)
        route.append(b)
        for seg in itertools.pairwise(route):
            if seg not in segments:
                segments.append(seg)
        routes.append(tuple(route))
    return Layered(col, tuple(segments), tuple(routes))


def _order(lg: Layered, ids: list[str]) -> list[list[str]]:
    """Rows inside each column: sweeps of the barycentre heuristic (left to right, then right to
    left), ties kept in model order, which makes the result deterministic."""
    col = lg.col
    ncols = max(col.values()) + 1
    cols: list[list[str]] = [[nid for nid in ids if col[nid] == c] for c in range(ncols)]
    preds: dict[str, list[str]] = {nid: [] for nid in ids}
    succs: dict[str, list[str]] = {nid: [] for nid in ids}
    for a, b in lg.segments:
        preds[b].append(a)
        succs[a].append(b)

    def position() -> dict[str, float]:
        return {nid: (i + 0.5) / len(c) for c in cols for i, nid in enumerate(c)}

    def sweep(indices, neighbours) -> None:
        for ci in indices:
            pos = position()
            c = cols[ci]
            keyed = []
            for i, nid in enumerate(c):
                ns = [pos[n] for n in neighbours[nid]]
                keyed.append(((sum(ns) / len(ns)) if ns else (i + 0.5) / len(c), i, nid))
            cols[ci] = [nid for _, _, nid in sorted(keyed)]

    for _ in range(3):
        sweep(range(1, ncols), preds)
        sweep(range(ncols - 2, -1, -1), succs)
    sweep(range(1, ncols), preds)
    return cols


def layout(g: Graph):
    """Boxes, waypoints (id -> (left x, right x, y)), the routes, the drawing's width and
    height, and each band's (title, left x, right x)."""
    lg = _layer(g)
    ids = [n.id for n in g.nodes] + [w for w in lg.col if w.startswith("~")]
    cols = _order(lg, ids)
    by_id = {n.id: n for n in g.nodes}
    size = {}
    for n in g.nodes:
        w = max(len(line) for line in n.lines) * _CHAR_W + 2 * _PAD_X
        size[n.id] = (max(w, 48.0), len(n.lines) * _LINE_H + 2 * _PAD_Y)
    for w in ids:
        if w not in by_id:
            size[w] = (0.0, 4.0)
    col_w = [max(size[nid][0] for nid in c) for c in cols]
    # a band is at least as wide as its title
    for b, title in enumerate(g.bands):
        cs = sorted({lg.col[n.id] for n in g.nodes if n.band == b})
        have = sum(col_w[c] for c in cs) + _COL_GAP * (len(cs) - 1)
        need = len(title) * _CHAR_W + 8
        if need > have:
            for c in cs:
                col_w[c] += (need - have) / len(cs)
    gap = {True: 8.0, False: _ROW_GAP}

    def column_height(c) -> float:
        h = sum(size[nid][1] for nid in c)
        return h + sum(
            gap[a.startswith("~") and b.startswith("~")] for a, b in itertools.pairwise(c)
        )

    col_h = [column_height(c) for c in cols]
    inner_h = max(col_h)
    boxes, points, x = [], {}, _MARGIN
    xs = []
    for ci, c in enumerate(cols):
        y = _BAND_TOP + 20 + (inner_h - col_h[ci]) / 2
        xs.append(x)
        for i, nid in enumerate(c):
            w, h = size[nid]
            if nid in by_id:
                boxes.append(Box(by_id[nid], x + (col_w[ci] - w) / 2, y, w, h))
            else:
                points[nid] = (x, x + col_w[ci], y + h / 2)
            y += h
            if i + 1 < len(c):
                y += gap[nid.startswith("~") and c[i + 1].startswith("~")]
        x += col_w[ci] + _COL_GAP
    width = x - _COL_GAP + _MARGIN
    height = _BAND_TOP + 20 + inner_h + 16 + _MARGIN
    bands = []
    for b, title in enumerate(g.bands):
        cs = sorted({lg.col[n.id] for n in g.nodes if n.band == b})
        bands.append((title, xs[cs[0]] - _COL_GAP / 4, xs[cs[-1]] + col_w[cs[-1]] + _COL_GAP / 4))
    return boxes, points, lg.routes, width, height, bands


def _f(v: float) -> str:
    """Coordinates with one decimal and no trailing zeros: short and deterministic."""
    s = f"{v:.1f}"
    return s.removesuffix(".0")


def to_svg(cc) -> str:
    """The diagram as a standalone SVG document."""
    g = build_graph(cc)
    boxes, points, routes, width, height, bands = layout(g)
    at = {b.node.id: b for b in boxes}
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{_f(width)}" height="{_f(height)}" '
            f'viewBox="0 0 {_f(width)} {_f(height)}" font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" '
            'font-size="12">'
        ),
        f"<title>{escape(g.name)}: data flow of one step (cellspec)</title>",
        "<defs>",
        (
            '<marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
            'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#6b7280"/></marker>'
        ),
        "</defs>",
        f'<rect x="0" y="0" width="{_f(width)}" height="{_f(height)}" fill="#ffffff"/>',
        (
            f'<text x="{_MARGIN}" y="22" font-size="15" font-weight="bold">{escape(g.name)}'
            f'<tspan font-weight="normal" font-size="12" fill="#4b5563">  one step: inputs and states '
            "(left) to next states and outputs (right)</tspan></text>"
        ),
    ]
    for i, (title, x0, x1) in enumerate(bands):
        shade = "#f8fafc" if i % 2 == 0 else "#eef2f7"
        out.append(
            f'<g class="band"><rect x="{_f(x0)}" y="{_BAND_TOP - 8}" width="{_f(x1 - x0)}" '
            f'height="{_f(height - _BAND_TOP - _MARGIN + 16)}" rx="6" fill="{shade}" stroke="#cbd5e1"/>'
            f'<text x="{_f((x0 + x1) / 2)}" y="{_BAND_TOP + 8}" text-anchor="middle" fill="#334155" '
            f'font-weight="bold">{escape(title)}</text></g>'
        )

    # ports: the edges into a box end at points spread over its left side, in the order of where
    # they come from (so they do not cross at the box); the edges out of a box leave from one
    # point per first hop, spread likewise over its right side
    def y_of(nid: str) -> float:
        return points[nid][2] if nid in points else at[nid].y + at[nid].h / 2

    def spread(box: Box, keys: list) -> dict:
        n = len(keys)
        step = min(box.h / (n + 1), 9.0)
        top = box.y + box.h / 2 - step * (n - 1) / 2
        return {k: top + i * step for i, k in enumerate(keys)}

    incoming: dict[str, list] = {}
    outgoing: dict[str, list] = {}
    for route in routes:
        incoming.setdefault(route[-1], []).append((y_of(route[-2]), route[0], route))
        hop = route[1]
        if (y_of(hop), hop) not in outgoing.setdefault(route[0], []):
            outgoing[route[0]].append((y_of(hop), hop))
    port_in = {}
    for nid, items in incoming.items():
        port_in.update({(nid, r): y for (_, _, r), y in spread(at[nid], sorted(items)).items()})
    port_out = {}
    for nid, items in outgoing.items():
        port_out.update({(nid, h): y for (_, h), y in spread(at[nid], sorted(items)).items()})
    for route in routes:
        a, b = route[0], route[-1]
        s, t = at[a], at[b]
        pts = [(s.x + s.w, port_out[(a, route[1])])]
        for w in route[1:-1]:
            left, right, y = points[w]
            pts += [(left, y), (right, y)]
        pts.append((t.x, port_in[(b, route)]))
        d = f"M {_f(pts[0][0])} {_f(pts[0][1])}"
        for i in range(1, len(pts)):
            (x1, y1), (x2, y2) = pts[i - 1], pts[i]
            if i % 2 == 0:  # through a column: straight
                d += f" L {_f(x2)} {_f(y2)}"
            else:  # across a gap between columns: a smooth S
                dx = (x2 - x1) / 2
                d += f" C {_f(x1 + dx)} {_f(y1)}, {_f(x2 - dx)} {_f(y2)}, {_f(x2)} {_f(y2)}"
        out.append(
            f'<path class="edge" d="{d}" fill="none" stroke="#6b7280" stroke-width="1.3" '
            f'marker-end="url(#arrow)"><title>{escape(a)} → {escape(b)}</title></path>'
        )
    for bx in boxes:
        n = bx.node
        fill, stroke = _STYLE[n.kind]
        width_px = "2.2" if n.kind in ("next", "output") else "1.2"
        out.append(f'<g class="node {n.kind}" id="{escape(n.id)}"><title>{escape(n.title)}</title>')
        out.append(
            f'<rect x="{_f(bx.x)}" y="{_f(bx.y)}" width="{_f(bx.w)}" height="{_f(bx.h)}" rx="5" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="{width_px}"/>'
        )
        for i, line in enumerate(n.lines):
            y = bx.y + _PAD_Y + (i + 0.78) * _LINE_H
            weight = ' font-weight="bold"' if i == 0 else ' fill="#374151"'
            out.append(
                f'<text x="{_f(bx.x + bx.w / 2)}" y="{_f(y)}" text-anchor="middle"{weight}>'
                f"{escape(line)}</text>"
            )
        out.append("</g>")
    # a legend under the bands
    lx, ly = _MARGIN, height - 14
    legend = [
        ("input", "input"),
        ("state", "previous state"),
        ("gemm", "GEMM (params)"),
        ("value", "gate / value"),
        ("next", "next state"),
        ("output", "output"),
    ]
    if any(n.kind == "mask" for n in g.nodes):
        legend.insert(2, ("mask", "random mask"))
    for kind, text in legend:
        fill, stroke = _STYLE[kind]
        out.append(
            f'<rect x="{_f(lx)}" y="{_f(ly - 10)}" width="14" height="12" rx="3" fill="{fill}" stroke="{stroke}"/>'
            f'<text x="{_f(lx + 19)}" y="{_f(ly)}" fill="#374151">{escape(text)}</text>'
        )
        lx += 19 + len(text) * _CHAR_W + 18
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _dot_id(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(cc) -> str:
    """The same graph as Graphviz DOT source (``dot -Tsvg``), one cluster per band."""
    g = build_graph(cc)
    out = [
        f"digraph {_dot_id(g.name)} {{",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fontname="monospace", fontsize=11];',
        '  edge [color="#6b7280"];',
    ]
    for b, title in enumerate(g.bands):
        out.append(f"  subgraph cluster_{b} {{")
        out.append(
            f'    label={_dot_id(title)}; style="rounded,filled"; fillcolor="#f8fafc"; color="#cbd5e1";'
        )
        for n in g.nodes:
            if n.band == b:
                fill, stroke = _STYLE[n.kind]
                label = "\\n".join(
                    line.replace("\\", "\\\\").replace('"', '\\"') for line in n.lines
                )
                out.append(
                    f'    {_dot_id(n.id)} [label="{label}", fillcolor="{fill}", color="{stroke}", '
                    f"tooltip={_dot_id(n.title)}];"
                )
        out.append("  }")
    for a, b in g.edges:
        out.append(f"  {_dot_id(a)} -> {_dot_id(b)};")
    out.append("}")
    return "\n".join(out) + "\n"
