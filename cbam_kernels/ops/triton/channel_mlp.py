"""The channel gate's MLP as Triton kernels, one launch each way.

* :func:`channel_mlp`  -- one program per sample: pooled vectors, the shared MLP of both pools,
  the gate ``ca``. Saves ``pooled``, ``hidden`` and ``pstar`` for backward.
* :func:`mlp_backward` -- one program per sample: ``gz``, the hidden gradients, ``ga``/``gm``.
  The weight gradients are sums over the batch: ``param_grads`` computes them.
"""

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..types import ChannelGrads, ChannelSaved, Partials
from .common import (ACT_CODES, GATE_CODES, SMALL_TILE, WARPS, _activation, _activation_grad,
                     _gate_grad, _gate_value, _max_partials, _sum_partials, _weight_tile,
                     next_pow2)


class MlpWeight(NamedTuple):
    """A weight of the MLP, W1 (R, C) or W2 (C, R), as one (tuple) kernel argument: the tensor
    and its strides along R and along C."""

    ptr: Tensor
    s_r: int
    s_c: int


@triton.jit
def _channel_mlp_kernel(pool, S, N, C, R, w1, b1, w2, b2, out,
                        USE_AVG: tl.constexpr, USE_MAX: tl.constexpr, ACT: tl.constexpr,
                        GATE: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Sample n = program: finish the pools over H*W (the :class:`Partials` ``pool``),
    z = sum_k W2 act(W1 v_k + b1) + b2, ca = gate(z) (w1, w2: :class:`MlpWeight`). Writes the
    :class:`ChannelSaved` ``out``: pooled (K, N, C), pstar (N, C), hidden (K, N, R), ca (N, C)."""
    n = tl.program_id(0).to(tl.int64)
    K: tl.constexpr = USE_AVG + USE_MAX
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    h_avg = tl.zeros([BLOCK_R], tl.float32)
    h_max = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        w1t = _weight_tile(w1.ptr, c, r, w1.s_c, w1.s_r, c_ok[:, None] & r_ok[None, :])  # [C, R]
        if USE_AVG:
            v = _sum_partials(pool.sum, S, N * C, n * C + c, c_ok)
            tl.store(out.pooled + n * C + c, v, mask=c_ok)
            h_avg += tl.sum(w1t * v[:, None], 0)
        if USE_MAX:
            m, a = _max_partials(pool.max, pool.arg, S, N * C, n * C + c, c_ok, True)
            tl.store(out.pooled + ((K - 1) * N + n) * C + c, m, mask=c_ok)
            tl.store(out.pstar + n * C + c, a, mask=c_ok)
            h_max += tl.sum(w1t * m[:, None], 0)
    bias1 = tl.load(b1 + r, mask=r_ok, other=0.0).to(tl.float32) if HAS_B1 else 0.0
    h_avg += bias1
    h_max += bias1
    if USE_AVG:
        tl.store(out.hidden + n * R + r, h_avg, mask=r_ok)
    if USE_MAX:
        tl.store(out.hidden + ((K - 1) * N + n) * R + r, h_max, mask=r_ok)
    a_avg = _activation(h_avg, ACT)
    a_max = _activation(h_max, ACT)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        w2t = _weight_tile(w2.ptr, c, r, w2.s_c, w2.s_r, c_ok[:, None] & r_ok[None, :])  # [C, R]
        bias2 = tl.load(b2 + c, mask=c_ok, other=0.0).to(tl.float32) if HAS_B2 else 0.0
        z = tl.zeros([BLOCK_C], tl.float32)
        if USE_AVG:
            z += tl.sum(w2t * a_avg[None, :], 1) + bias2
        if USE_MAX:
            z += tl.sum(w2t * a_max[None, :], 1) + bias2
        tl.store(out.ca + n * C + c, _gate_value(z, GATE), mask=c_ok)


def _mlp_weight(w: Tensor, r_dim: int) -> MlpWeight:
    """The :class:`MlpWeight` of ``w``, whose dim ``r_dim`` runs along R (0 for W1, 1 for W2)."""
    s = w.stride()
    return MlpWeight(w, s[r_dim], s[1 - r_dim])


def _mlp_blocks(c: int, r: int) -> Tuple[int, int]:
    block_r = next_pow2(r)
    return min(next_pow2(c), max(1, SMALL_TILE // block_r)), block_r


def channel_mlp(pool: Partials, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                b2: Optional[Tensor], use_avg: bool, use_max: bool, act: str,
                gate: str) -> ChannelSaved:
    """The channel gate from the partials of ``pool_hw``: ca = gate(sum_k MLP(pool_k))."""
    _, n, c = pool.sum.shape
    r = w1.shape[0]
    k = int(use_avg) + int(use_max)
    f32 = dict(dtype=torch.float32, device=pool.sum.device)
    ca = torch.empty((n, c), **f32)
    pooled = torch.empty((k, n, c), **f32)
    hidden = torch.empty((k, n, r), **f32)
    pstar = torch.empty((n, c), dtype=torch.int32, device=pool.sum.device) if use_max else None
    block_c, block_r = _mlp_blocks(c, r)
    out = ChannelSaved(ca, pooled, hidden, pstar)
    _channel_mlp_kernel[(n,)](
        pool, pool.sum.shape[0], n, c, r, _mlp_weight(w1, 0), b1, _mlp_weight(w2, 1), b2, out,
        USE_AVG=use_avg, USE_MAX=use_max, ACT=ACT_CODES[act], GATE=GATE_CODES[gate],
        HAS_B1=b1 is not None, HAS_B2=b2 is not None, BLOCK_C=block_c, BLOCK_R=block_r,
        num_warps=WARPS)
    return out


@triton.jit
def _mlp_grad_kernel(gpart, S, N, C, R, ca, hidden, w1, w2, grads,
                     USE_AVG: tl.constexpr, USE_MAX: tl.constexpr, ACT: tl.constexpr,
                     GATE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Sample n = program: finish gca from the partials of ``grad_channel``;
    gz = gca * gate'(ca); ghidden_k = (gz W2) * act'(hidden_k); ga / gm = ghidden_k W1. Reads ca
    and hidden as :func:`channel_mlp` saved them, writes the :class:`ChannelGrads` ``grads``;
    w1, w2: :class:`MlpWeight`."""
    n = tl.program_id(0).to(tl.int64)
    K: tl.constexpr = USE_AVG + USE_MAX
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    acc = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        gca = _sum_partials(gpart, S, N * C, n * C + c, c_ok)
        gz = gca * _gate_grad(tl.load(ca + n * C + c, mask=c_ok, other=0.0), GATE)
        tl.store(grads.gz + n * C + c, gz, mask=c_ok)
        w2t = _weight_tile(w2.ptr, c, r, w2.s_c, w2.s_r, c_ok[:, None] & r_ok[None, :])  # [C, R]
        acc += tl.sum(w2t * gz[:, None], 0)
    first = tl.load(hidden + n * R + r, mask=r_ok, other=0.0)
    last = tl.load(hidden + ((K - 1) * N + n) * R + r, mask=r_ok, other=0.0)
    gh_first = acc * _activation_grad(first, ACT)
    gh_last = acc * _activation_grad(last, ACT)
    tl.store(grads.ghidden + n * R + r, gh_first, mask=r_ok)
    tl.store(grads.ghidden + ((K - 1) * N + n) * R + r, gh_last, mask=r_ok)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        w1t = _weight_tile(w1.ptr, c, r, w1.s_c, w1.s_r, c_ok[:, None] & r_ok[None, :])  # [C, R]
        if USE_AVG:
            tl.store(grads.ga + n * C + c, tl.sum(w1t * gh_first[None, :], 1), mask=c_ok)
        if USE_MAX:
            tl.store(grads.gm + n * C + c, tl.sum(w1t * gh_last[None, :], 1), mask=c_ok)


def mlp_backward(grad: Partials, saved: ChannelSaved, w1: Tensor, w2: Tensor, use_avg: bool,
                 use_max: bool, act: str, gate: str) -> ChannelGrads:
    """Backward of :func:`channel_mlp` from the partials of ``grad_channel`` (dL/dca)."""
    _, n, c = grad.sum.shape
    r = w1.shape[0]
    f32 = dict(dtype=torch.float32, device=grad.sum.device)
    gz = torch.empty((n, c), **f32)
    ghidden = torch.empty_like(saved.hidden)
    ga = torch.empty((n, c), **f32) if use_avg else None
    gm = torch.empty((n, c), **f32) if use_max else None
    block_c, block_r = _mlp_blocks(c, r)
    grads = ChannelGrads(ga, gm, gz, ghidden)
    _mlp_grad_kernel[(n,)](
        grad.sum, grad.sum.shape[0], n, c, r, saved.ca, saved.hidden, _mlp_weight(w1, 0),
        _mlp_weight(w2, 1), grads, USE_AVG=use_avg, USE_MAX=use_max, ACT=ACT_CODES[act],
        GATE=GATE_CODES[gate], BLOCK_C=block_c, BLOCK_R=block_r, num_warps=WARPS)
    return grads
