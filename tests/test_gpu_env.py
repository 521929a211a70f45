"""The GPU environment without a GPU: CUDA's toolkit/driver compatibility rules, the choice of
nvcc and of its host compiler (and that they key the build cache), a failed build compiled only
once per process, and cuda_backend_usable's answer for each simulated cause."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
import torch

from cellspec.runtime import cuda_env, native

REQUIRE_NVCC = os.environ.get("CELLSPEC_REQUIRE_NVCC") == "1"
REAL_PROBE = cuda_env._probe

# ------------------------------------------------------------------ toolkit vs driver


@pytest.mark.parametrize(
    ("toolkit", "driver", "ptx", "ok", "why"),
    [
        ((12, 8), 12080, False, True, "at least as new"),
        ((12, 8), 12080, True, True, "at least as new"),
        ((12, 0), 12080, True, True, "at least as new"),
        ((12, 8), 12040, False, True, "minor version compatibility"),  # SASS: same major suffices
        ((12, 8), 12000, False, True, "minor version compatibility"),
        ((11, 8), 11000, False, True, "minor version compatibility"),
        ((13, 0), 13000, False, True, "at least as new"),
        ((12, 8), 12040, True, False, "JIT"),  # PTX needs a driver at least as new as its toolkit
        ((12, 8), 13000, True, True, "newer major"),
        ((11, 4), 12020, False, True, "newer major"),
        ((13, 0), 12090, False, False, "older major"),
        ((13, 0), 12090, True, False, "older major"),
        ((12, 1), 11080, False, False, "older major"),
        ((10, 2), 10010, False, False, "before CUDA 11"),  # no minor version compatibility yet
        ((10, 1), 10020, False, True, "at least as new"),
    ],
)
def test_toolkit_runs_on_driver(toolkit, driver, ptx, ok, why):
    got, reason = cuda_env.toolkit_runs_on_driver(toolkit, driver, needs_ptx_jit=ptx)
    assert got is ok, reason
    assert why in reason


def test_incompatible_driver_says_what_to_do():
    ok, why = cuda_env.toolkit_runs_on_driver((13, 0), 12080, False)
    assert not ok
    assert "CUDA 13.0" in why and "CUDA 12.8" in why and "CELLSPEC_NVCC" in why
    ok, why = cuda_env.toolkit_runs_on_driver((12, 9), 12040, True)
    assert not ok and "update the driver" in why


@pytest.mark.parametrize(
    ("capability", "codes", "expected"),
    [
        ((9, 0), {"sm_80", "sm_90", "sm_100"}, (("90",), False)),
        ((8, 6), {"sm_80", "sm_90"}, (("80",), False)),  # sm_80 SASS runs on sm_86
        ((12, 0), {"sm_80", "sm_90"}, (("90",), True)),  # newer GPU: PTX, JIT by the driver
        ((10, 3), {"sm_90", "sm_100", "sm_103"}, (("103",), False)),
        ((9, 0), set(), (("90",), False)),  # nvcc could not say: build for the GPU itself
        ((7, 0), {"sm_80", "sm_90"}, None),  # nothing nvcc builds runs there
    ],
)
def test_choose_archs(capability, codes, expected):
    assert cuda_env.choose_archs(capability, frozenset(codes)) == expected


def test_driver_version_reads_cuDriverGetVersion(monkeypatch):
    class FakeLib:
        @staticmethod
        def cuDriverGetVersion(ref):
            ref._obj.value = 12080
            return 0

    def fake_cdll(name):
        if name == "libcuda.so.1":
            return FakeLib()
        raise OSError(name)

    monkeypatch.setattr(cuda_env.ctypes, "CDLL", fake_cdll)
    assert cuda_env.driver_version() == 12080
    monkeypatch.setattr(cuda_env.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))
    assert cuda_env.driver_version() is None


def test_driver_version_error_is_none(monkeypatch):
    class FailingLib:
        @staticmethod
        def cuDriverGetVersion(ref):
            return 3  # CUDA_ERROR_NOT_INITIALIZED

    monkeypatch.setattr(cuda_env.ctypes, "CDLL", lambda name: FailingLib())
    assert cuda_env.driver_version() is None


# ------------------------------------------------------------------ choosing nvcc and -ccbin


def _script(path: Path, body: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


def _fake_nvcc(path: Path, release: str, calls: Path, exit_code: int = 0) -> str:
    """An 'nvcc' that answers --version with `release`, logs every other call to `calls` and
    writes the file after -o (or fails with exit_code)."""
    return _script(path, f"""
