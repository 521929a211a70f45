"""Layer-normalised LSTM cost (issue 9): float32 forward + backward at (T, B, H) = (64, 32, 256),
input size = H, interleaved rounds in one process, medians reported.

* ``lnlstm``   the generated LayerNormLSTM (specs/layer_norm_lstm.cell), backend "auto" (on the CPU: the
  fused kernels of its .cu file, row functions for the layer norms);
* ``lstm``     the generated plain LSTM (specs/lstm.cell), backend "auto";
* ``eager``    the same LN-LSTM as a user writes it in PyTorch: a Python loop over steps with
  ``F.layer_norm`` on each gate and on the cell state, differentiated by autograd.

Usage: ``python benchmarks/ln_bench.py [--T 64 --B 32 --H 256 --rounds 7 --backend auto --threads N]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cellspec.driver import compile_file
from cellspec.runtime.loader import load_package


def _load(spec: str):
    (cc,) = compile_file(ROOT / "specs" / spec)
    return load_package(cc.module_name, cc.files)


def eager_ln_lstm(p: dict, x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """TF's LayerNormBasicLSTMCell in plain torch ops (the params of the generated LayerNormLSTM)."""
    T, B, _ = x.shape
    H = p["U_i"].shape[0]
    h = x.new_zeros(B, H)
    c = x.new_zeros(B, H)
    W = torch.cat([p["W_i"], p["W_j"], p["W_f"], p["W_o"]])
    U = torch.cat([p["U_i"], p["U_j"], p["U_f"], p["U_o"]])
    outs = []
    for t in range(T):
        z = x[t] @ W.T + h @ U.T
        zi, zj, zf, zo = z.split(H, dim=1)
        i = torch.sigmoid(F.layer_norm(zi, (H,), p["g_i"], p["b_i"], eps))
        j = torch.tanh(F.layer_norm(zj, (H,), p["g_j"], p["b_j"], eps))
        f = torch.sigmoid(F.layer_norm(zf, (H,), p["g_f"], p["b_f"], eps) + 1.0)
        o = torch.sigmoid(F.layer_norm(zo, (H,), p["g_o"], p["b_o"], eps))
        c = F.layer_norm(c * f + i * j, (H,), p["g_c"], p["b_c"], eps)
        h = torch.tanh(c) * o
        outs.append(h)
    return torch.stack(outs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--B", type=int, default=32)
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ln = _load("layer_norm_lstm.cell").torch_cell.LayerNormLSTM(a.H, a.H, backend=a.backend)
    plain = _load("lstm.cell").torch_cell.LSTM(a.H, a.H, backend=a.backend)
    x = torch.randn(a.T, a.B, a.H, requires_grad=True)
    grad = torch.randn(a.T, a.B, a.H)
    params = dict(ln.named_parameters())

    def run(fn) -> float:
        t0 = time.perf_counter()
        out = fn()
        torch.autograd.backward(out, grad)
        return time.perf_counter() - t0

    variants = {
        "lnlstm": lambda: ln(x)[0],
        "lstm": lambda: plain(x)[0],
        "eager": lambda: eager_ln_lstm(params, x),
    }
    for fn in variants.values():  # warm-up (builds, caches)
        run(fn)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.rounds):
        for k, fn in variants.items():
            times[k].append(run(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    print(f"float32 fwd+bwd, T={a.T} B={a.B} H={a.H} I={a.H}, backend={a.backend!r}, "
          f"{torch.get_num_threads()} threads, {a.rounds} interleaved rounds (median, min)")
    for k in times:
        print(f"  {k:<8} {med[k] * 1e3:8.1f} ms {best[k] * 1e3:8.1f} ms")
    for label, m in (("median", med), ("min", best)):
        print(f"  {label:<6} lnlstm / lstm = {m['lnlstm'] / m['lstm']:.2f} (target <= 1.3), "
              f"eager / lnlstm = {m['eager'] / m['lnlstm']:.2f} (target >= 3)")


if __name__ == "__main__":
    main()
