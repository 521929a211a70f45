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
leaves. The operand may itself read hoisted projections (``W2 @ tanh(W1 @ x)``,
``A @ (W @ x)``): the hoisted part is then a sequence of :class:`HoistedLevel` s, level k being
its pointwise values (which read leaves, values of levels <= k and GEMM results of levels < k)
and then its GEMM groups (whose operands are leaves or level-k values). Projections of one
stage (or level) that share an operand form one :class:`GemmGroup`, a single GEMM against the
stacked matrices (TensorFlow's ``_linear([x, h], 2 * units)``).
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
class HoistedLevel:
    """One level of the hoisted pass (all T·B rows, before the loop): its pointwise values, then
    its GEMM groups. Level 0's values read only leaves; a later level reads GEMM results of the
    levels before it."""

    index: int
    values: list[Value]
    gemms: list[GemmGroup]


@dataclass
class Schedule:
    model: CellModel
    hoisted_values: list[Value]  # computed over the whole sequence before the loop (level order)
    hoisted_gemms: list[GemmGroup]  # one GEMM over all T·B rows each (level order)
    stages: list[Stage]
    consumers: dict[str, list[str]] = field(default_factory=dict)  # key -> value keys reading it
    hoisted_levels: list[HoistedLevel] = field(default_factory=list)  # the hoisted pass, in order

    def hoisted_level(self, key: str) -> int | None:
        """The level of a hoisted value (its pointwise block) or projection (its GEMM); None if
        the key is not hoisted."""
        for lv in self.hoisted_levels:
            if any(v.key == key for v in lv.values) or any(p.key == key for g in lv.gemms for p in g.projections):
                return lv.index
        return None

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

    # input-only: computed from inputs and params alone, through pointwise values and projections
    # (a projection of input-only work is input-only too: W2 @ tanh(W1 @ x), A @ (W @ x)).
    # An output or a next state is a per-step result: it is never computed in the hoisted pass
    # (every back end writes outputs and states from the loop), so neither is anything that needs
    # one.
    per_step = set(model.outputs) | set(model.next_state.values())
    input_only: dict[str, bool] = {k: leaf.kind != "state" for k, leaf in model.leaves.items()}

    def projection_input_only(key: str) -> bool:
        if key not in input_only:
            operand = projs[key].operand
            input_only[key] = projection_input_only(operand) if operand in projs else input_only.get(operand, False)
        return input_only[key]

    for v in model.values:  # values are in dependency order
        for r in reads[v.key]:
            if r in projs:
                projection_input_only(r)
        input_only[v.key] = v.key not in per_step and all(input_only.get(r, False) for r in reads[v.key])
    for p in model.projections:
        projection_input_only(p.key)

    def closure(key: str) -> set[str]:
        """The values a key needs, through values and hoisted projections' operands."""
        found: set[str] = set()
        todo = [key]
        while todo:
            k = todo.pop()
            if k in projs:
                todo.append(projs[k].operand)
            elif k in values and k not in found:
                found.add(k)
                todo.extend(reads[k])
        return found

    hoisted_proj = {p.key for p in model.projections if input_only[p.key]}
    # values that hoisted projections need, transitively
    hoisted_vals: set[str] = set().union(*(closure(projs[k].operand) for k in hoisted_proj))

    # hoisted levels: a value is at the largest level among what it reads (a leaf 0, a hoisted
    # value its level, a hoisted projection one more than its GEMM's); a GEMM at its operand's
    level: dict[str, int] = {}

    def level_of(key: str) -> int:
        """The level at which key is available to the pointwise values of the hoisted pass."""
        if key in projs:
            return gemm_level(key) + 1
        return level.get(key, 0)

    def gemm_level(key: str) -> int:
        return level_of(projs[key].operand)

    for v in model.values:
        if v.key in hoisted_vals:
            level[v.key] = max((level_of(r) for r in reads[v.key]), default=0)
    for k in hoisted_proj:
        level[k] = gemm_level(k)

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
    levels = []
    for k in range(max(level.values(), default=-1) + 1):
        levels.append(HoistedLevel(
            k,
            [v for v in model.values if v.stage == -1 and level[v.key] == k],
            _group([p for p in model.projections if p.stage == -1 and level[p.key] == k]),
        ))
    return Schedule(
        model=model,
        hoisted_values=[v for lv in levels for v in lv.values],
        hoisted_gemms=[g for lv in levels for g in lv.gemms],
        stages=stages,
        consumers=consumers,
        hoisted_levels=levels,
    )
