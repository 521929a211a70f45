"""One script for a GPU machine: build, check and benchmark the CUDA back end.

    python benchmarks/gpu_check.py            # on a machine with a CUDA GPU and nvcc
    python benchmarks/gpu_check.py --dry-run  # anywhere: the CPU build stands in for the GPU

Steps (each prints what it does and how long it took):

1. build: every spec's .cu (specs/*.cell, tests/specs/*.cell) with nvcc for this GPU's
   architecture, in parallel, into the cellspec cache (with --dry-run: for sm_90, if nvcc exists);
2. check: every spec with backend="cuda" against NumPy float64 (outputs, final states, every
   gradient) in float32 (tolerance 2e-5, TF32 off) and bfloat16 (tolerance 5e-2), and against
   the generated PyTorch backend in float32 (with --dry-run: float32 through the CPU build;
   bfloat16 is not run, the CPU build has no 16-bit storage);
3. torch.compile: a small model (the generated LSTM layer with backend="cuda" and a linear
   head), fullgraph, forward and backward, against eager;
4. benchmark: forward and forward+backward of LSTM and TorchGRU at (T=256, B=64, H=256/512/1024)
   and (T=1024, B=16, H=768), float32: the generated layer with backend="cuda", torch.nn.LSTM /
   torch.nn.GRU (cuDNN), an eager PyTorch loop of the same cell (backend="autograd"), and that
   loop with its step compiled by torch.compile. Prints a table and writes it to
   benchmarks/results/gpu_check_<gpu name>.md (with --dry-run: tiny sizes, one repetition,
   written to a temporary folder unless --out is given).

Budget on an H100: about 1 min of builds (cold cache), seconds of checks, ~1 min of
torch.compile, 2-3 min of benchmarks.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from cellspec.driver import compile_file
from cellspec.runtime import native
from cellspec.runtime.loader import load_package
from cellspec.verify import check

SHAPES = [(256, 64, 256), (256, 64, 512), (256, 64, 1024), (1024, 16, 768)]
DRY_SHAPES = [(8, 4, 16), (16, 2, 24)]
BENCH_CELLS = {"lstm": torch.nn.LSTM, "torch_gru": torch.nn.GRU}


def log(msg: str) -> None:
    print(msg, flush=True)


def cells():
    out = []
    for path in sorted((ROOT / "specs").glob("*.cell")) + sorted((ROOT / "tests" / "specs").glob("*.cell")):
        out.extend(compile_file(path))
    return out


# ---------------------------------------------------------------------------------------- build


def build_all(ccs, archs: tuple[str, ...]) -> list[str]:
    nvcc = native.which_nvcc()
    if nvcc is None:
        return ["nvcc not found: build skipped"]
    t0 = time.perf_counter()

    def one(cc):
        t = time.perf_counter()
        try:
            native.build_cuda(cc.files[f"{cc.module_name}.cu"], cc.module_name, archs)
            return f"  {cc.module_name:20s} ok   {time.perf_counter() - t:6.1f} s"
        except native.NativeBuildError as e:
            return f"  {cc.module_name:20s} FAILED\n{e}"

    with ThreadPoolExecutor(max(1, min(len(ccs), os.cpu_count() or 1))) as pool:
        lines = list(pool.map(one, ccs))
    lines.append(f"  built {len(ccs)} specs for sm_{'/'.join(archs)} in {time.perf_counter() - t0:.1f} s (cached afterwards)")
    return lines


# ---------------------------------------------------------------------------------------- check


def check_all(ccs, device: str, dry: bool) -> tuple[list[str], bool]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    lines, ok = [], True
    header = f"  {'cell':20s} {'f32 vs numpy':>14s} {'f32 vs torch':>14s} {'bf16 vs numpy':>14s}"
    lines.append(header)
    for cc in ccs:
        pkg = load_package(cc.module_name, cc.files)
        p = check.make_problem(pkg, T=6, B=3, seed=3)
        ref = check.run_numpy(p)
        row = f"  {cc.module_name:20s}"
        try:
            cuda32 = check.run_torch(p, "cuda", "float32", device)
            gen32 = check.run_torch(p, "generated", "float32", device)
            e1 = max(check.compare(cuda32, ref).values())
            e2 = max(check.compare(cuda32, gen32).values())
            row += f" {e1:14.1e} {e2:14.1e}"
            ok &= e1 <= 2e-5 and e2 <= 2e-5
            if dry:
                row += f" {'(not run)':>14s}"
            else:
                e3 = max(check.compare(check.run_torch(p, "cuda", "bfloat16", device), ref).values())
                row += f" {e3:14.1e}"
                ok &= e3 <= 5e-2
        except Exception as e:  # noqa: BLE001 - report and go on with the other specs
            ok = False
            row += f"  FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        lines.append(row)
    lines.append("  tolerances: float32 2e-5, bfloat16 5e-2 (relative to max |reference|)")
    return lines, ok


# ---------------------------------------------------------------------------------------- compile


def compile_check(device: str) -> list[str]:
    pkg = load_package(*_module("lstm"))
    torch.manual_seed(0)
    layer = pkg.LSTM(16, 32, backend="cuda").to(device)
    head = torch.nn.Linear(32, 4).to(device)

    def model(x):
        y, (_h, c) = layer(x)
        return head(y).square().mean() + c.square().mean()

    x = torch.randn(12, 5, 16, device=device)
    t0 = time.perf_counter()
    compiled = torch.compile(model, fullgraph=True)
    loss_c = compiled(x)
    gc = torch.autograd.grad(loss_c, list(layer.parameters()))
    t1 = time.perf_counter()
    loss_e = model(x)
    ge = torch.autograd.grad(loss_e, list(layer.parameters()))
    err = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(gc, ge))
    return [f"  torch.compile(fullgraph=True) of LSTM(backend='cuda') + Linear: compiled and ran in {t1 - t0:.1f} s",
            f"  loss compiled {loss_c.item():.6f} eager {loss_e.item():.6f}; max rel grad difference {err:.1e}"]


_CC_BY_MODULE: dict = {}


def _module(name: str):
    if not _CC_BY_MODULE:
        for cc in cells():
            _CC_BY_MODULE[cc.module_name] = cc
    cc = _CC_BY_MODULE[name]
    return cc.module_name, cc.files


# ---------------------------------------------------------------------------------------- bench


def _timer(device: str):
    if device == "cuda":
        def sync():
            torch.cuda.synchronize()
    else:
        def sync():
            pass
    return sync


def measure(fn, device: str, reps: int, warmup: int) -> float:
    """Median seconds of fn() over reps runs after warmup runs."""
    sync = _timer(device)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def compiled_loop(pkg, layer):
    """The eager loop of `step`, with the step compiled by torch.compile (unrolling the whole
    time loop would take minutes to compile at T=1024)."""
    step = torch.compile(pkg.torch_cell.step)
    params = layer._params()
    n_state = len(pkg.torch_cell.STATES)

    def run(x):
        state = tuple(x.new_zeros(x.shape[1], layer.sizes[s]) for _, s in pkg.torch_cell.STATES)
        outs = []
        for t in range(x.shape[0]):
            out, state = step(params, x[t], state[0] if n_state == 1 else state)
            state = (state,) if n_state == 1 else state
            outs.append(out)
        return torch.stack(outs), state

    return run


def bench(device: str, dry: bool) -> list[list[str]]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    shapes = DRY_SHAPES if dry else SHAPES
    reps, warmup = (1, 1) if dry else (5, 2)
    rows = []
    for module, ref_cls in BENCH_CELLS.items():
        pkg = load_package(*_module(module))
        cls = getattr(pkg.torch_cell, pkg.torch_cell.CELL)
        for T, B, H in shapes:
            torch.manual_seed(0)
            x = torch.randn(T, B, H, device=device)
            impls = {
                "cellspec cuda": cls(H, H, backend="cuda").to(device),
                "cuDNN" if device == "cuda" else "torch.nn": ref_cls(H, H).to(device),
                "eager loop": cls(H, H, backend="autograd").to(device),
            }
            loop_layer = cls(H, H, backend="autograd").to(device)
            impls["compiled step loop"] = (loop_layer, compiled_loop(pkg, loop_layer))
            for name, impl in impls.items():
                if isinstance(impl, tuple):
                    layer, run = impl
                else:
                    layer, run = impl, impl
                params = list(layer.parameters())

                def fwd(run=run, x=x):
                    with torch.no_grad():
                        run(x)

                def fwd_bwd(run=run, x=x, params=params):
                    y, _ = run(x)
                    y.sum().backward()
                    for q in params:
                        q.grad = None

                try:
                    tf = measure(fwd, device, reps, warmup)
                    tb = measure(fwd_bwd, device, reps, warmup)
                    rows.append([module, f"{T}x{B}x{H}", name, f"{tf * 1e3:.2f}", f"{tb * 1e3:.2f}"])
                except Exception as e:  # noqa: BLE001 - one failing implementation must not stop the table
                    rows.append([module, f"{T}x{B}x{H}", name, "error", f"{type(e).__name__}: {str(e)[:80]}"])
                log("  " + " | ".join(rows[-1]))
    return rows


def table(rows: list[list[str]]) -> str:
    head = ["cell", "TxBxH", "implementation", "fwd ms", "fwd+bwd ms"]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows])


# ---------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="run on the CPU: the CPU build stands in for kernel launches")
    ap.add_argument("--out", help="folder for the results table (default benchmarks/results, dry run: a temp folder)")
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        log("no CUDA GPU visible to torch: run with --dry-run, or on a GPU machine")
        return 2
    device = "cpu" if dry else "cuda"
    gpu = "dry-run (CPU)" if dry else torch.cuda.get_device_name()
    archs = ("90",) if dry else ("{}{}".format(*torch.cuda.get_device_capability()),)
    report = [f"# cellspec CUDA back end: {gpu}", "",
              (f"torch {torch.__version__} (CUDA {torch.version.cuda}), nvcc: "
               f"{(native.compiler_version(native.which_nvcc()).splitlines()[-1] if native.which_nvcc() else 'none')}"), ""]
    ok = True
    t_all = time.perf_counter()
    ccs = cells()

    def section(title: str, fn):
        nonlocal ok
        log(f"== {title}")
        t = time.perf_counter()
        try:
            lines = fn()
        except Exception:  # noqa: BLE001 - a failing section is reported, the others still run
            ok = False
            lines = ["  FAILED:\n" + traceback.format_exc()]
        lines = lines if isinstance(lines, list) else [lines]
        for line in lines:
            log(line)
        log(f"   ({time.perf_counter() - t:.1f} s)")
        report.extend([f"## {title}", "", "```", *lines, "```", ""])

    section("build", lambda: build_all(ccs, archs))

    def checks():
        nonlocal ok
        lines, good = check_all(ccs, device, dry)
        ok &= good
        return lines

    section("check against NumPy and PyTorch", checks)
    section("torch.compile", lambda: compile_check(device))
    if not args.skip_bench:
        log("== benchmark (median ms)")
        rows = bench(device, dry)
        text = table(rows)
        log(text)
        report.extend(["## benchmark (median ms, float32, TF32 off)", "", text, ""])
    report.append(f"total {time.perf_counter() - t_all:.0f} s; {'OK' if ok else 'FAILURES above'}")
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="cellspec-gpu-check-")) if dry else ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_")
    path = out / f"gpu_check_{slug}.md"
    path.write_text("\n".join(report) + "\n")
    log(f"wrote {path}")
    log("OK" if ok else "FAILURES (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
