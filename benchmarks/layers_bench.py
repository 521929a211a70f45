"""CPU speed of a 2-layer bidirectional LSTM / GRU over a PackedSequence: the generated layer
against torch.nn, in one process (same weights, same batch, same thread count).

    PYTHONPATH=. python benchmarks/layers_bench.py [--threads N] [--reps R] [--quick]

For each shape it times the forward without grad and the forward + backward (a sum loss over the
padded outputs and the final states) of: torch.nn.LSTM/GRU, the generated layer with
backend="auto" (the fused CPU kernels where g++ builds them) and with backend="generated" (the
PyTorch engine). The best of R runs after warm-up is reported (the implementations take turns
within each repetition, so load from other processes hits them alike), with the ratio to torch.nn.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cellspec.driver import compile_file
from cellspec.runtime.loader import load_package

SHAPES = [(64, 32, 128, 128), (128, 64, 256, 256)]  # T, B, I, H
QUICK = [(16, 8, 32, 32)]
CELLS = {"lstm": ("LSTM", nn.LSTM, "ifgo"), "torch_gru": ("TorchGRU", nn.GRU, "rzn")}


def generated(module: str):
    (cc,) = compile_file(ROOT / "specs" / f"{module}.cell")
    return load_package(cc.module_name, cc.files)


def copy_weights(ref: nn.Module, ours: nn.Module, gates: str) -> None:
    """torch.nn's weight_ih_l1_reverse rows [i; f; g; o] -> W_ii_l1_reverse, ... by name."""
    sd = {}
    for k, v in ref.state_dict().items():
        kind, sfx = k[: k.index("_l")], k[k.index("_l") :]
        prefix = {"weight_ih": "W_i", "weight_hh": "W_h", "bias_ih": "b_i", "bias_hh": "b_h"}[kind]
        for g, rows in zip(gates, v.chunk(len(gates))):
            sd[f"{prefix}{g}{sfx}"] = rows.clone()
    ours.load_state_dict(sd, strict=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="one small shape (a smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32, 2 layers, bidirectional, "
          f"PackedSequence (enforce_sorted=False), best of {args.reps} (implementations interleaved)\n")
    print("| cell | T, B, I, H | impl | forward ms | ratio | fwd+bwd ms | ratio |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for module, (cls_name, ref_cls, gates) in CELLS.items():
        pkg = generated(module)
        for T, B, I, H in QUICK if args.quick else SHAPES:
            torch.manual_seed(0)
            ref = ref_cls(I, H, 2, bidirectional=True)
            impls = {"torch.nn": ref}
            for backend in ("auto", "generated"):
                ours = getattr(pkg, cls_name)(I, H, 2, bidirectional=True, backend=backend)
                copy_weights(ref, ours, gates)
                impls[f"cellspec {backend}"] = ours
            x = torch.randn(T, B, I)
            lengths = torch.randint(T // 2, T + 1, (B,))
            lengths[0] = T

            def run(mod, x=x, lengths=lengths):
                out, fin = mod(pack_padded_sequence(x, lengths, enforce_sorted=False))
                out, _ = pad_packed_sequence(out)
                return out, fin if isinstance(fin, tuple) else (fin,)

            fns = {}
            for name, mod in impls.items():
                def fwd(mod=mod):
                    with torch.no_grad():
                        run(mod)

                def fwd_bwd(mod=mod):
                    mod.zero_grad()
                    out, fin = run(mod)
                    (out.sum() + sum(f.sum() for f in fin)).backward()

                fns[name] = (fwd, fwd_bwd)
            times = interleaved(fns, args.reps)
            base = times["torch.nn"]
            for name, (tf, tb) in times.items():
                print(f"| {cls_name} | {T}, {B}, {I}, {H} | {name} | {tf * 1e3:.2f} | {tf / base[0]:.2f} "
                      f"| {tb * 1e3:.2f} | {tb / base[1]:.2f} |")


def interleaved(fns: dict, reps: int) -> dict[str, tuple[float, float]]:
    """Best-of-``reps`` times of every (forward, forward+backward), the implementations taking turns
    within each repetition so that load from other processes hits them alike."""
    for fwd, fwd_bwd in fns.values():  # warm-up (native builds, allocator)
        fwd()
        fwd_bwd()
    best = {name: [float("inf"), float("inf")] for name in fns}
    for _ in range(reps):
        for name, pair in fns.items():
            for i, fn in enumerate(pair):
                t = time.perf_counter()
                fn()
                best[name][i] = min(best[name][i], time.perf_counter() - t)
    return {name: (b[0], b[1]) for name, b in best.items()}


if __name__ == "__main__":
    main()
