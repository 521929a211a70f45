"""Can the CUDA backend run on this machine? One answer per device and process, with the reason.

The generated kernels are built by an nvcc found on this machine (:func:`native.which_nvcc`) and
linked with that toolkit's static CUDA runtime, so they run only where the installed driver
accepts that toolkit's code. CUDA's rules (NVIDIA, "CUDA Compatibility", minor version
compatibility, CUDA 11 and later):

* a driver of a newer major version runs everything an older toolkit built (backward
  compatibility);
* within one major version, SASS (machine code for the GPU's architecture) built by a newer
  minor toolkit runs on an older minor driver (minor version compatibility; not before CUDA 11);
* PTX is JIT-compiled by the driver, which only understands PTX of its own toolkit version or
  older: PTX from a newer toolkit fails (``cudaErrorUnsupportedPtxVersion``);
* a driver of an older major version runs nothing a newer major toolkit built (except through
  the ``cuda-compat`` forward compatibility package on data-centre GPUs).

API:

* :func:`toolkit_runs_on_driver` — those rules, as a pure function;
* :func:`choose_archs` — what to build for a GPU (SASS for its architecture when nvcc knows it,
  else PTX of the newest architecture nvcc knows, which needs the driver's JIT);
* :func:`driver_version` — ``cuDriverGetVersion`` through ctypes (None without a driver);
* :func:`cuda_backend_usable` — all checks for one device (torch.cuda, nvcc, toolkit vs driver,
  a probe kernel built and launched), cached per process; when the answer is no it logs one INFO
  line on the ``cellspec`` logger, so that ``backend="auto"`` can fall back to the PyTorch
  engine with exactly one message.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import subprocess

from cellspec.runtime import native

log = logging.getLogger("cellspec")

#: the first CUDA major version with minor version compatibility
FIRST_MVC_MAJOR = 11

#: a kernel built and launched once per device by :func:`cuda_backend_usable`: it proves that
#: nvcc, the host compiler, the static runtime and the driver work together on that GPU.
PROBE_SOURCE = r"""
#include <cuda_runtime.h>
__global__ void cellspec_probe_kernel(int* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = 3 * i + 1;
}
extern "C" int cellspec_probe_launch(int* out, int n, void* stream) {
  cellspec_probe_kernel<<<(n + 127) / 128, 128, 0, (cudaStream_t)stream>>>(out, n);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return (int)e;
  return (int)cudaStreamSynchronize((cudaStream_t)stream);
}
extern "C" const char* cellspec_probe_error(int e) { return cudaGetErrorString((cudaError_t)e); }
"""

_USABLE: dict[tuple[str, int | None], tuple[bool, str]] = {}


def _version_text(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


def split_driver_version(driver_version: int) -> tuple[int, int]:
    """(major, minor) of a ``cuDriverGetVersion`` value: 12080 -> (12, 8)."""
    return driver_version // 1000, driver_version % 1000 // 10


def toolkit_runs_on_driver(toolkit: tuple[int, int], driver_version: int,
                           needs_ptx_jit: bool) -> tuple[bool, str]:
    """Whether code built by the CUDA toolkit ``toolkit`` (major, minor) runs on a driver whose
    ``cuDriverGetVersion`` is ``driver_version`` (1000*major + 10*minor), and why.
    ``needs_ptx_jit``: the GPU would run PTX (no SASS for its architecture in the build)."""
    tk, drv = tuple(toolkit), split_driver_version(driver_version)
    tks, drvs = _version_text(tk), _version_text(drv)
    if drv[0] > tk[0]:
        return True, f"the driver (CUDA {drvs}) is of a newer major version than nvcc (CUDA {tks})"
    if drv[0] < tk[0]:
        return False, (
            f"nvcc is from CUDA {tks} but the driver supports only CUDA {drvs}: a driver of an "
            f"older major version cannot run CUDA {tk[0]} code. Use an nvcc from a CUDA {drv[0]}.x "
            f"toolkit (set CELLSPEC_NVCC=/path/to/cuda-{drv[0]}.x/bin/nvcc) or update the driver")
    if drv >= tk:
        return True, f"the driver (CUDA {drvs}) is at least as new as nvcc (CUDA {tks})"
    if tk[0] < FIRST_MVC_MAJOR:
        return False, (
            f"nvcc is from CUDA {tks} but the driver supports only CUDA {drvs}; before CUDA "
            f"{FIRST_MVC_MAJOR} a toolkit needs a driver at least as new as itself. Use an nvcc "
            f"no newer than CUDA {drvs} (set CELLSPEC_NVCC) or update the driver")
    if needs_ptx_jit:
        return False, (
            f"this GPU would run PTX from CUDA {tks}, which the driver (CUDA {drvs}) cannot "
            f"JIT-compile (PTX needs a driver at least as new as its toolkit). Use an nvcc no "
            f"newer than CUDA {drvs} or one that builds SASS for this GPU (set CELLSPEC_NVCC), "
            f"or update the driver")
    return True, (f"minor version compatibility: SASS from CUDA {tks} runs on a CUDA {drvs} driver "
                  f"(same major version)")


def choose_archs(capability: tuple[int, int],
                 gpu_codes: frozenset[str] | set[str]) -> tuple[tuple[str, ...], bool] | None:
    """What to build for a GPU of compute ``capability`` with an nvcc that generates
    ``gpu_codes`` (``nvcc --list-gpu-code``: {'sm_80', 'sm_90', ...}; empty when unknown).

    Returns (archs for :func:`native.build_cuda`, needs_ptx_jit): SASS for the GPU's own
    architecture when nvcc knows it (or when the list is unknown); else the newest older
    architecture nvcc knows: its SASS runs on this GPU when the major version is the same
    (sm_80 code on an sm_86 GPU), otherwise the driver JIT-compiles its PTX. None when nvcc
    knows no architecture at or below the GPU's (nothing it builds could run there)."""
    arch = capability[0] * 10 + capability[1]
    known = sorted(int(c[3:]) for c in gpu_codes if c.startswith("sm_") and c[3:].isdigit())
    if not known or arch in known:
        return (str(arch),), False
    older = [a for a in known if a < arch]
    if not older:
        return None
    return (str(older[-1]),), older[-1] // 10 != arch // 10