if [ "$1" = "--version" ]; then
  echo "Cuda compilation tools, release {release}, V{release}.1"; exit 0
fi
echo "$@" >> {calls}
if [ {exit_code} -ne 0 ]; then echo "fake compiler error" >&2; exit {exit_code}; fi
while [ $# -gt 0 ]; do if [ "$1" = "-o" ]; then : > "$2"; fi; shift; done
""")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No toolkit/host compiler settings from the outer environment; a private build cache and
    an empty record of failed builds."""
    for var in ("CELLSPEC_NVCC", "NVCC", "CUDA_HOME", "CUDA_PATH", "CELLSPEC_CCBIN", "CUDAHOSTCXX",
                "CXX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CELLSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_FAILED", {})
    return tmp_path


def test_cellspec_nvcc_comes_first(clean_env, monkeypatch):
    calls = clean_env / "calls"
    mine = _fake_nvcc(clean_env / "a" / "nvcc", "12.8", calls)
    other = _fake_nvcc(clean_env / "b" / "nvcc", "13.0", calls)
    monkeypatch.setenv("NVCC", other)
    monkeypatch.setenv("CELLSPEC_NVCC", mine)
    assert native.which_nvcc() == mine
    monkeypatch.delenv("CELLSPEC_NVCC")
    assert native.which_nvcc() == other


def test_cellspec_nvcc_that_is_not_there_is_not_replaced(clean_env, monkeypatch):
    monkeypatch.setenv("NVCC", _fake_nvcc(clean_env / "b" / "nvcc", "13.0", clean_env / "calls"))
    monkeypatch.setenv("CELLSPEC_NVCC", str(clean_env / "missing" / "nvcc"))
    assert native.which_nvcc() is None
    with pytest.raises(native.NativeBuildError, match="CELLSPEC_NVCC=.*not an executable"):
        native.build_cuda("// x", "x", ("90",))


def test_path_then_cuda_home(clean_env, monkeypatch):
    on_path = _fake_nvcc(clean_env / "path" / "nvcc", "12.8", clean_env / "calls")
    home = _fake_nvcc(clean_env / "home" / "bin" / "nvcc", "12.6", clean_env / "calls")
    monkeypatch.setenv("CUDA_HOME", str(clean_env / "home"))
    monkeypatch.setenv("PATH", str(clean_env / "path"))
    assert native.which_nvcc() == on_path
    monkeypatch.setenv("PATH", str(clean_env / "empty"))
    assert native.which_nvcc() == home


def test_ccbin_selection(clean_env, monkeypatch):
    gxx = _script(clean_env / "gxx" / "g++-12", "echo 'g++ (GCC) 12.3.0'\n")
    clang = _script(clean_env / "clang" / "clang++", "echo 'clang version 17'\n")
    assert native.nvcc_host_flags() == ()
    monkeypatch.setenv("CUDAHOSTCXX", clang)
    assert native.nvcc_host_flags() == ("-ccbin", clang)
    monkeypatch.setenv("CELLSPEC_CCBIN", gxx)
    assert native.nvcc_host_flags() == ("-ccbin", gxx)
    monkeypatch.setenv("CELLSPEC_CCBIN", str(clean_env / "nope" / "g++"))
    with pytest.raises(native.NativeBuildError, match="CELLSPEC_CCBIN=.*not an executable"):
        native.nvcc_host_flags()


def test_nvcc_and_ccbin_key_the_build_cache(clean_env, monkeypatch):
    calls = clean_env / "calls"
    monkeypatch.setenv("CELLSPEC_NVCC", _fake_nvcc(clean_env / "a" / "nvcc", "12.8", calls))

    def runs() -> list[str]:
        return calls.read_text().splitlines() if calls.exists() else []

    first = native.build_cuda("// kernels", "k", ("90",))
    assert len(runs()) == 1 and "-ccbin" not in runs()[0]
    assert native.build_cuda("// kernels", "k", ("90",)) == first and len(runs()) == 1  # cached

    gxx = _script(clean_env / "gxx" / "g++-12", "echo 'g++ (GCC) 12.3.0'\n")
    monkeypatch.setenv("CELLSPEC_CCBIN", gxx)
    with_ccbin = native.build_cuda("// kernels", "k", ("90",))
    assert with_ccbin != first and len(runs()) == 2 and f"-ccbin {gxx}" in runs()[1]

    # the same -ccbin path with another compiler version behind it is another build
    _script(clean_env / "gxx" / "g++-12", "echo 'g++ (GCC) 12.4.0'\n")
    native.compiler_version.cache_clear()
    assert native.build_cuda("// kernels", "k", ("90",)) not in (first, with_ccbin)
    assert len(runs()) == 3

    monkeypatch.delenv("CELLSPEC_CCBIN")
    monkeypatch.setenv("CELLSPEC_NVCC", _fake_nvcc(clean_env / "b" / "nvcc", "13.0", calls))
    assert native.build_cuda("// kernels", "k", ("90",)) != first and len(runs()) == 4


# ------------------------------------------------------------------ failed builds run once


def test_failed_nvcc_build_runs_once(clean_env, monkeypatch):
    calls = clean_env / "calls"
    monkeypatch.setenv("CELLSPEC_NVCC", _fake_nvcc(clean_env / "a" / "nvcc", "12.8", calls, 1))
    with pytest.raises(native.NativeBuildError, match="fake compiler error") as first:
        native.build_cuda("// broken", "k", ("90",))
    with pytest.raises(native.NativeBuildError) as second:
        native.build_cuda("// broken", "k", ("90",))
    assert second.value is first.value
    assert len(calls.read_text().splitlines()) == 1
    # another source is another build; forgetting the failures compiles again
    with pytest.raises(native.NativeBuildError):
        native.build_cuda("// other", "k", ("90",))
    assert len(calls.read_text().splitlines()) == 2
    native.clear_failed_builds()
    with pytest.raises(native.NativeBuildError):
        native.build_cuda("// broken", "k", ("90",))
    assert len(calls.read_text().splitlines()) == 3


def test_failed_host_build_runs_once(clean_env, monkeypatch):
    calls = clean_env / "calls"
    cxx = _script(clean_env / "bin" / "c++", f"""
if [ "$1" = "--version" ]; then echo "fake c++ 1.0"; exit 0; fi
echo "$@" >> {calls}; echo "no such luck" >&2; exit 1
""")
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.setenv("CELLSPEC_HOST_SIMD", "0")
    errors = []
    for _ in range(3):
        with pytest.raises(native.NativeBuildError, match="no such luck") as e:
            native.build_host("// broken", "k")
        errors.append(e.value)
    assert errors[0] is errors[1] is errors[2]
    assert len(calls.read_text().splitlines()) == 1


# ------------------------------------------------------------------ cuda_backend_usable


@pytest.fixture
def fresh(monkeypatch, clean_env):
    """cuda_backend_usable with no cached answers, and a GPU machine that works: torch sees
    sm_90, nvcc 13.0 builds sm_90, the driver is 13.0, the probe kernel runs. Each test breaks
    one thing."""
    monkeypatch.setattr(cuda_env, "_USABLE", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(native, "which_nvcc", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(native, "nvcc_cuda_version", lambda nvcc: (13, 0))
    monkeypatch.setattr(cuda_env, "nvcc_gpu_codes", lambda nvcc: frozenset({"sm_80", "sm_90"}))
    monkeypatch.setattr(cuda_env, "driver_version", lambda: 13000)
    probes = []

    def probe(device, archs):
        probes.append((device, archs))
        return True, "a test kernel built and ran"

    monkeypatch.setattr(cuda_env, "_probe", probe)
    return probes


def _infos(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "cellspec" and r.levelno == logging.INFO]


def test_usable_when_everything_works(fresh, caplog):
    caplog.set_level(logging.INFO, logger="cellspec")
    ok, why = cuda_env.cuda_backend_usable("cuda")
    assert ok, why
    assert "nvcc CUDA 13.0" in why and "sm_90" in why
    assert fresh == [(torch.device("cuda", 0), ("90",))]
    assert _infos(caplog) == []


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        ("no_torch_cuda", "torch.cuda.is_available() is False"),
        ("no_nvcc", "nvcc not found"),
        ("old_driver", "older major version"),
        ("ptx_too_new", "cannot JIT-compile"),
        ("gpu_too_old", "no architecture this GPU"),
        ("build_fails", "did not build: nvcc build of cellspec_probe.cu failed"),
    ],
)
def test_not_usable_says_why_once(fresh, monkeypatch, caplog, breakage, reason):
    if breakage == "no_torch_cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    elif breakage == "no_nvcc":
        monkeypatch.setattr(native, "which_nvcc", lambda: None)
    elif breakage == "old_driver":
        monkeypatch.setattr(cuda_env, "driver_version", lambda: 12080)
    elif breakage == "ptx_too_new":  # an sm_120 GPU gets compute_90 PTX from CUDA 13.1
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 0))
        monkeypatch.setattr(native, "nvcc_cuda_version", lambda nvcc: (13, 1))
    elif breakage == "gpu_too_old":
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    elif breakage == "build_fails":
        def failing_build(source, name, archs):
            raise native.NativeBuildError(f"nvcc build of {name}.cu failed (exit 1)")

        monkeypatch.setattr(cuda_env, "_probe", REAL_PROBE)  # the real probe, up to its build
        monkeypatch.setattr(native, "build_cuda", failing_build)
    caplog.set_level(logging.INFO, logger="cellspec")
    for _ in range(3):
        ok, why = cuda_env.cuda_backend_usable(0)
        assert not ok
        assert reason in why
    infos = _infos(caplog)
    assert len(infos) == 1, infos
    assert reason in infos[0] and "PyTorch engine" in infos[0]


