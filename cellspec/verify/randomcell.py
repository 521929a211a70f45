"""Random valid ``.cell`` specs for differential fuzzing, each with an independent reference.

Input: a seed. Output: a :class:`RandomCell` — the spec text, and the expression trees it was
printed from. The trees are evaluated by :func:`reference_sequence`, a small interpreter in
plain ``torch`` ops that shares nothing with cellspec's parser, lowering or printers, so a
precedence, lowering or printing bug shows up as a disagreement with it (gradients come from
autograd through the interpreter).

The generator covers every operator (``+ - * / @ ^ **``, unary minus), every function, extra
size symbols (``size P = ...``), several inputs, states and outputs, multi-stage projections
(``U @ (r * h)``), hoisted compound operands (``W @ (x * m)``), reused matrices, primed states
read after their update, dead intermediates, redundant parentheses, odd number spellings and
names that clash with Python/C/torch (which the back ends must mangle). Domains are kept safe:
``log``/``sqrt``/fractional powers and divisors only see expressions bounded away from zero,
``exp`` only sees bounded arguments, and state updates are mostly squashed, so every value of
a short sequence is finite and of moderate size.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from cellspec.model import ops

#: names that clash with Python keywords/built-ins, NumPy/torch aliases, C/CUDA names, and
#: names cellspec generates itself (adjoints ``d_*``, next states ``*_next``, temporaries ``t0``).
HOSTILE_NAMES = [
    "lambda", "self", "np", "torch", "nn", "F", "math", "float", "int", "out", "forward", "input_",
    "register_buffer", "sum_", "len", "print", "class", "def_", "None_", "True_", "double", "real",
    "threadIdx", "exp_", "d_h", "h_next", "t0", "t1", "W_x", "W_in", "W_out", "x_seq", "g", "dw",
    "sizes_", "step", "backward", "state_", "params", "grads", "np_", "tanh_", "sigmoid_",
]
#: param names may not shadow nn.Module attributes (refused by the semantics), so fewer clashes
HOSTILE_PARAM_NAMES = ["lambda", "np", "torch", "nn", "F", "math", "int", "out", "self", "len",
                       "class", "real", "exp_", "W_x", "d_h", "t0", "step", "grads", "params"]

# The vocabulary comes from the op table's fuzz tags (the reference interpreter below does not:
# its math is written independently of cellspec).
_FUNCTIONS = [o for o in ops.OPS if o.name in ops.language_functions() and o.shape_rule == "elementwise"]
#: one-argument functions
UNARY = [o.name for o in _FUNCTIONS if o.max_args == 1]
#: squashing functions: bounded output for any finite input
SQUASH = [o.name for o in _FUNCTIONS if "squash" in o.fuzz]
#: reading or writing these is fine anywhere (bounded growth on bounded input)
SAFE_UNARY = [o.name for o in _FUNCTIONS if "safe" in o.fuzz and o.max_args == 1]
#: only for arguments bounded away from zero (log, sqrt)
POSITIVE_DOMAIN = [o.name for o in _FUNCTIONS if "needs-positive-domain" in o.fuzz]
#: only for bounded arguments (exp)
BOUNDED_ARGUMENT = [o.name for o in _FUNCTIONS if "needs-bounded-argument" in o.fuzz]
#: functions of several arguments (min, max, clip)
MULTI = [o.name for o in _FUNCTIONS if o.max_args > 1]


@dataclass(frozen=True)
class Node:
    """An expression: ``op`` is num, name, neg, pow, bin, matmul, call or paren."""

    op: str
    args: tuple
    size: str | None  # size symbol, None for a pure number

    # precedence as the grammar has it: sum 1, product 2, unary 3, power 4, atom 5
    @property
    def prec(self) -> int:
        if self.op == "bin":
            return 1 if self.args[0] in "+-" else 2
        if self.op == "matmul":
            return 2
        if self.op == "neg":
            return 3
        if self.op == "pow":
            return 4
        return 5


def num(text: str) -> Node:
    return Node("num", (text,), None)


def name(key: str, size: str, primed: bool = False) -> Node:
    return Node("name", (key, primed), size)


def neg(a: Node) -> Node:
    return Node("neg", (a,), a.size)


def binop(op: str, a: Node, b: Node) -> Node:
    return Node("bin", (op, a, b), a.size or b.size)


def call(f: str, *args: Node) -> Node:
    return Node("call", (f, *args), next((a.size for a in args if a.size), None))


def power(base: Node, exponent: str, spelling: str = "^", paren: bool = False) -> Node:
    return Node("pow", (base, exponent, spelling, paren), base.size)


def matmul(matrix: str, operand: Node, out: str) -> Node:
    return Node("matmul", (matrix, operand), out)


def paren(a: Node) -> Node:
    return Node("paren", (a,), a.size)


def render(e: Node) -> str:
    """Spec text with only the parentheses the grammar needs (plus explicit ``paren`` nodes)."""
    if e.op == "num":
        return e.args[0]
    if e.op == "name":
        key, primed = e.args
        return key + ("'" if primed else "")
    if e.op == "paren":
        return "(" + render(e.args[0]) + ")"
    if e.op == "neg":
        return "-" + _sub(e.args[0], 3)
    if e.op == "pow":
        base, exponent, spelling, par = e.args
        ex = f"({exponent})" if par else exponent
        return f"{_sub(base, 5)} {spelling} {ex}"
    if e.op == "bin":
        op, a, b = e.args
        p = e.prec
        return f"{_sub(a, p)} {op} {_sub(b, p + 1)}"
    if e.op == "matmul":
        matrix, operand = e.args
        return f"{matrix} @ {_sub(operand, 3)}"
    if e.op == "call":
        f, *args = e.args
        return f"{f}(" + ", ".join(render(a) for a in args) + ")"
    raise ValueError(e.op)


def _sub(e: Node, need: int) -> str:
    text = render(e)
    # a number with a sign (from a negative literal) or a lower-precedence node needs parens
    if e.prec < need or (e.op == "num" and text.startswith("-")):
        return "(" + text + ")"
    return text


@dataclass
class RandomCell:
    """One random spec and what the reference interpreter needs to evaluate it."""

    seed: int
    name: str
    text: str
    sizes: dict[str, str]  # symbol -> constructor argument
    inputs: list[tuple[str, str]]
    states: list[tuple[str, str]]
    params: dict[str, tuple[str, ...]]
    assigns: list[tuple[str, Node]]  # (key as in the spec: "a" or "h'", expression)
    outputs: list[str]
    features: set[str] = field(default_factory=set)
    #: ``def``s of the file: name -> (argument names, body over them)
    defs: dict[str, tuple[tuple[str, ...], Node]] = field(default_factory=dict)
    #: ``const``s of the cell: name -> value (the generated code's defaults)
    consts: dict[str, float] = field(default_factory=dict)


class _Gen:
    def __init__(self, seed: int, hostile: bool):
        self.rng = random.Random(seed)
        self.seed = seed
        self.hostile = hostile
        self.taken: set[str] = set()
        self.params: dict[str, tuple[str, ...]] = {}
        self.features: set[str] = set()
        self.counter = 0
        self.consts: dict[str, str] = {}  # name -> number text
        self.defs: dict[str, tuple[tuple[str, ...], Node]] = {}
        #: the random ops (dropout, variational_dropout, zoneout) draw from their own generator, so
        #: that adding them left the rest of every seed's cell as it was
        self.random_ops = random.Random(seed * 7919 + 17)

    # ---------------------------------------------------------------- names
    def fresh(self, base: str, pool: list[str] | None = None) -> str:
        r = self.rng
        if self.hostile and pool and r.random() < 0.3:
            cand = r.choice(pool)
            if cand not in self.taken and cand not in self.sizes:
                self.taken.add(cand)
                self.features.add("hostile-name")
                return cand
        while True:
            self.counter += 1
            cand = f"{base}{self.counter}"
            if cand not in self.taken:
                self.taken.add(cand)
                return cand

    def number(self, positive: bool = False) -> Node:
        r = self.rng
        text = r.choice(["1", "0.5", "2", "0.25", ".5", "1.", "1e-1", "3E-1", "1.5", "0.75", "2e0", "10e-1"])
        k = r.random()
        if k < 0.1:  # a const of the cell in the number's place (a keyword of the generated code)
            c = self.fresh("k")
            self.consts[c] = text
            self.features.add("const")
            return Node("name", (c, False), None)
        if k < 0.16:  # a trained scalar (no shape), between 0.5 and 1.5 at the start
            s = self.fresh("s", HOSTILE_PARAM_NAMES)
            self.params[s] = ()
            self.features.add("scalar-param")
            return Node("name", (s, False), None)
        if not positive and r.random() < 0.2:
            text = "-" + text
        return num(text)

    def reduction(self, size: str, depth: int) -> Node:
        """A layer norm (a vector of ``size``), or a vector scaled by a squashed row scalar (the
        sum or mean of one or several vectors of any sizes)."""
        r = self.rng
        if r.random() < 0.4:
            self.features.add("layer_norm")
            inner = self.bounded(size, depth - 1)
            eps = [num(r.choice(["0.5", "1", "1e-1"]))] if r.random() < 0.8 else []
            return call("layer_norm", inner, *eps)
        f = r.choice(["mean", "sum"])
        self.features.add(f)
        args = [self.bounded(r.choice(self.all_sizes), depth - 1) for _ in range(r.choice([1, 1, 2, 3]))]
        row = Node("call", (f, *args), "row")
        squashed = Node("call", (r.choice(SQUASH), Node("bin", ("*", row, num("0.3")), "row")), "row")
        return Node("bin", ("*", self.expr(size, depth - 1), squashed), size)

    def use_def(self, size: str, depth: int) -> Node:
        """A call of one of the file's defs (made on first use), expanded in place by cellspec."""
        r = self.rng
        if not self.defs or r.random() < 0.4:
            f = self.fresh("f")
            a, b = "u", "v"
            bodies = [
                binop("*", name(a, "arg"), call("sigmoid", name(b, "arg"))),
                binop("+", call("tanh", name(a, "arg")), binop("/", name(b, "arg"), num("2"))),
                binop("-", name(a, "arg"), binop("*", num("0.5"), call("softsign", name(b, "arg")))),
            ]
            self.defs[f] = ((a, b), r.choice(bodies))
            self.features.add("def")
        f = r.choice(sorted(self.defs))
        return call(f, self.expr(size, depth - 1), self.bounded(size, depth - 1))

    # ------------------------------------------------------------ expressions
    def leaf(self, size: str) -> Node:
        r = self.rng
        cands = [n for n in self.readable if n.size == size]
        if not cands or r.random() < 0.15:
            # a vector param, created on demand
            p = self.fresh("b", HOSTILE_PARAM_NAMES)
            self.params[p] = (size,)
            return name(p, size)
        return self.randomised(r.choice(cands))

    def randomised(self, leaf: Node) -> Node:
        """Sometimes a random op around a leaf: dropout, variational dropout, or zoneout between it
        and another vector of its size (its mask is fixed by the check; see evaluate)."""
        q = self.random_ops
        if q.random() >= 0.08:
            return leaf
        if q.random() < 0.25:
            rate = f"rate{len(self.consts) + 1}"
            while rate in self.taken:
                rate += "_"
            self.taken.add(rate)
            self.consts[rate] = q.choice(["0.25", "0.5"])
            rate_node = Node("name", (rate, False), None)
        else:
            rate_node = num(q.choice(["0.25", "0.5", "0", "0.1"]))
        kind = q.choice(["dropout", "variational_dropout", "zoneout"])
        others = [n for n in self.readable if n.size == leaf.size]
        self.features.add(kind)
        if kind == "zoneout":
            return Node("call", ("zoneout", leaf, q.choice(others), rate_node), leaf.size)
        return Node("call", (kind, leaf, rate_node), leaf.size)

    def projection(self, size: str, depth: int) -> Node:
        """``W @ operand`` with W [size, n]; the operand is a name or a compound expression."""
        r = self.rng
        in_size = r.choice(self.all_sizes)
        reuse = [k for k, s in self.params.items() if s == (size, in_size)]
        if reuse and r.random() < 0.3:
            matrix = r.choice(reuse)
            self.features.add("reused-matrix")
        else:
            matrix = self.fresh("W", HOSTILE_PARAM_NAMES)
            self.params[matrix] = (size, in_size)
        if r.random() < 0.55:
            operand = self.leaf(in_size)
        else:
            operand = self.bounded(in_size, depth - 1)
            self.features.add("compound-operand")
        return matmul(matrix, operand, size)

    def bounded(self, size: str, depth: int) -> Node:
        """An expression of moderate size: a squash, a clip or a plain small expression."""
        r = self.rng
        k = r.random()
        inner = self.expr(size, depth - 1)
        if k < 0.6:
            return call(r.choice(SQUASH), inner)
        if k < 0.8:
            lo, hi = r.choice([("-1", "1"), ("-2", "0.5"), ("0", "3")])
            self.features.add("clip")
            return call("clip", inner, num(lo) if lo[0] != "-" else neg(num(lo[1:])), num(hi))
        return inner

    def positive(self, size: str, depth: int) -> Node:
        """An expression >= 0.25: a safe argument for log, sqrt, division, fractional powers."""
        r = self.rng
        e = self.expr(size, depth - 1)
        k = r.randrange(6)
        if k == 0:
            return binop("+", call("sigmoid", e), num(r.choice(["0.5", "1", "0.25"])))
        if k == 1:
            return binop("+", call("softplus", e), num(r.choice(["0.5", "1"])))
        if k == 2:
            return binop("+", num("1"), call("abs", e))
        if k == 3:
            return call("exp", call(r.choice(SQUASH), e))
        if k == 4:
            return binop("+", power(paren(call("tanh", e)) if r.random() < 0.5 else call("tanh", e), "2"), num("0.5"))
        return binop("+", call("max", call("softsign", e), num("0")), num("0.5"))

    def expr(self, size: str, depth: int) -> Node:
        r = self.rng
        if depth <= 0:
            return self.leaf(size)
        k = r.random()
        if k < 0.14:
            return self.leaf(size)
        if k < 0.34:
            op = r.choice("+-*")
            a = self.expr(size, depth - 1)
            b = self.expr(size, depth - 1) if r.random() < 0.85 else self.number()
            if op == "*" and b.op != "num":
                b = call(r.choice(SQUASH), b)  # keep products bounded: one side squashed
            if r.random() < 0.5:
                a, b = b, a
            return binop(op, a, b)
        if k < 0.42:
            self.features.add("div")
            a = self.expr(size, depth - 1)
            if r.random() < 0.5:
                return binop("/", a, binop("+", num("1"), call("abs", self.expr(size, depth - 1))))
            return binop("/", a, self.positive(size, depth - 1))
        if k < 0.56:
            self.features.add("matmul")
            return self.projection(size, depth)
        if k < 0.74:
            f = r.choice(UNARY)
            self.features.add(f)
            if f in POSITIVE_DOMAIN:
                return call(f, self.positive(size, depth - 1))
            if f in BOUNDED_ARGUMENT:
                return call(f, self.bounded(size, depth - 1) if r.random() < 0.7 else
                            binop("*", num("0.5"), call("tanh", self.expr(size, depth - 1))))
            return call(f, self.expr(size, depth - 1))
        if k < 0.82:
            f = r.choice(MULTI)
            self.features.add(f)
            if f == "clip":
                lo = self.number() if r.random() < 0.5 else self.leaf(size)
                hi = self.number(positive=True) if r.random() < 0.5 else self.leaf(size)
                return call("clip", self.expr(size, depth - 1), lo, hi)
            rest = [self.expr(size, depth - 1) if r.random() < 0.7 else self.number()
                    for _ in range(ops.by_name(f).max_args - 1)]
            return call(f, self.expr(size, depth - 1), *rest)
        if k < 0.88:
            self.features.add("neg")
            return neg(self.expr(size, depth - 1))
        if k < 0.9:
            self.features.add("pow")
            spelling = r.choice(["^", "**"])
            if r.random() < 0.5:
                return power(paren(self.bounded(size, depth - 1)), r.choice(["2", "3", "2.0", "1"]), spelling)
            ex = r.choice(["0.5", "-1", "1.5", "-0.5", "-2", "2"])
            return power(paren(self.positive(size, depth - 1)), ex, spelling, paren=r.random() < 0.3)
        if k < 0.93:
            return self.reduction(size, depth)
        if k < 0.96:
            return self.use_def(size, depth)
        self.features.add("paren")
        return paren(self.expr(size, depth - 1))

    # ------------------------------------------------------------------- cell
    def run(self) -> RandomCell:
        r = self.rng
        self.sizes: dict[str, str] = {}
        extra = []
        for sym, arg in (("P", "proj_size"), ("Q", r.choice(["q_size", "n_heads", "width"]))):
            if r.random() < 0.35:
                extra.append(sym)
                self.sizes[sym] = arg
        self.all_sizes = ["I", "H", *extra]
        self.taken |= set(self.all_sizes)
        cell_name = f"Fuzz{self.seed}"
        inputs = [(self.fresh("x", HOSTILE_NAMES), "I")]
        for _ in range(r.choice([0, 0, 0, 1, 2])):
            inputs.append((self.fresh("x", HOSTILE_NAMES), r.choice(self.all_sizes)))
        states = []
        for _ in range(r.choice([1, 1, 2, 2, 3])):
            states.append((self.fresh("h", HOSTILE_NAMES), r.choice(["H", "H", *self.all_sizes])))
        self.readable: list[Node] = [name(k, s) for k, s in inputs + states]
        if len(states) > 1:
            self.features.add("multi-state")

        assigns: list[tuple[str, Node]] = []
        pending = list(states)
        r.shuffle(pending)
        n_inter = r.randint(0, 4)
        intermediates: list[str] = []
        steps = ["i"] * n_inter + ["s"] * len(pending)
        r.shuffle(steps)
        for kind in steps:
            depth = r.randint(1, 4)
            if kind == "i":
                size = r.choice(self.all_sizes + ["H"])
                key = self.fresh("a", HOSTILE_NAMES)
                e = self.bounded(size, depth) if r.random() < 0.7 else self.expr(size, depth)
                assigns.append((key, e))
                self.readable.append(name(key, size))
                intermediates.append(key)
            else:
                st, size = pending.pop()
                k = r.random()
                if k < 0.45:
                    e = call(r.choice(SQUASH), self.expr(size, depth))
                elif k < 0.75:
                    # a gated update u*h + (1 - u)*c, as in the GRU
                    u = call("sigmoid", self.expr(size, depth - 1))
                    c = call(r.choice(SQUASH), self.expr(size, depth - 1))
                    e = binop("+", binop("*", u, name(st, size)), binop("*", paren(binop("-", num("1"), u)), c))
                elif k < 0.9:
                    e = self.bounded(size, depth)
                else:
                    e = self.expr(size, depth)  # unsquashed: fine over a short sequence
                    self.features.add("raw-update")
                assigns.append((st + "'", e))
                self.readable.append(name(st, size, primed=True))
                if any(n.op == "name" and n.args == (st, False) for n in self.readable):
                    self.features.add("prime")

        # every input must be used: add it to the first assignment of a matching size
        used = _names_in([e for _, e in assigns])
        for x, size in inputs:
            if x not in used:
                i = r.randrange(len(assigns))
                key, e = assigns[i]
                esize = e.size
                if esize == size:
                    e = binop("+", e, call("tanh", name(x, size)))
                else:
                    m = self.fresh("W", HOSTILE_PARAM_NAMES)
                    self.params[m] = (esize, size)
                    e = binop("+", e, matmul(m, name(x, size), esize))
                assigns[i] = (key, e)

        # every size must be the size of an input or a param (a size only states have is refused)
        covered = {s for _, s in inputs} | {d for shape in self.params.values() for d in shape}
        for i, (key, e) in enumerate(assigns):
            if e.size not in covered:
                b = self.fresh("b", HOSTILE_PARAM_NAMES)
                self.params[b] = (e.size,)
                covered.add(e.size)
                assigns[i] = (key, binop("+", e, binop("*", num("0.1"), call("tanh", name(b, e.size)))))

        cands = [k for k, _ in assigns]
        outputs: list[str] = []
        if r.random() < 0.8:
            outputs = r.sample(cands, k=min(len(cands), r.choice([1, 1, 2, 3])))
            if len(outputs) > 1:
                self.features.add("multi-output")
        used_sizes = {s for _, s in inputs + states} | {d for shape in self.params.values() for d in shape}
        self.sizes = {k: v for k, v in self.sizes.items() if k in used_sizes}
        text = self.render_cell(cell_name, inputs, states, assigns, outputs)
        if not outputs:
            outputs = [states[0][0] + "'"]
        return RandomCell(
            self.seed, cell_name, text, dict(self.sizes), inputs, states, dict(self.params), assigns, outputs,
            self.features, dict(self.defs), {k: float(v) for k, v in self.consts.items()},
        )

    def render_cell(self, cell_name, inputs, states, assigns, outputs) -> str:
        r = self.rng
        ind = r.choice(["  ", "    ", "\t"])
        lines = [f"# random cell, seed {self.seed}"]
        for f, (args, body) in self.defs.items():
            lines.append(f"def {f}({', '.join(args)}) = {render(body)}")
        lines.append(f"cell {cell_name} {{")
        for sym, arg in self.sizes.items():
            lines.append(f"{ind}size {sym} = {arg}")
        if self.consts:
            lines.append(ind + "const " + ", ".join(f"{k} = {v}" for k, v in self.consts.items()))
        lines.append(ind + "input " + ", ".join(f"{k}[{s}]" for k, s in inputs))
        lines.append(ind + "state " + ", ".join(f"{k}[{s}]" for k, s in states))
        items = [f"{k}[{', '.join(s)}]" if s else f"{k} = {r.choice(['0.5', '1', '1.5'])}"
                 for k, s in self.params.items()]
        for i in range(0, len(items), 3):
            lines.append(ind + "param " + ", ".join(items[i : i + 3]))
        for key, e in assigns:
            lines.append(f"{ind}{key} = {render(e)}")
        if outputs:
            lines.append(ind + "output " + ", ".join(outputs))
        lines.append("}")
        eol = "\r\n" if r.random() < 0.1 else "\n"
        return eol.join(lines) + eol


