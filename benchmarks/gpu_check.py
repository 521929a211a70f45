"""The one script for a GPU machine: build, check and benchmark the CUDA back end, and always
leave a report.

    python benchmarks/gpu_check.py --out DIR            # a machine with a CUDA GPU and nvcc
    python benchmarks/gpu_check.py --dry-run --out DIR  # anywhere: the CPU stands in for the GPU
    options: --skip-bench, --only SPEC (repeatable; also limits the benchmarked cells),
             --budget-s S (default 480), --compile-backend NAME (default inductor)

Sections (each one's wall time, result and, on a failure, traceback go into the report, which is
rewritten as ``gpu_check_<gpu>.md`` and ``.json`` in ``--out`` after every section and every
spec, so a run that is killed still leaves everything done so far):

1. environment: torch, the GPU, the driver, nvcc, the host compiler, and
   ``cellspec.runtime.cuda_env.cuda_backend_usable`` (what ``backend="auto"`` will decide);
2. build: every spec's ``.cu`` (``specs/*.cell`` and ``tests/specs/cuda_*.cell``) with nvcc for
   this GPU's architecture, in a process pool (one nvcc per core), into the cellspec cache
   (dry run: for sm_90 when nvcc is there, and the CPU build that stands in for the kernels);
3. check: each spec in its own subprocess (``CUDA_LAUNCH_BLOCKING=1``: a sticky CUDA error or a
   crash in one spec cannot take the others with it), several at once: ``backend="cuda"``
   against NumPy float64 and against ``backend="generated"`` on the same device and dtype, in
   float64, float32 (TF32 off), bfloat16 and float16, outputs, final states and every gradient;
   then ``torch.compile(fullgraph=True)`` of a model around the layer (the layer with
   ``backend="cuda"`` and a linear head), forward and backward, against eager. The 16-bit
   tolerances are measured per spec in the same run (see :func:`tolerance`). Dry run: the CPU
   build of the kernels (``backend="fused"``) in float64/float32; for bfloat16/float16, which the CPU build does not
   run, the PyTorch engine in that dtype stands in (so every comparison path runs);
4. benchmark (``--skip-bench`` skips): LSTM and TorchGRU forward and forward+backward, float32,
   at (T, B, H) = (256, 64, 256/512/1024) and (1024, 16, 768): ``backend="cuda"``, cuDNN
   (``torch.nn.LSTM``/``GRU``), ``backend="generated"``, the eager step loop
   (``backend="autograd"``) and that loop with its step compiled once by
   ``torch.compile(dynamic=True)`` (every shape and grad mode warmed up before timing; a hit of
   dynamo's recompile limit fails the column instead of silently timing the eager loop, and
   the report says how many graphs were compiled). One subprocess per cell. Dry run: the same
   code on CPU tensors at tiny shapes.

Budget (``--budget-s``, default 480 s = 8 min on one H100/H200 with 16 cores): builds ~10-30 s
cold, checks ~2-3 min (mostly torch.compile; 4 specs at a time), benchmarks ~2-3 min; a section
that runs out of budget skips what is left and says so.

Exit status: 0 when every section passed, 1 when something failed, 2 without a GPU (and no
``--dry-run``): the report is written in every case.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Only light imports at module level: the build workers (spawned processes) import this file.
from cellspec.runtime import native

SHAPES = [(256, 64, 256), (256, 64, 512), (256, 64, 1024), (1024, 16, 768)]
DRY_SHAPES = [(5, 2, 8), (7, 3, 12), (9, 2, 6)]
BENCH_CELLS = {"lstm": "LSTM", "torch_gru": "GRU"}  # module -> torch.nn class
CHECK_T, CHECK_B, CHECK_SEED = 8, 3, 3
DTYPES = ("float64", "float32", "bfloat16", "float16")
#: tolerance (relative to the reference's scale, as in `cellspec check`) of float64 and float32
FIXED_TOL = {"float64": 1e-9, "float32": 2e-5}
#: 16-bit tolerance = TOL_FACTOR x what rounding the problem's data and results to that dtype
#: costs on the CPU (see tolerance()); measured over the shipped and CUDA test specs, the
#: PyTorch engine run entirely in bfloat16/float16 (rounding after every op, more often than
#: the fused kernels) stays within 4.2x that cost; 6 leaves headroom.
TOL_FACTOR = 6.0
#: ... but never below this many units of the dtype's epsilon
TOL_FLOOR_EPS = 4.0
#: compiled vs eager, float32 (different fusion and summation order)
COMPILE_TOL = 1e-4
#: hidden test hook: CELLSPEC_GPU_CHECK_FAIL=<module> raises inside that spec's check subprocess;
#: <module>:crash kills the subprocess (os.abort), as a sticky CUDA error or a segfault would
FAIL_ENV = "CELLSPEC_GPU_CHECK_FAIL"
SECTIONS = ("environment", "build", "check", "benchmark")
#: the backend that runs the .cu file's kernels on each device type: on CPU tensors (the dry
#: run) that is the fused CPU build (backend="fused"; backend="cuda" wants CUDA tensors)
KERNELS = {"cuda": "cuda", "cpu": "fused"}
#: environment variables that change what is built or run: recorded in the report
ENV_VARS = ("CELLSPEC_NVCC", "NVCC", "CUDA_HOME", "CELLSPEC_CCBIN", "CUDAHOSTCXX", "CELLSPEC_CACHE",
            "CELLSPEC_HOST_SIMD", "CUDA_VISIBLE_DEVICES", "TORCHINDUCTOR_CACHE_DIR", FAIL_ENV)


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------ report


class Report:
    """Every section's status, wall time, data and error; rewritten in full (markdown + JSON,
    atomically) by :meth:`write` after every step."""

    def __init__(self, out: Path, gpu: str, dry: bool, argv: list[str]):
        self.out = out
        self.gpu = gpu
        slug = "dryrun" if dry else re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_")
        self.md_path = out / f"gpu_check_{slug}.md"
        self.json_path = out / f"gpu_check_{slug}.json"
        self.meta = {"gpu": gpu, "dry_run": dry, "command": " ".join(["gpu_check.py", *argv]),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                     "finished": None}
        self.t0 = time.perf_counter()
        self.sections = {name: {"name": name, "status": "pending", "seconds": None, "data": {},
                                "lines": [], "error": None} for name in SECTIONS}

    @property
    def ok(self) -> bool:
        return all(s["status"] in ("ok", "skipped") for s in self.sections.values())

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.meta["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        doc = {"meta": self.meta, "ok": self.ok, "sections": list(self.sections.values())}
        _atomic_write(self.json_path, json.dumps(doc, indent=1, default=str) + "\n")
        _atomic_write(self.md_path, self.markdown())

    def markdown(self) -> str:
        m = self.meta
        lines = [f"# cellspec GPU check: {self.gpu}", "",
                 f"`{m['command']}`, started {m['started']}, "
                 + (f"finished {m['finished']}" if m["finished"] else "still running or killed")
                 + f", {m['elapsed_s']:.0f} s; " + ("**OK**" if self.ok else "**not OK**"), "",
                 "| section | status | wall time |", "|---|---|---|"]
        for s in self.sections.values():
            secs = "" if s["seconds"] is None else f"{s['seconds']:.1f} s"
            lines.append(f"| {s['name']} | {s['status']} | {secs} |")
        for s in self.sections.values():
            secs = "" if s["seconds"] is None else f", {s['seconds']:.1f} s"
            lines += ["", f"## {s['name']} ({s['status']}{secs})", ""]
            lines += s["lines"] or ["(nothing yet)"]
            if s["error"]:
                lines += ["", "```", s["error"].rstrip(), "```"]
        return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_section(report: Report, name: str, fn, *args) -> None:
    """Run fn(section, *args); record its wall time, and on an exception its traceback (the
    other sections still run); write the report before and after."""
    sec = report.sections[name]
    sec["status"] = "running"
    report.write()
    log(f"== {name}")
    t = time.perf_counter()
    try:
        fn(sec, *args)
        if sec["status"] == "running":
            sec["status"] = "ok"
    except Exception:  # noqa: BLE001 - a failing section is reported, the others still run
        sec["status"] = "failed"
        sec["error"] = traceback.format_exc()
        log(sec["error"])
    sec["seconds"] = round(time.perf_counter() - t, 2)
    log(f"   {name}: {sec['status']} ({sec['seconds']:.1f} s)")
    report.write()


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


# ------------------------------------------------------------------------------------ specs


def spec_files() -> list[Path]:
    """The shipped specs and the CUDA test specs (every function of the language, several
    stages and sizes)."""
    return sorted((ROOT / "specs").glob("*.cell")) + sorted(
        (ROOT / "tests" / "specs").glob("cuda_*.cell"))


def compiled_specs(only: list[str] | None = None) -> dict[str, tuple[Path, object]]:
    """module name -> (spec file, CompiledCell), restricted to ``only`` (module names or file
    stems). Raises SystemExit naming the choices for an unknown name."""
    from cellspec.driver import compile_file

    files = spec_files()
    if only and all(any(f.stem == o for f in files) for o in only):
        files = [f for f in files if f.stem in only]  # by file name: compile only those
    out = {}
    for path in files:
        for cc in compile_file(path):
            if not only or cc.module_name in only or path.stem in only:
                out[cc.module_name] = (path, cc)
    stems = {p.stem for p, _ in out.values()}
    missing = [o for o in only or () if o not in out and o not in stems]
    if missing:
        raise SystemExit(f"--only {missing}: no such spec; choose from "
                         + ", ".join(f.stem for f in spec_files()))
    return out


def load_spec(path: Path, module: str):
    """The generated package of one module of a spec file."""
    from cellspec.driver import compile_file
    from cellspec.runtime.loader import load_package

    for cc in compile_file(path):
        if cc.module_name == module:
            return load_package(cc.module_name, cc.files), cc
    raise LookupError(f"{path} defines no cell with module name {module!r}")


# ------------------------------------------------------------------------------------ environment


def environment(sec: dict, device: str, dry: bool) -> tuple[str, ...]:
    """Record the setup; return the architectures to build for."""
    import torch

    from cellspec.runtime import cuda_env

    d: dict = sec["data"]
    d.update(python=platform.python_version(), torch=torch.__version__,
             torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
             cpus=os.cpu_count())
    nvcc = native.which_nvcc()
    d["nvcc"] = nvcc
    d["nvcc_version"] = native.nvcc_cuda_version(nvcc) if nvcc else None
    d["nvcc_gpu_codes"] = sorted(cuda_env.nvcc_gpu_codes(nvcc)) if nvcc else []
    try:
        d["ccbin"] = native.which_ccbin()
    except native.NativeBuildError as e:
        d["ccbin"] = f"error: {e}"
    d["settings"] = {v: os.environ[v] for v in ENV_VARS if v in os.environ}
    drv = cuda_env.driver_version()
    d["driver_cuda"] = None if drv is None else "{}.{}".format(*cuda_env.split_driver_version(drv))
    archs: tuple[str, ...] = ("90",)
    if not dry and torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        d["gpu"] = torch.cuda.get_device_name()
        d["capability"] = f"sm_{cap[0]}{cap[1]}"
        d["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        archs = (f"{cap[0]}{cap[1]}",)  # what the cuda backend builds for, so the cache is shared
        choice = cuda_env.choose_archs(cap, cuda_env.nvcc_gpu_codes(nvcc) if nvcc else frozenset())
        d["choose_archs"] = choice
        if d["nvcc_version"] and drv:
            d["toolkit_runs_on_driver"] = cuda_env.toolkit_runs_on_driver(
                d["nvcc_version"], drv, bool(choice and choice[1]))
    ok, why = cuda_env.cuda_backend_usable("cuda")
    d["cuda_backend_usable"] = {"ok": ok, "why": why}
    d["build_archs"] = archs
    sec["lines"] = md_table(["item", "value"], [[k, f"`{v}`"] for k, v in d.items()])
    if not dry and not ok:
        sec["status"] = "failed"  # the checks below will say what breaks; this says why
    return archs


# ------------------------------------------------------------------------------------ build


def _build_one(module: str, source: str, archs: tuple[str, ...], cuda: bool, host: bool) -> dict:
    """One spec's builds (runs in a worker process); never raises."""
    res = {"module": module}
    for kind, wanted in (("cuda", cuda), ("host", host)):
        if not wanted:
            continue
        t = time.perf_counter()
        try:
            if kind == "cuda":
                native.build_cuda(source, module, archs)
            else:
                native.build_host(source, module)
            res[kind] = "ok"
        except Exception as e:  # noqa: BLE001 - reported per spec
            res[kind] = "failed"
            res[f"{kind}_error"] = str(e)[-3000:]
        res[f"{kind}_s"] = round(time.perf_counter() - t, 2)
    return res


