"""The fused attention gate: one entry point, :func:`attention_gate`, for every module.

One op covers SE, the CBAM channel gate, the CBAM spatial gate and whole CBAM:

    ca = gate(MLP(avg_hw(x)) + MLP(max_hw(x)))        channel gate, when ``params.w1`` is given
    x1 = x * ca
    p  = [max_c(x1), mean_c(x1)]                      spatial gate, when ``params.conv_w`` is
    sa = sigmoid(BN(conv(p)))                          given (BatchNorm running statistics are
    y  = x1 * sa                                       updated in training)

How a call runs depends on the backend that ``ops.backend.pipeline_for`` picks for x:

* ``torch`` (CPU tensors, float64, or forced): ``ops.torch.pipeline.forward`` in plain PyTorch under
  autograd, so eager mode runs PyTorch's own kernels and ``torch.compile`` traces and fuses it.
* a kernel backend (``triton``, ``cuda``): in eager mode a ``torch.autograd.Function`` around the
  kernel pipeline (least host time per call: no dispatcher, one output, nothing materialised for
  unused gradients; running statistics updated in-kernel); under ``torch.compile`` the same
  pipeline as the functional ``torch.library`` custom ops ``cbam_kernels::gate_forward`` /
  ``gate_backward``, opaque to the compiler (no graph break), with fake implementations; the op
  returns the batch statistics and the running statistics are updated by PyTorch ops that the
  compiler fuses.
* while exporting (``torch.export``, ``torch.onnx.export`` with either exporter,
  ``torch.jit.trace``; see :func:`exporting`): ``ops.torch.pipeline.forward`` on every backend,
  so an exported graph holds standard ATen ops only and translates to standard ONNX operators.

Autograd saves x (and the output, with a residual) plus per-(n, c) and per-(n, h, w) tensors.
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import backend
from .torch import pipeline as pipeline_torch
from .torch.passes import acc_dtype
from .torch.pipeline import update_running_stats
from .types import BatchNormState, ChannelSaved, GateConfig, GateParams, SpatialSaved


def attention_gate(x: Tensor, residual: Optional[Tensor] = None,
                   params: GateParams = GateParams(), cfg: GateConfig = GateConfig(),
                   bn: BatchNormState = BatchNormState(), *, name: str = "attention_gate"
                   ) -> Tensor:
    """Apply a fused channel and/or spatial gate to ``x`` (N, C, H, W).

    Channel gate (given ``params.w1``/``w2``, shapes (R, C) and (C, R), biases optional): the
    MLP is applied to the average pool (``cfg.use_avg``) and/or the max pool (``cfg.use_max``)
    over H*W. ``cfg.act`` ('relu' or 'silu') is the MLP's hidden activation and ``cfg.gate``
    ('sigmoid' or 'hardsigmoid') turns its output into ``ca``.

    Spatial gate (given ``params.conv_w``, shape (1, 2, k, k) with odd k): the pooled map is
    ordered [max, mean] when ``cfg.max_first`` else [mean, max]; the BatchNorm (affine terms
    ``params.bn_w``/``bn_b``) uses and updates the batch statistics when ``bn.batch_stats``,
    else the running statistics.

    With ``residual`` (x's shape and dtype), returns the ResNet block epilogue
    relu(gated x + residual), computed in the same pass. The result has x's shape, dtype and
    memory format.

    Raises a clear error, naming ``name`` (the calling module's class), for an input the gate
    cannot take and for a residual that does not match x (never a broadcast).
    """
    check_input(x, params, name)
    if residual is not None:
        check_residual(x, residual)
    if params.conv_w is not None and bn.batch_stats and x.shape[0] * x.shape[2] * x.shape[3] == 1:
        raise ValueError(f"{name}: expected more than 1 value per channel when training the "
                         f"spatial gate's BatchNorm, got input size {tuple(x.shape)}")
    if x.numel() == 0:
        return _empty_gate(x, residual, params, bn)
    compiling = torch.compiler.is_compiling()
    name = backend.backend_name(x.device, x.dtype) if compiling else backend.backend_for(x)
    if name == "torch" or exporting():
        device = "cpu" if x.is_cpu else x.device.type
        # The small math stays in float32 under autocast, which meta tensors (shape
        # propagation, deferred initialisation) do not have. (No torch.amp.is_autocast_available:
        # dynamo cannot trace it in torch 2.11.)
        if device != "meta" and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return pipeline_torch.forward(x, residual, params, cfg, bn, keep=False)[0]
        return pipeline_torch.forward(x, residual, params, cfg, bn, keep=False)[0]
    if compiling:
        running = (None, None) if bn.batch_stats else (bn.running_mean, bn.running_var)
        out = gate_forward(x, residual, *_pack(params), *running, bn.eps, bn.batch_stats, *cfg)
        if params.conv_w is not None:
            n, _, h, w = x.shape
            stats = out[-1]
            update_running_stats(bn, stats[0:1], stats[1:2], n * h * w)
        return out[0]
    pipeline = backend.pipeline_named(name, x.device)
    if torch.is_grad_enabled() and _needs_grad(x, residual, params):
        return _FusedGate.apply(x, residual, *params, pipeline, cfg, bn)
    return pipeline.forward(x, residual, params, cfg, bn)[0]


def check_input(x: Tensor, params: GateParams, name: str) -> None:
    """Raise a clear error, naming ``name``, for an input the fused gates cannot take: x must be
    a floating-point (N, C, H, W) tensor, with the channel MLP's C channels, on the device of
    the parameters."""
    param = params.w1 if params.w1 is not None else params.conv_w
    if (isinstance(x, Tensor) and x.dim() == 4 and x.is_floating_point()
            and (params.w1 is None or x.shape[1] == params.w1.shape[1])
            and (param is None or param.device == x.device)):
        return
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point input, got dtype {x.dtype}")
    if params.w1 is not None and x.shape[1] != params.w1.shape[1]:
        raise ValueError(f"{name} was built for {params.w1.shape[1]} channels, got an input "
                         f"with {x.shape[1]} channels (shape {tuple(x.shape)})")
    raise RuntimeError(f"{name}: input is on {x.device} but parameters are on {param.device}; "
                       f"move the module with .to({str(x.device)!r})")


def check_residual(x: Tensor, residual: Tensor) -> None:
    """Raise a clear error for a residual that cannot be added to the gated x (never a
    broadcast: a (1, C, 1, 1) residual is an error, not a bias)."""
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"residual must match the input: got {tuple(residual.shape)} "
                         f"{residual.dtype} on {residual.device} for an input "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")


def exporting() -> bool:
    """Whether the call is being exported rather than run: ``torch.export`` (which the ONNX
    exporter uses) or TorchScript tracing (``torch.jit.trace``, the legacy ONNX exporter). Then
    every backend takes the specification's forward, so that the graph holds standard ATen ops
    only (no custom op, no kernel), whatever the device."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def _empty_gate(x: Tensor, residual: Optional[Tensor], params: GateParams,
                bn: BatchNormState) -> Tensor:
    """The result for an empty x (N, H or W zero): empty, yet connected to x, the residual and
    every parameter, so that backward gives zero gradients as ``nn.Conv2d`` does; a training
    BatchNorm counts the batch in num_batches_tracked, as ``nn.BatchNorm2d`` does."""
    if params.conv_w is not None and bn.batch_stats and bn.num_batches_tracked is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
    y = x * sum(p.sum() for p in params if p is not None) * 0
    return y if residual is None else torch.relu(y + residual)


def _needs_grad(x: Tensor, residual: Optional[Tensor], params: GateParams) -> bool:
    return (x.requires_grad or (residual is not None and residual.requires_grad)
            or any(p is not None and p.requires_grad for p in params))


def _pack(params: GateParams) -> Tuple[List[Tensor], List[bool]]:
    """The present parameters as a list, and which of GateParams' fields they are (a custom
    op's list of tensors has no None)."""
    return [p for p in params if p is not None], [p is not None for p in params]


def _unpack(tensors: Sequence[Tensor], present: Sequence[bool]) -> GateParams:
    """Inverse of :func:`_pack`."""
    it = iter(tensors)
    return GateParams(*(next(it) if here else None for here in present))


def _saved_list(channel: Optional[ChannelSaved], spatial: Optional[SpatialSaved],
                like: Optional[Tensor] = None) -> List[Optional[Tensor]]:
    """The saved tensors as one list, None standing for each absent one, or with ``like`` a
    distinct empty tensor like it (the outputs of a custom op are tensors that do not alias)."""
    ch = list(channel) if channel is not None else [None] * len(ChannelSaved._fields)
    sp = list(spatial) if spatial is not None else [None] * len(SpatialSaved._fields)
    saved = ch + sp
    return saved if like is None else [like.new_empty(0) if t is None else t for t in saved]


def _saved_tuples(saved: Sequence[Tensor], params: GateParams, cfg: GateConfig
                  ) -> Tuple[Optional[ChannelSaved], Optional[SpatialSaved]]:
    """Inverse of :func:`_saved_list`."""
    k = len(ChannelSaved._fields)
    channel = spatial = None
    if params.w1 is not None:
        ca, pooled, hidden, pstar = saved[:k]
        channel = ChannelSaved(ca, pooled, hidden, pstar if cfg.use_max else None)
    if params.conv_w is not None:
        spatial = SpatialSaved(*saved[k:])
    return channel, spatial


class _FusedGate(torch.autograd.Function):
    """The kernel pipeline under autograd in eager mode: one output, x plus small tensors
    saved, no gradient materialised for what has none."""

    @staticmethod
    def forward(ctx, x, residual, w1, b1, w2, b2, conv_w, bn_w, bn_b, pipeline, cfg, bn):
        params = GateParams(w1, b1, w2, b2, conv_w, bn_w, bn_b)
        y, channel, spatial = pipeline.forward(x, residual, params, cfg, bn)
        ctx.set_materialize_grads(False)
        ctx.pipeline, ctx.cfg, ctx.bn = pipeline, cfg, bn
        ctx.save_for_backward(x, y if residual is not None else None, *params,
                              *_saved_list(channel, spatial))
        return y

    @staticmethod
    def backward(ctx, gy):
        if gy is None:
            return (None,) * 12
        x, out, *rest = ctx.saved_tensors
        params = GateParams(*rest[:7])
        channel, spatial = _saved_tuples(rest[7:], params, ctx.cfg)
        with torch.no_grad():
            grads = ctx.pipeline.backward(gy, x, out, params, ctx.cfg, ctx.bn, channel, spatial)
        result = (grads.x, grads.residual, *grads.params)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (gy, x, *params)):
            result = _refuse_double_backward(result)
        return (*result, None, None, None)