def _nodes(e: Node):
    todo = [e]
    while todo:
        n = todo.pop()
        yield n
        todo.extend(a for a in n.args if isinstance(a, Node))


def _names_in(exprs: list[Node]) -> set[str]:
    out: set[str] = set()
    todo = list(exprs)
    while todo:
        e = todo.pop()
        if e.op == "name":
            out.add(e.args[0])
        elif e.op == "matmul":
            out.add(e.args[0])
            todo.append(e.args[1])
        else:
            todo.extend(a for a in e.args if isinstance(a, Node))
    return out


def random_cell(seed: int, hostile: bool = True) -> RandomCell:
    """A random valid cell for this seed (the same seed always gives the same text)."""
    return _Gen(seed, hostile).run()


# ------------------------------------------------------------------ reference interpreter
def evaluate(e: Node, env: dict, params: dict, defs: dict | None = None, consts: dict | None = None,
             masks=None):
    """Evaluate a tree with torch ops; ``env`` maps ``x``/``h``/``h'``/intermediates to tensors,
    ``defs`` the file's defs (name -> (argument names, body)), ``consts`` the cell's consts,
    ``masks`` an iterator over this step's masks of the random ops, in the order the spec calls
    them (innermost first, left to right: the order their arguments are evaluated in)."""
    import torch
    import torch.nn.functional as F

    defs, consts = defs or {}, consts or {}
    rows = next(v.shape[0] for v in env.values() if isinstance(v, torch.Tensor) and v.dim() == 2)

    def ev(n: Node):
        if n.op == "num":
            return float(n.args[0])
        if n.op == "name":
            key, primed = n.args
            if not primed and key in consts:
                return consts[key]
            return env[key + "'"] if primed else (env[key] if key in env else params[key])
        if n.op == "paren":
            return ev(n.args[0])
        if n.op == "neg":
            return -ev(n.args[0])
        if n.op == "pow":
            base, exponent, _, _ = n.args
            return ev(base) ** float(exponent)
        if n.op == "bin":
            op, a, b = n.args
            a, b = ev(a), ev(b)
            return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b}[op]()
        if n.op == "matmul":
            matrix, operand = n.args
            return ev(operand) @ params[matrix].T
        if n.op == "call":
            f, *args = n.args
            vals = [ev(a) for a in args]
            if f in defs:  # a def: its body with the arguments bound
                names, body = defs[f]
                return evaluate(body, {**env, **dict(zip(names, vals))}, params, defs, consts, masks)
            if f in ("dropout", "variational_dropout"):  # the mask as drawn (already scaled)
                return vals[0] * next(masks)
            if f == "zoneout":
                m = next(masks)
                return m * vals[1] + (1 - m) * vals[0]
            if f in ("sum", "mean"):  # over the units of every argument, one number per row
                cat = torch.cat([torch.broadcast_to(torch.as_tensor(v, dtype=torch.float64),
                                                    (rows, torch.as_tensor(v).shape[-1])) for v in vals], -1)
                return cat.sum(-1, keepdim=True) if f == "sum" else cat.mean(-1, keepdim=True)
            if f == "layer_norm":
                z = torch.broadcast_to(vals[0], (rows, vals[0].shape[-1]))
                return F.layer_norm(z, z.shape[-1:], eps=float(vals[1]) if len(vals) > 1 else 1e-5)
            t = [v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float64) for v in vals]
            fns = {
                "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "exp": torch.exp,
                "log": torch.log, "sqrt": torch.sqrt, "softplus": F.softplus, "softsign": F.softsign,
                "abs": torch.abs,
                # not F.hardsigmoid: its float64 backward multiplies by a float32 1/6 (3e-8 off)
                "hard_sigmoid": lambda z: torch.clamp(z / 6 + 0.5, 0, 1), "min": torch.minimum,
                "max": torch.maximum, "clip": lambda z, lo, hi: torch.clamp(*torch.broadcast_tensors(z, lo, hi)),
            }
            return fns[f](*t)
        raise ValueError(n.op)

    return ev(e)