@functools.cache
def nvcc_gpu_codes(nvcc: str) -> frozenset[str]:
    """The real architectures this nvcc generates code for (``nvcc --list-gpu-code``), or the
    empty set when it cannot say (old nvcc)."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], check=False, capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(w for w in out.split() if w.startswith("sm_"))


def driver_version() -> int | None:
    """The installed driver's CUDA version (``cuDriverGetVersion``: 1000*major + 10*minor,
    e.g. 12080), or None when there is no driver library or it does not answer."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        v = ctypes.c_int(0)
        try:
            rc = lib.cuDriverGetVersion(ctypes.byref(v))
        except AttributeError:
            return None
        return int(v.value) if rc == 0 and v.value > 0 else None
    return None


def _probe(device, archs: tuple[str, ...]) -> tuple[bool, str]:
    """Build :data:`PROBE_SOURCE` for archs and launch it on device (torch's current stream)."""
    import torch

    try:
        lib = native.load_library(str(native.build_cuda(PROBE_SOURCE, "cellspec_probe", archs)))
    except native.NativeBuildError as e:
        first = str(e).strip().splitlines()
        return False, "a test kernel did not build: " + " | ".join(first[:3])[:600]
    lib.cellspec_probe_launch.restype = ctypes.c_int
    lib.cellspec_probe_launch.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.cellspec_probe_error.restype = ctypes.c_char_p
    lib.cellspec_probe_error.argtypes = [ctypes.c_int]
    n = 1000
    with torch.cuda.device(device):
        out = torch.zeros(n, dtype=torch.int32, device=device)
        stream = torch.cuda.current_stream(device)
        rc = lib.cellspec_probe_launch(out.data_ptr(), n, stream.cuda_stream)
        if rc != 0:
            what = lib.cellspec_probe_error(rc).decode(errors="replace")
            return False, (f"a test kernel built for sm_{'/'.join(archs)} did not run: CUDA error "
                           f"{rc} ({what})")
        expected = torch.arange(n, dtype=torch.int32, device=device) * 3 + 1
        if not bool(torch.equal(out, expected)):
            return False, "a test kernel ran but wrote wrong values"
    return True, "a test kernel built and ran"


