"""Build a generated ``.cu`` file into a shared library (CPU or GPU) through the cache, and load it.

* :func:`build_host` — the CPU build: ``g++ -x c++ -O3 -fopenmp -shared -fPIC`` (or, without
  g++, ``nvcc -x cu`` compiling host code only). Exposes ``<fn>_f32`` / ``<fn>_f64``.
* :func:`build_cuda` — the GPU build: ``nvcc -shared -Xcompiler -fPIC -gencode ...`` for the
  given architectures. Exposes ``<fn>_cuda_{f32,f64,f16,bf16}`` launchers taking a stream.

Both go through :func:`cellspec.runtime.cache.entry`, keyed by the source text, the compiler's
version line and the flags, so the same source is compiled once per machine (file lock, atomic
rename). Errors are :class:`NativeBuildError` with what went wrong and what to do; a build that
failed is remembered for the rest of the process (:func:`clear_failed_builds` forgets), so a
caller that tries again gets the same error at once instead of another compiler run.

Choosing the toolkit and the host compiler (see docs/cuda.md):

* nvcc: ``$CELLSPEC_NVCC`` (only that one when set), else ``$NVCC``, ``nvcc`` on ``PATH``,
  ``$CUDA_HOME/bin``, ``$CUDA_PATH/bin``, ``/usr/local/cuda/bin``;
* nvcc's host compiler: ``$CELLSPEC_CCBIN``, else ``$CUDAHOSTCXX``, passed as ``-ccbin <path>``.

Both are part of the cache key (the nvcc's and the host compiler's ``--version`` and the flags).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

from cellspec.runtime.cache import cache_root, entry, key_of

HOST_FLAGS = ("-x", "c++", "-O3", "-fopenmp", "-shared", "-fPIC")
#: added to HOST_FLAGS where GCC, x86-64 and glibc's libmvec are there: the element math calls
#: libmvec's vector exp/log/tanh/... (declared by the .cu prelude under CELLSPEC_SIMD_MATH).
#: -fno-math-errno / -fno-trapping-math only drop errno and FP-exception-flag side effects
#: (results, NaN and inf included, are unchanged); no -ffast-math.
SIMD_FLAGS = ("-DCELLSPEC_SIMD_MATH", "-fno-math-errno", "-fno-trapping-math")
#: with AVX2 and FMA on this CPU: 8-wide float / 4-wide double vectors; FMA contraction stays off
#: so that the arithmetic is the plain build's, operation for operation.
AVX2_FLAGS = ("-mavx2", "-mfma", "-ffp-contract=off")
#: with AVX-512 (F and DQ) as well: 16-wide float / 8-wide double vectors and libmvec's AVX-512
#: variants (measured on AMD Zen 4: the LSTM's pointwise step 5.5 -> 3.5 ns per element).
AVX512_FLAGS = AVX2_FLAGS + ("-mavx512f", "-mavx512dq", "-mprefer-vector-width=512")
SIMD_LIBS = ("-lmvec", "-lm")


class NativeBuildError(RuntimeError):
    """A compiler is missing or failed; the message says what to do."""


log = logging.getLogger("cellspec")

#: builds that failed in this process, by cache key: the error is raised again without a rerun
_FAILED: dict[str, NativeBuildError] = {}


def which_cxx() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx and shutil.which(cxx):
        return shutil.which(cxx)
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def which_nvcc() -> str | None:
    """The nvcc to build with: ``$CELLSPEC_NVCC`` when set (and nothing else: a wrong setting is
    reported, not silently replaced by another toolkit), else ``$NVCC``, ``nvcc`` on ``PATH``,
    ``$CUDA_HOME/bin/nvcc``, ``$CUDA_PATH/bin/nvcc``, ``/usr/local/cuda/bin/nvcc``."""
    chosen = os.environ.get("CELLSPEC_NVCC")
    if chosen:
        return shutil.which(chosen)
    nvcc = os.environ.get("NVCC")
    if nvcc and shutil.which(nvcc):
        return shutil.which(nvcc)
    path = shutil.which("nvcc")
    if path:
        return path
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and shutil.which(str(Path(home) / "bin" / "nvcc")):
            return str(Path(home) / "bin" / "nvcc")
    return None


def nvcc_missing_message() -> str:
    """Why :func:`which_nvcc` found nothing, and what to do."""
    chosen = os.environ.get("CELLSPEC_NVCC")
    if chosen:
        return (f"CELLSPEC_NVCC={chosen!r} is not an executable nvcc: point it at the nvcc of an "
                "installed CUDA toolkit (e.g. /usr/local/cuda-12.8/bin/nvcc) or unset it")
    return ("nvcc not found: the CUDA backend compiles its kernels on first use. Install the CUDA "
            "toolkit matching your driver and put nvcc on PATH (or set $CELLSPEC_NVCC, $NVCC or "
            "$CUDA_HOME), or pass backend='generated' to run the PyTorch implementation instead")


def which_ccbin() -> str | None:
    """The host compiler nvcc should use (``-ccbin``): ``$CELLSPEC_CCBIN``, else
    ``$CUDAHOSTCXX``; None when neither is set (nvcc picks its default). Raises
    :class:`NativeBuildError` when the variable names no executable."""
    for var in ("CELLSPEC_CCBIN", "CUDAHOSTCXX"):
        value = os.environ.get(var)
        if value:
            path = shutil.which(value)
            if path is None:
                raise NativeBuildError(
                    f"{var}={value!r} is not an executable host compiler for nvcc: point it at a "
                    "g++/clang++ that your nvcc supports (e.g. /usr/bin/g++-13) or unset it")
            return path
    return None


def nvcc_host_flags() -> tuple[str, ...]:
    """``('-ccbin', path)`` when a host compiler is chosen (:func:`which_ccbin`), else ()."""
    ccbin = which_ccbin()
    return ("-ccbin", ccbin) if ccbin else ()


@functools.cache
def compiler_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], check=False, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:  # pragma: no cover
        raise NativeBuildError(f"cannot run {path} --version: {e}") from None
    return out.strip()


def nvcc_cuda_version(nvcc: str) -> tuple[int, int] | None:
    """(major, minor) of the CUDA toolkit nvcc belongs to, from 'release 13.0'."""
    text = compiler_version(nvcc)
    for part in text.replace(",", " ").split():
        if part[:1].isdigit() and "." in part and text.find("release " + part) >= 0:
            major, minor = part.split(".")[:2]
            return int(major), int(minor)
    return None


def _run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeBuildError(f"{what}: could not run {cmd[0]}: {e}") from None
    if proc.returncode != 0:
        raise NativeBuildError(
            f"{what} failed (exit {proc.returncode}):\n  {' '.join(cmd)}\n{proc.stderr.strip()[-4000:]}\n"
            "This is a bug in the generated code or an unsupported compiler; please report it with the spec."
        )


def _compile(kind: str, compiler: str, flags: tuple[str, ...], source: str, name: str, what: str,
             libs: tuple[str, ...] = ()) -> Path:
    """Build through the cache; a failure is remembered per key and raised again without a rerun."""
    identity = [compiler_version(compiler)]
    if "-ccbin" in flags:  # nvcc's host compiler changes the output: its version is in the key
        identity.append(compiler_version(flags[flags.index("-ccbin") + 1]))
    key = key_of(kind, source, *identity, " ".join(flags + libs))
    failed = _FAILED.get(key)
    if failed is not None:
        raise failed

    def build(tmp: Path) -> None:
        src = tmp / f"{name}.cu"
        src.write_text(source)
        _run([compiler, *flags, str(src), "-o", str(tmp / f"{name}.so"), *libs], what)

    if not (cache_root() / kind / key / ".complete").exists():  # say once why the first use pauses
        log.info("cellspec: building %s (first use on this machine; cached in %s afterwards)",
                 what, cache_root())
    try:
        return entry(kind, key, build) / f"{name}.so"
    except NativeBuildError as e:
        _FAILED[key] = e
        log.debug("%s failed; not retried in this process (native.clear_failed_builds() to retry)",
                  what)
        raise


def clear_failed_builds() -> None:
    """Forget the builds that failed in this process (after fixing the compiler), so that the
    next call compiles again."""
    _FAILED.clear()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_simd_flags(cxx: str) -> tuple[str, ...] | None:
    """The extra flags :func:`build_host` uses with this compiler (the widest vectorised build
    whose probe builds here), or None for the plain build (not GCC, not x86-64 Linux, no
    libmvec, or CELLSPEC_HOST_SIMD=0)."""
    options = host_simd_options(cxx)
    return next((o for o in options if _simd_works(cxx, o)), None)


@functools.cache
def host_simd_options(cxx: str) -> tuple[tuple[str, ...], ...]:
    """The vectorised host builds this compiler and CPU allow, widest first (AVX-512, AVX2,
    SSE2); empty where none applies. :func:`host_simd_flags` takes the first whose probe builds."""
    if os.environ.get("CELLSPEC_HOST_SIMD", "1") == "0":
        return ()
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return ()
    version = compiler_version(cxx)
    if "clang" in version.lower() or not ("GCC" in version or "g++" in version or "Free Software Foundation" in version):
        return ()
    if ctypes.util.find_library("mvec") is None:
        return ()
    cpu = _cpu_flags()
    options = []
    if {"avx2", "fma", "avx512f", "avx512dq"} <= cpu:
        options.append(SIMD_FLAGS + AVX512_FLAGS)
    if {"avx2", "fma"} <= cpu:
        options.append(SIMD_FLAGS + AVX2_FLAGS)
    options.append(SIMD_FLAGS)
    return tuple(options)


@functools.cache
def _simd_works(cxx: str, flags: tuple[str, ...]) -> bool:
    """One tiny build and load with the vector math flags (a libmvec too old or missing symbols
    shows up here once, not per spec)."""
    probe = ("#include <math.h>\n#pragma GCC diagnostic ignored \"-Wunused-function\"\n"
             "#if defined(__GLIBC__) && __GLIBC_PREREQ(2, 35)\n"
             "extern \"C\" { __attribute__((__simd__(\"notinbranch\"))) float tanhf(float) __THROW; }\n#endif\n"
             "extern \"C\" { __attribute__((__simd__(\"notinbranch\"))) double exp(double) __THROW; }\n"
             "extern \"C\" void cs_probe(long n, const float* a, float* b, const double* c, double* d) {\n"
             "#pragma omp simd\n for (long j = 0; j < n; ++j) { b[j] = tanhf(a[j]); d[j] = exp(c[j]); } }\n")
    try:
        path = _compile("host-so", cxx, HOST_FLAGS + flags, probe, "cs_probe", "vector math probe", SIMD_LIBS)
        _ = ctypes.CDLL(str(path)).cs_probe  # it loads, and the symbol resolves
    except (NativeBuildError, OSError, AttributeError):
        return False
    return True


def build_host(source: str, name: str) -> Path:
    """The CPU build of a generated .cu file (path of the shared library): vectorised math
    (libmvec) with :func:`host_simd_flags`, else the plain ``-O3 -fopenmp`` build."""
    cxx = which_cxx()
    if cxx is not None:
        extra = host_simd_flags(cxx)
        if extra is not None:
            return _compile("host-so", cxx, HOST_FLAGS + extra, source, name, f"C++ build of {name}.cu", SIMD_LIBS)
        return _compile("host-so", cxx, HOST_FLAGS, source, name, f"C++ build of {name}.cu")
    nvcc = which_nvcc()
    if nvcc is not None:  # host code only, through nvcc's host compiler
        flags = (*nvcc_host_flags(), "-x", "c++", "-O3", "-shared", "-Xcompiler", "-fPIC,-fopenmp")
        return _compile("host-so", nvcc, flags, source, name, f"host build of {name}.cu with nvcc")
    raise NativeBuildError(
        "no C++ compiler found (g++, c++ or clang++, or $CXX): install one (e.g. apt-get install g++) "
        "to build the CPU version of the CUDA kernels"
    )


def cuda_flags(archs: tuple[str, ...]) -> tuple[str, ...]:
    """nvcc flags for a shared library with SASS for each arch ('80', '90') and PTX for the last."""
    flags = ["-O3", "-shared", "-Xcompiler", "-fPIC", "-lineinfo"]
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    if archs:
        flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return tuple(flags)


def build_cuda(source: str, name: str, archs: tuple[str, ...]) -> Path:
    """The GPU build of a generated .cu file for the given SM architectures, with the nvcc of
    :func:`which_nvcc` and the host compiler of :func:`which_ccbin`."""
    nvcc = which_nvcc()
    if nvcc is None:
        raise NativeBuildError(nvcc_missing_message())
    flags = nvcc_host_flags() + cuda_flags(archs)
    return _compile("cuda-so", nvcc, flags, source, name, f"nvcc build of {name}.cu")


@functools.cache
def load_library(path: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(path)
    except OSError as e:
        raise NativeBuildError(f"cannot load {path}: {e}") from None
