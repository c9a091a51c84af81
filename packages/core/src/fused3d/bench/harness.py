"""The benchmark run: every implementation, mode, precision and batch, in one process.

``python -m fused3d.bench --help`` lists the options. For each (precision, batch) group the
inputs, the fixed random output gradient and a float64 oracle are made once; then for each
implementation and mode the implementation is built fresh (a fresh ``torch.compile`` for the
compiled baselines, so each graph is specialised to its shape and flags), checked against the
oracle, warmed up, timed, and its peak memory measured. Whatever fails (an error, an OOM, a
failed check) becomes a row with its status and message; the run goes on. Results are rewritten
after every group, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .problem import (
    BENCHMARK_BATCH,
    BENCHMARK_PROBLEM,
    CPU_PROBLEM,
    DEFAULT_PRECISIONS,
    FLOOR_DEVICE,
    FULL_BATCHES,
    PRECISIONS,
    Precision,
    Problem,
    forward_floor_ms,
    set_tf32,
)
from .timing import Stats, Timer, TimingPlan

FORWARD, TRAINING = "forward", "forward+backward"
MODES = (FORWARD, TRAINING)
MODE_ALIASES = {"forward": FORWARD, "fwd": FORWARD, "forward+backward": TRAINING,
                "fwdbwd": TRAINING, "backward": TRAINING, "train": TRAINING}

#: Row status values.
OK, FAILED_CHECK, ERROR, OOM = "ok", "failed-check", "error", "oom"
UNAVAILABLE, UNSUPPORTED, SKIPPED = "unavailable", "unsupported", "skipped"

COLUMNS = (
    "implementation", "kind", "mode", "precision", "dtype", "tf32", "batch", "status",
    "median_ms", "p10_ms", "p25_ms", "p75_ms", "p90_ms", "min_ms", "mean_ms", "reps",
    "peak_extra_mib", "speedup_vs_eager", "speedup_vs_compile", "floor_ms", "percent_of_floor",
    "check_error", "check_tolerance", "first_call_s", "message",
    "in_channels", "out_channels", "spatial", "device", "gpu", "torch", "triton", "cupy",
    "cuda", "cudnn", "git_commit", "date", "l2_flush_mib",
)


@dataclass(frozen=True)
class Implementation:
    """One thing being timed: a plain-PyTorch baseline or a fused3d backend."""

    name: str
    kind: str  # "baseline" or "backend"
    compile_mode: str | None = None  # None (eager), "default" or "max-autotune"
    backend: str | None = None
    #: Forward and backward captured once as CUDA graphs (torch.cuda.make_graphed_callables)
    #: and replayed: the same kernels without the per-call host work.
    graphed: bool = False

    @property
    def replays_cuda_graphs(self) -> bool:
        return self.graphed or self.compile_mode == "max-autotune"

    @property
    def tolerance_row(self) -> str:
        # Baselines use the default row of fused3d.testing's table.
        return self.backend or "eager"


#: Suffix of a backend's CUDA-graph row (``--cudagraphs``).
CUDAGRAPHS_SUFFIX = "+cudagraphs"


def graphed(backend: str) -> Implementation:
    """A backend's FusedModel through torch.cuda.make_graphed_callables: forward and backward
    replayed as two CUDA graphs. Python, the dispatcher and the launches leave the step (the
    autograd engine and the graph launches stay); the kernels are the same, so the row shows
    what the step costs the GPU when the host keeps up."""
    return Implementation(backend + CUDAGRAPHS_SUFFIX, "backend", backend=backend, graphed=True)


BASELINES = {
    "eager": Implementation("eager", "baseline"),
    "compile": Implementation("compile", "baseline", compile_mode="default"),
    "compile-max-autotune": Implementation("compile-max-autotune", "baseline",
                                           compile_mode="max-autotune"),
}


@dataclass
class Settings:
    device: torch.device
    problem: Problem
    batches: tuple[int, ...]
    precisions: tuple[Precision, ...]
    modes: tuple[str, ...]
    baselines: tuple[str, ...]
    backends: tuple[str, ...] | None  # None: every registered backend
    plan: TimingPlan
    out_dir: Path
    stem: str
    merge: bool = False
    #: Backends also timed as CUDA graphs (see :func:`graphed`).
    graphed_backends: tuple[str, ...] = ()
    seed: int = 0
    time_budget_s: float | None = None
    #: On the CPU, backends other than ``reference`` run through an interpreter (Triton's
    #: TRITON_INTERPRET=1): slow, so only at this batch and with few reps.
    interpreted_batch: int | None = None
    interpreted_plan: TimingPlan | None = None


# ----------------------------------------------------------------------------------------------
# Facts recorded with every row


def git_commit() -> str:
    """Short commit of the checkout the run started in (``+dirty`` if modified), else unknown."""
    if os.environ.get("FUSED3D_GIT_COMMIT"):
        return os.environ["FUSED3D_GIT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here,
                                capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        return "unknown"


def run_metadata(settings: Settings) -> dict:
    from fused3d.info import environment
    from fused3d.registry import available_backends

    env = environment()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "device": settings.device.type,
        "gpu": env.get("gpu", "none") if settings.device.type == "cuda" else "cpu",
        "cpu_count": os.cpu_count(),
        "python": env.get("python"),
        "torch": env.get("torch"),
        "triton": env.get("triton"),
        "cupy": env.get("cupy"),
        "cuda": env.get("cuda (torch)"),
        "cudnn": str(cudnn),
        "git_commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python -m fused3d.bench " + " ".join(sys.argv[1:]),
        "problem": {
            "in_channels": settings.problem.in_channels,
            "out_channels": settings.problem.out_channels,
            "spatial": list(settings.problem.spatial),
            "kernel_size": settings.problem.kernel_size, "stride": settings.problem.stride,
            "padding": settings.problem.padding,
            "output_padding": settings.problem.output_padding,
            "multiplier_shape": list(settings.problem.multiplier_shape),
        },
        "timing": {
            "warmup": settings.plan.warmup, "min_reps": settings.plan.min_reps,
            "max_reps": settings.plan.max_reps, "target_s": settings.plan.target_s,
            "l2_flush_mib": 256 if settings.device.type == "cuda" else 0,
            "clock": "CUDA events" if settings.device.type == "cuda" else "perf_counter",
        },
        "floors": f"forward floors of DESIGN section 7, measured on the lent {FLOOR_DEVICE}",
        "backends": {
            row.name: {"available": row.available, "reasons": list(row.reasons),
                       "versions": row.versions}
            for row in available_backends()
        },
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }


# ----------------------------------------------------------------------------------------------
# Results


class ResultSet:
    """Rows of one run, plus rows kept from an earlier file with ``--merge``; written as CSV
    and JSON after every group."""

    def __init__(self, meta: dict, settings: Settings) -> None:
        self.meta = meta
        self.settings = settings
        self.rows: list[dict] = []
        self.kept: list[dict] = []
        self.csv_path = settings.out_dir / f"{settings.stem}.csv"
        self.json_path = settings.out_dir / f"{settings.stem}.json"
        if settings.merge and self.json_path.exists():
            previous = json.loads(self.json_path.read_text())
            ran = {(p.name, b) for p in settings.precisions for b in settings.batches}
            self.kept = [r for r in previous.get("rows", [])
                         if r.get("device") == meta["device"] and r.get("gpu") == meta["gpu"]
                         and (r.get("precision"), int(r.get("batch", -1))) not in ran]
            earlier = previous.get("meta", {})
            self.meta["merged_from"] = [
                *earlier.get("merged_from", []),
                {k: earlier.get(k) for k in ("date", "git_commit", "command")},
            ]

    def base_row(self, impl: Implementation, mode: str, precision: Precision,
                 batch: int) -> dict:
        meta, problem = self.meta, self.settings.problem
        row = dict.fromkeys(COLUMNS, "")
        row.update(
            implementation=impl.name, kind=impl.kind, mode=mode, precision=precision.name,
            dtype=str(precision.dtype).removeprefix("torch."),
            tf32=precision.tf32_text(meta["device"]), batch=batch,
            in_channels=problem.in_channels, out_channels=problem.out_channels,
            spatial=problem.spatial_text, device=meta["device"], gpu=meta["gpu"],
            torch=meta["torch"], triton=meta["triton"], cupy=meta["cupy"], cuda=meta["cuda"],
            cudnn=meta["cudnn"], git_commit=meta["git_commit"], date=meta["date"],
            l2_flush_mib=meta["timing"]["l2_flush_mib"],
        )
        return row

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def all_rows(self) -> list[dict]:
        rows = self.kept + self.rows
        fill_comparisons(rows)
        return rows

    def write(self) -> None:
        rows = self.all_rows()
        self.settings.out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.json_path, json.dumps({"meta": self.meta, "rows": rows}, indent=1))
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(COLUMNS), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.csv_path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def fill_comparisons(rows: list[dict]) -> None:
    """Speedups against eager and torch.compile (default mode) of the same group of the same
    run (mode, precision, batch), and the share of the forward floor reached."""
    groups: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row["status"] == OK:
            key = (row["mode"], row["precision"], int(row["batch"]), row["date"])
            groups.setdefault(key, {})[row["implementation"]] = float(row["median_ms"])
    for row in rows:
        row["speedup_vs_eager"] = row["speedup_vs_compile"] = ""
        if row["status"] != OK:
            continue
        key = (row["mode"], row["precision"], int(row["batch"]), row["date"])
        median = float(row["median_ms"])
        for baseline, column in (("eager", "speedup_vs_eager"),
                                 ("compile", "speedup_vs_compile")):
            if baseline in groups[key]:
                row[column] = round(groups[key][baseline] / median, 4)
        if row["floor_ms"] not in ("", None):
            row["percent_of_floor"] = round(100.0 * float(row["floor_ms"]) / median, 2)


# ----------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A tqdm bar on a terminal when tqdm is installed, else one line per point on stderr
    (which also reads well in a log file)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="point", dynamic_ncols=True)
            except ImportError:
                pass

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text)

    def step(self, text: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
            return
        elapsed = time.perf_counter() - self.started
        width = len(str(self.total))
        print(f"[{self.done:>{width}}/{self.total}] {elapsed:6.0f}s  {text}", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------
# One point


def _first_line(error: BaseException, limit: int = 400) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:limit]


def build(impl: Implementation, problem: Problem, state: dict, dtype: torch.dtype,
          device: torch.device) -> tuple[torch.nn.Module, Callable]:
    """A fresh module with the shared weights, and the callable to time."""
    import fused3d

    if impl.backend is not None:
        module = fused3d.FusedModel(*problem.init_args, backend=impl.backend)
    else:
        module = fused3d.Model(*problem.init_args)
    module.load_state_dict(state)
    module = module.to(device=device, dtype=dtype)
    if impl.compile_mode is None:
        return module, module
    torch._dynamo.reset()
    mode = None if impl.compile_mode == "default" else impl.compile_mode
    # dynamic=False: one static graph per (shape, flags), as a training job at fixed size has.
    return module, torch.compile(module, mode=mode, dynamic=False)


def _release(impl: Implementation | None) -> None:
    gc.collect()
    if impl is not None and impl.compile_mode is not None:
        torch._dynamo.reset()  # also frees CUDA-graph pools of max-autotune
        gc.collect()


@dataclass
class Group:
    """Inputs shared by every implementation at one (precision, batch)."""

    precision: Precision
    batch: int
    x: torch.Tensor
    grad_y: torch.Tensor
    oracle: object  # Float64Oracle
    eager_index: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Check:
    passed: bool
    error: float
    tolerance: float
    message: str
    first_call_s: float  # the first call: compile / JIT build / autotuning included


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_point(impl: Implementation, mode: str, module: torch.nn.Module, call: Callable,
                group: Group, prepare: Callable, device: torch.device) -> Check:
    """Run once (the first call, timed on the host) and compare with the float64 oracle."""
    from fused3d.functional import fused_block_with_index
    from fused3d.testing import tolerance_for

    from .oracle import GRADIENT_NAMES, BlockTensors, eager_window_index

    precision = group.precision
    tolerance = tolerance_for(impl.tolerance_row, precision.dtype, device.type,
                              precision.allow_tf32)
    prepare()
    started = time.perf_counter()
    if mode == FORWARD:
        with torch.no_grad():
            output = call(group.x)
            _synchronize(device)
            first_call_s = time.perf_counter() - started
            output = output.detach().clone()
        error = group.oracle.forward_error(output)
        passed = error <= tolerance.forward
        message = "" if passed else f"forward error {error:.3g} > {tolerance.forward:.3g}"
        return Check(passed, error, tolerance.forward, message, first_call_s)

    output = call(group.x)
    output.backward(group.grad_y)
    _synchronize(device)
    first_call_s = time.perf_counter() - started
    output = output.detach().clone()
    conv = module.conv_transpose
    grads = [None if t.grad is None else t.grad.detach().clone()
             for t in (group.x, conv.weight, conv.bias, module.multiplier)]
    prepare()
    forward_error = group.oracle.forward_error(output)
    if forward_error > tolerance.forward:
        return Check(False, forward_error, tolerance.forward,
                     f"forward error {forward_error:.3g} > {tolerance.forward:.3g}", first_call_s)
    block = BlockTensors.of_model(module, group.x)
    if impl.backend is not None:
        with torch.no_grad():
            _, index = fused_block_with_index(
                block.x, block.weight, block.bias, block.multiplier, block.stride,
                block.padding, block.output_padding, block.negative_slope,
                backend=impl.backend)
        winners = "its own winners"
    else:
        if group.eager_index is None:
            group.eager_index = eager_window_index(block)
        index = group.eager_index
        winners = "eager's winners"
    errors = group.oracle.gradient_errors(grads, group.grad_y, index)
    worst_name = max(errors, key=errors.get)
    worst = errors[worst_name]
    detail = ", ".join(f"{name} {errors[name]:.2g}" for name in GRADIENT_NAMES if name in errors)
    if worst <= tolerance.gradient:
        return Check(True, max(worst, forward_error), tolerance.gradient, "", first_call_s)
    message = (f"gradient error vs float64 routed through {winners}: {detail} "
               f"(tolerance {tolerance.gradient:.3g})")
    if impl.compile_mode is not None:
        # Compiled code picks its own winners near ties; they are not visible to check.
        return Check(True, worst, tolerance.gradient, "not gated: " + message, first_call_s)
    return Check(False, worst, tolerance.gradient, message, first_call_s)


class Runner:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = settings.device
        self.timer = Timer(self.device)
        self.context_lost: str | None = None
        self.started = time.perf_counter()

    def budget_left(self) -> bool:
        budget = self.settings.time_budget_s
        return budget is None or time.perf_counter() - self.started < budget

    def point(self, impl: Implementation, mode: str, group: Group, state: dict,
              row: dict) -> dict:
        from fused3d.backend import CallSpec
        from fused3d.registry import get_backend

        settings, precision = self.settings, group.precision
        if self.context_lost:
            return {**row, "status": SKIPPED, "message": self.context_lost}
        if not self.budget_left():
            return {**row, "status": SKIPPED,
                    "message": f"time budget of {settings.time_budget_s:.0f} s spent"}
        if group.extra.get("error"):
            return {**row, "status": ERROR, "message": group.extra["error"]}
        plan = settings.plan
        if impl.graphed and self.device.type != "cuda":
            return {**row, "status": UNAVAILABLE, "message": "CUDA graphs need a CUDA device"}
        if impl.backend is not None:
            try:
                backend = get_backend(impl.backend)
                reasons = list(backend.unavailable_reasons())
                if reasons:
                    return {**row, "status": UNAVAILABLE, "message": "; ".join(reasons)}
                reasons = list(backend.unsupported_reasons(
                    CallSpec(self.device.type, precision.dtype)))
                if reasons:
                    return {**row, "status": UNSUPPORTED, "message": "; ".join(reasons)}
            except Exception as error:
                return {**row, "status": UNAVAILABLE, "message": _first_line(error)}
            if self.device.type == "cpu" and impl.backend != "reference":
                if group.batch != settings.interpreted_batch:
                    return {**row, "status": SKIPPED, "message": (
                        f"interpreted on the CPU: timed at batch {settings.interpreted_batch} "
                        "only")}
                plan = settings.interpreted_plan or plan

        module = compiled = call = run = prepare = leaves = None
        try:
            self.timer.synchronize()
            resident = torch.cuda.memory_allocated(self.device) if self.timer.is_cuda else 0
            module, compiled = build(impl, settings.problem, state, precision.dtype, self.device)
            if impl.graphed:  # captured with this group's x, the input every timed call gets
                compiled = torch.cuda.make_graphed_callables(module, (group.x,))
            leaves = [group.x, *module.parameters()]
            marks_steps = impl.compile_mode == "max-autotune" and hasattr(
                torch.compiler, "cudagraph_mark_step_begin")

            def call(x, compiled=compiled, marks_steps=marks_steps):
                if marks_steps:  # max-autotune replays CUDA graphs: one step per call
                    torch.compiler.cudagraph_mark_step_begin()
                return compiled(x)

            def prepare(leaves=leaves):
                for leaf in leaves:
                    leaf.grad = None

            if mode == FORWARD:
                def run(call=call, x=group.x):
                    with torch.no_grad():
                        call(x)
            else:
                def run(call=call, x=group.x, grad_y=group.grad_y):
                    call(x).backward(grad_y)

            check = check_point(impl, mode, module, call, group, prepare, self.device)
            row.update(check_error=_num(check.error), check_tolerance=check.tolerance,
                       message=check.message, first_call_s=round(check.first_call_s, 3))
            if not check.passed:
                row["status"] = FAILED_CHECK
                return row
            stats: Stats = self.timer.measure(run, prepare, plan)
            row.update({k: round(v, 6) if isinstance(v, float) else v
                        for k, v in stats.__dict__.items()})
            if impl.replays_cuda_graphs and self.timer.is_cuda:
                # Its CUDA graphs replay inside a private pool whose reuse
                # max_memory_allocated does not see: a number here would undercount.
                note = "peak memory not measured (CUDA-graph private pool)"
                row["message"] = "; ".join(m for m in (row["message"], note) if m)
            else:
                peak = self.timer.peak_extra_mib(run, prepare, resident)
                row["peak_extra_mib"] = "" if peak is None else round(peak, 2)
            row["status"] = OK
            if mode == FORWARD and self.device.type == "cuda":
                floor = forward_floor_ms(settings.problem, precision.name, group.batch)
                row["floor_ms"] = "" if floor is None else round(floor, 6)
            return row
        except torch.cuda.OutOfMemoryError as error:
            row.update(status=OOM, message=_first_line(error))
            return row
        except Exception as error:
            row.update(status=ERROR, message=_first_line(error))
            return row
        finally:
            # Drop every reference first, so that _release really frees the module, its
            # compiled graphs and their CUDA-graph pools before the next point is measured.
            module = compiled = call = run = prepare = leaves = None
            _release(impl)
            if self.timer.is_cuda:
                try:
                    torch.cuda.synchronize(self.device)
                    torch.cuda.empty_cache()
                except Exception as error:  # a sticky CUDA error: nothing more can run here
                    self.context_lost = (f"CUDA context lost after {impl.name} {mode}: "
                                         f"{_first_line(error, 200)}")


def _num(value: float) -> float | str:
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    return float(f"{value:.4g}")


def make_group(settings: Settings, precision: Precision, batch: int, state: dict) -> Group:
    """Inputs (x = torch.rand, as in the problem), a fixed random output gradient, the oracle."""
    import fused3d
    from fused3d.config import BlockConfig

    from .oracle import BlockTensors, Float64Oracle

    problem = settings.problem
    generator = torch.Generator().manual_seed(settings.seed * 1000 + batch)
    x = torch.rand(problem.input_shape(batch), generator=generator)
    x = x.to(device=settings.device, dtype=precision.dtype).requires_grad_()
    eager = fused3d.Model(*problem.init_args)
    eager.load_state_dict(state)
    eager = eager.to(device=settings.device, dtype=precision.dtype)
    config = BlockConfig.from_args(problem.kernel_size, problem.stride, problem.padding,
                                   problem.output_padding)
    out_shape = config.output_shape(problem.input_shape(batch), problem.out_channels)
    grad_y = torch.randn(out_shape, generator=generator)
    grad_y = grad_y.to(device=settings.device, dtype=precision.dtype)
    group = Group(precision, batch, x, grad_y, oracle=None)
    try:
        group.oracle = Float64Oracle(BlockTensors.of_model(eager, x))
    except Exception as error:
        group.extra["error"] = "float64 oracle failed: " + _first_line(error)
    return group


def run(settings: Settings) -> int:
    """Run the benchmark; returns a process exit code."""
    import fused3d
    from fused3d.registry import backend_names

    torch.manual_seed(settings.seed)
    names = list(backend_names()) if settings.backends is None else list(settings.backends)
    # max-autotune runs last, so that nothing it leaves behind (autotuning processes, graph
    # pools) runs beside the backends' timings. (On the H100 the backends' host-bound steps
    # spread as widely with it last as with it first: the host's speed, not max-autotune.)
    impls = [BASELINES[name] for name in settings.baselines if name != "compile-max-autotune"]
    impls += [Implementation(name, "backend", backend=name) for name in names]
    impls += [graphed(name) for name in settings.graphed_backends]
    impls += [BASELINES[name] for name in settings.baselines if name == "compile-max-autotune"]
    meta = run_metadata(settings)
    results = ResultSet(meta, settings)
    runner = Runner(settings)
    total = len(settings.precisions) * len(settings.batches) * len(impls) * len(settings.modes)
    print(f"fused3d.bench: {meta['gpu']} | torch {meta['torch']} | "
          f"{len(impls)} implementations x {len(settings.modes)} modes x "
          f"{len(settings.precisions)} precisions x {len(settings.batches)} batches "
          f"-> {results.csv_path}", file=sys.stderr, flush=True)
    progress = Progress(total)
    master = fused3d.Model(*settings.problem.init_args)
    state = {k: v.detach().clone() for k, v in master.state_dict().items()}
    saved_flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        for precision in settings.precisions:
            set_tf32(precision.allow_tf32 if precision.dtype == torch.float32 else True)
            for batch in settings.batches:
                progress.describe(f"{precision.name} b{batch}")
                group, group_error = None, runner.context_lost
                if group_error is None:
                    try:
                        group = make_group(settings, precision, batch, state)
                    except Exception as error:  # e.g. no memory for this batch's inputs
                        group_error = "inputs could not be made: " + _first_line(error)
                for impl in impls:
                    for mode in settings.modes:
                        row = results.base_row(impl, mode, precision, batch)
                        if group is None:
                            status = SKIPPED if runner.context_lost else ERROR
                            row = {**row, "status": status, "message": group_error}
                        else:
                            row = runner.point(impl, mode, group, state, row)
                        results.add(row)
                        timing = (f"{row['median_ms']:.4f} ms" if row["status"] == OK
                                  else row["status"])
                        progress.step(f"{impl.name} {mode} {precision.name} b{batch}: {timing}")
                group = None
                gc.collect()
                if runner.timer.is_cuda and runner.context_lost is None:
                    torch.cuda.empty_cache()
                results.write()
    except KeyboardInterrupt:
        print("interrupted: writing what was measured", file=sys.stderr)
    finally:
        progress.close()
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved_flags
        results.write()
    print(summary(results.all_rows(), settings))
    print(f"wrote {results.csv_path} and {results.json_path}")
    if runner.context_lost:
        print(runner.context_lost, file=sys.stderr)
        return 2
    return 0


def summary(rows: list[dict], settings: Settings) -> str:
    """A short table at the benchmark batch (or the largest batch run): median ms and speedups."""
    batches = sorted({int(r["batch"]) for r in rows})
    if not batches:
        return "no results"
    batch = BENCHMARK_BATCH if BENCHMARK_BATCH in batches else batches[-1]
    columns = [(m, p.name) for p in settings.precisions for m in settings.modes]
    impls = list(dict.fromkeys(r["implementation"] for r in rows))
    cell = {(r["implementation"], r["mode"], r["precision"]): r for r in rows
            if int(r["batch"]) == batch}
    header = ["implementation"] + [f"{'fwd' if m == FORWARD else 'fwd+bwd'} {p}"
                                   for m, p in columns] + ["peak MiB fwd+bwd"]
    lines = [f"batch {batch}: median ms (x speedup vs eager)", " | ".join(header)]
    for impl in impls:
        cells = [impl]
        for mode, precision in columns:
            row = cell.get((impl, mode, precision))
            if row is None:
                cells.append("-")
            elif row["status"] != OK:
                cells.append(row["status"])
            else:
                speedup = row["speedup_vs_eager"]
                cells.append(f"{float(row['median_ms']):.3f}"
                             + (f" ({float(speedup):.1f}x)" if speedup != "" else ""))
        peak = next((cell[(impl, m, p)]["peak_extra_mib"] for m, p in columns
                     if m == TRAINING and (impl, m, p) in cell
                     and cell[(impl, m, p)]["status"] == OK), "")  # the first precision's
        cells.append(f"{float(peak):.0f}" if peak != "" else "-")
        lines.append(" | ".join(cells))
    problems = [f"{r['implementation']} {r['mode']} {r['precision']} b{r['batch']}: "
                f"{r['status']}: {r['message']}" for r in rows
                if r["status"] not in (OK, UNAVAILABLE, SKIPPED)]
    if problems:
        lines.append("not ok:")
        lines += ["  " + p for p in problems[:20]]
        if len(problems) > 20:
            lines.append(f"  ... and {len(problems) - 20} more (see the CSV)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line


def _ensure_triton_interpreter() -> None:
    """On the CPU, Triton kernels run only through Triton's interpreter (TRITON_INTERPRET=1).

    Triton fixes that choice when it is imported, and ``import fused3d`` already imports it
    (through torch.library), so setting the variable now is too late: run this command again
    in a fresh process with the variable set.
    """
    if os.environ.get("TRITON_INTERPRET") or os.environ.get("_FUSED3D_BENCH_REEXEC"):
        return
    env = {**os.environ, "TRITON_INTERPRET": "1", "_FUSED3D_BENCH_REEXEC": "1"}
    if "triton" not in sys.modules:
        os.environ.update(TRITON_INTERPRET="1")
        return
    sys.stdout.flush()
    sys.stderr.flush()
    print("fused3d.bench: restarting with TRITON_INTERPRET=1 (CPU run)", file=sys.stderr)
    os.execve(sys.executable, [sys.executable, "-m", "fused3d.bench", *sys.argv[1:]], env)


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: Iterable[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m fused3d.bench",
        description="Time eager Model, torch.compile and every fused3d backend in one process.")
    parser.add_argument("--quick", action="store_true",
                        help="batch 16 only (CPU: 2), TF32 only on a GPU, fewer reps, no "
                             "max-autotune; writes <stem>_quick.* unless --name is given")
    parser.add_argument("--out", type=Path, default=Path("plots"),
                        help="folder for the CSV/JSON (default: plots)")
    parser.add_argument("--name", default=None,
                        help="file stem (default bench_<device>, bench_<device>_quick)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--backends", default=None,
                        help="comma list of fused3d backends (default: every registered one; "
                             "'' for none)")
    parser.add_argument("--baselines", default=None,
                        help="comma list from eager,compile,compile-max-autotune "
                             "(default: all; --quick and CPU: eager,compile)")
    parser.add_argument("--cudagraphs", default="",
                        help="comma list of backends also timed as CUDA graphs "
                             "(torch.cuda.make_graphed_callables), rows '<backend>+cudagraphs': "
                             "the same kernels without the per-call host work (GPU only; "
                             "default none)")
    parser.add_argument("--batches", default=None,
                        help="comma list (default 1,4,16,64; CPU 1,4)")
    parser.add_argument("--precisions", default=None,
                        help="comma list from tf32,fp32,bf16 (default: all; CPU: fp32,bf16)")
    parser.add_argument("--modes", default="forward,forward+backward",
                        help="comma list from forward,forward+backward")
    parser.add_argument("--size", default=None,
                        help="D,H,W of the input (default 16,32,32; CPU 4,8,8)")
    parser.add_argument("--min-reps", type=int, default=None)
    parser.add_argument("--max-reps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; points not started by then are recorded as skipped")
    parser.add_argument("--merge", action="store_true",
                        help="keep rows of the existing file for (precision, batch) groups "
                             "not run now (same device and GPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(None if argv is None else list(argv))

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (torch "
                     f"{torch.__version__}); use --device cpu")
    device = torch.device(args.device, torch.cuda.current_device()) \
        if args.device == "cuda" else torch.device("cpu")
    on_cpu = device.type == "cpu"

    problem = CPU_PROBLEM if on_cpu else BENCHMARK_PROBLEM
    if args.size:
        spatial = tuple(int(v) for v in _csv_list(args.size))
        if len(spatial) != 3:
            parser.error("--size takes D,H,W")
        problem = Problem(spatial=spatial)

    if args.batches:
        batches = tuple(int(b) for b in _csv_list(args.batches))
    elif args.quick:
        batches = (2,) if on_cpu else (BENCHMARK_BATCH,)
    else:
        batches = (1, 4) if on_cpu else FULL_BATCHES
    if any(b < 1 for b in batches):
        parser.error("--batches: each batch must be >= 1")

    if args.precisions:
        precision_names = _csv_list(args.precisions)
    elif args.quick and not on_cpu:
        precision_names = ["tf32"]  # the headline precision; IEEE fp32 backwards take minutes
    else:
        precision_names = DEFAULT_PRECISIONS[device.type]
    unknown = [p for p in precision_names if p not in PRECISIONS]
    if unknown:
        parser.error(f"--precisions: unknown {unknown}; choose from {', '.join(PRECISIONS)}")
    if on_cpu and "tf32" in precision_names:
        parser.error("--precisions: tf32 exists only on a GPU")

    modes = []
    for mode in _csv_list(args.modes):
        if mode not in MODE_ALIASES:
            parser.error(f"--modes: unknown {mode!r}; choose from {', '.join(MODES)}")
        modes.append(MODE_ALIASES[mode])

    if args.baselines is not None:
        baselines = _csv_list(args.baselines)
    elif args.quick or on_cpu:
        baselines = ["eager", "compile"]
    else:
        baselines = list(BASELINES)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        parser.error(f"--baselines: unknown {unknown}; choose from {', '.join(BASELINES)}")

    backends = None if args.backends is None else tuple(_csv_list(args.backends))
    graphed_backends = tuple(_csv_list(args.cudagraphs))
    for option, names in (("--backends", backends), ("--cudagraphs", graphed_backends)):
        if names:
            from fused3d.registry import backend_names

            unknown = [b for b in names if b not in backend_names()]
            if unknown:
                parser.error(f"{option}: unknown {unknown}; installed: "
                             f"{', '.join(backend_names())}")

    if on_cpu:
        plan = TimingPlan(warmup=2, min_reps=5, max_reps=20, target_s=0.2)
    elif args.quick:
        plan = TimingPlan(warmup=3, min_reps=20, max_reps=60, target_s=0.1)
    else:
        plan = TimingPlan(warmup=5, min_reps=50, max_reps=200, target_s=0.25)
    plan = TimingPlan(
        warmup=plan.warmup if args.warmup is None else args.warmup,
        min_reps=plan.min_reps if args.min_reps is None else args.min_reps,
        max_reps=max(plan.max_reps if args.max_reps is None else args.max_reps,
                     plan.min_reps if args.min_reps is None else args.min_reps),
        target_s=plan.target_s,
    )
    if plan.min_reps < 1:
        parser.error("--min-reps must be >= 1")

    if on_cpu:
        _ensure_triton_interpreter()
    stem = args.name or (f"bench_{device.type}" + ("_quick" if args.quick else ""))
    return Settings(
        device=device, problem=problem, batches=batches,
        precisions=tuple(PRECISIONS[p] for p in precision_names), modes=tuple(modes),
        baselines=tuple(baselines), backends=backends, graphed_backends=graphed_backends,
        plan=plan, out_dir=args.out, stem=stem,
        merge=args.merge, seed=args.seed, time_budget_s=args.time_budget,
        interpreted_batch=min(batches) if on_cpu else None,
        # The correctness check is the interpreter's warm-up; a second of each run is plenty.
        interpreted_plan=TimingPlan(warmup=0, min_reps=2, max_reps=2, target_s=0.0),
    )


def main(argv: Iterable[str] | None = None) -> int:
    return run(parse_args(argv))