def _check(device) -> tuple[bool, str]:
    """The checks of :func:`cuda_backend_usable`, uncached."""
    import torch

    if device.type != "cuda":
        return False, f"{device} is not a CUDA device"
    if not torch.cuda.is_available():
        return False, (f"torch.cuda.is_available() is False (torch {torch.__version__}, built for "
                       f"CUDA {torch.version.cuda}): check the driver and CUDA_VISIBLE_DEVICES")
    nvcc = native.which_nvcc()
    if nvcc is None:
        return False, native.nvcc_missing_message()
    toolkit = native.nvcc_cuda_version(nvcc)
    if toolkit is None:
        return False, f"cannot read the CUDA version from `{nvcc} --version`: is it an nvcc?"
    capability = tuple(torch.cuda.get_device_capability(device))
    choice = choose_archs(capability, nvcc_gpu_codes(nvcc))
    if choice is None:
        return False, (f"nvcc (CUDA {_version_text(toolkit)}) generates code for no architecture "
                       f"this GPU (sm_{capability[0]}{capability[1]}) can run: use a newer toolkit "
                       f"(set CELLSPEC_NVCC)")
    archs, needs_jit = choice
    driver = driver_version()
    if driver is not None:
        ok, why = toolkit_runs_on_driver(toolkit, driver, needs_jit)
        if not ok:
            return False, why
    try:
        ok, why = _probe(device, archs)
    except Exception as e:  # noqa: BLE001 - any failure of the probe means: do not use the kernels
        return False, f"a test kernel could not be run: {type(e).__name__}: {e}"
    if not ok:
        return False, why
    return True, (f"nvcc CUDA {_version_text(toolkit)}, driver CUDA "
                  f"{_version_text(split_driver_version(driver)) if driver else 'unknown'}, "
                  f"sm_{archs[0]}{' (PTX, JIT)' if needs_jit else ''}: {why}")


def _device_key(device) -> tuple[object, tuple[str, int | None]]:
    import torch

    if device is None:
        device = torch.device("cuda")
    elif isinstance(device, int):
        device = torch.device("cuda", device)
    else:
        device = torch.device(device)
    index = device.index
    if device.type == "cuda" and index is None:
        try:
            index = torch.cuda.current_device() if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001 - a broken CUDA setup is reported by _check
            index = None
    if index is not None and index != device.index:
        device = torch.device(device.type, index)
    return device, (device.type, index)


def cuda_backend_usable(device=None) -> tuple[bool, str]:
    """Whether the fused CUDA kernels can run on ``device`` (a ``torch.device``, ``'cuda:1'``,
    an index, or None for the current CUDA device), and why (the reason says what to do when
    the answer is no).

    Checks torch.cuda, an nvcc (:func:`native.which_nvcc`), the toolkit against the driver
    (:func:`toolkit_runs_on_driver`), and builds and launches a test kernel. The answer is
    cached per device for the process; a no is logged once, at INFO level, on the ``cellspec``
    logger. :func:`reset_cuda_backend_usable` forgets the answers."""
    device, key = _device_key(device)
    if key in _USABLE:
        return _USABLE[key]
    ok, why = _check(device)
    _USABLE[key] = (ok, why)
    if not ok:
        log.info("the fused CUDA kernels do not run on %s, using the PyTorch engine "
                 "(backend='generated'): %s", device, why)
    return ok, why


def reset_cuda_backend_usable() -> None:
    """Forget the cached answers of :func:`cuda_backend_usable` (after changing the setup)."""
    _USABLE.clear()
