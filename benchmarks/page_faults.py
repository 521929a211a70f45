"""Page faults per call: the generated LSTM/GRU (the native library) against torch.nn, on the CPU.

A buffer fresh from the allocator is mapped page by page on first touch (a minor fault and a
zeroed 4 KiB page each), and glibc gives large blocks back to the system when they are freed, so
a layer that allocates its per-call buffers fresh pays that on every call. This counts the minor
faults (``getrusage``) of the forward and the backward of the last of ``--calls`` calls, the
output dropped after each (as in a training loop that does not keep outputs), and of an
inference call, in one process.

    python benchmarks/page_faults.py                         # LSTM, (64, 32, 256) and (256, 64, 512)
    python benchmarks/page_faults.py --spec torch_gru --shapes 256x64x512
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cellspec.driver import compile_file  # noqa: E402
from cellspec.runtime.loader import load_package  # noqa: E402

REFERENCE = {"lstm": torch.nn.LSTM, "torch_gru": torch.nn.GRU}


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def count(m, x, d, calls: int) -> tuple[int, int, int]:
    """(forward, backward, inference) faults of the last of ``calls`` calls."""
    for _ in range(calls):
        f0 = faults()
        out, _ = m(x)
        f1 = faults()
        out.backward(d)
        f2 = faults()
        del out
    for _ in range(calls):
        f3 = faults()
        with torch.no_grad():
            out, _ = m(x.detach())
        f4 = faults()
        del out
    return f1 - f0, f2 - f1, f4 - f3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default="lstm", choices=sorted(REFERENCE))
    ap.add_argument("--shapes", nargs="*", default=["64x32x256", "256x64x512"])
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pkg = load_package(args.spec, compile_file(ROOT / "specs" / f"{args.spec}.cell")[0].files)
    cls = getattr(pkg.torch_cell, pkg.torch_cell.CELL)
    print(f"{args.spec}: minor page faults in the last of {args.calls} calls (4 KiB pages)")
    print("| T, B, H | layer | forward | backward | inference |\n|---|---|---|---|---|")
    for shape in args.shapes:
        T, B, H = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        x = torch.randn(T, B, H, requires_grad=True)
        d = torch.randn(T, B, H)
        for name, m in (("torch.nn", REFERENCE[args.spec](H, H)), ("generated", cls(H, H, backend="fused"))):
            fw, bw, inf = count(m, x, d, args.calls)
            print(f"| {T}, {B}, {H} | {name} | {fw} | {bw} | {inf} |", flush=True)


if __name__ == "__main__":
    main()