def reference_sequence(rc: RandomCell, sizes: dict[str, int], params: dict, xs: tuple, states: tuple,
                       masks: tuple = ()):
    """Run the cell over a sequence with the interpreter: (outputs tuple [T,B,*], finals tuple);
    ``masks``: the random ops' masks, [T, B, n] each, in the order the spec calls them."""
    import torch

    T = xs[0].shape[0]
    size_of = {k: sizes[e.size] for k, e in rc.assigns}
    st = dict(zip((k for k, _ in rc.states), states))
    outs: list[list] = [[] for _ in rc.outputs]
    for t in range(T):
        env = dict(st)
        for (k, _), x in zip(rc.inputs, xs):
            env[k] = x[t]
        step_masks = iter([torch.as_tensor(m[t]) for m in masks])
        for key, e in rc.assigns:
            v = evaluate(e, env, params, rc.defs, rc.consts, step_masks)
            env[key] = torch.broadcast_to(torch.as_tensor(v, dtype=torch.float64), (xs[0].shape[1], size_of[key]))
        for i, o in enumerate(rc.outputs):
            outs[i].append(env[o])
        st = {k: env[k + "'"] for k in st}
    return tuple(torch.stack(o) for o in outs), tuple(st[k] for k, _ in rc.states)



# --------------------------------------------------------------------- differential check
#: tolerance per comparison of a random cell (relative to the largest reference value)
TOLERANCES = {"torch": 1e-9, "autograd": 1e-9, "reference": 1e-9, "fd": 1e-6, "np-f32": 1e-4, "torch-f32": 1e-4,
              "native": 1e-9, "native-f32": 1e-4}


