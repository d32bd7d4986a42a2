"""CBAM's spatial gate alone: every provider, pass and input of the run's settings.

Cases and the measurement are shared by all ops (conftest.py, op_bench.py); this file names the op.
"""

from .op_bench import benchmark_op

OP = "spatial_gate"


def test_spatial_gate(benchmark, op_case, bench_state):
    benchmark_op(benchmark, op_case, bench_state)