def build(sec: dict, report: Report, specs: dict, archs: tuple[str, ...], dry: bool) -> None:
    cuda = native.which_nvcc() is not None
    if not cuda and not dry:
        raise RuntimeError(native.nvcc_missing_message())
    jobs = {m: cc.files[f"{m}.cu"] for m, (_, cc) in specs.items()}
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    sec["data"].update(archs=archs, workers=workers, nvcc=cuda, results={})
    rows: list[list[str]] = []
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold CUDA state
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futs = [pool.submit(_build_one, m, src, archs, cuda, dry) for m, src in jobs.items()]
        for fut in as_completed(futs):
            r = fut.result()
            sec["data"]["results"][r["module"]] = r
            rows.append([r["module"], r.get("cuda", "not run"), f"{r.get('cuda_s', 0):.1f}",
                         r.get("host", "not run"), f"{r.get('host_s', 0):.1f}"])
            sec["lines"] = [f"sm_{'/'.join(archs)}, {workers} parallel builds"
                            + ("" if cuda else " (no nvcc: GPU builds not run)")] + md_table(
                ["spec", "nvcc build", "s", "CPU build", "s"], sorted(rows))
            report.write()
    errors = [(m, k, r[f"{k}_error"]) for m, r in sec["data"]["results"].items()
              for k in ("cuda", "host") if f"{k}_error" in r]
    for m, k, e in errors:
        sec["lines"] += ["", f"{m} ({k} build):", "```", e.rstrip(), "```"]
    if errors:
        sec["status"] = "failed"


