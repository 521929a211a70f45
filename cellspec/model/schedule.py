"""Scheduling: cell model → stages of GEMMs and pointwise work.

Input: :class:`~cellspec.model.lower.CellModel`. Output: :class:`Schedule`.

A step is a list of stages; stage k first runs its GEMM groups (projections whose operand is
ready after stage k-1), then its pointwise values. Depth rules:

* a leaf (input, previous state, vector param) has depth 0;
* a projection has depth ``depth(operand) + 1``;
* a value has the largest depth among what it reads (0 if nothing).

Stage k holds the projections and values of depth k. Projections whose operand depends only on
inputs and params are *hoisted*: for a whole sequence they are one GEMM over all T·B rows
before the time loop (with any pointwise work their operands need), and in the step they are
leaves. Projections of one stage that share an operand form one :class:`GemmGroup`, a single
GEMM against the stacked matrices (TensorFlow's ``_linear([x, h], 2 * units)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cellspec.model.lower import CellModel, Projection, Value


@dataclass
class GemmGroup:
    """Projections sharing one operand: ``operand @ concat(matrices).T`` in one GEMM."""

    operand: str
    projections: list[Projection]

    @property
    def key(self) -> str:
        return "_".join(p.matrix for p in self.projections) + "__" + self.operand

    @property
    def matrices(self) -> list[str]:
        return [p.matrix for p in self.projections]


@dataclass
class Stage:
    index: int
    gemms: list[GemmGroup]
    values: list[Value]


@dataclass
class Schedule:
    model: CellModel
    hoisted_values: list[Value]  # computed over the whole sequence before the loop
    hoisted_gemms: list[GemmGroup]  # one GEMM over all T·B rows each
    stages: list[Stage]
    consumers: dict[str, list[str]] = field(default_factory=dict)  # key -> value keys reading it

    @property
    def projections(self) -> list[Projection]:
        return self.model.projections

    @property
    def step_values(self) -> list[Value]:
        return [v for s in self.stages for v in s.values]

    @property
    def hoisted_projections(self) -> list[Projection]:
        return [p for g in self.hoisted_gemms for p in g.projections]

    @property
    def step_gemms(self) -> list[GemmGroup]:
        return [g for s in self.stages for g in s.gemms]

    def is_hoisted(self, key: str) -> bool:
        return any(v.key == key for v in self.hoisted_values) or any(
            p.key == key for p in self.hoisted_projections
        )


def _group(projections: list[Projection]) -> list[GemmGroup]:
    groups: dict[str, GemmGroup] = {}
    for p in projections:
        groups.setdefault(p.operand, GemmGroup(p.operand, [])).projections.append(p)
    return list(groups.values())


def schedule(model: CellModel) -> Schedule:
    """Assign every value and projection a stage (see module docstring)."""
    values = {v.key: v for v in model.values}
    projs = {p.key: p for p in model.projections}
    reads: dict[str, set[str]] = {v.key: {s.name for s in v.expr.free_symbols} for v in model.values}

    # input-only: computed from inputs and params alone, through pointwise values (a projection
    # result never counts, so hoisted work is one pointwise pass and one GEMM layer deep)
    input_only: dict[str, bool] = {k: leaf.kind != "state" for k, leaf in model.leaves.items()}
    for v in model.values:  # values are in dependency order
        input_only[v.key] = all(input_only.get(r, False) for r in reads[v.key])
    # An output or a next state is a per-step result: it is never computed in the hoisted pass
    # (every back end writes outputs and states from the loop), so neither is a projection whose
    # operand needs one.
    per_step = set(model.outputs) | set(model.next_state.values())

    def closure(key: str) -> set[str]:
        found: set[str] = set()
        todo = [key]
        while todo:
            k = todo.pop()
            if k in values and k not in found:
                found.add(k)
                todo.extend(reads[k])
        return found

    def hoistable(operand: str) -> bool:
        return input_only.get(operand, False) and not (closure(operand) & per_step)

    hoisted_proj = {p.key for p in model.projections if hoistable(p.operand)}
    # values that hoisted projections need, transitively
    hoisted_vals: set[str] = set().union(*(closure(projs[k].operand) for k in hoisted_proj))

    depth: dict[str, int] = {k: 0 for k in model.leaves}
    depth.update({k: 0 for k in hoisted_proj | hoisted_vals})

    def projection_depth(key: str) -> int:
        """One more than its operand's; the operand may itself be a projection (W @ (U @ h))."""
        if key not in depth:
            operand = projs[key].operand
            depth[key] = (projection_depth(operand) if operand in projs else depth[operand]) + 1
        return depth[key]

    for v in model.values:
        if v.key in hoisted_vals:
            continue
        for r in reads[v.key]:
            if r in projs:
                projection_depth(r)
        depth[v.key] = max((depth[r] for r in reads[v.key]), default=0)
    for p in model.projections:  # projections read by no value still need a depth
        projection_depth(p.key)

    for v in model.values:
        v.stage = -1 if v.key in hoisted_vals else depth[v.key]
    for p in model.projections:
        p.stage = -1 if p.key in hoisted_proj else depth[p.key]

    n = max([depth[k] for k in depth] + [0])
    stages = []
    for k in range(n + 1):
        gemms = _group([p for p in model.projections if p.stage == k])
        vals = [v for v in model.values if v.stage == k]
        if gemms or vals:
            stages.append(Stage(len(stages), gemms, vals))
    consumers: dict[str, list[str]] = {}
    for v in model.values:
        for r in sorted(reads[v.key]):
            consumers.setdefault(r, []).append(v.key)
    return Schedule(
        model=model,
        hoisted_values=[v for v in model.values if v.stage == -1],
        hoisted_gemms=_group([p for p in model.projections if p.stage == -1]),
        stages=stages,
        consumers=consumers,
    )
