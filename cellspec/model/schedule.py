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
stacked matrices (TensorFlow's ``_linear([x, h], 2 * units)``); operands of one stage (or level)
multiplied by the same stack of matrices are stacked by rows into the same group
(``[h; c] @ Wᵀ``: one GEMM with k times the rows, see :class:`GemmGroup`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cellspec.model.lower import CellModel, Projection, Value


@dataclass
class GemmGroup:
    """Projections computed by one GEMM: every operand times every matrix of one stack.

    One operand and several matrices is *column stacking* (``h @ [W_i, W_f]ᵀ``: the projections
    sharing an operand). Several operands multiplied by the same stack is *row stacking*
    (``[h; c] @ Wᵀ``: one GEMM with k times the rows; its result's row blocks are the
    individual projections). ``projections`` are operand-major: operand 0's projections in
    stack order, then operand 1's, ..."""

    operands: list[str]
    projections: list[Projection]

    @property
    def key(self) -> str:
        return "_".join(self.matrices) + "__" + "__".join(self.operands)

    @property
    def matrices(self) -> list[str]:
        """The stack (the matrices of one operand's projections, the same for every operand)."""
        return [p.matrix for p in self.of(self.operands[0])]

    def of(self, operand: str) -> list[Projection]:
        """The projections of one operand, in stack order."""
        return [p for p in self.projections if p.operand == operand]


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


def _group(projections: list[Projection], batch_free) -> list[GemmGroup]:
    """One group per operand (its projections stacked by columns), then the groups with the same
    stack of matrices merged into one (their operands stacked by rows). An operand with no batch
    rows (``batch_free``: it reads params alone, one row broadcast to the batch) is never stacked
    by rows: it is a single row, not a block of B."""
    by_operand: dict[str, list[Projection]] = {}
    for p in projections:
        by_operand.setdefault(p.operand, []).append(p)
    groups: list[GemmGroup] = []
    for operand, ps in by_operand.items():
        mats = sorted(p.matrix for p in ps)
        same = None
        if not batch_free(operand):
            same = next((g for g in groups if sorted(g.matrices) == mats and not batch_free(g.operands[0])), None)
        if same is None:
            groups.append(GemmGroup([operand], list(ps)))
        else:  # stacked by rows: in the group's stack order
            order = {m: i for i, m in enumerate(same.matrices)}
            same.operands.append(operand)
            same.projections.extend(sorted(ps, key=lambda p: order[p.matrix]))
    return groups


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

    def batch_free(key: str) -> bool:
        """Reads no input, state or mask: one row for the whole batch."""
        if key in model.leaves:
            return model.leaves[key].kind in ("param", "const")
        if key in projs:
            return batch_free(projs[key].operand)
        return all(batch_free(r) for r in reads[key])

    n = max([depth[k] for k in depth] + [0])
    stages = []
    for k in range(n + 1):
        gemms = _group([p for p in model.projections if p.stage == k], batch_free)
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
            _group([p for p in model.projections if p.stage == -1 and level[p.key] == k], batch_free),
        ))
    return Schedule(
        model=model,
        hoisted_values=[v for lv in levels for v in lv.values],
        hoisted_gemms=[g for lv in levels for g in lv.gemms],
        stages=stages,
        consumers=consumers,
        hoisted_levels=levels,
    )
