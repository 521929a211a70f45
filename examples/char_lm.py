"""A character-level language model on text found on this machine: the docstrings of Python's own
standard library (nothing is downloaded, no text is kept in the repository).

An embedding, a generated recurrent layer and a linear read-out predict the next character;
training runs over random windows of the text (truncated backpropagation through time), and at the
end the model writes a sample, one character at a time, with the one-step cell of the same spec
(its weights are the layer's: both have the spec's param names).

    pip install -e ".[examples]"
    python examples/char_lm.py                      # LSTM, a few minutes on a CPU
    python examples/char_lm.py --cell gru --steps 3000
    python examples/char_lm.py --spec my.cell       # any one-input cell of your own
    python examples/char_lm.py --quick              # seconds: what CI runs

Writes into --out (default examples/out/char_lm): loss.png (bits per character, train and held
out), results.md (a Markdown table) and sample.txt, and prints the table and the sample.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import math
import sys
import sysconfig
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


def stdlib_docstrings(limit: int) -> str:
    """Up to `limit` characters of docstrings from the standard library's modules, in a fixed
    order (sorted file names), ASCII only, so that a run is repeatable on one Python version."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = [tree] + [
            n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))
        ]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40 and doc.isascii():
                parts.append(doc.strip() + "\n\n")
                total += len(parts[-1])
                if total >= limit:
                    return "".join(parts)[:limit]
    if total < 1000:
        sys.exit(f"found only {total} characters of docstrings under {root}")
    return "".join(parts)


class CharModel(torch.nn.Module):
    def __init__(self, layer_cls, vocab: int, hidden: int, backend: str):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.rnn = layer_cls(hidden, hidden, backend=backend)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(idx))  # idx [T, B] -> out [T, B, H]
        out = out[0] if isinstance(out, tuple) else out  # a cell with several outputs: the first
        return self.head(out)


def windows(data: torch.Tensor, n: int, length: int, gen: torch.Generator):
    start = torch.randint(0, len(data) - length - 1, (n,), generator=gen)
    idx = start[None, :] + torch.arange(length + 1)[:, None]
    chunk = data[idx]  # [length + 1, n]
    return chunk[:-1], chunk[1:]


def sample(
    model: CharModel, cell_cls, chars: list[str], prompt: str, n: int, temperature: float
) -> str:
    """Generate n characters after the prompt with the one-step cell (weights copied from the
    sequence layer: both have the spec's param names)."""
    hidden = model.rnn.hidden_size
    cell = cell_cls(hidden, hidden, backend="generated")
    cell.load_state_dict(model.rnn.state_dict())
    stoi = {c: i for i, c in enumerate(chars)}
    gen = torch.Generator().manual_seed(0)
    state, text = None, prompt
    with torch.no_grad():
        logits = None
        for ch in prompt:
            out, state = cell(model.embed(torch.tensor([stoi.get(ch, 0)])), state)
            out = out[0] if isinstance(out, tuple) else out
            logits = model.head(out)[0]
        for _ in range(n):
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
            text += chars[nxt]
            out, state = cell(model.embed(torch.tensor([nxt])), state)
            out = out[0] if isinstance(out, tuple) else out
            logits = model.head(out)[0]
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cell", default="lstm", help="a shipped cell: the package name in generated/")
    p.add_argument(
        "--spec", type=Path, default=None, help="a .cell file to compile instead (cellspec.load)"
    )
    p.add_argument("--chars", type=int, default=400_000, help="characters of text to use")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=64, help="characters per training window")
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sample", type=int, default=400, help="characters to generate at the end")
    p.add_argument("--out", type=Path, default=ROOT / "examples" / "out" / "char_lm")
    p.add_argument(
        "--quick", action="store_true", help="a tiny model for a few steps: seconds (CI)"
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.chars, args.steps, args.batch, args.length, args.hidden, args.sample = (
            20_000,
            12,
            8,
            16,
            24,
            80,
        )
        args.backend = "generated"
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    pkg = (
        cellspec.load(args.spec) if args.spec else importlib.import_module(f"generated.{args.cell}")
    )
    name = pkg.numpy_cell.CELL
    layer_cls, cell_cls = getattr(pkg, name), getattr(pkg, name + "Cell")

    text = stdlib_docstrings(args.chars)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train_data, held_data = data[:split], data[split:]
    print(
        f"text: {len(text)} characters of standard-library docstrings, {len(chars)} distinct; cell {name}"
    )

    model = CharModel(layer_cls, len(chars), args.hidden, args.backend)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    held_gen = torch.Generator().manual_seed(args.seed + 1)
    held_x, held_y = windows(held_data, 64 if not args.quick else 8, args.length, held_gen)
    log2 = math.log(2)
    train_bpc, held_bpc, held_at = [], [], []
    every = max(1, args.steps // 20)
    t0 = time.perf_counter()
    bar = tqdm(
        range(1, args.steps + 1), desc=f"{name} char LM", disable=args.no_progress, file=sys.stdout
    )
    for step in bar:
        x, y = windows(train_data, args.batch, args.length, gen)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_bpc.append(loss.item() / log2)
        if step % every == 0 or step == args.steps:
            with torch.no_grad():
                h = torch.nn.functional.cross_entropy(model(held_x).flatten(0, 1), held_y.flatten())
            held_bpc.append(h.item() / log2)
            held_at.append(step)
            bar.set_postfix(bpc=f"{held_bpc[-1]:.3f}")
    seconds = time.perf_counter() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    k = max(1, args.steps // 50)
    smoothed = [
        sum(train_bpc[max(0, i - k + 1) : i + 1]) / min(i + 1, k) for i in range(len(train_bpc))
    ]
    ax.plot(range(1, args.steps + 1), smoothed, label="train (moving average)", linewidth=1.2)
    ax.plot(held_at, held_bpc, "o-", label="held out", markersize=3)
    ax.axhline(
        math.log2(len(chars)), color="gray", linestyle="--", linewidth=1, label="uniform guess"
    )
    ax.set_xlabel("training step")
    ax.set_ylabel("bits per character")
    ax.set_title(f"Character-level LM with the generated {name}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "loss.png")
    plt.close(fig)

    generated_text = sample(model, cell_cls, chars, "Return the ", args.sample, temperature=0.7)
    (args.out / "sample.txt").write_text(generated_text + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    table = (
        f"Character-level LM on {len(text)} characters of standard-library docstrings: {args.steps} "
        f"Adam steps, batch {args.batch} x {args.length} characters, hidden {args.hidden}.\n\n"
        "| cell | params | train bpc (last 10%) | held-out bpc | uniform bpc | time (s) |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        f"| {name} | {n_params} | {sum(train_bpc[-max(1, args.steps // 10) :]) / max(1, args.steps // 10):.3f} | "
        f"{held_bpc[-1]:.3f} | {math.log2(len(chars)):.3f} | {seconds:.1f} |\n"
    )
    (args.out / "results.md").write_text(table)
    print()
    print(table)
    print("sample (temperature 0.7):")
    print(generated_text)
    print(f"\nplot: {args.out / 'loss.png'}")
    return 0 if all(math.isfinite(v) for v in train_bpc) else 1


if __name__ == "__main__":
    sys.exit(main())