DOUBLE_BACKWARD_ERROR = (
    "double backward (create_graph=True, e.g. a gradient penalty) through the fused attention "
    "kernels is not supported: their backward is hand-written and not itself differentiable. "
    "Run the gates in plain PyTorch for this (CBAM_KERNELS_BACKEND=torch, twice "
    "differentiable), or use the reference modules of cbam_kernels.reference")


def _refuse_double_backward(grads: Tuple[Optional[Tensor], ...]) -> Tuple[Optional[Tensor], ...]:
    """``grads`` as tensors whose own backward raises :data:`DOUBLE_BACKWARD_ERROR` (so that
    create_graph=True works until something differentiates through them; never a silently
    missing second-order term)."""
    present = [g for g in grads if g is not None]
    error = torch._C._functions.DelayedError(DOUBLE_BACKWARD_ERROR.encode(), len(present))
    raised = error(*(g.detach().requires_grad_() for g in present))
    raised = iter(raised if isinstance(raised, tuple) else (raised,))
    return tuple(None if g is None else next(raised) for g in grads)


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("cbam_kernels::gate_forward", mutates_args=())
def gate_forward(x: Tensor, residual: Optional[Tensor], params: List[Tensor],
                 present: List[bool], running_mean: Optional[Tensor],
                 running_var: Optional[Tensor], eps: float, batch_stats: bool, use_avg: bool,
                 use_max: bool, act: str, gate: str, max_first: bool) -> List[Tensor]:
    """:func:`attention_gate` as one functional op: [y, *saved] (``_saved_list`` order; the
    last is the [mean, variance] the BatchNorm used). ``params``/``present`` are a
    :class:`GateParams` as :func:`_pack` gives it; the running statistics are read in eval
    (batch_stats False) and not updated."""
    bn = BatchNormState(running_mean, running_var, None, eps, None, batch_stats)
    cfg = GateConfig(use_avg, use_max, act, gate, max_first)
    with torch.autocast(x.device.type, enabled=False):
        y, channel, spatial = backend.pipeline_for(x).forward(x, residual,
                                                              _unpack(params, present), cfg, bn)
    return [y, *_saved_list(channel, spatial, like=x)]