def run_reference(rc: RandomCell, p) -> object:
    """The interpreter's outputs and autograd gradients on a check Problem, as check Results."""
    import torch

    from cellspec.verify import check

    t = lambda a: torch.tensor(a, dtype=torch.float64, requires_grad=True)
    params = {k: t(v) for k, v in p.params.items()}
    xs = tuple(t(a) for a in p.xs)
    st = tuple(t(a) for a in p.states)
    outs, finals = reference_sequence(rc, p.sizes, params, xs, st, tuple(p.masks.values()))
    seeds = [torch.as_tensor(a) for a in p.d_outputs + p.d_final]
    leaves = list(params.values()) + list(xs) + list(st)
    # an output no input, state or param reaches (a constant) does not require grad
    pairs = [(y, d) for y, d in zip(list(outs) + list(finals), seeds) if y.requires_grad]
    wrt = leaves
    g = torch.autograd.grad([y for y, _ in pairs], wrt, [d for _, d in pairs], allow_unused=True) if pairs else [None] * len(wrt)
    g = [torch.zeros_like(leaf) if gi is None else gi for gi, leaf in zip(g, leaves)]
    n = len(params)
    dp = dict(zip(params, g[:n]))
    return check._collect(p, outs, finals, dp, g[n : n + len(xs)], g[n + len(xs) :])


