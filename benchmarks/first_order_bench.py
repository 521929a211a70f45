"""First-order fwd+bwd time of two copies of a generated package in one process (e.g. before
and after a template change): median over interleaved repetitions, and the ratio.

    python benchmarks/first_order_bench.py BEFORE_DIR AFTER_DIR [--module lstm] [--T 64 --B 32 --H 256]

Each DIR holds the package directory (``DIR/lstm``), e.g. ``git archive REV generated/lstm``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch


def load(directory: str, module: str, alias: str):
    path = Path(directory) / module / "torch_cell.py"
    spec = importlib.util.spec_from_file_location(alias, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[alias] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--module", default="lstm")
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--B", type=int, default=32)
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(1)
    mods = {"before": load(a.before, a.module, "bench_before"), "after": load(a.after, a.module, "bench_after")}
    x = torch.randn(a.T, a.B, a.H)
    for backend in ("generated", "fused"):
        layers = {}
        for k, m in mods.items():
            torch.manual_seed(0)
            layers[k] = getattr(m, m.CELL)(a.H, a.H, backend=backend)
        times = {k: [] for k in layers}
        for rep in range(a.reps):
            order = list(layers.items())
            for k, layer in order if rep % 2 else order[::-1]:  # alternate who runs first
                t = time.perf_counter()
                out, (h, c) = layer(x)
                (out.sum() + c.sum()).backward()
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v[2:]) * 1e3 for k, v in times.items()}
        print(f"{a.module} T={a.T} B={a.B} H={a.H} float32 {backend:9s} fwd+bwd: before {med['before']:.1f} ms, "
              f"after {med['after']:.1f} ms, after/before {med['after'] / med['before']:.3f}")


if __name__ == "__main__":
    main()
