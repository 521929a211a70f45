"""The native library of a generated ``.cu`` file: build it, load it, call its entry points.

A generated PyTorch module calls :func:`library` once per device type and then
``lib(function, dims, tensors)``: one ctypes call runs a whole sequence (``forward``,
``inference`` or ``backward``; see :mod:`cellspec.backends.native_render` for the ABI). What to
allocate and pass is generated code (the module's ``_native_*`` functions); nothing here reads a
plan.

* CPU: the g++ build (:func:`cellspec.runtime.native.build_host`); its GEMMs call the
  Fortran-ABI ``sgemm_``/``dgemm_`` that torch's own library exports (MKL on x86-64 Linux
  wheels), found once per process with ``dlsym``. Without it the library is unusable and the
  module runs its PyTorch engine.
* GPU: the nvcc build for the device's architecture; GEMMs through ``cublasGemmEx`` of the
  cuBLAS torch has loaded, on torch's cuBLAS handle and current stream.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from cellspec.runtime import native

HOST_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
CUDA_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
#: rows (of all B) per chunk of the work behind a backward's steps on the CPU (Library.chunk_steps_behind)
BEHIND_ROWS = 256


class KernelError(RuntimeError):
    """The native library cannot be built, loaded or run here; the message says why."""


@functools.cache
def l2_bytes() -> int:
    """The size of one core's L2 cache (Linux sysfs), else 1 MiB."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(base.glob("index*")):
            if (index / "level").read_text().strip() == "2" and (index / "type").read_text().strip() in ("Unified", "Data"):
                text = (index / "size").read_text().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
                return int(text.rstrip("KMG")) * scale
    except (OSError, ValueError):
        pass
    return 1 << 20


class _HostCtx(ctypes.Structure):
    _fields_ = [("sgemm", ctypes.c_void_p), ("dgemm", ctypes.c_void_p), ("pack_size", ctypes.c_void_p),
                ("pack", ctypes.c_void_p), ("compute", ctypes.c_void_p), ("own", ctypes.c_int), ("team", ctypes.c_int)]


class _CudaCtx(ctypes.Structure):
    _fields_ = [("gemm", ctypes.c_void_p), ("handle", ctypes.c_void_p), ("stream", ctypes.c_void_p)]


def _symbol(lib: ctypes.CDLL, name: str) -> int | None:
    try:
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    except AttributeError:
        return None


@functools.cache
def host_blas() -> tuple[int, int, int | None, int | None, int | None]:
    """Addresses of ``sgemm_`` and ``dgemm_`` in the process (torch's MKL; KernelError if absent)
    and of MKL's packed-matrix API ``sgemm_pack_get_size_``, ``sgemm_pack_``, ``sgemm_compute_``
    (None where the BLAS lacks it: the per-step GEMMs then re-pack their weight every step).
    ``CELLSPEC_PACKED_GEMM=0`` turns the packed API off (for measuring it)."""
    lib_dir = Path(torch.__file__).parent / "lib"
    candidates = [lib_dir / "libtorch_cpu.so", lib_dir / "libtorch_cpu.dylib"]
    for path in candidates:
        if not path.exists():
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        s, d = _symbol(lib, "sgemm_"), _symbol(lib, "dgemm_")
        if s and d:
            packed = [_symbol(lib, n) for n in ("sgemm_pack_get_size_", "sgemm_pack_", "sgemm_compute_")]
            if os.environ.get("CELLSPEC_PACKED_GEMM", "1") == "0" or not all(packed):
                packed = [None, None, None]
            return (s, d, *packed)
    raise KernelError(
        "no Fortran-ABI sgemm_/dgemm_ found in torch's library (this build of torch does not export "
        "MKL's BLAS); the PyTorch engine runs instead"
    )