def differential(rc: RandomCell, T: int = 3, B: int = 2, fd: bool = False, f32: bool = True,
                 native: bool = False) -> list[str]:
    """Compile rc and hold every backend against NumPy float64, NumPy against the interpreter
    and (with fd) against finite differences; with ``native`` also the .cu file's CPU build (the
    fused kernels and the C++ host loop, one g++ build per cell). Returns the failures (empty
    when all agree)."""
    import numpy as np

    from cellspec.driver import compile_source
    from cellspec.errors import Source
    from cellspec.runtime.loader import load_package
    from cellspec.verify import check

    targets = ("numpy", "torch", "cuda") if native else ("numpy", "torch")
    (cc,) = compile_source(Source(f"fuzz_{rc.seed}.cell", rc.text), targets)
    pkg = load_package(cc.module_name, cc.files)
    p = check.make_problem(pkg, T, B, seed=rc.seed)
    ref = check.run_numpy(p)
    fails: list[str] = []
    bad = [k for k, v in ref.values.items() if not np.all(np.isfinite(v))]
    if bad:
        return [f"non-finite NumPy results: {', '.join(bad)}"]
    cols = {
        "torch": lambda: check.compare(check.run_torch(p, "generated"), ref),
        "autograd": lambda: check.compare(check.run_torch(p, "autograd"), ref),
        "reference": lambda: check.compare(ref, run_reference(rc, p)),
    }
    if fd:
        cols["fd"] = lambda: check.compare(ref, check.run_fd(p), grads_only=True)
    if f32:
        cols["np-f32"] = lambda: check.compare(check.run_numpy(p, np.float32), ref)
        cols["torch-f32"] = lambda: check.compare(check.run_torch(p, "generated", "float32"), ref)
    if native:
        cols["native"] = lambda: check.compare(check.run_torch(p, "fused"), ref)
        if f32:
            cols["native-f32"] = lambda: check.compare(check.run_torch(p, "fused", "float32"), ref)
    for name, fn in cols.items():
        errs = fn()
        for q, err in errs.items():
            if not err <= TOLERANCES[name]:
                fails.append(f"{name}: {q} relative error {err:.1e} > {TOLERANCES[name]:.0e}")
    return fails
