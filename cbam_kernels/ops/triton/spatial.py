"""The spatial gate's k x k conv, BatchNorm and sigmoid as Triton kernels.

* :func:`spatial_gate`     -- the pooled map ``p``, the conv, BatchNorm and the gate ``sa``; one
  launch in eval, two in training (batch statistics need every conv output first; the second
  launch also updates the running statistics in-kernel, as ``nn.BatchNorm2d`` does).
* :func:`spatial_backward` -- two launches: BatchNorm's backward needs batch-wide sums of the
  first before the conv transpose of the second; the weight gradients leave as per-program
  partials, which ``param_grads`` sums.
"""

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..types import BatchNormState, Partials, SpatialGrads, SpatialSaved
from .common import (PARTIAL_BLOCK, PIXEL_BLOCK, PIXEL_SUB, WARPS, _batch_sum, _max_partials,
                     _scalar, _sum_partials, next_pow2)


class ConvWeight(NamedTuple):
    """The conv weight (1, 2, k, k) as one (tuple) kernel argument: the tensor and its strides
    along the input channel, the row and the column of a tap."""

    ptr: Tensor
    s_ch: int
    s_i: int
    s_j: int


@triton.jit
def _taps(conv, KSIZE: tl.constexpr, TBLOCK: tl.constexpr):
    """The conv's taps as vectors: offsets (dy, dx) in [-k//2, k//2], which exist, and the
    weights of both input channels (0 for padding taps) of the :class:`ConvWeight` ``conv``."""
    PAD: tl.constexpr = KSIZE // 2
    t = tl.arange(0, TBLOCK)
    t_ok = t < KSIZE * KSIZE
    i = t // KSIZE
    j = t % KSIZE
    w0 = tl.load(conv.ptr + i * conv.s_i + j * conv.s_j, mask=t_ok, other=0.0).to(tl.float32)
    w1 = tl.load(conv.ptr + conv.s_ch + i * conv.s_i + j * conv.s_j, mask=t_ok,
                 other=0.0).to(tl.float32)
    return i - PAD, j - PAD, t_ok, w0, w1


