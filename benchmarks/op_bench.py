"""Measure one op case inside pytest-benchmark and record what it means in ``extra_info``.

``extra_info`` of every op result:

* the case: ``op``, ``provider``, ``pass_name``, ``batch``, ``shape``, ``dtype``, ``format``,
  ``device``;
* ``median_ms``; ``tensor_bytes`` (one x-sized tensor);
* ``bytes_moved`` = ``min_passes`` x tensor_bytes, the op's own minimum (see traffic.py), and
  ``gbps`` = bytes_moved / median; ``copy_gbps``, the device's copy bandwidth measured once per
  run, and ``pct_copy_bw`` = gbps / copy_gbps in percent;
* ``io_floor_bytes`` (2 passes forward: read x, write y; 3 backward; 5 both) and ``floor_ratio`` =
  median / (io_floor_bytes / copy bandwidth): how many times the two-pass floor it takes;
* ``speedup_vs_eager``, ``speedup_vs_compile``: the baseline's median over this one. A baseline
  deselected with ``-k`` is measured for this; one left out of ``--bench-providers`` is not
  (None), nor one that failed to compile (None, with ``compile_error``);
* ``peak_mem_bytes`` (forward+backward on CUDA): peak allocation of one call beyond its inputs;
* ``launches``: the kernels one call launches (``launches.py``: Triton launches, ops of the C++
  extension and ATen ops that run on the device), with ``launch_names``; None for the compiled
  providers (the compiled graph launches its own kernels).
"""

from typing import Callable, Dict, Hashable, List, Optional

import pytest
import torch
from torch import nn

from cbam_kernels import available_backends

from . import traffic
from .launches import Launches, count_launches
from .suite import BASELINES, COMPILED, OpCase, Settings, backend_of
from .timing import (Workload, copy_bandwidth, device_clock, median_seconds,
                     peak_memory_bytes)
from .workloads import CompileCache, build_module, forced_backend, make_workload


class CompileFailed(RuntimeError):
    """torch.compile of a reference module failed on this machine."""


class BenchState:
    """What a run shares: settings, the device clock, copy bandwidth (measured once), compiled
    modules, the medians measured so far (for speedups) and the model results (for the summary)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = torch.device(settings.device)
        self.clock = device_clock(self.device)
        self.compiled = CompileCache(settings.compile_backend)
        self.medians: Dict[Hashable, float] = {}
        self.compile_errors: Dict[Hashable, str] = {}
        self.model_results: List[dict] = []
        self._copy_bandwidth: Optional[float] = None

    @property
    def copy_bandwidth(self) -> float:
        """Bytes/s of a large device-to-device copy (read + write), measured at first use."""
        if self._copy_bandwidth is None:
            self._copy_bandwidth = copy_bandwidth(self.device, self.clock)
        return self._copy_bandwidth

    def workload(self, case: OpCase) -> Workload:
        """The case's workload; for a compiled provider, compiled and run once (raises
        CompileFailed)."""
        if case.provider not in COMPILED:
            module = build_module(case)
            return make_workload(case, module, module)
        return self.compiled_workload(
            (case.key, case.provider), (case.module_key, case.provider),
            build=lambda: build_module(case),
            make=lambda compiled, module: make_workload(case, compiled, module))

    def compiled_workload(self, error_key: Hashable, module_key: Hashable,
                          build: Callable[[], nn.Module],
                          make: Callable[[Callable, nn.Module], Workload]) -> Workload:
        """``make(compiled, module)`` for the module ``build()`` makes (compiled once per
        ``module_key``), run once here so that compile errors surface before any timing.

        Raises CompileFailed, and again for the same ``error_key`` without retrying.
        """
        if error_key in self.compile_errors:
            raise CompileFailed(self.compile_errors[error_key])
        module, compiled = self.compiled.get(module_key, build)
        workload = make(compiled, module)
        try:
            workload.call()
        except Exception as err:  # any compiler failure: record it, skip the provider
            self.compile_errors[error_key] = f"{type(err).__name__}: {err}".splitlines()[0]
            raise CompileFailed(self.compile_errors[error_key]) from err
        return workload

    def median(self, case: OpCase) -> Optional[float]:
        """Median seconds of ``case``: measured earlier in the run, else now if its provider is
        among the run's providers; None if it is not or fails to compile."""
        if case.provider not in self.settings.providers:
            return None
        if (case.key, case.provider) not in self.medians:
            try:
                workload = self.workload(case)
            except CompileFailed:
                return None
            self.medians[case.key, case.provider] = median_seconds(
                workload, self.clock, self.settings.rounds, self.settings.warmup_rounds)
        return self.medians[case.key, case.provider]


