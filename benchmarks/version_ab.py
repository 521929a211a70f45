"""One spec's generated layer at an earlier commit against the current one, and torch.nn, in one
process (the machine's speed drifts by 10-25% between runs: only a same-process comparison says
what a change bought).

The earlier version is the committed ``generated/<spec>/`` of ``--base`` (``git show``), loaded
as a package of its own name next to the current ``generated/<spec>/``; both build their native
library (cached by source). Timing is ``native_bench.best_of``: the variants take turns,
``--rounds`` times; each turn times back-to-back calls for ~``--sample`` seconds and the best
time per call is kept.

    python benchmarks/version_ab.py --base 7ed51c9                   # LSTM, 4 shapes, 1 thread
    python benchmarks/version_ab.py --base 7ed51c9 --spec torch_gru --threads 2 --shapes 64x32x256
    python benchmarks/version_ab.py --base 7ed51c9 --spec ind_rnn   # no torch.nn: base and now in ms
    python benchmarks/version_ab.py --base 7ed51c9 --spec torch_gru --shapes 64x32x256 --floor

``--floor`` (lstm, torch_gru): the GEMMs alone (``native_bench.floor_fns``) take turns with the
training calls too, and a row gives each version's training time over that floor, measured in
the same turns.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from native_bench import best_of, floor_fns  # noqa: E402  (this folder: the same timing as the table of record)

REFERENCE = {"lstm": torch.nn.LSTM, "torch_gru": torch.nn.GRU}
SHAPES = ["64x32x256", "256x64x512", "512x8x128", "16x1x128"]


def export(commit: str, spec: str, dest: Path) -> None:
    """generated/<spec>/ at ``commit`` into ``dest`` (a package directory)."""
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{commit}:generated/{spec}"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split()
    dest.mkdir(parents=True)
    for name in names:
        blob = subprocess.run(["git", "show", f"{commit}:generated/{spec}/{name}"], cwd=ROOT, check=True,
                              capture_output=True).stdout
        (dest / name).write_bytes(blob)


def layer(pkg, H: int):
    tc = pkg.torch_cell
    return getattr(tc, tc.CELL)(H, H, backend="fused")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the earlier commit")
    ap.add_argument("--spec", default="lstm",
                    help="a shipped spec (its committed generated/ package); torch.nn runs too for "
                         + " and ".join(sorted(REFERENCE)))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", nargs="*", default=SHAPES)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sample", type=float, default=0.05)
    ap.add_argument("--floor", action="store_true", help="also each version's training time over its GEMMs alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="cellspec-ab-"))
    export(args.base, args.spec, tmp / f"base_{args.spec}")
    sys.path.insert(0, str(tmp))
    sys.path.insert(0, str(ROOT / "generated"))
    base = importlib.import_module(f"base_{args.spec}")
    now = importlib.import_module(args.spec)
    print(f"{args.spec}, {args.threads} thread(s): best time per call, ratio to torch.nn "
          f"(base = {args.base}, now = the working tree's generated/{args.spec})")
    print("| T, B, H | kind | torch.nn (ms) | base | now | now / base |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        T, B, H = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        mods = {"base": layer(base, H), "now": layer(now, H)}
        if args.spec in REFERENCE:
            mods["torch.nn"] = REFERENCE[args.spec](H, H)
        x = torch.randn(T, B, H, requires_grad=True)
        d = torch.randn(T, B, H)
        for kind in ("train", "infer"):
            def call(m, kind=kind):
                if kind == "infer":
                    with torch.no_grad():
                        m(x.detach())
                else:
                    out, _ = m(x)
                    out.backward(d)

            fns = {k: (lambda m=m: call(m)) for k, m in mods.items()}
            floor = args.floor and kind == "train" and args.spec in REFERENCE
            if floor:
                fns.update(floor_fns(T, B, H, 4 if args.spec == "lstm" else 3))
            best = best_of(fns, args.rounds, args.sample)
            if "torch.nn" in best:
                ref = best["torch.nn"]
                cols = f"{ref * 1e3:.2f} | {best['base'] / ref:.2f} | {best['now'] / ref:.2f}"
            else:  # no torch.nn module of this cell: the times themselves
                cols = f"- | {best['base'] * 1e3:.2f} ms | {best['now'] * 1e3:.2f} ms"
            print(f"| {T}, {B}, {H} | {kind} | {cols} | {best['now'] / best['base']:.3f} |", flush=True)
            if floor:
                fl = best["floor"]
                print(f"| {T}, {B}, {H} | train / GEMM floor | {fl * 1e3:.2f} (floor) | {best['base'] / fl:.2f} | "
                      f"{best['now'] / fl:.2f} | {best['now'] / best['base']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