@functools.cache
def host_ctx() -> _HostCtx:
    """The context every CPU library call gets: the BLAS addresses of :func:`host_blas` and
    ``own`` = 1 where the float products may run the library's own AVX-512 GEMM, the library
    choosing per call by the CPU, the batch and the loop (every call on AMD, elsewhere batches
    under 32 rows (with one thread only their steps' products) and forwards that run as a team
    with at most 1 MiB of step weights: ``cs_for_batch``); ``CELLSPEC_OWN_GEMM=0`` or
    :func:`set_own_gemm` keeps the BLAS
    throughout, ``CELLSPEC_OWN_GEMM=2`` the own GEMM wherever the CPU has AVX-512,
    ``CELLSPEC_OWN_GEMM=3`` the BLAS for the products by a weight and the own kernel for the
    weight gradients (what the library chooses where it picks the BLAS on one thread, for weight
    gradients of at most 1 Mi floats: one pass over an adjoint for all its dW and its column
    sums), ``CELLSPEC_OWN_GEMM=4`` the own kernel for the products of a step's rows and the
    weight gradients, the BLAS for the products of a chunk's rows (what it picks for a batch
    under 32 rows on one thread) (for measuring one against the other). ``team``: whether a time loop
    runs as one team of threads for all its steps instead of forking per op: 1 where a step's
    GEMM would fork (the library decides, and whether each thread runs the steps on its own rows
    of the batch or the threads share each op's work), 0 never (``CELLSPEC_LOOP_TEAM=0``), 2
    wherever it can, on rows of their own wherever every thread gets one (``CELLSPEC_LOOP_TEAM=2``:
    tests run small shapes through it), 3 wherever it can, each op's work shared
    (``CELLSPEC_LOOP_TEAM=3``); :func:`set_loop_team`."""
    team = {"0": 0, "2": 2, "3": 3}.get(os.environ.get("CELLSPEC_LOOP_TEAM", "1"), 1)
    own = {"0": 0, "2": 2, "3": 3, "4": 4}.get(os.environ.get("CELLSPEC_OWN_GEMM", "1"), 1)
    return _HostCtx(*host_blas(), own, team)


def set_own_gemm(on: bool | str) -> None:
    """For every later CPU call in this process: the own GEMM where the library chooses it
    (True), never (False), wherever the CPU has AVX-512 (``"always"``), for the weight
    gradients only (``"weight_grads"``: the BLAS multiplies by the weights), or for the products
    of a step's rows and the weight gradients (``"steps"``: the BLAS for the products of a
    chunk's rows, the hoisted one and dx)."""
    host_ctx().own = {"always": 2, "weight_grads": 3, "steps": 4}.get(on, 1) if on else 0


def set_loop_team(mode: int) -> None:
    """How every later CPU call in this process runs its time loops' threads (``host_ctx``'s
    ``team``): 0 a fork per op, 1 one team per loop where a step's GEMM would fork (its threads
    on rows of their own where that pays), 2 one team per loop wherever the loop allows it (on
    rows of their own wherever every thread gets a row), 3 one team per loop wherever the loop
    allows it, each op's work shared."""
    if mode not in (0, 1, 2, 3):
        raise ValueError(f"loop team mode is 0, 1, 2 or 3, not {mode!r}")
    host_ctx().team = mode


@functools.cache
def cublas_gemm() -> int:
    """Address of ``cublasGemmEx`` in the cuBLAS that torch loaded."""
    torch.cuda.current_blas_handle()  # makes torch load cuBLAS
    with open("/proc/self/maps") as f:
        paths = sorted({line.split()[-1] for line in f if "libcublas.so" in line and "Lt" not in line})
    for path in paths:
        addr = _symbol(ctypes.CDLL(path), "cublasGemmEx")
        if addr:
            return addr
    raise KernelError("cublasGemmEx not found in the process: torch has not loaded cuBLAS")


