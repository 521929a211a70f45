"""What randomness costs (issue 10): the cells with random ops against the same cells without
them, and against the zoneout LSTM as a user writes it in eager PyTorch, float32 forward +
backward in training mode, interleaved rounds in one process.

* ``zoneout``      specs/zoneout_lstm.cell (zoneout on h and c; two [T, B, H] masks per call)
* ``variational``  specs/variational_lstm.cell (variational dropout on x and h; two [B, n] draws)
* ``lstm``         specs/lstm.cell (the same LSTM without masks; the weights are the same)
* ``ln_dropout``   specs/layer_norm_basic_lstm.cell (TF's LayerNormBasicLSTMCell, recurrent dropout)
* ``ln``           specs/layer_norm_lstm.cell (the same without the dropout)
* ``eager_zoneout`` torch.nn.LSTMCell in a Python loop with zoneout written in torch ops

Usage: ``python benchmarks/random_bench.py [--T 64 --B 32 --H 256 --rounds 5 --threads 1]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cellspec  # noqa: E402


def eager_zoneout(cell, x, p_h, p_c):
    h = x.new_zeros(x.shape[1], cell.hidden_size)
    c = torch.zeros_like(h)
    outs = []
    for t in range(x.shape[0]):
        h_new, c_new = cell(x[t], (h, c))
        m_h = torch.empty_like(h).bernoulli_(p_h)
        m_c = torch.empty_like(c).bernoulli_(p_c)
        h = m_h * h + (1 - m_h) * h_new
        c = m_c * c + (1 - m_c) * c_new
        outs.append(h)
    return torch.stack(outs), (h, c)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--B", type=int, default=32)
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    T, B, H = a.T, a.B, a.H
    load = lambda n: cellspec.load(str(ROOT / "specs" / f"{n}.cell"))  # noqa: E731
    lstm = load("lstm").LSTM(H, H)
    zone = load("zoneout_lstm").ZoneoutLSTM(H, H, zoneout_h=0.1, zoneout_c=0.1)
    zone.load_state_dict(lstm.state_dict())
    var = load("variational_lstm").VariationalLSTM(H, H)
    var.load_state_dict(lstm.state_dict())
    ln = load("layer_norm_lstm").LayerNormLSTM(H, H)
    lnd = load("layer_norm_basic_lstm").LayerNormBasicLSTM(H, H)
    lnd.load_state_dict(ln.state_dict())
    cell = torch.nn.LSTMCell(H, H)
    x = torch.randn(T, B, H, requires_grad=True)

    def run(f):
        def go():
            out, _ = f(x)
            out.sum().backward()
        return go

    impls = {
        "lstm": run(lstm), "zoneout": run(zone), "variational": run(var), "ln": run(ln), "ln_dropout": run(lnd),
        "eager_zoneout": run(lambda v: eager_zoneout(cell, v, 0.1, 0.1)),
    }
    times = {k: [] for k in impls}
    for f in impls.values():
        f()  # builds, warm-up
    for _ in range(a.rounds):
        for k, f in impls.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"float32 fwd+bwd in training mode, T={T} B={B} H={H}, {a.threads} thread(s), "
          f"median of {a.rounds} interleaved rounds, torch {torch.__version__}")
    for k, v in med.items():
        print(f"  {k:14s} {v:8.2f} ms")
    print(f"  zoneout / lstm = {med['zoneout'] / med['lstm']:.2f}, variational / lstm = "
          f"{med['variational'] / med['lstm']:.2f}, ln_dropout / ln = {med['ln_dropout'] / med['ln']:.2f}, "
          f"eager_zoneout / zoneout = {med['eager_zoneout'] / med['zoneout']:.2f}")
    mask_mb = 2 * T * B * H * 4 / 2**20
    print(f"  masks kept per call: zoneout 2 x [T, B, H] float32 = {mask_mb:.1f} MiB; variational "
          f"2 x [B, n] = {2 * B * H * 4 / 2**20:.3f} MiB")


if __name__ == "__main__":
    main()