# ------------------------------------------------------------------------------------ check


def tolerance(dtype: str, storage_error: float) -> float:
    """The tolerance of a run in dtype against NumPy float64. For 16-bit storage it is
    TOL_FACTOR x ``storage_error`` (what rounding the problem's inputs, params, states and
    adjoints to dtype and the float32 engine's results back to it costs, measured on the CPU for
    the same problem), at least TOL_FLOOR_EPS epsilons of dtype."""
    if dtype in FIXED_TOL:
        return FIXED_TOL[dtype]
    import torch

    eps = torch.finfo(getattr(torch, dtype)).eps
    return max(TOL_FACTOR * storage_error, TOL_FLOOR_EPS * eps)


def storage_rounding_error(p, dtype: str) -> float:
    """Largest relative error, vs NumPy float64, of the float32 PyTorch engine on the CPU when
    the problem's data is rounded to dtype and its results are rounded to dtype."""
    from dataclasses import replace

    import torch

    from cellspec.verify import check

    dt = getattr(torch, dtype)

    def r(a):
        return torch.as_tensor(a).to(dt).double().numpy()

    rounded = replace(p, params={k: r(v) for k, v in p.params.items()}, xs=tuple(map(r, p.xs)),
                      states=tuple(map(r, p.states)), d_outputs=tuple(map(r, p.d_outputs)),
                      d_final=tuple(map(r, p.d_final)))
    res = check.run_torch(rounded, "generated", "float32", "cpu")
    res = check.Results({k: r(v) for k, v in res.values.items()})
    return max(check.compare(res, check.run_numpy(p)).values())


