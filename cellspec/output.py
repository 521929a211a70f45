"""Writing generated packages: all of them or none, never a half-written folder.

Every package is first written in full to a temporary folder next to its destination; only
when all are written are they swapped in, each by renames (old folder aside, new folder in,
old folder removed). A process killed at any point leaves each destination either as it was or
complete, plus at most some hidden temporary folders (``.NAME.tmp-*``), which the next compile
removes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


class OutputError(Exception):
    pass


def _clean_stale(outdir: Path, name: str) -> None:
    dest = outdir / name
    if not dest.exists():  # killed between moving the old folder aside and the new one in
        for old in sorted(outdir.glob(f".{name}.old-*")):
            os.replace(old, dest)  # the aside folder is the complete old package: put it back
            break
    for stale in outdir.glob(f".{name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in outdir.glob(f".{name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def write_packages(outdir: Path, packages: dict[str, dict[str, str]]) -> None:
    """Write each package (name -> {file: text}) to outdir/name, all or nothing."""
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output folder {outdir}: {e.strerror or e}") from None
    if not outdir.is_dir():
        raise OutputError(f"output path {outdir} is not a folder")
    staged: list[tuple[Path, Path]] = []
    try:
        for name, files in sorted(packages.items()):
            _clean_stale(outdir, name)
            dest = outdir / name
            if dest.exists() and not dest.is_dir():
                raise OutputError(f"{dest} exists and is not a folder")
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=outdir))
            staged.append((tmp, dest))
            for fname, text in sorted(files.items()):
                with open(tmp / fname, "w", encoding="utf-8", newline="\n") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())
    except OSError as e:
        for tmp, _ in staged:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write to {outdir}: {e.strerror or e}") from None
    except OutputError:
        for tmp, _ in staged:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    for tmp, dest in staged:
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=outdir))
            os.rmdir(old)
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
