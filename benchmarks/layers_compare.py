"""The generated LSTM / GRU / Elman layers against torch.nn.LSTM / GRU / RNN, float64: the largest
absolute difference of the outputs, the final states and every gradient (x, initial states, each
param mapped by name), per option set and backend.

    PYTHONPATH=. python benchmarks/layers_compare.py

The same comparison, with asserted tolerances, is tests/test_layers.py; this prints the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import references as R

from cellspec.driver import compile_file
from cellspec.runtime.loader import load_package

DT = torch.float64
I, H, T, B = 3, 5, 7, 4
LENGTHS = [5, 7, 1, 5]
CELLS = {"lstm": ("LSTM", nn.LSTM), "torch_gru": ("TorchGRU", nn.GRU), "elman": ("Elman", nn.RNN)}
CONFIGS = [  # num_layers, bidirectional, batch_first, input
    (1, False, False, "plain"),
    (2, False, True, "plain"),
    (3, True, False, "plain"),
    (2, True, True, "packed (unsorted)"),
    (2, True, False, "packed (sorted)"),
    (3, True, False, "lengths="),
]


def to_spec_names(name: str, ref: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    tensors = {k: (v.grad if grads else v).detach() for k, v in ref.named_parameters()}
    out = {}
    default = ref.num_layers == 1 and not ref.bidirectional
    for layer in range(ref.num_layers):
        for sfx in ["", "_reverse"][: 2 if ref.bidirectional else 1]:
            for k, v in R._from_torch(name, tensors, f"_l{layer}{sfx}").items():
                out[k if default else f"{k}_l{layer}{sfx}"] = v.clone()
    return out


def run(mod, x, state, how, bf):
    lengths = torch.tensor(sorted(LENGTHS, reverse=True) if how == "packed (sorted)" else LENGTHS)
    if how == "plain":
        out, fin = mod(x, state)
    elif how == "lengths=" and not isinstance(mod, nn.RNNBase):
        out, fin = mod(x, state, lengths=lengths)
    else:
        packed = pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=how == "packed (sorted)")
        out, fin = mod(packed, state)
        out, _ = pad_packed_sequence(out, batch_first=bf, total_length=T)
    return out, fin if isinstance(fin, tuple) else (fin,)


def compare(name, cls_name, ref_cls, pkg, config, backend) -> tuple[float, float]:
    layers, bidi, bf, how = config
    torch.manual_seed(0)
    ref = ref_cls(I, H, layers, bidirectional=bidi, batch_first=bf).to(DT)
    ours = getattr(pkg, cls_name)(I, H, layers, bidirectional=bidi, batch_first=bf, backend=backend).to(DT)
    ours.load_state_dict(to_spec_names(name, ref))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((B, T, I) if bf else (T, B, I), dtype=DT, generator=gen)
    n_states = 2 if name == "lstm" else 1
    s0 = [torch.randn(layers * (2 if bidi else 1), B, H, dtype=DT, generator=gen) for _ in range(n_states)]
    res = []
    for mod in (ref, ours):
        xx, ss = x.clone().requires_grad_(), [s.clone().requires_grad_() for s in s0]
        out, fin = run(mod, xx, ss[0] if n_states == 1 else tuple(ss), how, bf)
        lg = torch.Generator().manual_seed(2)
        sum((t * torch.randn(t.shape, dtype=DT, generator=lg)).sum() for t in (out, *fin)).backward()
        res.append(([t.detach() for t in (out, *fin)], [xx.grad, *(s.grad for s in ss)]))
    fwd = max(float((a - b).abs().max()) for a, b in zip(res[0][0], res[1][0]))
    grads = [float((a - b).abs().max()) for a, b in zip(res[0][1], res[1][1])]
    ref_g = to_spec_names(name, ref, grads=True)
    grads += [float((v.grad - ref_g[k]).abs().max()) for k, v in ours.named_parameters()]
    return fwd, max(grads)


def main() -> None:
    backends = ["generated", "fused", "autograd"]
    print("| cell | num_layers | bidirectional | batch_first | input | " + " | ".join(
        f"{b}: fwd / grad" for b in backends) + " |")
    print("| --- | ---: | --- | --- | --- | " + " | ".join("---:" for _ in backends) + " |")
    for name, (cls_name, ref_cls) in CELLS.items():
        (cc,) = compile_file(ROOT / "specs" / f"{name}.cell")
        pkg = load_package(cc.module_name, cc.files)
        for config in CONFIGS:
            cells = []
            for backend in backends:
                f, g = compare(name, cls_name, ref_cls, pkg, config, backend)
                cells.append(f"{f:.1e} / {g:.1e}")
            layers, bidi, bf, how = config
            print(f"| {ref_cls.__name__} ({name}) | {layers} | {bidi} | {bf} | {how} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