def _worst(errors: dict[str, float]) -> tuple[str, float]:
    q = max(errors, key=lambda k: errors[k])
    return q, errors[q]


def check_spec(path: Path, module: str, device: str, dry: bool, compile_backend: str,
               result: Path) -> None:
    """The checks of one spec (runs in its own subprocess); writes ``result`` (JSON) after every
    step, so a crash leaves what was done."""
    import torch

    from cellspec.verify import check

    out: dict = {"module": module, "rows": [], "compile": None, "steps_done": []}

    def save():
        _atomic_write(result, json.dumps(out, default=str))

    save()
    fail = os.environ.get(FAIL_ENV, "")
    if fail == f"{module}:crash":
        os.abort()
    if fail == module:
        raise RuntimeError(f"{FAIL_ENV}={module}: the failure this test hook injects")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    pkg, _ = load_spec(path, module)
    p = check.make_problem(pkg, T=CHECK_T, B=CHECK_B, seed=CHECK_SEED)
    ref = check.run_numpy(p)
    out["sizes"] = p.sizes
    for dtype in DTYPES:
        t = time.perf_counter()
        sixteen = dtype not in FIXED_TOL
        # the CPU build has no 16-bit storage: the PyTorch engine stands in
        impl = "generated" if (dry and sixteen) else KERNELS[device]
        storage = storage_rounding_error(p, dtype) if sixteen else None
        tol = tolerance(dtype, storage or 0.0)
        tol_gen = 2 * tol if sixteen else tol  # both sides carry their own rounding
        row = {"dtype": dtype, "impl": impl, "storage_error": storage, "tol": tol,
               "tol_vs_generated": tol_gen}
        out["rows"].append(row)
        tested = check.run_torch(p, impl, dtype, device)
        row["vs_numpy"] = _worst(check.compare(tested, ref))
        generated = check.run_torch(p, "generated", dtype, device)
        row["vs_generated"] = _worst(check.compare(tested, generated))
        row["ok"] = row["vs_numpy"][1] <= tol and row["vs_generated"][1] <= tol_gen
        row["seconds"] = round(time.perf_counter() - t, 2)
        out["steps_done"].append(dtype)
        save()
    t = time.perf_counter()
    out["compile"] = {"backend": compile_backend}
    save()
    out["compile"].update(compile_check(pkg, p, device, compile_backend))
    out["compile"]["seconds"] = round(time.perf_counter() - t, 2)
    out["steps_done"].append("compile")
    save()