def unavailable_reason(case: OpCase) -> str:
    """Why ``case``'s provider cannot run here ('' when it can)."""
    if case.provider in BASELINES:
        return ""
    name = backend_of(case.provider)
    status = available_backends().get(name, "not a backend of this cbam_kernels build")
    if status != "available":
        return f"{case.provider} backend unavailable: {status}"
    if name != "torch" and case.device != "cuda":
        return f"the {case.provider} backend runs on CUDA tensors only"
    return ""


def benchmark_op(benchmark, case: OpCase, state: BenchState) -> None:
    """Time ``case`` with pytest-benchmark (pedantic, device timer) and fill ``extra_info``."""
    reason = unavailable_reason(case)
    if reason:
        pytest.skip(reason)
    benchmark.group = case.group
    with forced_backend(case.provider):
        try:
            workload = state.workload(case)
        except CompileFailed as err:
            pytest.skip(f"torch.compile failed: {err}")
        benchmark._timer = state.clock  # pytest-benchmark reads this timer around each round
        benchmark.pedantic(workload.run, setup=workload.setup, rounds=state.settings.rounds,
                           warmup_rounds=state.settings.warmup_rounds)
        peak = peak_memory_bytes(workload, state.device) if case.pass_name == "fwd+bwd" else None
        launches = None if case.provider in COMPILED else workload_launches(workload)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    seconds = benchmark.stats.stats.median
    state.medians[case.key, case.provider] = seconds
    benchmark.extra_info.update(op_metrics(case, seconds, state, peak))
    benchmark.extra_info.update(launch_info(launches))


def workload_launches(workload: Workload) -> Launches:
    """The launches of one (untimed) call of ``workload``."""
    args, kwargs = workload.setup()
    with count_launches() as launches:
        workload.run(*args, **kwargs)
    return launches


def launch_info(launches: Optional[Launches]) -> Dict[str, object]:
    """``launches`` and ``launch_names`` for ``extra_info`` (None when not counted)."""
    if launches is None:
        return {"launches": None, "launch_names": None}
    return {"launches": launches.total, "launch_names": launches.names()}


def op_metrics(case: OpCase, seconds: float, state: BenchState,
               peak: Optional[int]) -> Dict[str, object]:
    """The ``extra_info`` of one op result (see the module docstring)."""
    tensor_bytes = case.numel * case.torch_dtype.itemsize
    moved = traffic.min_passes(case.op, case.pass_name) * tensor_bytes
    floor = traffic.io_floor_passes(case.pass_name) * tensor_bytes
    info: Dict[str, object] = dict(
        op=case.op, provider=case.provider, pass_name=case.pass_name, batch=case.batch,
        shape=list(case.shape), dtype=case.dtype, format=case.fmt, device=case.device,
        median_ms=seconds * 1e3, tensor_bytes=tensor_bytes,
        min_passes=traffic.min_passes(case.op, case.pass_name), bytes_moved=moved,
        gbps=moved / seconds / 1e9, copy_gbps=state.copy_bandwidth / 1e9,
        pct_copy_bw=100 * moved / seconds / state.copy_bandwidth, io_floor_bytes=floor,
        floor_ratio=seconds * state.copy_bandwidth / floor, peak_mem_bytes=peak)
    for baseline in BASELINES:
        base = seconds if baseline == case.provider else state.median(case.with_provider(baseline))
        info[f"speedup_vs_{baseline}"] = None if base is None else base / seconds
    errors = [state.compile_errors[case.key, p] for p in COMPILED
              if (case.key, p) in state.compile_errors]
    if errors:
        info["compile_error"] = "; ".join(errors)
    return info
