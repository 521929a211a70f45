"""A cell's forward equations and its derived backward, typeset as LaTeX for a paper.

Input: a :class:`~cellspec.driver.CompiledCell`. Output: text, two ``align`` environments (the
forward step, then the backward step). The expressions are the SymPy ones the back ends print,
through SymPy's LaTeX printer with the cell's functions as ``\\sigma``, ``\\tanh``, ...,
elementwise products as ``\\odot``, projections as ``W_{r} x`` and next states as written
(``h'``). Notation of the backward: ``\\delta v`` is the gradient of the loss with respect to
``v`` at this step; ``\\delta_{t+1} s`` is the gradient of state ``s`` carried back from the next
step; ``\\delta_{y} v`` is the gradient arriving at output ``v`` from this step's loss; params
accumulate (``\\mathrel{+}=``) over steps and batch rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp
from sympy.printing.conventions import split_super_sub
from sympy.printing.latex import LatexPrinter, translate
from sympy.printing.precedence import PRECEDENCE, precedence

from cellspec.frontend.semantics import ROW
from cellspec.model import functions as fn
from cellspec.model.schedule import GemmGroup

#: how each function of the language is typeset: (LaTeX name, whether it is an operator name)
_FUNCTIONS: dict[type, str] = {
    fn.Sigmoid: r"\sigma",
    fn.Tanh: r"\tanh",
    fn.Exp: r"\exp",
    fn.Log: r"\log",
    fn.Relu: r"\operatorname{relu}",
    fn.Softplus: r"\operatorname{softplus}",
    fn.Softsign: r"\operatorname{softsign}",
    fn.HardSigmoid: r"\operatorname{hard\_sigmoid}",
    fn.Min: r"\min",
    fn.Max: r"\max",
    fn.Clip: r"\operatorname{clip}",
    fn.RowSum: r"\textstyle\sum",  # over the units of a row
    # masks that only derivatives use: indicator functions
    fn.Positive: r"\mathbb{1}_{>0}",
    fn.Sign: r"\operatorname{sign}",
    fn.InsideOpen3: r"\mathbb{1}_{(-3, 3)}",
    fn.LessTie: r"\operatorname{less}",
    fn.ClipPass: r"\operatorname{clip\_pass}",
    fn.ClipLow: r"\operatorname{clip\_low}",
    fn.ClipHigh: r"\operatorname{clip\_high}",
}


def name_latex(name: str) -> str:
    """A spec name as a math symbol: ``W_hi`` → ``W_{hi}``, ``mu`` → ``\\mu``, ``t1_2`` →
    ``t_{1,2}``, ``cand`` → ``\\mathit{cand}`` (a multi-letter name reads as one word, not a
    product)."""
    base, sups, subs = split_super_sub(name)
    text = translate(base)
    if len(base) > 1 and text == base:
        text = r"\mathit{" + base + "}"
    if subs:
        text += "_{" + ",".join(translate(x) for x in subs) + "}"
    if sups:
        text += "^{" + ",".join(translate(x) for x in sups) + "}"
    return text


def _spec_name_latex(key: str) -> str:
    """A name as written in the spec, primes included: ``h'`` → ``h'``."""
    return name_latex(key[:-1]) + "'" if key.endswith("'") else name_latex(key)


class CellLatexPrinter(LatexPrinter):
    """SymPy's LaTeX printer with symbols named by a table and the cell's functions typeset."""

    def __init__(self, names: dict[str, str], compound: frozenset[str] = frozenset(),
                 scalars: frozenset[str] = frozenset()):
        super().__init__({"mul_symbol": None})
        self.names = names
        self.compound = compound  # symbols shown as products (W x): parenthesised in a product
        self.scalars = scalars  # symbols shown as numbers (a const, a scalar param): no \odot

    def _print_Symbol(self, expr, style="plain"):
        return self.names.get(expr.name) or name_latex(expr.name)

    def _print_Function(self, expr, exp=None):
        cls = type(expr)
        if cls is fn.Abs:
            body = r"\left|" + self._print(expr.args[0]) + r"\right|"
            return body if exp is None else body + "^{" + exp + "}"
        if cls is fn.Sqrt:
            body = r"\sqrt{" + self._print(expr.args[0]) + "}"
            return body if exp is None else r"\left(" + body + r"\right)^{" + exp + "}"
        head = _FUNCTIONS.get(cls)
        if head is None:  # pragma: no cover - every function of functions.py has an entry
            return super()._print_Function(expr, exp)
        if exp is not None:
            head = head + "^{" + exp + "}"
        args = ", ".join(self._print(a) for a in expr.args)
        return head + r"\left(" + args + r"\right)"

    def _print_Mul(self, expr):
        """Elementwise products as ``\\odot``, quotients as fractions, numbers in front."""
        coeff, rest = expr.as_coeff_Mul()
        factors = sp.Mul.make_args(rest)
        sign = ""
        if coeff.is_negative:
            sign, coeff = "-", -coeff
        num, den = [], []
        for f in factors:
            base, e = f.as_base_exp()
            if e.is_Number and e.is_negative:
                den.append(base if e == -1 else base ** (-e))
            else:
                num.append(f)
        if coeff.is_Rational and coeff.q != 1:
            num_c, den_c = coeff.p, coeff.q
            if num_c != 1:
                num.insert(0, sp.Integer(num_c))
            den.insert(0, sp.Integer(den_c))
            coeff = sp.Integer(1)

        def product(items) -> str:
            if not items:
                return "1"
            lead_scalars = [factor(f) for f in items if f.is_Symbol and f.name in self.scalars]
            vectors = [factor(f) for f in items if not (f.is_Symbol and f.name in self.scalars)]
            return " ".join(lead_scalars + ([r" \odot ".join(vectors)] if vectors else []))

        def factor(f) -> str:
            if f.is_Symbol and f.name in self.compound:
                return r"\left(" + self._print(f) + r"\right)"
            return self.parenthesize(f, PRECEDENCE["Mul"], strict=False)

        lead = "" if coeff == 1 else self._print(coeff) + " "
        if den:
            top = product(num)
            numbers = [self._print(d) for d in den if d.is_Number]
            others = [d for d in den if not d.is_Number]
            if len(others) == 1 and not numbers:
                bottom = self._print(others[0])
            else:
                bottom = " ".join(numbers + [r" \\odot ".join(factor(d) for d in others)]).strip()
            return sign + lead + r"\frac{" + top + "}{" + bottom + "}"
        if not num:
            return sign + self._print(coeff)
        body = product(num)
        if lead and precedence(num[0]) < PRECEDENCE["Mul"] and len(num) == 1:
            body = r"\left(" + body + r"\right)"
        return sign + lead + body


def _adjoint_of(key: str, names: dict[str, str], adjoint: dict[str, str]) -> str:
    if key in adjoint:
        return names[adjoint[key]]
    return r"\delta\left(" + names[key] + r"\right)"


def _group_latex(g: GemmGroup, operand: str, names: dict[str, str], adjoint: dict[str, str]) -> str:
    """The GEMM backward of a group for one of its operands v: Σ_p W_pᵀ δ(W_p v)."""
    return " + ".join(
        f"{name_latex(p.matrix)}^{{\\top}} {_adjoint_of(p.key, names, adjoint)}"
        for p in g.of(operand)
    )


def _names(cc) -> dict[str, str]:
    """Symbol name → LaTeX for every name the forward and the backward read or write."""
    m, s, b = cc.model, cc.schedule, cc.backward
    names: dict[str, str] = {}
    synthetic = {v.key: v for v in m.values if v.spec_key == ""}
    printer = CellLatexPrinter(names)
    for key in m.leaves:
        names[key] = name_latex(key)
    for pr in m.prepared:  # a const or scalar param broadcast to a size is shown as itself
        if len(pr.shape) == 1:
            names[pr.key] = _terms_latex(pr)
    for v in m.values:
        if v.spec_key.endswith("'"):
            names[v.key] = name_latex(v.spec_key[:-1]) + "'"
        elif v.spec_key:
            names[v.key] = name_latex(v.spec_key)
    def name_projection(p) -> None:
        op = names[p.operand]
        if p.operand in synthetic and not synthetic[p.operand].expr.is_Symbol:
            op = r"\left(" + op + r"\right)"
        names[p.key] = f"{name_latex(p.matrix)} {op}"

    printer.scalars = _scalar_names(m)
    for v in m.values:  # a reduction's row value (mean, rstd) is a named row of its own
        if v.key in synthetic and v.size == ROW:
            names[v.key] = name_latex(v.key)
    for v in m.values:  # synthetic operands are shown as what they compute (in model order)
        if v.key in synthetic and v.size != ROW:
            read = {x.name for x in v.expr.free_symbols}
            for p in m.projections:  # W2 @ tanh(W1 @ x): W1 @ x is named before tanh(...) is printed
                if p.key in read and p.key not in names:
                    name_projection(p)
            names[v.key] = printer.doprint(v.expr)
    for p in m.projections:
        name_projection(p)
    # adjoints
    states = {st.name for st in m.cell.states}
    for key, adj in b.adjoint.items():
        shown = names.get(key, name_latex(key))
        if key in synthetic or any(p.key == key for p in m.projections):
            shown = r"\left(" + shown + r"\right)"
        names[adj] = (r"\delta_{t+1} " if key in states else r"\delta ") + shown
    for key, seed in b.output_seed.items():
        names[seed] = r"\delta_{y} " + names[key]
    for key, seed in b.step_seed.items():
        names[seed] = r"\delta_{t} " + names[key]
    for key, adj in b.hoisted_leaf_adjoint.items():  # the hoisted part's share, summed in
        names[adj] = r"\delta " + names[key]
    for st in s.stages:
        for g in st.gemms:
            for o in g.operands:
                adj = b.gemm_adjoint.get((st.index, o))
                if adj:
                    names[adj] = r"\left(" + _group_latex(g, o, names, b.adjoint) + r"\right)"
    for g in s.hoisted_gemms:
        for o in g.operands:
            adj = b.hoisted_gemm_adjoint.get(o)
            if adj:
                names[adj] = r"\left(" + _group_latex(g, o, names, b.adjoint) + r"\right)"
    return names


def _coef_latex(coef) -> str:
    return CellLatexPrinter({}).doprint(coef) if coef.free_symbols else sp.latex(coef)


def _signed_sum(items) -> str:
    r"""``coef * text`` terms as one sum (``W - W^\top - \gamma I``); an empty text is the bare
    coefficient."""
    out = []
    for coef, text in items:
        neg = coef.could_extract_minus_sign()
        coef = -coef if neg else coef
        body = text if coef == 1 and text else _coef_latex(coef) + (" " + text if text else "")
        out.append(("- " if neg else ("+ " if out else "")) + body)
    return " ".join(out) or "0"


def _terms_latex(pr) -> str:
    r"""A prepared param: a matrix as its terms (``W - W^\top - \gamma I``); a broadcast const or
    scalar as itself; ``1/H`` (a mean's factor) as a fraction."""
    def source(t) -> str:
        if t.source is None:
            return "I" if len(pr.shape) == 2 else ""  # the identity, or a vector of ones
        return name_latex(t.source) + (r"^{\top}" if t.transpose else "")

    terms = sorted(pr.terms, key=lambda t: (t.source is None, t.transpose))
    return _signed_sum((t.coef, source(t)) for t in terms)


def _prepared_rows(m) -> list[tuple[str, str, str]]:
    r"""Forward: the matrices formed before the loop (``W_{mat} = W - W^\top - \gamma I``)."""
    return [(name_latex(pr.key), "=", _terms_latex(pr)) for pr in m.prepared if len(pr.shape) == 2]


def _prepared_grad_rows(m) -> list[tuple[str, str, str]]:
    """Backward: each trained param's share of the prepared matrices' gradients."""
    trained = {p.name for p in (m.spec_cell or m.cell).params}
    acc: dict[str, list] = {}
    for pr in m.prepared:
        if len(pr.shape) != 2:
            continue
        for t in pr.terms:
            if t.source in trained:
                g = r"\delta " + name_latex(pr.key)
                acc.setdefault(t.source, []).append((t.coef, r"\left(" + g + r"\right)^{\top}" if t.transpose else g))
    return [(r"\delta " + name_latex(k), r"\mathrel{+}=", _signed_sum(v)) for k, v in acc.items()]


def _scalar_names(m) -> frozenset[str]:
    return frozenset(pr.key for pr in m.prepared if len(pr.shape) == 1)


def _rows(rows: list[tuple[str, str, str]]) -> list[str]:
    """``lhs &op rhs \\\\`` lines (the last without the line break)."""
    out = [f"  {lhs} &{op} {rhs}" for lhs, op, rhs in rows]
    return [line + r" \\" for line in out[:-1]] + out[-1:]


def _strip_parens(text: str) -> str:
    """Drop a pair of \\left( \\right) that encloses the whole text."""
    open_, close = r"\left(", r"\right)"
    if not (text.startswith(open_) and text.endswith(close)):
        return text
    depth, i = 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif text.startswith(close, i):
            depth, i = depth - 1, i + len(close)
            if depth == 0 and i < len(text):  # the first pair closes before the end
                return text
        else:
            i += 1
    return text[len(open_) : -len(close)]


def forward_latex(cc) -> str:
    """The forward step: one line per named value of the spec, in the order written."""
    names = _names(cc)
    pr = CellLatexPrinter(names, frozenset(p.key for p in cc.model.projections), _scalar_names(cc.model))
    rows = _prepared_rows(cc.model) + [(names[v.key], "=", pr.doprint(v.expr)) for v in cc.model.values
                                       if v.spec_key or v.size == ROW]
    return "\n".join([r"\begin{align}", *_rows(rows), r"\end{align}"])


def backward_latex(cc) -> str:
    """The backward step as derived: adjoints stage by stage (last stage first), then the
    previous states, inputs and params (weights as outer products)."""
    m, s, b = cc.model, cc.schedule, cc.backward
    names = _names(cc)
    pr = CellLatexPrinter(names, frozenset(p.key for p in cc.model.projections), _scalar_names(m))
    params = {p.name for p in m.cell.params}
    param_adj = {b.adjoint[k] for k in params if k in b.adjoint}
    param_adj |= {adj for k, adj in b.hoisted_leaf_adjoint.items() if k in params}
    states = {st.name for st in m.cell.states}
    # a hoisted share of a leaf's gradient adds to it: always for a param, and for an input when
    # the step gives it a share too
    hoisted_add = {
        adj
        for key, adj in b.hoisted_leaf_adjoint.items()
        if key in params or (key in b.adjoint and key not in b.zero)
    }

    def row(a, outgoing_state: bool = False):
        target = names.get(a.target) or name_latex(a.target)
        if outgoing_state:
            target = target.replace(r"\delta_{t+1} ", r"\delta ", 1)
        op = r"\mathrel{+}=" if a.target in param_adj or a.target in hoisted_add else "="
        return (target, op, _strip_parens(pr.doprint(a.expr)))

    rows = []
    for st in b.stages:
        rows += [row(a) for a in st.assigns]
    state_adj = {b.adjoint[k] for k in states if k in b.adjoint}
    rows += [row(a, a.target in state_adj) for a in b.leaf_assigns]
    rows += [row(a) for a in b.hoisted_assigns + b.hoisted_leaf_assigns]
    # an input's share from the hoisted GEMMs it is the operand of: the whole gradient when nothing
    # above gave the input a share, else added to it
    shown = {r[0] for r in rows}
    for g in s.hoisted_gemms:
        for o in g.operands:
            leaf = m.leaves.get(o)
            if leaf is None or leaf.kind != "input":
                continue
            target = r"\delta " + names[o]
            rows.append(
                (target, r"\mathrel{+}=" if target in shown else "=", _group_latex(g, o, names, b.adjoint))
            )
            shown.add(target)
    # weight gradients: one outer product per projection, summed over steps and batch rows
    groups = [g for st in s.stages for g in st.gemms] + list(s.hoisted_gemms)
    for g in groups:
        for p in g.projections:
            op = names[p.operand]
            if any(
                v.key == p.operand and not v.spec_key and not v.expr.is_Symbol for v in m.values
            ):
                op = r"\left(" + op + r"\right)"
            rows.append(
                (
                    r"\delta " + name_latex(p.matrix),
                    r"\mathrel{+}=",
                    f"{_adjoint_of(p.key, names, b.adjoint)} {op}^{{\\top}}",
                )
            )
    rows += _prepared_grad_rows(m)
    return "\n".join([r"\begin{align}", *_rows(rows), r"\end{align}"])


def cell_latex(cc) -> str:
    """Forward and backward of one cell, with LaTeX comments saying which is which."""
    c = cc.checked
    outs = ", ".join(c.outputs)
    return "\n".join(
        [
            f"% {c.name} ({c.filename}): forward step; outputs {outs}",
            forward_latex(cc),
            f"% {c.name}: backward step, derived by cellspec. \\delta v = dL/dv at this step;",
            "% \\delta_{t+1} s: gradient of state s from the next step; \\delta_{y} v: gradient at",
            "% output v from this step's loss; params accumulate (+=) over steps and batch rows.",
            backward_latex(cc),
        ]
    )


def cell_markdown(cc) -> str:
    """The same equations as Markdown: a heading and ``$$`` display blocks."""
    c = cc.checked
    return "\n".join(
        [
            f"### {c.name}",
            "",
            f"Forward step (outputs: {', '.join('$' + _spec_name_latex(o) + '$' for o in c.outputs)}):",
            "",
            "$$",
            forward_latex(cc),
            "$$",
            "",
            (
                "Backward step, as cellspec derives it ($\\delta v$: gradient of the loss with "
                "respect to "
                "$v$ at this step; $\\delta_{t+1} s$: gradient of state $s$ from the next step; "
                "$\\delta_{y} v$: gradient at output $v$ from this step's loss; params accumulate over "
                "steps and batch rows):"
            ),
            "",
            "$$",
            backward_latex(cc),
            "$$",
        ]
    )


def cell_source(checked) -> str:
    """The spec text of one cell: the comment lines right above it and its ``cell { ... }``
    block, as written."""
    from cellspec.errors import Source

    lines = Source("", checked.source_text).lines()
    start = checked.line - 1
    while start > 0 and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    depth, seen, end = 0, False, len(lines)
    for i in range(checked.line - 1, len(lines)):
        code = lines[i].split("#", 1)[0]
        depth += code.count("{") - code.count("}")
        seen = seen or "{" in code
        if seen and depth <= 0:
            end = i + 1
            break
    return "\n".join(lines[start:end])


@dataclass(frozen=True)
class _Parts:
    """The parts of a CompiledCell that the functions here read (a back end has only these)."""

    checked: object
    model: object
    schedule: object
    backward: object


def package_context(sched, back) -> dict[str, str]:
    """What the generated package's ``__init__.py`` shows: the spec (for its docstring, escaped
    for a Python string) and the equations (for ``EQUATIONS_LATEX``, a raw string)."""
    cc = _Parts(sched.model.cell, sched.model, sched, back)
    spec = "\n".join(("    " + line).rstrip() for line in cell_source(cc.checked).split("\n"))
    equations = cell_latex(cc)
    assert '"""' not in equations and not equations.endswith("\\")  # safe in r"""..."""
    return {
        "spec_docstring": spec.replace("\\", "\\\\").replace('"""', '\\"\\"\\"'),
        "equations_latex": equations,
    }
