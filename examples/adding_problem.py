"""The adding problem (Hochreiter & Schmidhuber, "Long short-term memory", 1997, experiment 4),
trained side by side with several shipped cells and one written here.

Each step of a sequence of length T carries two numbers: a value drawn from U(0, 1) and a marker.
Exactly two steps are marked, one in the first half and one in the second; the target, read after
the last step, is the sum of the two marked values. Predicting the mean (1.0) gives a mean
squared error of 1/6 ≈ 0.167; a cell that solves the task carries the first value across up to
T steps. Hochreiter & Schmidhuber count a sequence as solved when the absolute error is < 0.04.

    pip install -e ".[examples]"
    python examples/adding_problem.py                      # T = 50, 100, 200 (a few minutes/T)
    python examples/adding_problem.py --lengths 100 --steps 3000
    python examples/adding_problem.py --quick              # seconds: what CI runs

Writes into --out (default examples/out/adding): adding_T{T}.png (loss curves) and results.md (a
Markdown table: final loss and solved fraction per cell and T), and prints the table.

The shipped cells are the generated packages in generated/ (imported with the repository root on
sys.path, as after `cellspec compile specs/*.cell -o generated`); the custom cell is compiled from
the text below with cellspec.load.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm import tqdm
except ImportError as e:  # pragma: no cover - the examples extra is missing
    sys.exit(f'this example needs the examples extra: pip install -e ".[examples]" ({e})')

import torch

import cellspec

#: a cell of our own: the update-gate RNN (UGRNN) of Collins, Sohl-Dickstein & Sussillo,
#: "Capacity and trainability in recurrent neural networks" (ICLR 2017): a GRU without the reset
#: gate; the gate bias starts at 1.0 so that the state is mostly kept at first.
UGRNN = """
cell UGRNN {
  input x[I]
  state h[H]
  param W_g[H, I], U_g[H, H], b_g[H] = 1.0
  param W_c[H, I], U_c[H, H], b_c[H]

  g = sigmoid(W_g @ x + U_g @ h + b_g)
  c = tanh(W_c @ x + U_c @ h + b_c)
  h' = g * h + (1 - g) * c
  output h'
}
"""

#: shipped cells trained by default: (label, generated package, class name)
SHIPPED = [
    ("Elman", "elman", "Elman"),
    ("LSTM", "lstm", "LSTM"),
    ("GRU (TF)", "gru", "GRU"),
    ("PeepholeLSTM", "peephole_lstm", "PeepholeLSTM"),
    ("CIFG LSTM", "cifg_lstm", "CifgLSTM"),
]


def batch(n: int, T: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences [T, n, 2] of (value, marker) and their targets [n]."""
    values = torch.rand(T, n, generator=gen)
    first = torch.randint(0, T // 2, (n,), generator=gen)
    second = torch.randint(T // 2, T, (n,), generator=gen)
    marks = torch.zeros(T, n)
    rows = torch.arange(n)
    marks[first, rows] = 1.0
    marks[second, rows] = 1.0
    return torch.stack([values, marks], dim=-1), values[first, rows] + values[second, rows]


class Model(torch.nn.Module):
    """A generated recurrent layer and a linear read-out of its last output."""

    def __init__(self, layer_cls, hidden: int, backend: str):
        super().__init__()
        self.rnn = layer_cls(2, hidden, backend=backend)
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)  # out: [T, B, H]; the last step's output reads the sum
        return self.head(out[-1]).squeeze(-1)


def train(label: str, layer_cls, T: int, args, bar_position: int) -> dict:
    torch.manual_seed(args.seed)
    model = Model(layer_cls, args.hidden, args.backend)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + T)
    losses = []
    t0 = time.perf_counter()
    bar = tqdm(
        range(args.steps),
        desc=f"T={T} {label:>13}",
        position=bar_position,
        leave=True,
        disable=args.no_progress,
        file=sys.stdout,
    )
    for _ in bar:
        x, y = batch(args.batch, T, gen)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            bar.set_postfix(mse=f"{sum(losses[-20:]) / 20:.4f}")
    seconds = time.perf_counter() - t0
    with torch.no_grad():  # evaluation on fresh sequences
        x, y = batch(1000, T, torch.Generator().manual_seed(10_000 + T))
        err = (model(x) - y).abs()
    n_params = sum(p.numel() for p in model.rnn.parameters())
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "cell": label,
        "T": T,
        "params": n_params,
        "final_mse": sum(tail) / len(tail),
        "test_mse": float((err**2).mean()),
        "solved": float((err < 0.04).float().mean()),
        "seconds": seconds,
        "losses": losses,
    }


def smooth(values: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot(results: list[dict], T: int, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    k = max(1, len(results[0]["losses"]) // 50)
    for r in results:
        ax.plot(smooth(r["losses"], k), label=f"{r['cell']} ({r['params']} params)", linewidth=1.4)
    ax.axhline(1 / 6, color="gray", linestyle="--", linewidth=1, label="predict the mean (1/6)")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"MSE (moving average of {k})")
    ax.set_title(f"The adding problem, T = {T}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(results: list[dict], args) -> str:
    lines = [
        (
            f"Adding problem: {args.steps} Adam steps (lr {args.lr}), batch {args.batch}, hidden {args.hidden}, "
            f"seed {args.seed}; test on 1000 fresh sequences; solved = |error| < 0.04."
        ),
        "",
        "| T | cell | params | train MSE (last 10%) | test MSE | solved | time (s) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['T']} | {r['cell']} | {r['params']} | {r['final_mse']:.4f} | {r['test_mse']:.4f} | "
            f"{100 * r['solved']:.1f}% | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[50, 100, 200], metavar="T")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--backend", default="auto", help="backend of the generated layers (default auto)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: small GEMMs)")
    p.add_argument("--out", type=Path, default=ROOT / "examples" / "out" / "adding")
    p.add_argument("--quick", action="store_true", help="a few steps of tiny models: seconds (CI)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.steps, args.batch, args.hidden = [12], 15, 8, 8
        args.backend = "generated"  # no native build in CI's seconds
    torch.set_num_threads(args.threads)
    cells = [
        (label, getattr(importlib.import_module(f"generated.{mod}"), cls))
        for label, mod, cls in SHIPPED
    ]
    cells.append(("UGRNN (custom)", cellspec.load(UGRNN).UGRNN))
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for T in args.lengths:
        per_T = [train(label, cls, T, args, 0) for label, cls in cells]
        plot(per_T, T, args.out / f"adding_T{T}.png")
        results += per_T
    text = table(results, args)
    (args.out / "results.md").write_text(text)
    print()
    print(text)
    print(f"plots: {', '.join(str(args.out / f'adding_T{T}.png') for T in args.lengths)}")
    if not all(math.isfinite(r["final_mse"]) for r in results):
        print("a loss is not finite", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