def compile_check(pkg, p, device: str, backend: str) -> dict:
    """torch.compile(fullgraph=True) of the layer (backend='cuda') + a linear head, forward and
    backward, against the same model run eagerly (float32)."""
    import torch

    mod = pkg.torch_cell
    syms = list(mod.SIZES)
    kwargs = {a: p.sizes[s] for s, a in list(mod.SIZES.items())[2:]}
    torch.manual_seed(0)
    layer = getattr(mod, mod.CELL)(p.sizes[syms[0]], p.sizes[syms[1]], **kwargs,
                                   backend=KERNELS[device]).to(device)
    if getattr(mod, "MASKS", None):  # random ops: evaluation mode, so both runs see the same masks
        layer.eval()
    xs = [torch.tensor(a, dtype=torch.float32, device=device) for a in p.xs]
    x = xs[0] if len(xs) == 1 else tuple(xs)
    first, _ = layer(x)
    first = first if isinstance(first, torch.Tensor) else first[0]
    head = torch.nn.Linear(first.shape[-1], 3).to(device)

    def model(x):
        outs, final = layer(x)
        outs = outs if isinstance(outs, tuple) else (outs,)
        final = final if isinstance(final, tuple) else (final,)
        return head(outs[0]).square().mean() + sum(f.square().mean() for f in final)

    params = list(layer.parameters()) + list(head.parameters())
    t = time.perf_counter()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    loss_c = compiled(x)
    grads_c = torch.autograd.grad(loss_c, params)
    compile_s = time.perf_counter() - t
    loss_e = model(x)
    grads_e = torch.autograd.grad(loss_e, params)
    err = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
              for a, b in zip((loss_c, *grads_c), (loss_e, *grads_e)))
    return {"compile_and_run_s": round(compile_s, 2), "max_rel_diff": err, "tol": COMPILE_TOL,
            "ok": err <= COMPILE_TOL}


def _check_row_text(r: dict) -> list[str]:
    vn, vg = r.get("vs_numpy"), r.get("vs_generated")
    return [r["dtype"], r["impl"] + (" (stand-in)" if r["impl"] == "generated" else ""),
            "-" if r.get("storage_error") is None else f"{r['storage_error']:.1e}",
            f"{vn[1]:.1e} ({vn[0]})" if vn else "not run", f"{r['tol']:.0e}" if r["tol"] < 1e-3
            else f"{r['tol']:.1e}", f"{vg[1]:.1e}" if vg else "not run",
            "ok" if r.get("ok") else "FAILED"]


def run_check_subprocess(path: Path, module: str, device: str, dry: bool, compile_backend: str,
                         timeout: float, workdir: Path) -> dict:
    """One spec's checks in a fresh Python (CUDA_LAUNCH_BLOCKING=1); never raises."""
    result = workdir / f"check_{module}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_check-spec", module,
           "--_spec-path", str(path), "--_result", str(result), "--compile-backend",
           compile_backend] + (["--dry-run"] if dry else [])
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1", PYTHONPATH=_pythonpath())
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True,
                              timeout=max(timeout, 1))
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-6000:]
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        err = e.stderr or b""  # bytes even with text=True, on a timeout
        err = err.decode(errors="replace") if isinstance(err, bytes) else err
        tail = f"killed after {timeout:.0f} s\n" + err[-4000:]
    out = json.loads(result.read_text()) if result.exists() else {"module": module, "rows": []}
    out.update(rc=rc, seconds=round(time.perf_counter() - t, 2))
    complete = "compile" in out.get("steps_done", [])
    out["ok"] = (rc == 0 and complete and all(r.get("ok") for r in out["rows"])
                 and bool(out.get("compile", {}).get("ok")))
    if rc != 0 or not complete:
        out["error"] = f"subprocess {_exit_text(rc)}; output tail:\n{tail}"
    return out


def _pythonpath() -> str:
    """PYTHONPATH for the subprocesses: this checkout first."""
    return os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])


def _exit_text(rc) -> str:
    """'exit status 1', 'killed by SIGABRT', 'timeout'."""
    if isinstance(rc, int) and rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


