"""The sequence program: what every back end runs for a whole sequence, as typed data.

Input: nothing (data only). Built by :mod:`cellspec.program.plan` from a schedule and its
derived backward; rendered by :mod:`cellspec.backends.python_render` (NumPy, PyTorch) and
:mod:`cellspec.backends.native_render` (C++ host loop + CUDA kernels). Printed by
``cellspec show --stage program``.

A program has three functions — the training forward (which saves what the backward reads),
the inference forward (which saves nothing) and the backward — each a list of ops over named
buffers. Sizes are SymPy expressions over ``T``, ``B`` and the cell's size symbols, so buffer
shapes and column offsets print in any target language. Every vector the pointwise math reads
or writes lives in a :class:`Slot` (a column range of a buffer, at a time offset for buffers
that hold a whole sequence).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

T = sp.Symbol("T", integer=True, nonnegative=True)
B = sp.Symbol("B", integer=True, nonnegative=True)


#: the size of a row scalar (one number per row: a reduction), as semantics names it
ROW = "row"


def size(symbol: str) -> sp.Expr:
    """The SymPy symbol of a size (``H``), as used in shapes and offsets; 1 for a row scalar."""
    if symbol == ROW:
        return sp.S.One
    return sp.Symbol(symbol, integer=True, nonnegative=True)


@dataclass(frozen=True)
class Buffer:
    """A dense, contiguous, row-major array.

    ``role`` says what it holds (``input``, ``param``, ``state`` sequence, ``output``,
    ``saved``, ``scratch``, ``d_output``, ``d_state``, ``d_input``, ``d_param_rows``,
    ``d_gemm``, ...); ``init`` how it starts: ``arg`` (a call argument or a result of the
    forward), ``empty`` (every element the program reads it writes first), ``zeros``.
    """

    name: str
    shape: tuple[sp.Expr, ...]
    role: str
    init: str = "empty"

    @property
    def timed(self) -> bool:
        """Its first axis is time: [T, B, w] or [T + 1, B, w]."""
        return len(self.shape) == 3


@dataclass(frozen=True)
class Slot:
    """Where one named vector lives: columns ``col : col + size`` of ``buffer``, at step
    ``t + time`` when the buffer is timed (``time`` is None otherwise: one [B, w] block, or
    one broadcast row for a param vector)."""

    buffer: str
    time: int | None
    col: sp.Expr
    size: str


@dataclass(frozen=True)
class Statement:
    """``target = expr``: pointwise SymPy over per-element symbols (one name per vector)."""

    target: str
    expr: sp.Expr
    comment: str = ""
    temp: bool = False


@dataclass(frozen=True)
class Pointwise:
    """A fused elementwise block: every statement for every row (``rows``: ``step`` = the B rows
    of one step, ``all`` = all T·B rows) and unit. ``reads``/``writes`` are the names it takes
    from and leaves in slots; other targets are locals."""

    block: str
    title: str
    rows: str
    statements: tuple[Statement, ...]
    reads: tuple[str, ...]
    writes: tuple[str, ...]


@dataclass(frozen=True)
class Weight:
    """Param matrices stacked by rows, ``[Σ out, inner]``: the matrix of one GEMM group."""

    name: str
    matrices: tuple[str, ...]
    outs: tuple[str, ...]  # size symbol of each matrix's rows
    inner: str

    def offsets(self) -> list[tuple[sp.Expr, str]]:
        """(first row, size symbol) of each matrix in the stack."""
        out, at = [], sp.S.Zero
        for s in self.outs:
            out.append((at, s))
            at = at + size(s)
        return out

    @property
    def width(self) -> sp.Expr:
        return sum((size(s) for s in self.outs), sp.S.Zero)


@dataclass(frozen=True)
class Project:
    """``out = operand @ weightᵀ``: rows of one step, or all T·B rows (a hoisted GEMM).
    ``broadcast``: the operand is one row for the whole batch (it reads params alone).

    Several ``operands`` (row stacking: the same stack of matrices on k operands of one stage)
    are one GEMM with k times the rows: ``stacked`` is the buffer that holds them as adjacent
    column blocks, ``[rows, k·inner]``, which read row-major is the plain ``[k·rows, inner]``
    matrix ``[a; b]`` interleaved by row (row ``r·k + j`` is operand j's row r); ``out`` is then
    ``[rows, k·width]`` the same way, projection ``(j, i)`` at column ``j·width + offset_i``.
    Interleaving keeps the first B_t rows of every operand (variable lengths) the first
    ``k·B_t`` rows of the GEMM: one GEMM at every step."""

    weight: str
    operands: tuple[str, ...]
    out: str  # buffer (its columns are the stacked projections, in weight order, per operand)
    rows: str
    broadcast: bool = False
    comment: str = ""
    stacked: str = ""  # with several operands: the buffer holding them side by side


@dataclass(frozen=True)
class ProjectBack:
    """``d_operand = d_out @ weight`` (rows of one step, or all rows), written to the slot of
    ``d_operand``; with several operands (a row-stacked GEMM) one GEMM writes all of them, as
    adjacent column blocks of the buffer ``stacked`` (see :class:`Project`)."""

    weight: str
    d_out: str  # buffer of the adjoints of the stacked projections
    d_operands: tuple[str, ...]
    rows: str
    comment: str = ""
    accumulate: bool = False  # += into the slot (an input's gradient), else =
    stacked: str = ""
    #: the first column of the group's run in ``d_out`` (an adjoint buffer several groups share,
    #: :func:`cellspec.program.passes.share_adjoint_buffers`); its rows are the buffer's width apart
    d_col: sp.Expr = sp.S.Zero


@dataclass(frozen=True)
class WeightGrad:
    """``grad(matrix) += d_out[:, block]ᵀ @ operand`` over all T·B rows, for every matrix of
    the weight: dW is never a per-step GEMM. With several operands (a row-stacked GEMM) it is
    one GEMM over all k·T·B rows of ``stacked`` (the operands side by side, see
    :class:`Project`): the sum over every operand's rows."""

    weight: str
    d_out: str
    operands: tuple[str, ...]
    broadcast: bool = False
    comment: str = ""
    #: a [Σ out, inner] buffer: the whole stack's dW in one GEMM, then split per matrix (one GEMM
    #: reads the operand once; a GEMM per matrix would read it once per matrix)
    scratch: str = ""
    stacked: str = ""
    d_col: sp.Expr = sp.S.Zero  # as in ProjectBack


@dataclass(frozen=True)
class Stack:
    """Copy each ``sources`` slot into its column block (the slot ``targets``) of a row-stacked
    GEMM's operand buffer, before the GEMM (rows of one step, or all T·B rows). Only for
    operands the planner cannot lay out there itself: a caller's input, a state (its own
    ``[T + 1, B, n]`` sequence), a GEMM result, an output."""

    buffer: str
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    rows: str
    comment: str = ""


@dataclass(frozen=True)
class RowSum:
    """``grad(param) += Σ over all T·B rows`` of the slot of ``source`` (a vector param's
    gradient from its per-row adjoint)."""

    param: tuple[str, ...]  # params with this same adjoint: one reduction, added to each
    source: str
    scratch: str = ""  # a [size] buffer for the sum when it goes to several params


@dataclass(frozen=True)
class AddRows:
    """``grad(input) += source`` over the whole sequence (an input's adjoint from another
    pass: the hoisted GEMM or the hoisted pointwise backward)."""

    input: str
    source: str


@dataclass(frozen=True)
class Zero:
    """Set a buffer to zero (a carried state adjoint whose new value is identically zero)."""

    buffer: str


@dataclass(frozen=True)
class Hold:
    """Variable lengths: rows ``B_t ..`` of the state sequence at ``t + 1`` copy its rows at
    ``t`` (a sequence that has ended keeps its state). A no-op without per-step batch sizes."""

    buffer: str


@dataclass(frozen=True)
class Loop:
    """The time loop: ``body`` for t = 0 .. T-1, or T-1 .. 0 when ``reverse``.

    Every function may be called with **per-step batch sizes** ``batch_sizes[t]`` (variable
    lengths, the batch sorted by length, longest first: cuDNN's packed layout). Then every op of
    the body with ``rows == "step"`` (and every :class:`Zero`) runs on rows ``0 .. B_t - 1``
    only, :class:`Hold` freezes the states of the other rows, and the buffers the function lists
    in ``zero_when_packed`` start as zeros (the rows no step writes are read over all T·B rows
    after the loop). Outputs are zero in inactive rows and incoming output adjoints are ignored
    there (the renderers' wrappers mask them)."""

    reverse: bool
    body: tuple
    #: ops over all T·B rows that only the steps and later ops read, each row computed from the
    #: same row of its inputs (the hoisted projections and pointwise levels of a forward). An
    #: engine may run them in **chunks of steps**, each chunk just before its steps, so that a
    #: chunk's rows are still in cache when its steps read them (the native CPU loop does); one
    #: chunk of all T steps is running them before the loop (the Python engines, CUDA).
    ahead: tuple = ()
    #: buffers of the ahead ops' results that only this loop reads, each row at its own step
    #: (scratch, not saved): an engine that runs chunks may keep one chunk of steps of them, a
    #: ring that every chunk overwrites, instead of T (the native CPU loop does: its chunk of
    #: [T, B, 4H] stays in L2 where T steps of it would go through to memory). In a backward
    #: loop: the step adjoints its steps write that only the steps (each its own rows) and the
    #: ops behind them read.
    ring: tuple[str, ...] = ()
    #: ops over all T·B rows after a backward loop, each reading the rows of a step only
    #: (weight gradients and bias sums, which add up over the rows, a product or an input's
    #: gradient per row). An engine may run them in **chunks of steps**, each chunk just after
    #: its steps, so that the chunk's step adjoints are still in cache when they are read, and a
    #: ring of one chunk holds them (the native CPU loop does); one chunk of all T steps is
    #: running them after the loop (the Python engines, CUDA).
    behind: tuple = ()


Op = Pointwise | Project | ProjectBack | WeightGrad | Stack | RowSum | AddRows | Zero | Hold | Loop


@dataclass(frozen=True)
class Function:
    """One entry point: its buffers (arguments, results and workspace), where each named vector
    lives, and the ops in order."""

    name: str
    buffers: dict[str, Buffer]
    slots: dict[str, Slot]
    ops: tuple
    #: timed buffers the loop writes row-wise: zero-filled first when called with batch sizes
    zero_when_packed: tuple[str, ...] = ()
    #: state sequences of which a call returns only the final step (inference: not an output, not
    #: kept): an engine may keep two steps of them, t and t + 1 (the native loop does)
    last_only: tuple[str, ...] = ()

    def loop(self) -> Loop:
        return next(op for op in self.ops if isinstance(op, Loop))

    def flat(self) -> list:
        """Every op but the loop itself, in program order: a loop's ops ahead of its steps, its
        body, then the ops behind its steps."""
        out = []
        for op in self.ops:
            out.extend((*op.ahead, *op.body, *op.behind) if isinstance(op, Loop) else (op,))
        return out

    def written_by(self, op) -> list[str]:
        """The buffers one op (not a loop) writes, as the rows it runs on see them (a weight
        gradient's writes are the param gradients, not buffers of the function)."""
        if isinstance(op, Pointwise):
            return [self.slots[w].buffer for w in op.writes]
        if isinstance(op, Project):
            return [op.out]
        if isinstance(op, ProjectBack):
            return [op.stacked or self.slots[op.d_operands[0]].buffer]
        if isinstance(op, Stack):
            return [op.buffer]
        if isinstance(op, AddRows):
            return [self.slots[f"grad_input:{op.input}"].buffer]
        if isinstance(op, Zero):
            return [op.buffer]
        return []

    def pointwise(self) -> list[Pointwise]:
        """Every pointwise block, in program order (loop bodies included)."""
        return [o for o in self.flat() if isinstance(o, Pointwise)]


@dataclass(frozen=True)
class Vector:
    """An input, state or output of the cell (``key``: the spec name, ``name``: the model key)."""

    key: str
    name: str
    size: str


@dataclass(frozen=True)
class Param:
    key: str
    shape: tuple[str, ...]


@dataclass(frozen=True)
class Program:
    """The whole-sequence program of one cell (see the module docstring)."""

    cell: str
    module: str
    sizes: tuple[str, ...]  # size symbols, constructor order
    size_sources: dict[str, tuple]  # symbol -> ("input", i) | ("param", name, dim) | ("state", i)
    inputs: tuple[Vector, ...]  # the spec's inputs, then the masks
    states: tuple[Vector, ...]  # name: key of the next-state value
    params: tuple[Param, ...]
    outputs: tuple[Vector, ...]  # name: value key
    weights: dict[str, Weight]
    forward: Function
    inference: Function
    backward: Function
    #: buffers the training forward hands to the backward (beyond inputs and params)
    saved: tuple[str, ...]
    #: state key -> buffer of its carried adjoint in the backward
    d_states: dict[str, str] = field(default_factory=dict)
    #: output value key -> buffer of its incoming adjoint sequence
    d_outputs: dict[str, str] = field(default_factory=dict)
    #: input key -> buffer of its gradient (none for a mask)
    d_inputs: dict[str, str] = field(default_factory=dict)
    #: size symbol of every name the pointwise blocks use (values, projections, adjoints)
    value_sizes: dict[str, str] = field(default_factory=dict)
    #: the params the user trains (``params`` are the engine's: those the math reads directly,
    #: then the prepared ones); a scalar param has shape ()
    spec_params: tuple[Param, ...] = ()
    #: ``const`` name -> default value: keyword arguments of every entry point
    consts: tuple[tuple[str, float], ...] = ()
    #: engine params formed from spec params and consts once per call, before the loop
    #: (:class:`cellspec.model.lower.Prepared`: matrix expressions, broadcast consts and scalars)
    prepared: tuple = ()
    #: the random ops' masks (:class:`cellspec.model.lower.Mask`): the last entries of
    #: ``inputs``, drawn by the caller, never differentiated
    masks: tuple = ()

    @property
    def functions(self) -> tuple[Function, ...]:
        return (self.forward, self.inference, self.backward)
