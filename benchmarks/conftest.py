"""pytest-benchmark suite of cbam_kernels: options, case generation, shared state.

Run it and turn the results into a report::

    pytest benchmarks --benchmark-only --benchmark-json=results.json
    python benchmarks/report.py results.json --out benchmarks/results/

Ops (one file each): CBAM, channel gate, spatial gate, SE; ``test_bench_host.py`` times the host
work of one call (CBAM and SE on a tiny input); ``test_bench_resnet.py`` times whole ResNet-50s. Providers: ``eager`` (the reference modules of ``cbam_kernels.reference``),
``compile`` (``torch.compile(reference, dynamic=False)``), ``triton`` and ``cuda`` (our modules
forced onto that backend), ``torch`` (ours on the plain-PyTorch backend, the CPU provider) and
``torch+compile`` (that, under ``torch.compile(dynamic=False)``).

Default run (CUDA): the four ResNet-50 stage shapes (256,56,56) (512,28,28) (1024,14,14)
(2048,7,7) at batch 64, fp16, NCHW and channels_last, forward / backward / forward+backward,
providers eager, compile, triton, cuda (skipped unless the extension is built), 100 rounds.
With no GPU every case skips with the reason. ``--bench-full`` widens to batches 32, 64, 128,
the VGG16 block-end shapes too, and fp32/fp16/bf16 (hours: mostly torch.compile).

Options (each also read from the environment variable in brackets; the option wins):

  --bench-full                 [CBAM_BENCH_FULL=1]   the full product above
  --bench-device=cuda|cpu      [CBAM_BENCH_DEVICE]   cpu: providers eager,compile,torch,
                                                     torch+compile, shapes
                                                     "small", batch 8, fp32, 10 rounds
  --bench-providers=LIST       [CBAM_BENCH_PROVIDERS] eager,compile,triton,cuda,torch,
                                                      torch+compile
  --bench-batches=LIST         [CBAM_BENCH_BATCHES]  e.g. 32,128
  --bench-shapes=LIST          [CBAM_BENCH_SHAPES]   resnet50, vgg16, small, tiny or CxHxW
  --bench-dtypes=LIST          [CBAM_BENCH_DTYPES]   fp32,fp16,bf16
  --bench-formats=LIST         [CBAM_BENCH_FORMATS]  nchw,nhwc
  --bench-passes=LIST          [CBAM_BENCH_PASSES]   forward,backward,fwd+bwd
  --bench-rounds=N             [CBAM_BENCH_ROUNDS]   timed rounds per case
  --bench-compile-backend=NAME [CBAM_BENCH_COMPILE_BACKEND] inductor (default), aot_eager, ...

``-k`` selects on the ids ``<pass>-<dtype>-<format>-b<batch>-<C>x<H>x<W>-<provider>`` and the
file names, e.g. ``-k "cbam and nhwc and forward and not compile"``; baselines deselected that
way are still timed for the speedups (those left out of --bench-providers are not). Model ids
read ``<variant>-<eager|compile>-<forward|fwd+bwd>``; --bench-providers and --bench-passes
select them too.

Passes: ``forward`` is inference (eval mode, no_grad); ``fwd+bwd`` is training mode, forward and
the gradients of x and every parameter; ``backward`` times those gradients alone, after an
untimed forward. Timing: pytest-benchmark's pedantic mode with a CUDA-event timer (timing.py),
one call per round, warm-up rounds first, median reported; the inputs rotate so that they are
never read from L2 (workloads.py). What ``extra_info`` holds: op_bench.py.
"""

import os

import pytest
import torch

from . import report
from .op_bench import BenchState
from .suite import (OPTIONS, Settings, SettingsError, env_lookup, host_cases, model_cases,
                    op_cases, resolve_settings)

SETTINGS = pytest.StashKey[Settings]()
STATE = pytest.StashKey[BenchState]()


def pytest_addoption(parser):
    group = parser.getgroup("cbam-bench", "cbam_kernels benchmark selection")
    group.addoption("--bench-full", action="store_true", default=None,
                    help="batches 32,64,128, ResNet-50 and VGG16 shapes, fp32/fp16/bf16")
    for name, text in OPTIONS.items():
        group.addoption(f"--bench-{name.replace('_', '-')}", dest=f"bench_{name}", default=None,
                        help=text)


def pytest_configure(config):
    """Resolve the settings up front, so that a bad option stops the run with a usage error."""
    settings_for(config)


def settings_for(config) -> Settings:
    """This run's settings, resolved once from the options, the environment and the defaults."""
    if SETTINGS not in config.stash:
        full = config.getoption("bench_full", default=None)
        if full is None:
            full = os.environ.get("CBAM_BENCH_FULL", "").lower() in ("1", "true", "yes")
        try:
            config.stash[SETTINGS] = resolve_settings(
                lambda name: config.getoption(f"bench_{name}", default=None) or env_lookup(name),
                full)
        except SettingsError as err:
            raise pytest.UsageError(str(err)) from err
    return config.stash[SETTINGS]


def pytest_generate_tests(metafunc):
    """Parametrise ``op_case`` (with the module's ``OP``) and ``model_case`` from the settings."""
    settings = settings_for(metafunc.config)
    makers = {"op_case": lambda: op_cases(metafunc.module.OP, settings),
              "host_case": lambda: host_cases(settings),
              "model_case": lambda: model_cases(settings)}
    for name, make in makers.items():
        if name not in metafunc.fixturenames:
            continue
        if settings.device == "cuda" and not torch.cuda.is_available():
            reason = ("GPU benchmarks need a CUDA device and none is visible; for CPU numbers "
                      "run `python benchmarks/main.py` or pass --bench-device=cpu")
            params = [pytest.param(None, id="no-cuda", marks=pytest.mark.skip(reason=reason))]
        else:
            params = [pytest.param(case, id=case.id if name != "host_case" else
                                   f"{case.op}-{case.id}") for case in make()]
        metafunc.parametrize(name, params)


@pytest.fixture(scope="session")
def bench_state(pytestconfig) -> BenchState:
    """The run's shared state (also reachable from the hooks below)."""
    state = BenchState(settings_for(pytestconfig))
    pytestconfig.stash[STATE] = state
    return state


def pytest_benchmark_update_machine_info(config, machine_info):
    """Stamp the JSON with GPU name, torch / Triton / CUDA versions and the git commit."""
    machine_info.update(report.environment_info())


def pytest_terminal_summary(terminalreporter, config):
    """Print the ResNet-50 table when model results were measured."""
    state = config.stash.get(STATE, None)
    if state is not None and state.model_results:
        terminalreporter.write_sep("=", "ResNet-50 (batch, ms, images/s, peak memory)")
        terminalreporter.write_line(report.model_table(state.model_results))