def check(sec: dict, report: Report, specs: dict, device: str, dry: bool, compile_backend: str,
          deadline: float) -> None:
    cpus = os.cpu_count() or 1
    parallel = max(1, min(4, cpus // 4)) if not dry else 1
    sec["data"].update(parallel=parallel, T=CHECK_T, B=CHECK_B, seed=CHECK_SEED,
                       tol_factor=TOL_FACTOR, specs={})
    head = [(f"Problem T={CHECK_T} B={CHECK_B} seed={CHECK_SEED} (sizes per spec in the JSON); "
             "errors relative to the reference's scale; float32 with TF32 off. 16-bit tolerance = "
             f"{TOL_FACTOR:g} x the storage-rounding error (column 'rounding': the float32 engine "
             f"on data rounded to that dtype, CPU), at least {TOL_FLOOR_EPS:g} eps; vs generated: "
             f"2x that. {parallel} spec(s) at a time, each in its own process with "
             "CUDA_LAUNCH_BLOCKING=1."), ""]
    workdir = Path(tempfile.mkdtemp(prefix="gpu-check-"))

    def render():
        rows, notes = [], []
        for m in sorted(sec["data"]["specs"]):
            s = sec["data"]["specs"][m]
            for r in s.get("rows", []):
                rows.append([m, *_check_row_text(r)])
            c = s.get("compile") or {}
            if "ok" in c:
                rows.append([m, "float32", f"torch.compile ({c['backend']})", "-",
                             f"{c['max_rel_diff']:.1e} (vs eager)", f"{c['tol']:.0e}", "-",
                             "ok" if c["ok"] else "FAILED"])
            if s.get("error"):
                done = ", ".join(s.get("steps_done", [])) or "nothing"
                notes += ["", f"{m}: FAILED after {s['seconds']:.1f} s (completed: {done})",
                          "```", s["error"].rstrip(), "```"]
        done = sorted(sec["data"]["specs"].items())
        times = ", ".join(f"{m} {s['seconds']:.0f} s" for m, s in done)
        sec["lines"] = head + md_table(
            ["spec", "dtype", "implementation", "rounding", "vs NumPy f64 (worst)", "tol",
             "vs generated", "status"], rows) + ["", f"per spec: {times}"] + notes

    def one(module: str) -> dict:
        left = deadline - time.time()
        if left < 5:
            return {"module": module, "rows": [], "ok": False, "seconds": 0.0,
                    "error": "not run: out of the time budget (--budget-s)"}
        return run_check_subprocess(specs[module][0], module, device, dry, compile_backend,
                                    min(left, 600), workdir)

    with ThreadPoolExecutor(parallel) as pool:
        futs = {pool.submit(one, m): m for m in specs}
        for fut in as_completed(futs):
            res = fut.result()
            sec["data"]["specs"][res["module"]] = res
            log(f"  {res['module']}: {'ok' if res['ok'] else 'FAILED'} ({res['seconds']:.1f} s)")
            render()
            report.write()
    if not all(s["ok"] for s in sec["data"]["specs"].values()):
        sec["status"] = "failed"


# ------------------------------------------------------------------------------------ bench


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def measure(fn, device: str, reps: int, warmup: int) -> float:
    """Median seconds of fn() over reps runs, after warmup runs."""
    sync = _sync(device)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def step_loop(step, layer, pkg):
    """The time loop of ``step`` (the module's one-step function, or its compiled version) over
    ``layer``'s params: x [T, B, I] -> (outputs [T, B, H], final state)."""
    import torch

    n_state = len(pkg.torch_cell.STATES)

    def run(x):
        params = layer._params()
        state = tuple(x.new_zeros(x.shape[1], layer.sizes[s]) for _, s in pkg.torch_cell.STATES)
        outs = []
        for t in range(x.shape[0]):
            out, new = step(params, x[t], state[0] if n_state == 1 else state)
            state = (new,) if n_state == 1 else new
            outs.append(out)
        return torch.stack(outs), state

    return run


def bench_cell(module: str, device: str, dry: bool, compile_backend: str, deadline: float,
               result: Path) -> None:
    """Benchmark one cell (runs in its own subprocess); writes ``result`` after every row.

    The compiled step loop compiles ``step`` once with ``dynamic=True`` (one graph for every
    shape; compiling the unrolled loop would take minutes at T=1024); each shape and grad mode
    is warmed up before it is timed; dynamo's recompile limit fails the column
    (``fail_on_recompile_limit_hit``) instead of letting it run the eager loop unnoticed."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    # params are static-shaped by default, which specialises every size (H == I) and costs a
    # recompile per shape: with this off, three graphs serve every shape (no-grad; with grad,
    # the first step, whose state needs no grad, and the others)
    torch._dynamo.config.force_parameter_static_shapes = False
    path = next(p for p in spec_files() if p.stem == module)
    pkg, _ = load_spec(path, module)
    cls = getattr(pkg.torch_cell, pkg.torch_cell.CELL)
    ref_cls = getattr(torch.nn, BENCH_CELLS[module])
    shapes = DRY_SHAPES if dry else SHAPES
    reps, warmup = (3, 1) if dry else (5, 2)
    compiled_step = torch.compile(pkg.torch_cell.step, dynamic=True, backend=compile_backend)
    out: dict = {"module": module, "rows": [], "shapes": shapes, "reps": reps, "warmup": warmup,
                 "compiled_loop": {"recompile_limit": torch._dynamo.config.recompile_limit,
                                   "recompile_limit_hit": False}}

    def save():
        _atomic_write(result, json.dumps(out, default=str))

    for T, B, H in shapes:
        torch.manual_seed(0)
        x = torch.randn(T, B, H, device=device)
        loop_layer = cls(H, H, backend="autograd").to(device)
        impls = {
            f"cellspec {KERNELS[device]}": cls(H, H, backend=KERNELS[device]).to(device),
            "cuDNN" if device == "cuda" else "torch.nn (CPU)": ref_cls(H, H).to(device),
            "cellspec generated": cls(H, H, backend="generated").to(device),
            "eager step loop": loop_layer,
            "compiled step loop": loop_layer,
        }
        for name, layer in impls.items():
            row = {"shape": [T, B, H], "impl": name}
            out["rows"].append(row)
            if time.time() > deadline:
                row["error"] = "skipped: out of the time budget (--budget-s)"
                save()
                continue
            run = step_loop(compiled_step, layer, pkg) if name == "compiled step loop" else layer
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
                row["fwd_ms"] = measure(fwd, device, reps, warmup) * 1e3
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                row["fwd_bwd_ms"] = measure(fwd_bwd, device, reps, warmup) * 1e3
                if device == "cuda":
                    row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            except Exception as e:  # noqa: BLE001 - one failing implementation must not stop it
                if "RecompileLimit" in type(e).__name__ or "recompile_limit" in str(e):
                    out["compiled_loop"]["recompile_limit_hit"] = True
                first = (str(e).splitlines() or [""])[0][:300]
                row["error"] = f"{type(e).__name__}: {first}"
            if name == "compiled step loop":
                out["compiled_loop"].update(
                    graphs=int(counters["stats"].get("unique_graphs", 0)),
                    frames_compiled=int(counters["frames"].get("ok", 0)))
            save()
    out["done"] = True
    save()


def run_bench_subprocess(module: str, device: str, dry: bool, compile_backend: str,
                         deadline: float, workdir: Path) -> dict:
    """One cell's benchmark in a fresh Python; never raises."""
    result = workdir / f"bench_{module}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_bench-cell", module,
           "--_result", str(result), "--_deadline", str(deadline), "--compile-backend",
           compile_backend] + (["--dry-run"] if dry else [])
    env = dict(os.environ, PYTHONPATH=_pythonpath())
    if dry:  # one thread: torch's and the fused CPU kernel's OpenMP pools fight over few cores
        env.update(OMP_NUM_THREADS="1")
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True,
                              timeout=max(deadline - time.time() + 60, 5))
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-6000:]
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", "killed: past the time budget"
    out = json.loads(result.read_text()) if result.exists() else {"module": module, "rows": []}
    out.update(rc=rc, seconds=round(time.perf_counter() - t, 2))
    if rc != 0 or not out.get("done"):
        out["error"] = f"subprocess {_exit_text(rc)}; output tail:\n{tail}"
    return out


