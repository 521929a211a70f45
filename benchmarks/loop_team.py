"""A time loop as one team of threads against a fork per op, in one process (the same library).

The native CPU library runs a loop inside one OpenMP parallel region where a step's GEMM would
fork (``kernels.set_loop_team(1)``, the default: each thread on its own rows of the batch where
that pays, else each op's work shared), with each op's work shared always (``set_loop_team(3)``,
the default until stop 21), or forks and joins a team for every op (``set_loop_team(0)``). For
each spec, shape and kind (``train``: forward + backward, ``infer``: the forward under
``torch.no_grad()``), the variants take turns (``native_bench.best_of``) and the table gives
their times as ratios to torch.nn and to each other. One thread never forks: run it with two
(the default).

    python benchmarks/loop_team.py                               # LSTM and GRU, 2 threads
    python benchmarks/loop_team.py --specs lstm --shapes 512x8x128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from native_bench import REFERENCE, best_of  # noqa: E402  (this folder)

from cellspec.driver import compile_file  # noqa: E402
from cellspec.runtime import kernels  # noqa: E402
from cellspec.runtime.loader import load_package  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--specs", nargs="*", default=["lstm", "torch_gru"])
    ap.add_argument("--shapes", nargs="*", default=["512x8x128", "64x32x256"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loop_team.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for spec in args.specs:
        pkg = load_package(spec, compile_file(ROOT / "specs" / f"{spec}.cell")[0].files)
        tc = pkg.torch_cell
        for shape in args.shapes:
            T, B, H = (int(v) for v in shape.split("x"))
            torch.manual_seed(0)
            m = getattr(tc, tc.CELL)(H, H, backend="fused")
            ref = REFERENCE[spec](H, H)
            x = torch.randn(T, B, H, requires_grad=True)
            d = torch.randn(T, B, H)
            for kind in ("train", "infer"):
                def call(mod, mode=None, kind=kind):
                    if mode is not None:
                        kernels.set_loop_team(mode)
                    if kind == "infer":
                        with torch.no_grad():
                            mod(x.detach())
                    else:
                        out, _ = mod(x)
                        out.backward(d)

                try:
                    best = best_of({"team": lambda: call(m, 1), "shared": lambda: call(m, 3),
                                    "fork": lambda: call(m, 0), "torch.nn": lambda: call(ref)}, args.rounds, 0.05)
                finally:
                    kernels.set_loop_team(1)
                ref_t = best["torch.nn"]
                row = (f"| {spec} | {T}, {B}, {H} | {kind} | {ref_t * 1e3:.2f} | {best['fork'] / ref_t:.3f} | "
                       f"{best['shared'] / ref_t:.3f} | {best['team'] / ref_t:.3f} | {best['shared'] / best['fork']:.3f} | "
                       f"{best['team'] / best['shared']:.3f} |")
                print(row, flush=True)
                rows.append(row)
    text = ("# A time loop as one team of threads against a fork per op (CPU, float32)\n\n"
            f"`python benchmarks/loop_team.py {' '.join(sys.argv[1:])}` — {args.threads} threads, best of "
            f"{args.rounds} interleaved rounds, one process.\n\n"
            "team: the default (rows of their own where that pays); shared: a team, each op's work shared.\n\n"
            "| spec | T, B, H | kind | torch.nn (ms) | fork per op / torch.nn | shared / torch.nn | team / torch.nn "
            "| shared / fork | team / shared |\n"
            "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
