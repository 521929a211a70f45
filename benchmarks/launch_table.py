"""Per-step GEMMs, pointwise launches and arrays read / written (vector params not counted) of
each shipped cell's forward and backward loop, counted on its sequence program and the native
renderer's element functions: the table in docs/cuda.md.

    python benchmarks/launch_table.py
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cellspec.backends.native_render import _Renderer  # noqa: E402
from cellspec.driver import compile_file  # noqa: E402
from cellspec.program import ir  # noqa: E402

CELLS = ["cifg_lstm", "elman", "gru", "ind_rnn", "janet", "lstm", "lstmp", "mgu", "peephole_lstm", "sru", "torch_gru"]

def count(r, fn, loop_ops):
    gemms = launches = reads = writes = 0
    for op in loop_ops:
        if isinstance(op, (ir.Project, ir.ProjectBack)):
            gemms += 1
        elif isinstance(op, ir.Pointwise):
            for ef in r.split(fn, op):
                launches += 1
                for a in ef.args:
                    key = ef.keys[a["name"]]
                    buf = fn.buffers[fn.slots[key].buffer]
                    if buf.role == "param":
                        continue
                    writes += a["io"] in ("out", "inout")
                    reads += a["io"] in ("in", "inout")
    return gemms, launches, reads, writes

print("| cell | fwd GEMMs + launches | fwd arrays read / written | bwd GEMMs + launches | bwd arrays read / written | hoisted GEMMs + launches |")
print("| --- | --- | --- | --- | --- | --- |")
for c in CELLS:
    cc = compile_file(ROOT / "specs" / f"{c}.cell")[0]
    prog = cc.program
    r = _Renderer(prog)
    f, b = prog.forward, prog.backward
    fg, fl, fr, fw = count(r, f, f.loop().body)
    bg, bl, br, bw = count(r, b, b.loop().body)
    hops = [*f.loop().ahead, *(o for o in f.ops if o is not f.loop())]
    hg = sum(isinstance(o, ir.Project) for o in hops)
    hl = sum(len(r.split(f, o)) for o in hops if isinstance(o, ir.Pointwise))
    print(f"| {prog.cell} | {fg} + {fl} | {fr} / {fw} | {bg} + {bl} | {br} / {bw} | {hg} + {hl} |")