def test_answer_is_cached_per_device(fresh, monkeypatch):
    calls = []
    real_check = cuda_env._check
    monkeypatch.setattr(cuda_env, "_check", lambda d: calls.append(d) or real_check(d))
    assert cuda_env.cuda_backend_usable(None)[0]
    assert cuda_env.cuda_backend_usable("cuda:0")[0]
    assert cuda_env.cuda_backend_usable(torch.device("cuda", 0))[0]
    assert len(calls) == 1
    cuda_env.cuda_backend_usable(1)
    assert len(calls) == 2
    cuda_env.reset_cuda_backend_usable()
    cuda_env.cuda_backend_usable(0)
    assert len(calls) == 3


def test_cpu_device_is_not_usable(fresh):
    ok, why = cuda_env.cuda_backend_usable("cpu")
    assert not ok and "not a CUDA device" in why


def test_no_gpu_here_is_a_clear_no(monkeypatch, caplog):
    """The real checks on this machine (torch CPU build): no, said once."""
    monkeypatch.setattr(cuda_env, "_USABLE", {})
    caplog.set_level(logging.INFO, logger="cellspec")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert cuda_env.cuda_backend_usable() == cuda_env.cuda_backend_usable("cuda")
    assert not cuda_env.cuda_backend_usable()[0]
    assert len(_infos(caplog)) == 1


def test_probe_kernel_compiles_with_nvcc(tmp_path, monkeypatch):
    """The probe's source builds into a shared library with the real nvcc (sm_90)."""
    if native.which_nvcc() is None:
        if REQUIRE_NVCC:
            pytest.fail("nvcc not found but CELLSPEC_REQUIRE_NVCC=1")
        pytest.skip("nvcc not found")
    path = native.build_cuda(cuda_env.PROBE_SOURCE, "cellspec_probe", ("90",))
    assert path.exists() and path.stat().st_size > 0


def test_nvcc_gpu_codes_of_the_real_nvcc():
    nvcc = native.which_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    codes = cuda_env.nvcc_gpu_codes(nvcc)
    assert "sm_90" in codes and all(c.startswith("sm_") for c in codes)
