"""Host time per call: CBAM and SE on a tiny input (``suite.HOST_SHAPE``), where compute is
negligible, so a call's time is the host work around its kernels (module glue, dispatch,
launches). Eval-mode forward and training forward+backward, per provider.

Timed with ``time.perf_counter`` around ``HOST_ITERATIONS`` calls a round (a CUDA device is
synchronised after each round, outside the timed region, so the launch queue never fills);
``extra_info``: ``kind`` = "host", the case, ``us_per_call`` (median), ``host_vs_eager`` (ours
over the eager reference's; 1.0 or less: no more host time than eager) and ``launches``.
"""

import time

import pytest
import torch

from .op_bench import BenchState, launch_info, unavailable_reason, workload_launches
from .suite import HOST_ITERATIONS, OpCase
from .workloads import build_module, forced_backend, make_workload


def test_host(benchmark, host_case: OpCase, bench_state: BenchState):
    reason = unavailable_reason(host_case)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"host {host_case.op} {host_case.pass_name}"
    with forced_backend(host_case.provider):
        module = build_module(host_case)
        workload = make_workload(host_case, module, module)
        args, kwargs = workload.setup()

        def settle(*_, **__):
            if host_case.device == "cuda":
                torch.cuda.synchronize()

        benchmark._timer = time.perf_counter
        benchmark.pedantic(workload.run, args, kwargs, teardown=settle,
                           rounds=bench_state.settings.rounds * 2 + 1,
                           iterations=HOST_ITERATIONS, warmup_rounds=2)
        launches = workload_launches(workload)
    if benchmark.stats is None:
        return
    seconds = benchmark.stats.stats.median
    bench_state.medians[host_case.key, host_case.provider] = seconds
    eager = bench_state.medians.get((host_case.key, "eager"))
    benchmark.extra_info.update(
        kind="host", op=host_case.op, pass_name=host_case.pass_name,
        provider=host_case.provider, device=host_case.device, shape=list(host_case.input_shape),
        us_per_call=seconds * 1e6, host_vs_eager=None if eager is None else seconds / eager,
        **launch_info(launches))