def benchmark(sec: dict, report: Report, device: str, dry: bool, compile_backend: str,
              deadline: float, only: list[str] | None = None) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    ref = "cuDNN" if device == "cuda" else "torch.nn (CPU)"
    cells = [m for m in BENCH_CELLS if not only or m in only]
    sec["data"].update(cells={}, reference=ref, dtype="float32", tf32=False)
    if not cells:
        sec["status"] = "skipped"
        names = ", ".join(BENCH_CELLS)
        sec["lines"] = [f"skipped: --only names none of the benchmarked cells ({names})"]
        return
    failed = False
    for module in cells:
        res = run_bench_subprocess(module, device, dry, compile_backend, deadline, workdir)
        sec["data"]["cells"][module] = res
        failed |= "error" in res or any("error" in r for r in res["rows"])
        rows, notes = [], []
        for m, r in sec["data"]["cells"].items():
            base = {tuple(x["shape"]): x for x in r["rows"]
                    if x["impl"] == ref and "fwd_bwd_ms" in x}
            for x in r["rows"]:
                b = base.get(tuple(x["shape"]))
                if "fwd_bwd_ms" in x:
                    ratio = f"{x['fwd_bwd_ms'] / b['fwd_bwd_ms']:.2f}x" if b else "-"
                    rows.append([m, "x".join(map(str, x["shape"])), x["impl"], f"{x['fwd_ms']:.2f}",
                                 f"{x['fwd_bwd_ms']:.2f}", ratio, str(x.get("peak_mib", "-"))])
                else:
                    rows.append([m, "x".join(map(str, x["shape"])), x["impl"], "error", "", "",
                                 x.get("error", "")[:200]])
            cl = r.get("compiled_loop", {})
            notes.append(f"- {m}: compiled step loop: {cl.get('graphs', '?')} graph(s), "
                         f"{cl.get('frames_compiled', '?')} frame(s) compiled over "
                         f"{len(r.get('shapes', []))} shapes x 2 grad modes; recompile limit "
                         f"({cl.get('recompile_limit', '?')}) "
                         + ("**hit**" if cl.get("recompile_limit_hit") else "not hit")
                         + f"; {r['seconds']:.0f} s")
            if r.get("error"):
                notes += ["", "```", r["error"].rstrip(), "```"]
        intro = (f"median ms of {res.get('reps', '?')} runs after {res.get('warmup', '?')} warm-up "
                 f"runs, float32, TF32 off; 'vs ref' = fwd+bwd time / {ref}'s"
                 + ("; dry run: CPU tensors, tiny shapes, one thread: the numbers only show that "
                    "every column runs" if dry else ""))
        sec["lines"] = [intro, ""] + md_table(["cell", "TxBxH", "implementation", "fwd ms",
                                               "fwd+bwd ms", "vs ref",
                        "peak MiB"], rows) + [""] + notes
        report.write()
    if failed:
        sec["status"] = "failed"


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="run on the CPU (the CPU build stands in for the kernels, tiny shapes)")
    ap.add_argument("--out", help="folder for the report (default benchmarks/results; dry run: a "
                    "new temporary folder)")
    ap.add_argument("--skip-bench", action="store_true", help="no benchmark section")
    ap.add_argument("--only", action="append", metavar="SPEC",
                    help="check only this spec (module name or file stem); repeatable")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="wall-clock budget in seconds; what is left when it runs out is "
                    "skipped (default 480)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of the compile check and the compiled loop")
    ap.add_argument("--_check-spec", help=argparse.SUPPRESS)
    ap.add_argument("--_bench-cell", help=argparse.SUPPRESS)
    ap.add_argument("--_spec-path", help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)
    ap.add_argument("--_deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    if args._check_spec:
        check_spec(Path(args._spec_path), args._check_spec, device, dry, args.compile_backend,
                   Path(args._result))
        return 0
    if args._bench_cell:
        bench_cell(args._bench_cell, device, dry, args.compile_backend, args._deadline,
                   Path(args._result))
        return 0

    t_start = time.time()
    deadline = t_start + args.budget_s
    import torch

    has_gpu = torch.cuda.is_available()
    gpu = "dry run (CPU)" if dry else (torch.cuda.get_device_name() if has_gpu else "no GPU")
    if args.out:
        out = Path(args.out)
    elif dry:
        out = Path(tempfile.mkdtemp(prefix="cellspec-gpu-check-"))
    else:
        out = ROOT / "benchmarks" / "results"
    report = Report(out, gpu, dry, argv)
    report.write()
    log(f"report: {report.md_path} (rewritten after every step)")
    archs: list[tuple[str, ...]] = [("90",)]

    def env_section(sec):
        archs[0] = environment(sec, device, dry)

    run_section(report, "environment", env_section)
    if not dry and not has_gpu:
        for name in SECTIONS[1:]:
            why = ("not run: torch.cuda.is_available() is False; run on a GPU machine or with "
                   "--dry-run")
            report.sections[name].update(status="skipped", lines=[why])
        report.meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        report.write()
        log("no CUDA GPU visible to torch: nothing to check (see the environment section)")
        return 2
    specs: dict = {}

    def build_section(sec):
        specs.update(compiled_specs(args.only))
        build(sec, report, specs, archs[0], dry)

    run_section(report, "build", build_section)
    if not specs:  # the build section failed before compiling the specs
        specs.update(compiled_specs(args.only))
    run_section(report, "check", check, report, specs, device, dry, args.compile_backend,
                deadline)
    if args.skip_bench:
        report.sections["benchmark"].update(status="skipped", lines=["skipped: --skip-bench"])
    else:
        run_section(report, "benchmark", benchmark, report, device, dry, args.compile_backend,
                    deadline, args.only)
    report.meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    report.write()
    log(f"wrote {report.md_path} and {report.json_path}")
    log("OK" if report.ok else "FAILURES: see the report")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
