"""Exporting models that hold fused modules: ``torch.export`` and ONNX (both exporters).

Converted CBAM and SE ResNet-18s in eval mode export to graphs of standard operators only (no
``cbam_kernels`` op, no custom ONNX domain) that use the BatchNorm running statistics and mutate
no buffer; ONNX Runtime's output matches PyTorch's. A kernel backend exports the same way: while
exporting, every backend runs the specification (``ops.gate.exporting``).
"""

import warnings

import pytest
import torch

from cbam_kernels import CBAM
from cbam_kernels.ops import backend
from model_testing import randomize, resnet18_pair

SHAPE = (1, 3, 64, 64)


@pytest.fixture(params=["cbam", "se"])
def model(request):
    """A converted ResNet-18 with CBAM or SE (see ``resnet18_pair``) in eval mode, with random
    BatchNorm running statistics (an export that ignored them would differ)."""
    return resnet18_pair(request.param)[1]


def onnx_export(model, x, path, dynamo: bool):
    """``torch.onnx.export`` to ``path`` with one of the two exporters, quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, verbose=False)


def check_standard_onnx(path) -> set:
    """Assert that the ONNX file at ``path`` is valid and uses the standard domain only; return
    its operator types."""
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    domains = {node.domain for node in proto.graph.node} | {f.domain for f in proto.functions}
    assert domains <= {"", "ai.onnx"}, domains
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    assert len(proto.graph.output) == 1  # no buffer update comes out of the graph
    return {node.op_type for node in proto.graph.node}


def onnx_runtime(path, x: torch.Tensor) -> torch.Tensor:
    """The output of ONNX Runtime (CPU) on ``x`` for the model at ``path``."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


def test_torch_export(model):
    x = torch.randn(SHAPE)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "cbam_kernels" in t]
    assert not program.graph_signature.buffers_to_mutate
    torch.testing.assert_close(program.module()(x), model(x))
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), name


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_onnx_export_matches_onnx_runtime(model, dynamo, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    x = torch.randn(SHAPE)
    path = tmp_path / "model.onnx"
    onnx_export(model, x, path, dynamo)
    ops = check_standard_onnx(path)
    assert {"Sigmoid", "Mul", "Conv"} <= ops
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(onnx_runtime(path, x), expected, rtol=1e-4, atol=1e-4)


@pytest.fixture
def on_kernel_backend(monkeypatch):
    """(module, x, its output on the torch backend), with the modules then choosing the Triton
    backend, whose pipeline must not be reached."""
    torch.manual_seed(0)
    module = randomize(CBAM(16, 4)).eval()
    x = torch.randn(2, 16, 9, 9)
    expected = module(x)

    def refuse(name, device=None):
        raise AssertionError(f"the {name} pipeline ran")

    monkeypatch.setattr(backend, "backend_for", lambda x: "triton")
    monkeypatch.setattr(backend, "backend_name", lambda device, dtype: "triton")
    monkeypatch.setattr(backend, "pipeline_named", refuse)
    with pytest.raises(AssertionError, match="triton pipeline ran"):
        module(x)  # not exporting: the kernel pipeline
    return module, x, expected


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_kernel_backend_torch_export(on_kernel_backend, strict):
    module, x, expected = on_kernel_backend
    program = torch.export.export(module, (x,), strict=strict)
    torch.testing.assert_close(program.module()(x), expected)
    core = program.run_decompositions()  # eval BatchNorm: running statistics, nothing updated
    targets = {str(n.target) for n in core.graph.nodes if n.op == "call_function"}
    assert "aten._native_batch_norm_legit_no_training.default" in targets
    assert not core.graph_signature.buffers_to_mutate


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_kernel_backend_onnx_export(on_kernel_backend, dynamo, tmp_path):
    pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    module, x, expected = on_kernel_backend
    path = tmp_path / "cbam.onnx"
    onnx_export(module, x, path, dynamo)
    check_standard_onnx(path)
    torch.testing.assert_close(onnx_runtime(path, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["cbam", "se", "channel", "spatial"])
def test_jit_trace_passes_its_own_check(name, train):
    """torch.jit.trace with its default check_trace=True traces twice, the second time in
    another grad mode: both traces must be one graph, and the trace computes the module."""
    from cbam_kernels import SE, ChannelGate, SpatialGate
    module = {"cbam": lambda: CBAM(8, 2), "se": lambda: SE(8, 2),
              "channel": lambda: ChannelGate(8, 2), "spatial": SpatialGate}[name]().train(train)
    randomize(module)
    x = torch.randn(2, 8, 5, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, x)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), module(x), rtol=1e-6, atol=1e-6)