class Library:
    """One loaded build of a generated ``.cu`` file."""

    def __init__(self, lib: ctypes.CDLL, module: str, device_type: str):
        self.lib, self.module, self.device_type = lib, module, device_type
        self._fns: dict[tuple[str, torch.dtype], ctypes._CFuncPtr] = {}
        if device_type == "cpu":
            self._ctx = host_ctx()
        else:
            self._ctx = None
            err = getattr(lib, f"{module}_cuda_error_string")
            err.argtypes, err.restype = [ctypes.c_int], ctypes.c_char_p
            self._err = err

    def own_gemm(self) -> bool:
        """Whether this CPU build runs its float per-step products with its own AVX-512 GEMM
        (when :func:`host_ctx` allows it): compiled for x86-64 and the CPU has AVX-512."""
        fn = getattr(self.lib, f"{self.module}_own_gemm", None)
        return self.device_type == "cpu" and fn is not None and fn() == 1

    def _loop_count(self, name: str) -> int:
        """The CPU build's counter ``<module>_<name>``; 0 for a build without it."""
        fn = getattr(self.lib, f"{self.module}_{name}", None) if self.device_type == "cpu" else None
        if fn is None:
            return 0
        fn.argtypes, fn.restype = [], ctypes.c_long
        return int(fn())

    def team_loops(self) -> int:
        """How many time loops this CPU build has run as one team of threads in this process
        (``host_ctx``'s ``team``); 0 for a build without them."""
        return self._loop_count("team_loops")

    def split_loops(self) -> int:
        """How many of those team loops ran their steps on each thread's own rows of the batch
        (``CS_SPLIT_ROWS`` in the generated ``.cu``); 0 for a build without them."""
        return self._loop_count("split_loops")

    def release_scratch(self) -> None:
        """Free the packed-operand scratch the CPU build keeps between calls for the calling
        thread (``cs_take`` in the generated ``.cu``; a build without it keeps none)."""
        fn = getattr(self.lib, f"{self.module}_release_scratch", None) if self.device_type == "cpu" else None
        if fn is not None:
            fn.argtypes, fn.restype = [], None
            fn()

    def chunk_steps(self, T: int, B: int, floats_per_step: int, weight_floats: int,
                    step_weight_floats: int | None = None) -> int:
        """Steps per chunk of the work ahead of a forward's steps (the hoisted GEMMs and levels,
        ``ir.Loop.ahead``): the library runs them a chunk at a time, just before the chunk's
        steps, and keeps one chunk of their results (``ir.Loop.ring``). On the CPU as many steps
        as write ~256 KiB (64 Ki floats; ``floats_per_step`` is per step of all B rows), which
        are still in L2 when the steps read them; at least 256 rows where the chunk's weights
        (``weight_floats``) are more than 1 MiB (streamed from L3 once per chunk), or where they
        and the steps' weights (``step_weight_floats``) together fit in a core's L2 (each
        chunk's product then evicts part of the steps' weight and the steps part of its own:
        fewer chunks, fewer refills; modules generated before stop 25 do not pass the latter).
        On a GPU one chunk of all T steps (one large GEMM).
        Measured: docs/performance.md (stops 17, 18 and 25)."""
        if self.device_type != "cpu":
            return max(T, 1)
        c = 65536 // max(floats_per_step, 1)
        fits = step_weight_floats is not None and 0 < 4 * (weight_floats + step_weight_floats) <= l2_bytes()
        if B > 0 and c * B < 256 and (weight_floats > 262144 or fits):
            c = -(-256 // B)
        return max(1, min(c, T))

    def chunk_steps_behind(self, T: int, B: int) -> int:
        """Steps per chunk of the work behind a backward's steps (the weight gradients, bias sums
        and input gradients over their rows, ``ir.Loop.behind``): the library runs them a chunk
        at a time, just after the chunk's steps, and keeps one chunk of the step adjoints they
        read (``ir.Loop.ring``), which then stays in cache instead of going to memory and back.
        On the CPU as many steps as hold ``BEHIND_ROWS`` rows (fewer rows per chunk: the weight
        gradients' pass reads and writes its dW more often; more: the ring leaves L2); on a GPU
        one chunk of all T steps. Measured (docs/performance.md, stop 29): 256 rows among 64 to
        768 at (64, 32, 256) and (512, 8, 128), one and two threads."""
        if self.device_type != "cpu":
            return max(T, 1)
        return max(1, min(-(-BEHIND_ROWS // max(B, 1)), T))

    def function(self, name: str, dtype: torch.dtype):
        fn = self._fns.get((name, dtype))
        if fn is None:
            if self.device_type == "cpu":
                if dtype not in HOST_SUFFIX:
                    raise KernelError(f"the CPU build runs float32 and float64, not {dtype}")
                symbol = f"{self.module}_{name}_{HOST_SUFFIX[dtype]}"
            else:
                if dtype not in CUDA_SUFFIX:
                    raise KernelError(f"the CUDA kernels run float32, float64, float16 and bfloat16, not {dtype}")
                symbol = f"{self.module}_cuda_{name}_{CUDA_SUFFIX[dtype]}"
            fn = getattr(self.lib, symbol)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            fn.restype = ctypes.c_int
            self._fns[(name, dtype)] = fn
        return fn

    def __call__(self, name: str, dims: tuple[int, ...], tensors: list[torch.Tensor | int | None]) -> None:
        dtype = tensors[0].dtype
        fn = self.function(name, dtype)
        # None: a NULL pointer (the optional batch sizes, a host array even for the CUDA build); an
        # int: an address already (a weight stack that lies in one block: the glue's _stacked)
        ptrs = (ctypes.c_void_p * len(tensors))(*[t if t is None or t.__class__ is int else t.data_ptr() for t in tensors])
        dims_arr = (ctypes.c_int64 * len(dims))(*dims)
        if self.device_type == "cpu":
            rc = fn(dims_arr, ptrs, ctypes.byref(self._ctx))
        else:
            dev = tensors[0].device
            with torch.cuda.device(dev):
                stream = torch.cuda.current_stream(dev)
                ctx = _CudaCtx(cublas_gemm(), torch.cuda.current_blas_handle(), stream.cuda_stream)
                rc = fn(dims_arr, ptrs, ctypes.byref(ctx))
        if rc != 0:
            msg = self._err(rc).decode() if self.device_type != "cpu" else f"error {rc}"
            raise KernelError(f"{self.module} {name} failed: {msg}")


@functools.cache
def _load(path: str, device_type: str, archs: tuple[str, ...]) -> Library:
    source = Path(path).read_text()
    module = Path(path).stem
    try:
        if device_type == "cpu":
            so = native.build_host(source, module)
        else:
            so = native.build_cuda(source, module, archs)
        return Library(native.load_library(str(so)), module, device_type)
    except native.NativeBuildError as e:
        raise KernelError(str(e)) from None


def library(module_file: str, cu_name: str, device: torch.device) -> Library:
    """The library of the ``.cu`` file next to a generated module, built for ``device``'s type
    (once per process; the build itself is cached on disk)."""
    path = os.fspath(Path(module_file).with_name(cu_name))
    if device.type == "cpu":
        return _load(path, "cpu", ())
    if device.type == "cuda":
        from cellspec.runtime import cuda_env

        ok, why = cuda_env.cuda_backend_usable(device)  # cached; logs one line when it says no
        if not ok:
            raise KernelError(f"the CUDA kernels cannot run on {device}: {why}")
        nvcc = native.which_nvcc()
        capability = tuple(torch.cuda.get_device_capability(device))
        choice = cuda_env.choose_archs(capability, cuda_env.nvcc_gpu_codes(nvcc) if nvcc else frozenset())
        archs = choice[0] if choice else (f"{capability[0]}{capability[1]}",)
        return _load(path, "cuda", archs)
    raise KernelError(f"the native kernels run on CPU and CUDA tensors, not on {device.type!r}")
