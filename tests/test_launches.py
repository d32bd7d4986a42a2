"""Launch budgets: how many kernels one call of a fused module launches, on each kernel backend.

Counted on the CPU (``benchmarks/launches.py``): every Triton launch (through Triton's
interpreter) plus every ATen op that runs on the device (views and allocations excepted) and
every op of the C++ extension (one kernel each: the CUDA backend's passes, through their CPU
emulation), forward and backward, at shapes whose reductions do and do not split. The budgets
(the dependency floor of each gate, see ``ops.kernel_pipeline``):

=============  ==========  ============  ========
module         eval fwd    train fwd     backward
=============  ==========  ============  ========
CBAM           5           6             6
SE, channel    3           3             3
spatial gate   3           4             4
=============  ==========  ============  ========

On both backends the parameter gradients ride in the grad-input launch. The ResNet epilogue
(``residual=``) adds no launch. Run with::

    TRITON_INTERPRET=1 python -m pytest tests/test_launches.py -m triton
"""

import pytest
import torch

from benchmarks.launches import module_launches
from cbam_kernels import CBAM, SE, ChannelGate, SpatialGate
from cbam_kernels.ops.types import merged_hw_stride
from pass_testing import DEVICE, odd_layout, to_layout


def _reduction(channels):
    """The usual 16, or less for few channels."""
    return min(16, channels // 2)


# module name -> (factory, budget {eval forward, train forward, backward})
MODULES = {
    "cbam": (lambda c: CBAM(c, _reduction(c)), (5, 6, 6)),
    "cbam_timm": (lambda c: CBAM(c, _reduction(c), style="timm"), (5, 6, 6)),
    "cbam_no_spatial": (lambda c: CBAM(c, _reduction(c), no_spatial=True), (3, 3, 3)),
    "se": (lambda c: SE(c, _reduction(c)), (3, 3, 3)),
    "channel_gate": (lambda c: ChannelGate(c, _reduction(c)), (3, 3, 3)),
    "spatial_gate": (lambda c: SpatialGate(), (3, 4, 4)),
}
# (shape, dtype of x and parameters, layout); the last two split their reductions.
CASES = [((2, 64, 6, 6), torch.float32, "nchw"),
         ((2, 96, 7, 7), torch.float16, "cl"),
         ((1, 2048, 2, 2), torch.bfloat16, "nchw"),
         ((1, 8, 40, 40), torch.float32, "cl")]
# Every module at the first shape; CBAM (both gates) and SE (one channel reduction) at the
# others, where the interpreter is slower.
PARAMS = [(name, CASES[0]) for name in sorted(MODULES)] + [
    (name, case) for case in CASES[1:] for name in ("cbam", "se")]


@pytest.mark.parametrize("name,case", PARAMS,
                         ids=[f"{n}-{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}-{c[2]}"
                              for n, c in PARAMS])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_launch_budget(kernel_pipeline, name, case, residual):
    """Forward (eval and training) and backward (training and eval) within budget, with and
    without the residual epilogue."""
    make, (eval_fwd, train_fwd, bwd) = MODULES[name]
    shape, dtype, layout = case
    module = make(shape[1]).to(DEVICE, dtype)
    x = to_layout(torch.randn(shape, device=DEVICE, dtype=dtype), layout)
    res = torch.randn_like(x) if residual else None
    train = module_launches(module, x, True, True, res)
    counts = {"eval forward": (module_launches(module, x, False, False, res)["forward"], eval_fwd),
              "train forward": (train["forward"], train_fwd),
              "train backward": (train["backward"], bwd),
              "eval backward": (module_launches(module, x, False, True, res)["backward"], bwd)}
    for what, (launches, budget) in counts.items():
        assert launches.total <= budget, f"{what}: {launches.total} > {budget}: {launches.names()}"
        assert not launches.aten, f"{what}: ATen ops beside the kernels: {launches.aten}"


def test_cases_split_their_reductions(kernel_pipeline):
    """The last two CASES make channel_pool / pool_hw split (partials with S > 1), so the
    budgets hold where split partials are finished."""
    passes = kernel_pipeline.pipeline.passes
    assert passes.channel_pool(torch.randn(CASES[2][0], device=DEVICE), None).sum.shape[0] > 1
    x = to_layout(torch.randn(CASES[3][0], device=DEVICE), "cl")
    assert passes.pool_hw(x, True).sum.shape[0] > 1


def test_a_layout_whose_h_and_w_do_not_merge_is_copied_once(kernel_pipeline):
    """x, and so y, gy and gx, in a dense layout whose H and W do not merge (the kernels address
    (N, C, H*W)): besides the kernels, a forward copies x once and y once into x's layout, a
    backward x, gy and gx once each, not once per pass."""
    x = odd_layout("permuted_dense", (2, 16, 5, 6))
    assert merged_hw_stride(x.shape, x.stride()) is None
    module = CBAM(16, 4).to(DEVICE)
    eval_fwd, train_fwd, bwd = MODULES["cbam"][1]
    train = module_launches(module, x, True, True)
    counts = {"eval forward": (module_launches(module, x, False, False)["forward"], eval_fwd + 2),
              "train forward": (train["forward"], train_fwd + 2),
              "train backward": (train["backward"], bwd + 3)}
    for what, (launches, expected) in counts.items():
        assert launches.total == expected, f"{what}: {launches.names()}"