@gate_forward.register_fake
def _(x, residual, params, present, running_mean, running_var, eps, batch_stats, use_avg, use_max,
      act, gate, max_first):
    n, c, h, w = x.shape
    small = acc_dtype(x)
    saved = [x.new_empty(0) for _ in ChannelSaved._fields + SpatialSaved._fields]
    if present[0]:
        k, r = int(use_avg) + int(use_max), params[0].shape[0]
        pstar = x.new_empty(n, c, dtype=torch.int32) if use_max else x.new_empty(0)
        saved[:4] = [x.new_empty(n, c, dtype=small), x.new_empty(k, n, c, dtype=small),
                     x.new_empty(k, n, r, dtype=small), pstar]
    if present[4]:
        saved[4:] = [x.new_empty(n, h * w, dtype=small), x.new_empty(n, 2, h * w, dtype=small),
                     x.new_empty(n, h * w, dtype=torch.int32), x.new_empty(n, h * w, dtype=small),
                     x.new_empty(3, dtype=small)]
    return [torch.empty_like(x), *saved]


@torch.library.custom_op("cbam_kernels::gate_backward", mutates_args=())
def gate_backward(gy: Tensor, x: Tensor, out: Optional[Tensor], params: List[Tensor],
                  present: List[bool], saved: List[Tensor], eps: float, batch_stats: bool,
                  use_avg: bool, use_max: bool, act: str, gate: str,
                  max_first: bool) -> List[Tensor]:
    """Backward of ``gate_forward``: [gx, gresidual (empty without a residual), *gradients of
    ``params``]."""
    bn = BatchNormState(eps=eps, batch_stats=batch_stats)
    cfg = GateConfig(use_avg, use_max, act, gate, max_first)
    gparams = _unpack(params, present)
    channel, spatial = _saved_tuples(saved, gparams, cfg)
    with torch.autocast(x.device.type, enabled=False):
        grads = backend.pipeline_for(x).backward(gy, x, out, gparams, cfg, bn, channel, spatial)
    gres = x.new_empty(0) if grads.residual is None else grads.residual
    return [grads.x, gres, *_pack(grads.params)[0]]


@gate_backward.register_fake
def _(gy, x, out, params, present, saved, eps, batch_stats, use_avg, use_max, act, gate,
      max_first):
    gres = x.new_empty(0) if out is None else torch.empty_like(out)
    return [torch.empty_like(x), gres, *(torch.empty_like(p) for p in params)]


def _setup_context(ctx, inputs, output):
    (x, residual, params, present, _, _, eps, batch_stats, *cfg) = inputs
    ctx.set_materialize_grads(False)
    ctx.flags = (eps, batch_stats, *cfg)
    ctx.present = present
    ctx.count = len(params)
    ctx.save_for_backward(x, output[0] if residual is not None else None, *params, *output[1:])


def _backward(ctx, grads):
    gy = grads[0]
    if gy is None:
        return (None, None, [None] * ctx.count) + (None,) * 10
    x, out, *rest = ctx.saved_tensors
    params, saved = rest[:ctx.count], rest[ctx.count:]
    gx, gres, *gparams = gate_backward(gy, x, out, params, ctx.present, saved, *ctx.flags)
    return (gx, gres if out is not None else None, gparams) + (None,) * 10


gate_forward.register_autograd(_backward, setup_context=_setup_context)
