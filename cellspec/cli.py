"""The ``cellspec`` command: compile, check and show specs.

    cellspec compile FILE... [-o OUTDIR]   write one package per cell (all or nothing)
    cellspec check FILE...                 every backend against the others, as a table
    cellspec show FILE [--stage STAGE]     print an intermediate of the pipeline

A bad spec prints ``file:line:col: message`` with the line and a caret, exits 1 and writes
nothing. No traceback reaches the user for a bad spec or a bad path.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from cellspec import __version__
from cellspec.errors import SpecError


def _compile_all(files: list[str], backends: tuple[str, ...]):
    from cellspec.driver import compile_file

    compiled = []
    errors: list[SpecError] = []
    for f in files:
        t0 = time.perf_counter()
        try:
            cells = compile_file(f, backends)
        except SpecError as e:
            errors.append(e)
            continue
        dt = time.perf_counter() - t0
        compiled.append((f, cells, dt))
    return compiled, errors


def cmd_compile(args) -> int:
    from cellspec.output import OutputError, write_packages

    compiled, errors = _compile_all(args.files, ("numpy", "torch", "cuda"))
    for e in errors:
        print(e.render(), file=sys.stderr)
    if errors:
        print(f"cellspec: {len(errors)} file(s) with errors; nothing written", file=sys.stderr)
        return 1
    packages: dict[str, dict[str, str]] = {}
    origin: dict[str, str] = {}
    for f, cells, _ in compiled:
        for c in cells:
            if c.module_name in packages:
                print(
                    f"{f}: cell '{c.checked.name}' has the module name '{c.module_name}' of a cell in "
                    f"{origin[c.module_name]}; nothing written",
                    file=sys.stderr,
                )
                return 1
            packages[c.module_name] = c.files
            origin[c.module_name] = f
    try:
        write_packages(Path(args.output), packages)
    except OutputError as e:
        print(f"cellspec: {e}", file=sys.stderr)
        return 1
    for f, cells, dt in compiled:
        names = ", ".join(f"{c.checked.name} -> {Path(args.output) / c.module_name}/" for c in cells)
        if not args.quiet:
            print(f"{f}: {names}  ({dt:.2f} s)")
    return 0


def cmd_check(args) -> int:
    from cellspec.verify.check import check_cell

    compiled, errors = _compile_all(args.files, ("numpy", "torch", "cuda"))
    for e in errors:
        print(e.render(), file=sys.stderr)
    status = 1 if errors else 0
    for _, cells, _ in compiled:
        for c in cells:
            report = check_cell(c, T=args.steps, B=args.batch, seed=args.seed, fd=not args.no_fd)
            print(report.table())
            print()
            if not report.ok:
                status = 1
    return status


def cmd_show(args) -> int:
    from cellspec.show import show

    try:
        print(show(args.file, args.stage, args.cell))
    except SpecError as e:
        print(e.render(), file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cellspec", description="Compile RNN cells written as .cell equations.")
    p.add_argument("--version", action="version", version=f"cellspec {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="write one package per cell: NumPy, PyTorch (and CUDA sources)")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("-o", "--output", default="generated", metavar="OUTDIR", help="output folder (default: generated)")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=cmd_compile)
    k = sub.add_parser("check", help="run every backend on random inputs and print the error table")
    k.add_argument("files", nargs="+", metavar="FILE")
    k.add_argument("--steps", type=int, default=4, help="sequence length T (default 4)")
    k.add_argument("--batch", type=int, default=3, help="batch size B (default 3)")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--no-fd", action="store_true", help="skip finite differences")
    k.set_defaults(func=cmd_check)
    s = sub.add_parser("show", help="print one stage of the pipeline for a spec")
    s.add_argument("file", metavar="FILE")
    s.add_argument(
        "--stage",
        default="schedule",
        choices=("ast", "checked", "model", "schedule", "backward", "program", "numpy", "torch", "cuda"),
        help="which stage to print (default: schedule)",
    )
    s.add_argument("--cell", default=None, help="which cell of the file (default: all)")
    s.set_defaults(func=cmd_show)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("cellspec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # a bug in cellspec, not in the spec: say so, without a traceback
        if os.environ.get("CELLSPEC_DEBUG"):
            raise
        print(
            f"cellspec: internal error: {type(e).__name__}: {e}\n"
            "This is a bug in cellspec, not in your spec; rerun with CELLSPEC_DEBUG=1 for the "
            "traceback and report it. Nothing was written.",
            file=sys.stderr,
        )
        return 2
