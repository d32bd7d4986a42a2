"""The fused attention gate as ``torch.library`` custom ops.

One op covers SE, the CBAM channel gate, the CBAM spatial gate and whole CBAM:

    ca = sigmoid(MLP(avg_hw(x)) + MLP(max_hw(x)))    channel gate, when ``w1`` is given
    x1 = x * ca
    p  = [max_c(x1), mean_c(x1)]                      spatial gate, when ``conv_w`` is given
    sa = sigmoid(BN(conv(p)))
    y  = x1 * sa

Forward makes three passes over x (pool over H*W, pool over channels, apply the gates) and
backward three more (``grad_spatial``, ``grad_channel``, ``grad_input``); everything between
passes works on (N, C) vectors and (N, 2, H, W) maps (``gate_math.py``). Autograd saves x plus
those small tensors only. The passes run on the backend that ``backend.passes_for`` picks.

``cbam_kernels::gate_forward`` and ``cbam_kernels::gate_backward`` are opaque to
``torch.compile`` (no graph break) and carry fake implementations; :func:`attention_gate` is the
typed entry point that modules call.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import gate_math
from .backend import passes_for
from .passes_torch import acc_dtype


def attention_gate(x: Tensor, residual: Optional[Tensor] = None, w1: Optional[Tensor] = None,
                   b1: Optional[Tensor] = None, w2: Optional[Tensor] = None,
                   b2: Optional[Tensor] = None, use_avg: bool = True, use_max: bool = True,
                   act: str = "relu", gate: str = "sigmoid", conv_w: Optional[Tensor] = None,
                   bn_w: Optional[Tensor] = None, bn_b: Optional[Tensor] = None,
                   bn_mean: Optional[Tensor] = None, bn_var: Optional[Tensor] = None,
                   bn_eps: float = 1e-5, batch_stats: bool = True,
                   max_first: bool = True) -> Tuple[Tensor, Tensor]:
    """Apply a fused channel and/or spatial gate to ``x`` (N, C, H, W).

    Channel gate (given ``w1``/``w2``, shapes (R, C) and (C, R), biases optional): the MLP is
    applied to the average pool (``use_avg``) and/or the max pool (``use_max``) over H*W.
    ``act`` ('relu' or 'silu') is the MLP's hidden activation and ``gate`` ('sigmoid' or
    'hardsigmoid') turns its output into ``ca``.

    Spatial gate (given ``conv_w``, shape (1, 2, k, k) with odd k): the pooled map is ordered
    [max, mean] when ``max_first`` else [mean, max]; BatchNorm uses the batch statistics when
    ``batch_stats`` (training) else ``bn_mean``/``bn_var``.

    With ``residual`` (x's shape and dtype), ``y`` is the ResNet block epilogue
    relu(gated x + residual), computed in the same pass.

    Returns ``y`` (x's shape, dtype and memory format) and ``stats`` = [mean, biased variance]
    of the conv output that the BatchNorm used (empty without a spatial gate), from which the
    caller updates running statistics.
    """
    if act not in gate_math.ACTIVATIONS or gate not in gate_math.GATES:
        raise ValueError(f"act must be one of {gate_math.ACTIVATIONS} and gate one of "
                         f"{gate_math.GATES}, got act={act!r}, gate={gate!r}")
    out = gate_forward(x, residual, w1, b1, w2, b2, use_avg, use_max, act, gate, conv_w, bn_w,
                       bn_b, bn_mean, bn_var, bn_eps, batch_stats, max_first)
    return out[0], out[-1]


@torch.library.custom_op("cbam_kernels::gate_forward", mutates_args=())
def gate_forward(x: Tensor, residual: Optional[Tensor], w1: Optional[Tensor],
                 b1: Optional[Tensor], w2: Optional[Tensor], b2: Optional[Tensor], use_avg: bool,
                 use_max: bool, act: str, gate: str, conv_w: Optional[Tensor],
                 bn_w: Optional[Tensor], bn_b: Optional[Tensor],
                 bn_mean: Optional[Tensor], bn_var: Optional[Tensor], bn_eps: float,
                 batch_stats: bool, max_first: bool
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                            Tensor]:
    """Fused forward. Returns (y, ca, pooled, hidden, pstar, p, cstar, sa, xhat, stats).

    Everything after ``y`` is saved for backward; a tensor of an absent gate is empty. Runs
    with autocast off: the small math stays in float32 whatever the caller's autocast state.
    """
    with torch.autocast(x.device.type, enabled=False):
        return _gate_forward(x, residual, w1, b1, w2, b2, use_avg, use_max, act, gate, conv_w,
                             bn_w, bn_b, bn_mean, bn_var, bn_eps, batch_stats, max_first)


def _gate_forward(x, residual, w1, b1, w2, b2, use_avg, use_max, act, gate, conv_w, bn_w, bn_b,
                  bn_mean, bn_var, bn_eps, batch_stats, max_first):
    passes = passes_for(x)
    ca, pooled, hidden, p, sa, xhat, stats = _empties(x, 7, acc_dtype(x))
    pstar, cstar = _empties(x, 2, torch.int32)
    if w1 is not None:
        avg, mx, pstar = passes.pool_hw(x, use_max)
        pooled = torch.stack([v for v, use in ((avg, use_avg), (mx, use_max)) if use])
        z, hidden = gate_math.mlp_forward(pooled, w1, b1, w2, b2, act)
        ca = gate_math.gate(z, gate)
    if conv_w is not None:
        p, cstar = passes.channel_pool(x, _opt(ca), max_first)
        sa, xhat, mean, var = gate_math.spatial_forward(p, conv_w, bn_w, bn_b, bn_mean, bn_var,
                                                        bn_eps, batch_stats)
        stats = torch.cat([mean, var])
    y = passes.apply_gates(x, _opt(ca), _opt(sa), residual)
    return y, ca, pooled, hidden, pstar, p, cstar, sa, xhat, stats


@gate_forward.register_fake
def _(x, residual, w1, b1, w2, b2, use_avg, use_max, act, gate, conv_w, bn_w, bn_b, bn_mean,
      bn_var, bn_eps, batch_stats, max_first):
    n, c, h, w = x.shape
    small = acc_dtype(x)
    ca, pooled, hidden, p, sa, xhat, stats = _empties(x, 7, small)
    pstar, cstar = _empties(x, 2, torch.int32)
    if w1 is not None:
        k = int(use_avg) + int(use_max)
        ca = x.new_empty(n, c, dtype=small)
        pooled = x.new_empty(k, n, c, dtype=small)
        hidden = x.new_empty(k, n, w1.shape[0], dtype=small)
        if use_max:
            pstar = x.new_empty(n, c, dtype=torch.int32)
    if conv_w is not None:
        p = x.new_empty(n, 2, h, w, dtype=small)
        cstar = x.new_empty(n, h, w, dtype=torch.int32)
        sa = x.new_empty(n, h, w, dtype=small)
        xhat = x.new_empty(n, h, w, dtype=small)
        stats = x.new_empty(2, dtype=small)
    return torch.empty_like(x), ca, pooled, hidden, pstar, p, cstar, sa, xhat, stats


@torch.library.custom_op("cbam_kernels::gate_backward", mutates_args=())
def gate_backward(gy: Tensor, x: Tensor, out: Optional[Tensor], w1: Optional[Tensor],
                  b1: Optional[Tensor], w2: Optional[Tensor], b2: Optional[Tensor], use_avg: bool,
                  use_max: bool, act: str, gate: str, conv_w: Optional[Tensor],
                  bn_w: Optional[Tensor], bn_b: Optional[Tensor], bn_eps: float,
                  batch_stats: bool, max_first: bool,
                  ca: Tensor, pooled: Tensor, hidden: Tensor, pstar: Tensor, p: Tensor,
                  cstar: Tensor, sa: Tensor, xhat: Tensor, stats: Tensor) -> List[Tensor]:
    """Fused backward. Returns [gx, gw1, gb1, gw2, gb2, gconv_w, gbn_w, gbn_b, gresidual]
    (empty if absent). ``out`` is the forward output when it was a relu(... + residual)
    epilogue: the ReLU mask comes from it, and the masked gradient is the residual's."""
    with torch.autocast(x.device.type, enabled=False):
        return _gate_backward(gy, x, out, w1, b1, w2, b2, use_avg, use_max, act, gate, conv_w,
                              bn_w, bn_b, bn_eps, batch_stats, max_first, ca, pooled, hidden,
                              pstar, p, cstar, sa, xhat, stats)


def _gate_backward(gy, x, out, w1, b1, w2, b2, use_avg, use_max, act, gate, conv_w, bn_w, bn_b,
                   bn_eps, batch_stats, max_first, ca, pooled, hidden, pstar, p, cstar, sa, xhat,
                   stats):
    passes = passes_for(x)
    grads: List[Optional[Tensor]] = [None] * 9
    if out is not None:
        gy = grads[8] = torch.ops.aten.threshold_backward(gy, out, 0)
    gp = None
    if conv_w is not None:
        gsa = passes.grad_spatial(gy, x, _opt(ca))
        gp, grads[5:8] = gate_math.spatial_backward(gsa, sa, p, xhat, stats[1:], bn_eps, conv_w,
                                                    bn_w, bn_b, batch_stats)
    ga = gm = None
    if w1 is not None:
        gca = passes.grad_channel(gy, x, _opt(sa), gp, _opt(cstar), max_first)
        gz = gca * gate_math.gate_grad_from_output(ca, gate)
        gpooled, grads[1:5] = gate_math.mlp_backward(gz, pooled, hidden, w1, b1, w2, b2, act)
        ga = gpooled[0] if use_avg else None
        gm = gpooled[-1] if use_max else None
    grads[0] = passes.grad_input(gy, x, _opt(ca), _opt(sa), gp, _opt(cstar), max_first, ga, gm,
                                 _opt(pstar))
    return [x.new_empty(0) if g is None else g for g in grads]


@gate_backward.register_fake
def _(gy, x, out, w1, b1, w2, b2, use_avg, use_max, act, gate, conv_w, bn_w, bn_b, bn_eps,
      batch_stats, max_first, ca, pooled, hidden, pstar, p, cstar, sa, xhat, stats):
    params = [w1, b1, w2, b2, conv_w, bn_w, bn_b, out]
    return [torch.empty_like(x)] + [x.new_empty(0) if t is None else torch.empty_like(t)
                                    for t in params]


_INPUTS = ("x", "residual", "w1", "b1", "w2", "b2", "use_avg", "use_max", "act", "gate",
           "conv_w", "bn_w", "bn_b", "bn_mean", "bn_var", "bn_eps", "batch_stats", "max_first")
_PARAMS = ("w1", "b1", "w2", "b2", "conv_w", "bn_w", "bn_b")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_INPUTS, inputs))
    ctx.flags = tuple(args[k] for k in ("use_avg", "use_max", "act", "gate", "bn_eps",
                                        "batch_stats", "max_first"))
    out = output[0] if args["residual"] is not None else None
    ctx.save_for_backward(args["x"], out, *(args[k] for k in _PARAMS), *output[1:])


def _backward(ctx, gy, *unused):
    x, out, w1, b1, w2, b2, conv_w, bn_w, bn_b, *saved = ctx.saved_tensors
    g = gate_backward(gy, x, out, w1, b1, w2, b2, *ctx.flags[:4], conv_w, bn_w, bn_b,
                      *ctx.flags[4:], *saved)
    gx, gw1, gb1, gw2, gb2, gconv, gbn_w, gbn_b, gres = [_opt(t) for t in g]
    return (gx, gres, gw1, gb1, gw2, gb2, None, None, None, None, gconv, gbn_w, gbn_b, None, None,
            None, None, None)


gate_forward.register_autograd(_backward, setup_context=_setup_context)


def _empties(x: Tensor, count: int, dtype: torch.dtype) -> List[Tensor]:
    """Distinct empty placeholders for the outputs of absent gates (outputs may not alias)."""
    return [x.new_empty(0, dtype=dtype) for _ in range(count)]


def _opt(t: Tensor) -> Optional[Tensor]:
    """Empty placeholder -> None."""
    return None if t.numel() == 0 and t.dim() == 1 else t
