"""CUDA back end: one self-contained ``.cu`` file per cell.

Input: a schedule and its backward. Output: ``{"<module>.cu": text}``.

The file holds, per pointwise block (hoisted forward, each forward stage, each backward stage,
the per-step leaf adjoints, the hoisted backward) and per size symbol within it:

* a ``__host__ __device__`` element function ``<module>_<block>_<size><real>`` with the math
  (spec names as variables, one comment with the spec line per statement), templated on the
  math type ``real``;
* a ``__global__`` kernel templated on the storage type (float, double, __half,
  __nv_bfloat16; math in float for the 16-bit types, in double for double) and ``extern "C"``
  launchers ``..._cuda_f32/_f64/_f16/_bf16`` (only when compiled by nvcc: ``#ifdef __CUDACC__``);
* ``extern "C"`` host functions ``..._f32/_f64`` (an OpenMP loop over rows, a vectorisable
  loop over units) so that the same file compiled by g++ runs the same arithmetic on the CPU.

Every array argument is a pointer plus a row stride (``ld``; 0 broadcasts one row, which is how
vector params are passed). The sequence algorithm (which buffer each name lives in, the GEMMs,
the order of calls) is written into the file as a JSON *plan* between ``CELLSPEC_PLAN_BEGIN``
and ``CELLSPEC_PLAN_END``; :mod:`cellspec.runtime.cuda_host` runs it. The math comes from
:class:`~cellspec.backends.printers.CudaPrinter`; the template holds boilerplate only.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import sympy as sp

from cellspec.backends import context
from cellspec.backends.naming import C_RESERVED
from cellspec.backends.printers import CudaPrinter
from cellspec.backends.render import render_template
from cellspec.model import ops
from cellspec.model.gradients import Assignment, Backward
from cellspec.model.schedule import GemmGroup, Schedule

PLAN_BEGIN = "CELLSPEC_PLAN_BEGIN"
PLAN_END = "CELLSPEC_PLAN_END"
#: storage types of the CUDA launchers: suffix -> C++ type
CUDA_DTYPES = {"f32": "float", "f64": "double", "f16": "__half", "bf16": "__nv_bfloat16"}


@dataclass
class Line:
    target: str
    expr: str
    comment: str
    kind: str  # "local" (const real), "out" (assigned to a reference parameter)


@dataclass
class ElementFunction:
    """One pointwise block restricted to one size symbol."""

    name: str
    block: str  # fwd_hoisted, fwd0, bwd1, bwd_leaf, bwd_hoisted
    size: str
    title: str
    reads: list[str]
    writes: list[str]  # assigned only
    inouts: list[str]  # read, then assigned
    lines: list[Line] = field(default_factory=list)

    @property
    def args(self) -> list[dict]:
        """Kernel / host arguments in ABI order: reads, then in-outs, then writes."""
        return (
            [{"name": n, "io": "in"} for n in self.reads]
            + [{"name": n, "io": "inout"} for n in self.inouts]
            + [{"name": n, "io": "out"} for n in self.writes]
        )


def _coef(sizes: list[str]) -> dict[str, int]:
    return dict(sorted(Counter(sizes).items()))


class _Builder:
    def __init__(self, sched: Schedule, back: Backward):
        self.s, self.b, self.m = sched, back, sched.model
        self.ctx = context.build(sched, back, CudaPrinter, C_RESERVED)
        self.names: dict[str, str] = self.ctx["names"]
        self.pr = CudaPrinter(self.names)
        self.module = self.m.cell.module_name
        self.size: dict[str, str | None] = {}  # code name -> size symbol
        self._sizes()
        self.buffers: dict[str, dict] = {}
        self.home: dict[str, dict] = {}  # code name -> {"buf", "t", "col"}

    # ------------------------------------------------------------------ sizes of every name
    def _sizes(self) -> None:
        m, b, n = self.m, self.b, self.names
        for k, leaf in m.leaves.items():
            self.size[n[k]] = leaf.size
        for v in m.values:
            self.size[n[v.key]] = v.size
        for p in m.projections:
            self.size[n[p.key]] = p.out_size
        size_of = m.size_of
        for k, a in b.adjoint.items():
            self.size[n[a]] = size_of(k)
        for k, a in b.output_seed.items():
            self.size[n[a]] = size_of(k)
        for (_, operand), a in b.gemm_adjoint.items():
            self.size[n[a]] = size_of(operand)
        for operand, a in b.hoisted_gemm_adjoint.items():
            self.size[n[a]] = size_of(operand)
        for k, a in b.step_seed.items():
            self.size[n[a]] = size_of(k)
        for k, a in b.hoisted_leaf_adjoint.items():
            self.size[n[a]] = size_of(k)

    def sym_names(self, expr: sp.Expr) -> list[str]:
        return sorted(self.names.get(s.name, s.name) for s in expr.free_symbols)

    # ------------------------------------------------------------------ buffers and homes
    def buffer(self, name: str, shape: list, role: str) -> str:
        if name not in self.buffers:
            self.buffers[name] = {"shape": shape, "role": role}
        return name

    def place(self, key: str, buf: str, t: int | None = 0, col: dict | None = None) -> None:
        self.home.setdefault(key, {"buf": buf, "t": t, "col": col or {}, "size": self.size[key]})

    def plan_homes(self) -> None:
        s, m, b, n = self.s, self.m, self.b, self.names
        T, T1, B = {"T": 1}, {"T": 1, "1": 1}, {"B": 1}
        saved = {n[k] for k in b.saved}
        next_of = {v: st for st, v in m.next_state.items()}
        outputs = {n[k] for k in m.outputs}
        for v in m.cell.inputs:
            self.place(n[v.name], self.buffer(f"x_{n[v.name]}", [T, B, {v.size: 1}], "input"))
        for v in m.cell.states:
            buf = self.buffer(f"s_{n[v.name]}", [T1, B, {v.size: 1}], "state")
            self.place(n[v.name], buf, 0)
            self.place(n[m.next_state[v.name]], buf, 1)
        for p in m.cell.params:
            if not p.is_matrix:
                self.place(n[p.name], self.buffer(f"p_{n[p.name]}", [{p.shape[0]: 1}], "param"), None)
        for g in s.hoisted_gemms:
            key = self.gkey(g)
            buf = self.buffer(f"hg_{key}", [T, B, _coef([p.out_size for p in g.projections])], "hoisted_gemm")
            for p, col in zip(g.projections, self.cols(g)):
                self.place(n[p.key], buf, 0, col)
        for v in s.hoisted_values:
            self.place(n[v.key], self.buffer(f"hv_{n[v.key]}", [T, B, {v.size: 1}], "hoisted_value"))
        for st in s.stages:
            for g in st.gemms:
                key = self.gkey(g)
                width = _coef([p.out_size for p in g.projections])
                keep = any(p.key in b.saved for p in g.projections)
                buf = self.buffer(f"g_{key}", [T, B, width] if keep else [B, width], "gemm" if keep else "step_gemm")
                for p, col in zip(g.projections, self.cols(g)):
                    self.place(n[p.key], buf, 0 if keep else None, col)
            for v in st.values:
                name = n[v.key]
                if v.key in next_of:
                    continue  # placed with its state
                if name in saved or name in outputs:
                    self.place(name, self.buffer(f"v_{name}", [T, B, {v.size: 1}], "saved"))
                else:
                    self.place(name, self.buffer(f"tmp_{name}", [B, {v.size: 1}], "step"), None)
        # backward
        for k, seed in b.output_seed.items():
            self.place(n[seed], self.buffer(f"dout_{n[k]}", [T, B, {m.size_of(k): 1}], "d_output"))
        for v in m.cell.states:
            a = n[b.adjoint[v.name]]
            self.place(a, self.buffer(f"ds_{n[v.name]}", [B, {v.size: 1}], "d_state"), None)
        for v in m.cell.inputs:
            if v.name in b.adjoint:
                self.place(n[b.adjoint[v.name]], self.buffer(f"dx_{n[v.name]}", [T, B, {v.size: 1}], "d_input"))
        for p in m.cell.params:
            if not p.is_matrix and p.name in b.adjoint:
                self.place(n[b.adjoint[p.name]], self.buffer(f"dp_{n[p.name]}", [T, B, {p.shape[0]: 1}], "d_param_rows"))
        for st in s.stages:
            for g in st.gemms:
                buf = self.buffer(f"dg_{self.gkey(g)}", [T, B, _coef([p.out_size for p in g.projections])], "d_gemm")
                for p, col in zip(g.projections, self.cols(g)):
                    if p.key in b.adjoint:
                        self.place(n[b.adjoint[p.key]], buf, 0, col)
                d_op = n[b.gemm_adjoint[(st.index, g.operand)]]
                self.place(d_op, self.buffer(f"tmp_{d_op}", [B, {m.size_of(g.operand): 1}], "step"), None)
        for g in s.hoisted_gemms:
            buf = self.buffer(f"dhg_{self.gkey(g)}", [T, B, _coef([p.out_size for p in g.projections])], "d_hoisted_gemm")
            for p, col in zip(g.projections, self.cols(g)):
                if p.key in b.adjoint:
                    self.place(n[b.adjoint[p.key]], buf, 0, col)
            d_op = n[b.hoisted_gemm_adjoint[g.operand]]
            self.place(d_op, self.buffer(f"hgd_{n[g.operand]}", [T, B, {m.size_of(g.operand): 1}], "d_hoisted_operand"))
        for k, a in b.step_seed.items():
            self.place(n[a], self.buffer(f"seed_{n[k]}", [T, B, {m.size_of(k): 1}], "step_seed"))
        for k, a in b.hoisted_leaf_adjoint.items():
            self.place(n[a], self.buffer(f"hl_{n[k]}", [T, B, {m.size_of(k): 1}], "hoisted_leaf"))

    def step_home(self, name: str) -> None:
        """A name that crosses kernels and has no home yet: a per-step [B, size] buffer."""
        if name not in self.home:
            self.place(name, self.buffer(f"tmp_{name}", [{"B": 1}, {self.size[name]: 1}], "step"), None)

    def seq_home(self, name: str) -> None:
        if name not in self.home:
            self.place(name, self.buffer(f"tmp_{name}", [{"T": 1}, {"B": 1}, {self.size[name]: 1}], "hoisted_tmp"))

    def gkey(self, g: GemmGroup) -> str:
        return "_".join(self.names[p.matrix] for p in g.projections) + "__" + self.names[g.operand]

    def cols(self, g: GemmGroup) -> list[dict]:
        out, seen = [], []
        for p in g.projections:
            out.append(_coef(seen))
            seen.append(p.out_size)
        return out

    # ------------------------------------------------------------------ element functions
    def functions(self, block: str, title: str, stmts: list[tuple[str, sp.Expr, str, bool]], exported: set[str]) -> list[ElementFunction]:
        """Split one block of (target, expr, comment, temp) by size and make its functions."""
        defined = {t for t, _, _, _ in stmts}
        reads_of = {t: set(self.sym_names(e)) for t, e, _, _ in stmts}
        size: dict[str, str | None] = {}
        for t, e, _, _ in stmts:
            sz = {size.get(r) if r in defined else self.size.get(r) for r in reads_of[t]} - {None}
            size[t] = self.size.get(t) or (min(sz) if sz else None)
            if size[t] is None or t not in self.size:
                self.size.setdefault(t, size[t])
        groups = sorted({sz for sz in size.values() if sz is not None})
        out = []
        for g in groups:
            # statements of this size, and constant temporaries they read
            need = {t for t in defined if size[t] == g}
            changed = True
            while changed:
                changed = False
                for t in list(need):
                    for r in reads_of[t]:
                        if r in defined and r not in need:
                            need.add(r)
                            changed = True
            mine = [x for x in stmts if x[0] in need]
            # drop statements nothing exported depends on (aliased copies, unused locals)
            live = {t for t, _, _, temp in mine if t in exported and not temp}
            for t, _, _, _ in reversed(mine):
                if t in live:
                    live |= reads_of[t] & defined
            mine = [x for x in mine if x[0] in live]
            reads: set[str] = set()
            assigned: set[str] = set()
            for t, _, _, _ in mine:
                reads |= {r for r in reads_of[t] if r not in assigned}
                assigned.add(t)
            ext_reads = sorted(reads)
            writes = [t for t, _, _, temp in mine if t in exported and not temp]
            inouts = sorted(set(writes) & set(ext_reads))
            if not writes:
                continue  # nothing of this size leaves the block
            fn = ElementFunction(
                name=f"{self.module}_{block}_{g}",
                block=block,
                size=g,
                title=f"{title}, units of size {g}",
                reads=[r for r in ext_reads if r not in inouts],
                writes=[w for w in writes if w not in inouts],
                inouts=inouts,
            )
            for t, e, comment, _ in mine:
                kind = "out" if t in writes else "local"
                fn.lines.append(Line(t, self.pr.doprint(e), comment, kind))
            out.append(fn)
        return out

    # ------------------------------------------------------------------ the whole file
    def build(self) -> dict:
        s, m, b, n = self.s, self.m, self.b, self.names
        cell = m.cell
        self.plan_homes()

        def spec_comment(v) -> str:
            return f"{cell.filename}:{v.line}  {v.text}"

        # which forward values cross a kernel boundary
        back_blocks = [a for bs in b.stages for a in bs.assigns] + b.leaf_assigns
        back_reads = set().union(*(set(self.sym_names(a.expr)) for a in back_blocks)) if back_blocks else set()

        def read_by_other_stage(v, stage_values) -> bool:
            mine = {x.key for x in stage_values}
            for c in s.consumers.get(v.key, []):
                if c not in mine:
                    return True
            return False

        gemm_operands = {n[g.operand] for g in s.step_gemms} | {n[g.operand] for g in s.hoisted_gemms}
        sinks = {n[k] for k in m.next_state.values()} | {n[k] for k in m.outputs} | {n[k] for k in b.saved} | gemm_operands
        functions: list[ElementFunction] = []
        calls: dict[str, list[str]] = {}

        hv = [(n[v.key], v.expr, spec_comment(v), False) for v in s.hoisted_values]
        fns = self.functions("fwd_hoisted", "hoisted forward (all T*B rows)", hv, {n[v.key] for v in s.hoisted_values})
        functions += fns
        calls["fwd_hoisted"] = [f.name for f in fns]
        fwd_stages = []
        for st in s.stages:
            exported = {n[v.key] for v in st.values if n[v.key] in sinks or read_by_other_stage(v, st.values) or n[v.key] in back_reads}
            for name in exported:
                if name not in self.home:
                    self.step_home(name)
            stmts = [(n[v.key], v.expr, spec_comment(v), False) for v in st.values]
            fns = self.functions(f"fwd{st.index}", f"stage {st.index} forward", stmts, exported)
            functions += fns
            fwd_stages.append({
                "gemms": [self.gemm_plan(g) for g in st.gemms],
                "kernels": [self.call(f) for f in fns],
            })
        aliases = self.alias_copies()
        # backward blocks: a non-temporary target crosses kernels if another block reads it or
        # it has a home (a sink: GEMM adjoint slice, state/input/param adjoint, step seed)
        blocks: list[tuple[str, str, list[Assignment]]] = []
        for bs in b.stages:
            blocks.append((f"bwd{bs.index}", f"stage {bs.index} backward", bs.assigns))
        blocks.append(("bwd_leaf", "per-step adjoints of inputs, states, vector params, hoisted results", b.leaf_assigns))
        blocks.append(("bwd_hoisted", "hoisted backward (all T*B rows)", b.hoisted_assigns + b.hoisted_leaf_assigns))
        reads_by_block = [set().union(*(set(self.sym_names(a.expr)) for a in blk)) if blk else set() for _, _, blk in blocks]
        back_plan: dict = {"stages": [], "leaf": [], "hoisted": []}
        for i, (tag, title, blk) in enumerate(blocks):
            others = set().union(*(r for j, r in enumerate(reads_by_block) if j != i)) if len(blocks) > 1 else set()
            exported = set()
            for a in blk:
                t = n[a.target]
                if a.temp:
                    continue
                if t in self.home or t in others:
                    exported.add(t)
                    if tag == "bwd_hoisted":
                        self.seq_home(t)
                    else:
                        self.step_home(t)
            stmts = [(n[a.target], a.expr, self.adjoint_comment(a), a.temp) for a in blk]
            fns = self.functions(tag, title, stmts, exported)
            functions += fns
            kernels = [self.call(f) for f in fns]
            if tag == "bwd_leaf":
                back_plan["leaf"] = kernels
            elif tag == "bwd_hoisted":
                back_plan["hoisted"] = kernels
            else:
                idx = int(tag[3:])
                st = next(x for x in s.stages if x.index == idx)
                back_plan["stages"].append({
                    "kernels": kernels,
                    "gemms": [
                        {
                            "d_buf": f"dg_{self.gkey(g)}",
                            "matrices": [n[p.matrix] for p in g.projections],
                            "d_operand": n[b.gemm_adjoint[(idx, g.operand)]],
                            "used": n[b.gemm_adjoint[(idx, g.operand)]] in set().union(*reads_by_block),
                        }
                        for g in st.gemms
                    ],
                })
        for f in functions:
            for name in f.reads + f.inouts:
                if name not in self.home:
                    raise RuntimeError(f"cuda backend: {name} read by {f.name} has no buffer")  # pragma: no cover

        plan = {
            "cell": cell.name,
            "module": self.module,
            "sizes": [s_ for s_, _ in cell.sizes.items()],
            "size_sources": self.size_sources(),
            "inputs": [{"name": n[v.name], "key": v.name, "size": v.size} for v in cell.inputs],
            "states": [
                {"name": n[v.name], "key": v.name, "size": v.size, "adjoint": n[b.adjoint[v.name]],
                 "adjoint_zero": v.name in b.zero or v.name not in b.adjoint}
                for v in cell.states
            ],
            "params": [{"name": n[p.name], "key": p.name, "shape": list(p.shape), "matrix": p.is_matrix} for p in cell.params],
            "outputs": [{"name": n[k], "spec": m.value(k).spec_key, "size": m.value(k).size, "seed": n[b.output_seed[k]]} for k in m.outputs],
            "buffers": self.buffers,
            "home": self.home,
            "forward": {
                "hoisted": [self.call(f) for f in functions if f.block == "fwd_hoisted"],
                "hoisted_gemms": [self.gemm_plan(g) for g in s.hoisted_gemms],
                "stages": fwd_stages,
            },
            "backward": back_plan,
            "dw": [
                {"d_buf": f"dg_{self.gkey(g)}", "operand": n[g.operand], "slices": self.slices(g)}
                for g in s.step_gemms
            ],
            "hoisted_dw": [
                {"d_buf": aliases["hoisted"].get(self.gkey(g), f"dhg_{self.gkey(g)}"), "operand": n[g.operand], "slices": self.slices(g),
                 "d_operand": n[b.hoisted_gemm_adjoint[g.operand]],
                 "operand_is_input": g.operand in m.leaves and m.leaves[g.operand].kind == "input"}
                for g in s.hoisted_gemms
            ],
            "input_grads": {
                n[v.name]: [f"dx_{n[v.name]}"] * (v.name in b.adjoint and v.name not in b.zero)
                + [f"hl_{n[v.name]}"] * (v.name in b.hoisted_leaf_adjoint)
                for v in cell.inputs
            },
            "param_grads": {
                n[p.name]: [aliases["params"].get(n[p.name], {"buf": f"dp_{n[p.name]}", "col": {}})]
                * (p.name in b.adjoint and p.name not in b.zero)
                + [{"buf": f"hl_{n[p.name]}", "col": {}}] * (p.name in b.hoisted_leaf_adjoint)
                for p in cell.params if not p.is_matrix
            },
            "saved": sorted(k for k, v in self.buffers.items() if v["role"] in ("input", "state", "hoisted_gemm", "hoisted_value", "gemm", "saved")),
        }
        return {
            "module": self.module,
            "cell": cell,
            "version": self.ctx["version"],
            "filename": cell.filename,
            "spec_text": self.ctx["spec_text"],
            "functions": functions,
            "dtypes": CUDA_DTYPES,
            "c_prelude": ops.c_prelude(),
            "plan_json": plan_text(plan),
            "plan_begin": PLAN_BEGIN,
            "plan_end": PLAN_END,
        }

    def adjoint_comment(self, a: Assignment) -> str:
        """'adjoint of <spec line name>', or of '<kind> <name>' for leaves."""
        if not a.comment:
            return ""
        of = {v: k for k, v in self.b.adjoint.items()}.get(a.target) or {
            v: k for k, v in self.b.hoisted_leaf_adjoint.items()}.get(a.target) or {
            v: k for k, v in self.b.step_seed.items()}.get(a.target)
        if of is not None and a.comment in ("state", "input", "param", "hoisted projection"):
            return f"adjoint of {a.comment} {of}"
        if of is not None and a.comment == "per-step part":
            return f"adjoint of {of}, per-step part"
        return f"adjoint of {a.comment}"

    def alias_copies(self) -> dict:
        """Per-step adjoints that are plain copies of another adjoint kept per step (``d_b_ii =
        d_W_hi_h``; the LSTM's hoisted ``d_W_ii_x = d_W_hi_h``) are not written again: the
        after-loop reductions read the original. Returns {"params": name -> {"buf", "col"},
        "hoisted": hoisted group key -> d buffer}; drops the homes and buffers they replace."""
        b, n = self.b, self.names
        src: dict[str, dict] = {}
        for a in b.leaf_assigns:
            if a.temp or not isinstance(a.expr, sp.Symbol):
                continue
            h = self.home.get(n[a.expr.name])
            if h is not None and h["t"] == 0 and len(self.buffers[h["buf"]]["shape"]) == 3 and "T" in self.buffers[h["buf"]]["shape"][0]:
                src[n[a.target]] = h
        out: dict = {"params": {}, "hoisted": {}}
        dropped: set[str] = set()
        for p in self.m.cell.params:
            if p.is_matrix or p.name not in b.adjoint:
                continue
            d = n[b.adjoint[p.name]]
            if d in src and self.home.get(d, {}).get("buf") == f"dp_{n[p.name]}":
                out["params"][n[p.name]] = {"buf": src[d]["buf"], "col": src[d]["col"]}
                dropped.add(d)
        for g in self.s.hoisted_gemms:
            ds = [n[b.adjoint[p.key]] if p.key in b.adjoint else None for p in g.projections]
            if any(d is None or d not in src for d in ds):
                continue
            bufs = {src[d]["buf"] for d in ds}
            width = _coef([p.out_size for p in g.projections])
            if len(bufs) == 1 and all(src[d]["col"] == c for d, c in zip(ds, self.cols(g))):
                buf = bufs.pop()
                if self.buffers[buf]["shape"][2] == width:
                    out["hoisted"][self.gkey(g)] = buf
                    dropped.update(ds)
        for d in dropped:
            buf = self.home.pop(d)["buf"]
            if not any(h["buf"] == buf for h in self.home.values()):
                self.buffers.pop(buf, None)
        return out

    def call(self, f: ElementFunction) -> dict:
        return {"fn": f.name, "size": f.size, "args": f.args}

    def gemm_plan(self, g: GemmGroup) -> dict:
        key = self.gkey(g)
        first = self.names[g.projections[0].key]
        return {"operand": self.names[g.operand], "out_buf": self.home[first]["buf"],
                "matrices": [self.names[p.matrix] for p in g.projections], "key": key}

    def slices(self, g: GemmGroup) -> list[dict]:
        return [{"matrix": self.names[p.matrix], "key": p.matrix, "start": c, "size": p.out_size}
                for p, c in zip(g.projections, self.cols(g))]

    def size_sources(self) -> dict[str, list]:
        cell = self.m.cell
        out: dict[str, list] = {}
        for i, v in enumerate(cell.inputs):
            out.setdefault(v.size, ["input", i])
        for p in cell.params:
            for d, s_ in enumerate(p.shape):
                out.setdefault(s_, ["param", p.name, d])
        for i, v in enumerate(cell.states):
            out.setdefault(v.size, ["state", i])
        return out


def plan_text(plan: dict) -> str:
    """The plan as JSON, one line per entry of each top-level list or dict (sorted keys)."""

    def one(v) -> str:
        return json.dumps(v, sort_keys=True)

    parts = []
    for key in sorted(plan):
        v = plan[key]
        if isinstance(v, dict) and v and key not in ("forward", "backward"):
            inner = ",\n".join(f"  {one(k)}: {one(x)}" for k, x in sorted(v.items()))
            parts.append(f" {one(key)}: {{\n{inner}\n }}")
        elif isinstance(v, list) and v:
            inner = ",\n".join(f"  {one(x)}" for x in v)
            parts.append(f" {one(key)}: [\n{inner}\n ]")
        elif isinstance(v, dict) and v:
            inner = ",\n".join(f"  {one(k)}: {json.dumps(x, sort_keys=True, indent=None)}" for k, x in sorted(v.items()))
            parts.append(f" {one(key)}: {{\n{inner}\n }}")
        else:
            parts.append(f" {one(key)}: {one(v)}")
    return "{\n" + ",\n".join(parts) + "\n}"


def build_context(sched: Schedule, back: Backward) -> dict:
    return _Builder(sched, back).build()


def render(sched: Schedule, back: Backward) -> dict[str, str]:
    ctx = build_context(sched, back)
    return {f"{ctx['module']}.cu": render_template("cuda_cell.cu.j2", ctx)}


def torch_extension(ctx: dict, sched, back) -> None:
    """torch_backend.EXTENSIONS hook: backend="cuda" in the generated modules, chosen
    automatically for CUDA tensors, and backend="fused" (the same file's CPU build, the fused
    CPU kernel), chosen automatically on the CPU where it builds (cellspec.runtime.fused_cpu)."""
    module = sched.model.cell.module_name
    ctx["extra_backends"] = ctx.get("extra_backends", "") + ', "cuda", "fused"'
    rule = ctx.get("auto_backend_rule", "")
    ctx["auto_backend_rule"] = (rule + "\n" if rule else "") + (
        '        try:\n'
        '            from cellspec.runtime import fused_cpu\n'
        '        except ImportError:  # this package used without cellspec installed: the PyTorch engine\n'
        '            return "generated"\n'
        '        if xs[0].is_cuda:  # the fused CUDA kernels (cellspec.runtime.cuda_ops)\n'
        '            return "cuda"\n'
        '        if fused_cpu.use_fused(__file__, "' + module + '.cu", xs, state, self._params()):  # fused CPU kernel\n'
        '            return "fused"'
    )
    dispatch = ctx.get("extra_dispatch", "")
    ctx["extra_dispatch"] = (dispatch + "\n" if dispatch else "") + (
        '        if backend == "fused" and not xs[0].is_cuda:  # fused CPU kernel of ' + module + '.cu\n'
        "            from cellspec.runtime import fused_cpu\n\n"
        f'            return fused_cpu.run_sequence(__file__, "{module}.cu", xs, state, params)\n'
        '        if backend in ("cuda", "fused"):  # kernels of ' + module + '.cu (GPU or CPU build), compiled on first use\n'
        "            from cellspec.runtime import cuda_ops\n\n"
        f'            return cuda_ops.run_sequence(__file__, "{module}.cu", xs, state, params)'
    )


def _register() -> None:
    from cellspec.backends import torch_backend

    if torch_extension not in torch_backend.EXTENSIONS:
        torch_backend.EXTENSIONS.append(torch_extension)


_register()
