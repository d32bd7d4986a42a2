"""ResNet-50 plain vs SE vs CBAM, reference modules vs ours, eager and torch.compile.

On CUDA: batch 128, 224 x 224 images, AMP fp16 (autocast), channels_last. Two passes:
``forward`` is inference (eval mode, no_grad) and ``fwd+bwd`` one training step (zero_grad,
forward, cross-entropy, backward, SGD step; no GradScaler). Our modules run on the default
backend. On CPU (the smoke run) batch 2, 32 x 32, fp32.

``extra_info``: ``median_ms``, ``images_per_s`` and, for the training step on CUDA,
``peak_mem_bytes`` -- everything allocated at the step's peak (weights, optimizer state and
activations). The table (printed at the end of the run; report.py saves it) gives each variant's
overhead over the plain network. Targets: CBAM <= +20% inference, +30% training step, +25% peak
memory; SE <= +10% and +15%.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from .op_bench import BenchState, CompileFailed
from .suite import MODEL_VARIANTS, ModelCase
from .timing import Workload, peak_memory_bytes

#: (batch, image size) per device.
MODEL_INPUT = {"cuda": (128, 224), "cpu": (2, 32)}
CLASSES = 1000


def build_model(case: ModelCase) -> nn.Module:
    """The case's ResNet-50 on its device, channels_last."""
    models = pytest.importorskip("cbam_kernels.models",
                                 reason="cbam_kernels.models is not available")
    attention, reference = MODEL_VARIANTS[case.variant]
    torch.manual_seed(0)
    model = models.resnet50(attention=attention, reference=reference)
    return model.to(case.device, memory_format=torch.channels_last)


def model_workload(case: ModelCase, fn, model: nn.Module) -> Workload:
    """Inference or one training step of ``fn`` (``model`` or its compiled form)."""
    batch, size = MODEL_INPUT[case.device]
    images = torch.randn(batch, 3, size, size, device=case.device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, CLASSES, (batch,), device=case.device)

    def autocast():
        return torch.autocast(case.device, torch.float16, enabled=case.device == "cuda")

    model.train(case.pass_name == "fwd+bwd")
    if case.pass_name == "forward":
        def infer():
            with torch.no_grad(), autocast():
                return fn(images)
        return Workload(run=infer, setup=lambda: ((), {}))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(fn(images), labels)
        loss.backward()
        optimizer.step()
    return Workload(run=train_step, setup=lambda: ((), {}))


def workload_for(case: ModelCase, state: BenchState) -> Workload:
    """The case's workload; compiled ones once per variant, checked before timing."""
    if case.execution == "eager":
        model = build_model(case)
        return model_workload(case, model, model)
    try:
        return state.compiled_workload(
            ("resnet50", case.id), ("resnet50", case.variant), lambda: build_model(case),
            lambda compiled, model: model_workload(case, compiled, model))
    except CompileFailed as err:
        pytest.skip(f"torch.compile failed: {err}")


def test_resnet50(benchmark, model_case, bench_state):
    workload = workload_for(model_case, bench_state)
    benchmark.group = f"resnet50 {model_case.pass_name} {model_case.execution}"
    benchmark._timer = bench_state.clock  # pytest-benchmark reads this timer around each round
    benchmark.pedantic(workload.run, setup=workload.setup, rounds=bench_state.settings.rounds,
                       warmup_rounds=bench_state.settings.warmup_rounds)
    peak = None
    if model_case.pass_name == "fwd+bwd":
        peak = peak_memory_bytes(workload, bench_state.device, above_resident=False)
    if benchmark.stats is None:  # --benchmark-disable
        return
    seconds = benchmark.stats.stats.median
    batch, size = MODEL_INPUT[model_case.device]
    attention, reference = MODEL_VARIANTS[model_case.variant]
    info = dict(model="resnet50", variant=model_case.variant, attention=attention or "none",
                impl="reference" if reference else "ours" if attention else "-",
                execution=model_case.execution,
                pass_name=model_case.pass_name, device=model_case.device, batch=batch,
                image_size=size, precision="amp-fp16" if model_case.device == "cuda" else "fp32",
                median_ms=seconds * 1e3, images_per_s=batch / seconds, peak_mem_bytes=peak)
    benchmark.extra_info.update(info)
    bench_state.model_results.append(info)