@triton.jit
def _neighbours(pix, valid, W, H, dy, dx, t_ok):
    """[pixels, taps] flat indices of (row + dy, col + dx), and which lie inside the map."""
    r = (pix // W)[:, None] + dy[None, :]
    c = (pix % W)[:, None] + dx[None, :]
    inside = valid[:, None] & t_ok[None, :] & (r >= 0) & (r < H) & (c >= 0) & (c < W)
    return r * W + c, inside


@triton.jit
def _conv_kernel(pool, S, N, H, W, hw_blocks, conv, out, stats_part, mean_ptr, var_ptr, bn_w,
                 bn_b, eps,
                 MAX_PLANE: tl.constexpr, KSIZE: tl.constexpr, BATCH_STATS: tl.constexpr,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr,
                 SUB: tl.constexpr, TBLOCK: tl.constexpr):
    """One block of BLOCK pixels of one sample, SUB pixels x all taps at a time: finish the
    channel pools (the :class:`Partials` ``pool``) into p (N, 2, HW) and cstar,
    u = conv_kxk(p) (zero padding; the :class:`ConvWeight` ``conv``), into the
    :class:`SpatialSaved` ``out``. Eval: u -> xhat and sa with the running statistics, which
    program 0 also writes to stats ([mean, var, 1 / sqrt(var + eps)]).
    Training: u (in xhat) and this block's (mean, M2) of u in stats_part[pid] (Chan et al.)."""
    pid = tl.program_id(0)
    HW = H * W
    n = (pid // hw_blocks).to(tl.int64)
    base = (pid % hw_blocks) * BLOCK
    stride_s = N * HW
    dy, dx, t_ok, w0, w1 = _taps(conv, KSIZE, TBLOCK)
    w_max = w0 if MAX_PLANE == 0 else w1
    w_mean = w1 if MAX_PLANE == 0 else w0
    count = 0.0
    mean_u = 0.0
    m2_u = 0.0
    run_mean = 0.0
    rstd = 1.0
    if not BATCH_STATS:
        run_mean = tl.load(mean_ptr).to(tl.float32)
        run_var = tl.load(var_ptr).to(tl.float32)
        rstd = 1.0 / tl.sqrt(run_var + eps)
        if pid == 0:
            tl.store(out.stats, run_mean)
            tl.store(out.stats + 1, run_var)
            tl.store(out.stats + 2, rstd)
    for sub in range(0, tl.minimum(BLOCK, HW - base), SUB):
        pix = base + sub + tl.arange(0, SUB)
        valid = pix < HW
        at = n * HW + pix
        mean = _sum_partials(pool.sum, S, stride_s, at, valid)
        mx, arg = _max_partials(pool.max, pool.arg, S, stride_s, at, valid, True)
        tl.store(out.p + (2 * n + MAX_PLANE) * HW + pix, mx, mask=valid)
        tl.store(out.p + (2 * n + 1 - MAX_PLANE) * HW + pix, mean, mask=valid)
        tl.store(out.cstar + at, arg, mask=valid)
        q, inside = _neighbours(pix, valid, W, H, dy, dx, t_ok)
        q_mean = _sum_partials(pool.sum, S, stride_s, n * HW + q, inside)
        q_max, _ = _max_partials(pool.max, pool.arg, S, stride_s, n * HW + q, inside, False)
        u = tl.sum(tl.where(inside, q_max * w_max[None, :] + q_mean * w_mean[None, :], 0.0), 1)
        if BATCH_STATS:
            tl.store(out.xhat + at, u, mask=valid)
            sub_count = tl.sum(valid.to(tl.float32), 0)
            sub_mean = tl.sum(tl.where(valid, u, 0.0), 0) / sub_count
            dev = tl.where(valid, u - sub_mean, 0.0)
            total = count + sub_count
            delta = sub_mean - mean_u
            m2_u += tl.sum(dev * dev, 0) + delta * delta * count * sub_count / total
            mean_u += delta * sub_count / total
            count = total
        else:
            xhat = (u - run_mean) * rstd
            tl.store(out.xhat + at, xhat, mask=valid)
            v = xhat * _scalar(bn_w, 1.0, HAS_W) + _scalar(bn_b, 0.0, HAS_B)
            tl.store(out.sa + at, tl.sigmoid(v), mask=valid)
    if BATCH_STATS:
        tl.store(stats_part + 2 * pid, mean_u)
        tl.store(stats_part + 2 * pid + 1, m2_u)


@triton.jit
def _block_count(p, hw_blocks, HW, BLOCK: tl.constexpr):
    """Pixels of spatial program(s) p (the last block of a sample may be short)."""
    return tl.minimum(HW - (p % hw_blocks) * BLOCK, BLOCK).to(tl.float32)


@triton.jit
def _batch_norm_kernel(stats_part, programs, hw_blocks, HW, xhat, sa_out, stats_out, bn_w, bn_b,
                       eps, run_mean, run_var, num_batches, momentum,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, UPDATE: tl.constexpr,
                       CUMULATIVE: tl.constexpr, BLOCK: tl.constexpr, PBLOCK: tl.constexpr):
    """Training BatchNorm of the conv output u (in ``xhat``, overwritten): every program folds
    the per-block (mean, M2) partials in the same fixed order into the batch mean and biased
    variance (Chan et al.), normalises its block and writes sa (sa_out). Program 0 also writes
    stats_out = [mean, var, 1 / sqrt(var + eps)] and, with UPDATE, the
    running statistics as nn.BatchNorm2d:
    num_batches += 1; r = (1 - f) r + f s with f = momentum (1 / num_batches if CUMULATIVE) and
    the unbiased variance for run_var."""
    pid = tl.program_id(0)
    total = HW * (programs // hw_blocks)
    acc = tl.zeros([PBLOCK], tl.float32)
    for p0 in range(0, programs, PBLOCK):
        p = p0 + tl.arange(0, PBLOCK)
        ok = p < programs
        acc += tl.where(ok, _block_count(p, hw_blocks, HW, BLOCK)
                        * tl.load(stats_part + 2 * p, mask=ok, other=0.0), 0.0)
    mean = tl.sum(acc, 0) / total
    acc = tl.zeros([PBLOCK], tl.float32)
    for p0 in range(0, programs, PBLOCK):
        p = p0 + tl.arange(0, PBLOCK)
        ok = p < programs
        d = tl.load(stats_part + 2 * p, mask=ok, other=0.0) - mean
        m2_p = tl.load(stats_part + 2 * p + 1, mask=ok, other=0.0)
        acc += tl.where(ok, m2_p + _block_count(p, hw_blocks, HW, BLOCK) * d * d, 0.0)
    m2 = tl.sum(acc, 0)
    var = m2 / total
    rstd = 1.0 / tl.sqrt(var + eps)
    n = (pid // hw_blocks).to(tl.int64)
    pix = (pid % hw_blocks) * BLOCK + tl.arange(0, BLOCK)
    valid = pix < HW
    xn = (tl.load(xhat + n * HW + pix, mask=valid, other=0.0) - mean) * rstd
    tl.store(xhat + n * HW + pix, xn, mask=valid)
    v = xn * _scalar(bn_w, 1.0, HAS_W) + _scalar(bn_b, 0.0, HAS_B)
    tl.store(sa_out + n * HW + pix, tl.sigmoid(v), mask=valid)
    if pid == 0:
        tl.store(stats_out, mean)
        tl.store(stats_out + 1, var)
        tl.store(stats_out + 2, rstd)
        if UPDATE:
            batches = tl.load(num_batches) + 1
            tl.store(num_batches, batches)
            f = momentum
            if CUMULATIVE:
                f = 1.0 / batches.to(tl.float32)
            rm = tl.load(run_mean).to(tl.float32)
            rv = tl.load(run_var).to(tl.float32)
            tl.store(run_mean, (f * mean + (1 - f) * rm).to(run_mean.dtype.element_ty))
            unbiased = m2 / (total - 1)
            tl.store(run_var, (f * unbiased + (1 - f) * rv).to(run_var.dtype.element_ty))


def _conv_weight(conv_w: Tensor) -> ConvWeight:
    """The :class:`ConvWeight` of ``conv_w``."""
    s = conv_w.stride()
    return ConvWeight(conv_w, s[1], s[2], s[3])


def _pixel_grid(n: int, hw: int) -> Tuple[int, int]:
    blocks = -(-hw // PIXEL_BLOCK)
    return blocks, n * blocks


def spatial_gate(pool: Partials, conv_w: Tensor, bn_w: Optional[Tensor], bn_b: Optional[Tensor],
                 bn: BatchNormState, max_first: bool, height: int, width: int) -> SpatialSaved:
    """sa = sigmoid(BN(conv(p))) from the partials of ``channel_pool``; in training the batch
    statistics are used and the running statistics updated in the second launch."""
    _, n, hw = pool.sum.shape
    device = pool.sum.device
    f32 = dict(dtype=torch.float32, device=device)
    p = torch.empty((n, 2, hw), **f32)
    cstar = torch.empty((n, hw), dtype=torch.int32, device=device)
    xhat = torch.empty((n, hw), **f32)
    sa = torch.empty((n, hw), **f32)
    hw_blocks, programs = _pixel_grid(n, hw)
    stats = torch.empty(3, **f32)
    part = torch.empty((programs, 2), **f32) if bn.batch_stats else None
    out = SpatialSaved(sa, p, cstar, xhat, stats)
    _conv_kernel[(programs,)](
        pool, pool.sum.shape[0], n, height, width, hw_blocks, _conv_weight(conv_w), out, part,
        bn.running_mean, bn.running_var, bn_w, bn_b, bn.eps, MAX_PLANE=0 if max_first else 1,
        KSIZE=conv_w.shape[-1], BATCH_STATS=bn.batch_stats, HAS_W=bn_w is not None,
        HAS_B=bn_b is not None, BLOCK=PIXEL_BLOCK, SUB=PIXEL_SUB,
        TBLOCK=next_pow2(conv_w.shape[-1] ** 2), num_warps=WARPS)
    if bn.batch_stats:
        update = bn.num_batches_tracked is not None
        _batch_norm_kernel[(programs,)](
            part, programs, hw_blocks, hw, xhat, sa, stats, bn_w, bn_b, bn.eps,
            bn.running_mean, bn.running_var, bn.num_batches_tracked,
            0.0 if bn.momentum is None else bn.momentum, HAS_W=bn_w is not None,
            HAS_B=bn_b is not None, UPDATE=update, CUMULATIVE=bn.momentum is None,
            BLOCK=PIXEL_BLOCK, PBLOCK=PARTIAL_BLOCK, num_warps=WARPS)
    return out


# ----------------------------------------------------------------------------- backward

@triton.jit
def _sa_grad_kernel(gpart, S, N, HW, hw_blocks, sa, xhat, gv_out, bn_part, BLOCK: tl.constexpr):
    """Finish gsa from the partials of ``grad_spatial``; gv = gsa * sa (1 - sa), the gradient
    of the BatchNorm output, to gv_out; this block's (sum gv, sum gv * xhat) to bn_part[pid]."""
    pid = tl.program_id(0)
    n = (pid // hw_blocks).to(tl.int64)
    pix = (pid % hw_blocks) * BLOCK + tl.arange(0, BLOCK)
    valid = pix < HW
    at = n * HW + pix
    gsa = _sum_partials(gpart, S, N * HW, at, valid)
    s = tl.load(sa + at, mask=valid, other=0.0)
    gv = gsa * s * (1 - s)
    tl.store(gv_out + at, gv, mask=valid)
    xh = tl.load(xhat + at, mask=valid, other=0.0)
    tl.store(bn_part + 2 * pid, tl.sum(gv, 0))
    tl.store(bn_part + 2 * pid + 1, tl.sum(gv * xh, 0))


@triton.jit
def _conv_grad_kernel(gv, xhat, p, stats, bn_part, programs, N, H, W, hw_blocks, conv, bn_w, gp_out,
                      wpart,
                      BATCH_STATS: tl.constexpr, HAS_W: tl.constexpr, KSIZE: tl.constexpr,
                      BLOCK: tl.constexpr, SUB: tl.constexpr, TBLOCK: tl.constexpr,
                      PBLOCK: tl.constexpr):
    """gu, the gradient of the conv output (BatchNorm's backward, through the batch statistics
    in training), then for this block gp = conv_transpose(gu) (N, 2, HW) and its share of the
    conv weight gradient, sum p(shifted) * gu per tap, to wpart[pid] (2 k k). xhat, p, stats:
    as :func:`spatial_gate` saved them; conv: :class:`ConvWeight`."""
    pid = tl.program_id(0)
    HW = H * W
    n = (pid // hw_blocks).to(tl.int64)
    base = (pid % hw_blocks) * BLOCK
    scale = _scalar(bn_w, 1.0, HAS_W) * tl.load(stats + 2)
    shift = 0.0
    tilt = 0.0
    if BATCH_STATS:
        total = (N * HW).to(tl.float32)
        shift = _batch_sum(bn_part, programs, 2, 0, PBLOCK) / total
        tilt = _batch_sum(bn_part, programs, 2, 1, PBLOCK) / total
    dy, dx, t_ok, w0, w1 = _taps(conv, KSIZE, TBLOCK)
    acc0 = tl.zeros([TBLOCK], tl.float32)
    acc1 = tl.zeros([TBLOCK], tl.float32)
    for sub in range(0, tl.minimum(BLOCK, HW - base), SUB):
        pix = base + sub + tl.arange(0, SUB)
        valid = pix < HW
        at = n * HW + pix
        gu = scale * (tl.load(gv + at, mask=valid, other=0.0) - shift
                      - tl.load(xhat + at, mask=valid, other=0.0) * tilt)
        gu = tl.where(valid, gu, 0.0)
        q, inside = _neighbours(pix, valid, W, H, -dy, -dx, t_ok)
        gu_q = scale * (tl.load(gv + n * HW + q, mask=inside, other=0.0) - shift
                        - tl.load(xhat + n * HW + q, mask=inside, other=0.0) * tilt)
        gu_q = tl.where(inside, gu_q, 0.0)
        tl.store(gp_out + 2 * n * HW + pix, tl.sum(gu_q * w0[None, :], 1), mask=valid)
        tl.store(gp_out + (2 * n + 1) * HW + pix, tl.sum(gu_q * w1[None, :], 1), mask=valid)
        q, inside = _neighbours(pix, valid, W, H, dy, dx, t_ok)
        acc0 += tl.sum(tl.load(p + 2 * n * HW + q, mask=inside, other=0.0) * gu[:, None], 0)
        acc1 += tl.sum(tl.load(p + (2 * n + 1) * HW + q, mask=inside, other=0.0)
                       * gu[:, None], 0)
    t = tl.arange(0, TBLOCK)
    TAPS: tl.constexpr = KSIZE * KSIZE
    tl.store(wpart + pid * 2 * TAPS + t, acc0, mask=t_ok)
    tl.store(wpart + pid * 2 * TAPS + TAPS + t, acc1, mask=t_ok)


def spatial_backward(grad: Partials, saved: SpatialSaved, conv_w: Tensor, bn_w: Optional[Tensor],
                     bn: BatchNormState, height: int, width: int) -> SpatialGrads:
    """Backward of :func:`spatial_gate` from the partials of ``grad_spatial`` (dL/dsa)."""
    n, hw = saved.sa.shape
    device = saved.sa.device
    hw_blocks, programs = _pixel_grid(n, hw)
    taps = conv_w.shape[-1] ** 2
    gv = torch.empty((n, hw), dtype=torch.float32, device=device)
    bn_part = torch.empty((programs, 2), dtype=torch.float32, device=device)
    gp = torch.empty((n, 2, hw), dtype=torch.float32, device=device)
    wpart = torch.empty((programs, 2 * taps), dtype=torch.float32, device=device)
    _sa_grad_kernel[(programs,)](grad.sum, grad.sum.shape[0], n, hw, hw_blocks, saved.sa,
                                 saved.xhat, gv, bn_part, BLOCK=PIXEL_BLOCK, num_warps=WARPS)
    _conv_grad_kernel[(programs,)](
        gv, saved.xhat, saved.p, saved.stats, bn_part, programs, n, height, width, hw_blocks,
        _conv_weight(conv_w), bn_w, gp, wpart, BATCH_STATS=bn.batch_stats, HAS_W=bn_w is not None,
        KSIZE=conv_w.shape[-1], BLOCK=PIXEL_BLOCK, SUB=PIXEL_SUB,
        TBLOCK=next_pow2(conv_w.shape[-1] ** 2), PBLOCK=PARTIAL_BLOCK, num_warps=WARPS)
    return SpatialGrads(gp, wpart, bn_part)
