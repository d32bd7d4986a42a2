"""The small half of a fused gate as Triton kernels: ``gate_math.py``, one launch per step.

Both kernel backends run these between their full-size passes (a CUDA-backend call launches
them too), so each small step has one implementation. Every kernel finishes the reduction
partials it reads (``passes_torch.Partials``: S ranges combined in range order, as
``passes_torch.combine_partials`` specifies), so split reductions cost no extra launch, and all
cross-program sums run in a fixed order (no atomics): results are bitwise repeatable.

Forward (``gate_op`` order):

* :func:`channel_mlp`   -- one program per sample: pooled vectors, the shared MLP of both pools,
  the gate ``ca``. Saves ``pooled``, ``hidden`` and ``pstar`` for backward.
* :func:`spatial_gate`  -- the pooled map ``p``, the k x k conv, BatchNorm and the sigmoid ``sa``;
  one launch in eval, two in training (batch statistics need every conv output first; the second
  launch also updates the running statistics in-kernel, as ``nn.BatchNorm2d`` does).

Backward:

* :func:`spatial_backward` -- two launches: BatchNorm's backward needs batch-wide sums of the
  first before the conv transpose of the second; the weight gradients leave as per-program
  partials.
* :func:`mlp_backward` -- one program per sample: ``gz``, the hidden gradients, ``ga``/``gm``.
* :func:`param_grads_task` -- the parameter gradients (sums over the batch), as tasks that the
  grad-input pass of the Triton backend runs in the same launch (the CUDA backend's grad-input
  kernel has the same tasks in C++, ``csrc/passes.cuh``).

Small tensors are float32 (``hidden``, ``pooled``, ``sa`` ...), int32 arg-maxes; parameters and
BatchNorm buffers are read and written in their own dtype and strides.
"""

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gate_math import BatchNormState, ChannelSaved, GateParams, SpatialSaved
from .passes_torch import Partials

ACT_CODES = {"relu": 0, "silu": 1}
GATE_CODES = {"sigmoid": 0, "hardsigmoid": 1}
SMALL_TILE = 4096     # elements of a weight tile held by one program
PIXEL_BLOCK = 512     # pixels per program of the spatial kernels
PIXEL_SUB = 32        # pixels the conv kernels take at a time (with all k * k taps)
PARTIAL_BLOCK = 1024  # partials folded per step of a batch-wide sum
WARPS = 4


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (>= 1), on the host. (triton.next_power_of_2 and
    triton.cdiv are jit functions: about 5 µs per call from host code, on every launch.)"""
    return 1 << max(0, n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints, on the host."""
    return -(-a // b)


# ----------------------------------------------------------------------------- jit helpers

@triton.jit
def _sum_partials(ptr, S, stride_s, offs, mask):
    """Finish a sum: add the S range results at ``offs`` in range order."""
    acc = tl.load(ptr + offs, mask=mask, other=0.0)
    for s in range(1, S):
        acc += tl.load(ptr + s * stride_s + offs, mask=mask, other=0.0)
    return acc


@triton.jit
def _max_partials(max_ptr, arg_ptr, S, stride_s, offs, mask, WITH_ARG: tl.constexpr):
    """Finish a max (and with WITH_ARG its first index; else 0): ranges in order, a later one
    wins only with a larger value or the first NaN."""
    m = tl.load(max_ptr + offs, mask=mask, other=0.0)
    a = tl.load(arg_ptr + offs, mask=mask, other=0) if WITH_ARG else 0
    for s in range(1, S):
        m2 = tl.load(max_ptr + s * stride_s + offs, mask=mask, other=0.0)
        take = (m2 > m) | ((m2 != m2) & (m == m))
        m = tl.where(take, m2, m)
        if WITH_ARG:
            a = tl.where(take, tl.load(arg_ptr + s * stride_s + offs, mask=mask, other=0), a)
    return m, a


@triton.jit
def _activation(h, ACT: tl.constexpr):
    """relu (NaN stays NaN, as torch.relu) or silu."""
    if ACT == 0:
        return tl.where(h < 0, 0.0, h)
    return h * tl.sigmoid(h)


@triton.jit
def _activation_grad(h, ACT: tl.constexpr):
    if ACT == 0:
        return tl.where(h > 0, 1.0, 0.0)
    s = tl.sigmoid(h)
    return s * (1 + h * (1 - s))


@triton.jit
def _gate_value(z, GATE: tl.constexpr):
    """sigmoid, or hardsigmoid = clamp(z + 3, 0, 6) / 6 (as F.hardsigmoid)."""
    if GATE == 0:
        return tl.sigmoid(z)
    return tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0


@triton.jit
def _gate_grad(g, GATE: tl.constexpr):
    """d gate / dz through the gate's output g."""
    if GATE == 0:
        return g * (1 - g)
    return tl.where((g > 0) & (g < 1), 1.0 / 6.0, 0.0)


@triton.jit
def _weight_tile(ptr, rows, cols, s_row, s_col, mask):
    """A [len(rows), len(cols)] tile of a 2-D parameter as float32."""
    return tl.load(ptr + rows[:, None] * s_row + cols[None, :] * s_col, mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _scalar(ptr, default, PRESENT: tl.constexpr):
    """A one-element parameter or buffer as float32, ``default`` when absent."""
    if PRESENT:
        return tl.load(ptr).to(tl.float32)
    return default


@triton.jit
def _batch_sum(part_ptr, count, stride, col, BLOCK: tl.constexpr):
    """Sum of column ``col`` of ``count`` partial rows, in a fixed order."""
    acc = tl.zeros([BLOCK], tl.float32)
    for p0 in range(0, count, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + p * stride + col, mask=p < count, other=0.0)
    return tl.sum(acc, 0)


# ----------------------------------------------------------------------------- channel MLP

@triton.jit
def _channel_mlp_kernel(psum, pmax, parg, S, N, C, R,
                        w1, s1_r, s1_c, b1, w2, s2_c, s2_r, b2,
                        ca_out, pooled_out, hidden_out, pstar_out,
                        USE_AVG: tl.constexpr, USE_MAX: tl.constexpr, ACT: tl.constexpr,
                        GATE: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Sample n = program: finish the pools over H*W, z = sum_k W2 act(W1 v_k + b1) + b2,
    ca = gate(z). Writes pooled (K, N, C), pstar (N, C), hidden (K, N, R), ca (N, C)."""
    n = tl.program_id(0).to(tl.int64)
    K: tl.constexpr = USE_AVG + USE_MAX
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    h_avg = tl.zeros([BLOCK_R], tl.float32)
    h_max = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        w1t = _weight_tile(w1, c, r, s1_c, s1_r, c_ok[:, None] & r_ok[None, :])  # [C, R]
        if USE_AVG:
            v = _sum_partials(psum, S, N * C, n * C + c, c_ok)
            tl.store(pooled_out + n * C + c, v, mask=c_ok)
            h_avg += tl.sum(w1t * v[:, None], 0)
        if USE_MAX:
            m, a = _max_partials(pmax, parg, S, N * C, n * C + c, c_ok, True)
            tl.store(pooled_out + ((K - 1) * N + n) * C + c, m, mask=c_ok)
            tl.store(pstar_out + n * C + c, a, mask=c_ok)
            h_max += tl.sum(w1t * m[:, None], 0)
    bias1 = tl.load(b1 + r, mask=r_ok, other=0.0).to(tl.float32) if HAS_B1 else 0.0
    h_avg += bias1
    h_max += bias1
    if USE_AVG:
        tl.store(hidden_out + n * R + r, h_avg, mask=r_ok)
    if USE_MAX:
        tl.store(hidden_out + ((K - 1) * N + n) * R + r, h_max, mask=r_ok)
    a_avg = _activation(h_avg, ACT)
    a_max = _activation(h_max, ACT)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        w2t = _weight_tile(w2, c, r, s2_c, s2_r, c_ok[:, None] & r_ok[None, :])  # [C, R]
        bias2 = tl.load(b2 + c, mask=c_ok, other=0.0).to(tl.float32) if HAS_B2 else 0.0
        z = tl.zeros([BLOCK_C], tl.float32)
        if USE_AVG:
            z += tl.sum(w2t * a_avg[None, :], 1) + bias2
        if USE_MAX:
            z += tl.sum(w2t * a_max[None, :], 1) + bias2
        tl.store(ca_out + n * C + c, _gate_value(z, GATE), mask=c_ok)


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
    _channel_mlp_kernel[(n,)](
        pool.sum, pool.max, pool.arg, pool.sum.shape[0], n, c, r,
        w1, w1.stride(0), w1.stride(1), b1, w2, w2.stride(0), w2.stride(1), b2,
        ca, pooled, hidden, pstar, USE_AVG=use_avg, USE_MAX=use_max, ACT=ACT_CODES[act],
        GATE=GATE_CODES[gate], HAS_B1=b1 is not None, HAS_B2=b2 is not None,
        BLOCK_C=block_c, BLOCK_R=block_r, num_warps=WARPS)
    return ChannelSaved(ca, pooled, hidden, pstar)


# ----------------------------------------------------------------------------- spatial gate

@triton.jit
def _taps(conv_w, sw_ch, sw_i, sw_j, KSIZE: tl.constexpr, TBLOCK: tl.constexpr):
    """The conv's taps as vectors: offsets (dy, dx) in [-k//2, k//2], which exist, and the
    weights of both input channels (0 for padding taps)."""
    PAD: tl.constexpr = KSIZE // 2
    t = tl.arange(0, TBLOCK)
    t_ok = t < KSIZE * KSIZE
    i = t // KSIZE
    j = t % KSIZE
    w0 = tl.load(conv_w + i * sw_i + j * sw_j, mask=t_ok, other=0.0).to(tl.float32)
    w1 = tl.load(conv_w + sw_ch + i * sw_i + j * sw_j, mask=t_ok, other=0.0).to(tl.float32)
    return i - PAD, j - PAD, t_ok, w0, w1


@triton.jit
def _neighbours(pix, valid, W, H, dy, dx, t_ok):
    """[pixels, taps] flat indices of (row + dy, col + dx), and which lie inside the map."""
    r = (pix // W)[:, None] + dy[None, :]
    c = (pix % W)[:, None] + dx[None, :]
    inside = valid[:, None] & t_ok[None, :] & (r >= 0) & (r < H) & (c >= 0) & (c < W)
    return r * W + c, inside


@triton.jit
def _conv_kernel(psum, pmax, parg, S, N, H, W, hw_blocks, conv_w, sw_ch, sw_i, sw_j,
                 p_out, cstar_out, u_out, stats_part, sa_out, stats_out, mean_ptr, var_ptr, bn_w,
                 bn_b, eps,
                 MAX_PLANE: tl.constexpr, KSIZE: tl.constexpr, BATCH_STATS: tl.constexpr,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr,
                 SUB: tl.constexpr, TBLOCK: tl.constexpr):
    """One block of BLOCK pixels of one sample, SUB pixels x all taps at a time: finish the
    channel pools into p (N, 2, HW) and cstar, u = conv_kxk(p) (zero padding). Eval: u -> xhat
    (u_out) and sa with the running statistics, which program 0 also writes to stats_out
    ([mean, var, 1 / sqrt(var + eps)]).
    Training: u (u_out) and this block's (mean, M2) of u in stats_part[pid] (Chan et al.)."""
    pid = tl.program_id(0)
    HW = H * W
    n = (pid // hw_blocks).to(tl.int64)
    base = (pid % hw_blocks) * BLOCK
    stride_s = N * HW
    dy, dx, t_ok, w0, w1 = _taps(conv_w, sw_ch, sw_i, sw_j, KSIZE, TBLOCK)
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
            tl.store(stats_out, run_mean)
            tl.store(stats_out + 1, run_var)
            tl.store(stats_out + 2, rstd)
    for sub in range(0, tl.minimum(BLOCK, HW - base), SUB):
        pix = base + sub + tl.arange(0, SUB)
        valid = pix < HW
        at = n * HW + pix
        mean = _sum_partials(psum, S, stride_s, at, valid)
        mx, arg = _max_partials(pmax, parg, S, stride_s, at, valid, True)
        tl.store(p_out + (2 * n + MAX_PLANE) * HW + pix, mx, mask=valid)
        tl.store(p_out + (2 * n + 1 - MAX_PLANE) * HW + pix, mean, mask=valid)
        tl.store(cstar_out + at, arg, mask=valid)
        q, inside = _neighbours(pix, valid, W, H, dy, dx, t_ok)
        q_mean = _sum_partials(psum, S, stride_s, n * HW + q, inside)
        q_max, _ = _max_partials(pmax, parg, S, stride_s, n * HW + q, inside, False)
        u = tl.sum(tl.where(inside, q_max * w_max[None, :] + q_mean * w_mean[None, :], 0.0), 1)
        if BATCH_STATS:
            tl.store(u_out + at, u, mask=valid)
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
            tl.store(u_out + at, xhat, mask=valid)
            v = xhat * _scalar(bn_w, 1.0, HAS_W) + _scalar(bn_b, 0.0, HAS_B)
            tl.store(sa_out + at, tl.sigmoid(v), mask=valid)
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
    variance (Chan et al.), normalises its block and writes sa. Program 0 also writes
    stats_out = [mean, var, 1 / sqrt(var + eps)] and, with UPDATE, the running statistics as
    nn.BatchNorm2d:
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
    _conv_kernel[(programs,)](
        pool.sum, pool.max, pool.arg, pool.sum.shape[0], n, height, width, hw_blocks, conv_w,
        conv_w.stride(1), conv_w.stride(2), conv_w.stride(3), p, cstar, xhat, part, sa, stats,
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
    return SpatialSaved(sa, p, cstar, xhat, stats)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _sa_grad_kernel(gpart, S, N, HW, hw_blocks, sa, xhat, gv_out, bn_part,
                    BLOCK: tl.constexpr):
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
def _conv_grad_kernel(gv, xhat, p, bn_part, programs, N, H, W, hw_blocks, conv_w, sw_ch, sw_i,
                      sw_j, stats, bn_w, gp_out, wpart,
                      BATCH_STATS: tl.constexpr, HAS_W: tl.constexpr, KSIZE: tl.constexpr,
                      BLOCK: tl.constexpr, SUB: tl.constexpr, TBLOCK: tl.constexpr,
                      PBLOCK: tl.constexpr):
    """gu, the gradient of the conv output (BatchNorm's backward, through the batch statistics
    in training), then for this block gp = conv_transpose(gu) (N, 2, HW) and its share of the
    conv weight gradient, sum p(shifted) * gu per tap, to wpart[pid] (2 k k)."""
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
    dy, dx, t_ok, w0, w1 = _taps(conv_w, sw_ch, sw_i, sw_j, KSIZE, TBLOCK)
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
        acc1 += tl.sum(tl.load(p + (2 * n + 1) * HW + q, mask=inside, other=0.0) * gu[:, None], 0)
    t = tl.arange(0, TBLOCK)
    TAPS: tl.constexpr = KSIZE * KSIZE
    tl.store(wpart + pid * 2 * TAPS + t, acc0, mask=t_ok)
    tl.store(wpart + pid * 2 * TAPS + TAPS + t, acc1, mask=t_ok)


class SpatialGrads(NamedTuple):
    """The spatial gate's backward: gp for the passes, per-program partials for the tail."""

    gp: Tensor       # (N, 2, HW) gradient of the pooled map
    wpart: Tensor    # (programs, 2 k k) conv weight gradient partials
    bn_part: Tensor  # (programs, 2) sums of gv and gv * xhat


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
        gv, saved.xhat, saved.p, bn_part, programs, n, height, width, hw_blocks, conv_w,
        conv_w.stride(1), conv_w.stride(2), conv_w.stride(3), saved.stats, bn_w, gp,
        wpart, BATCH_STATS=bn.batch_stats, HAS_W=bn_w is not None,
        KSIZE=conv_w.shape[-1], BLOCK=PIXEL_BLOCK, SUB=PIXEL_SUB,
        TBLOCK=next_pow2(conv_w.shape[-1] ** 2), PBLOCK=PARTIAL_BLOCK, num_warps=WARPS)
    return SpatialGrads(gp, wpart, bn_part)


@triton.jit
def _mlp_grad_kernel(gpart, S, N, C, R, ca, hidden, w1, s1_r, s1_c, w2, s2_c, s2_r,
                     gz_out, ghidden_out, ga_out, gm_out,
                     USE_AVG: tl.constexpr, USE_MAX: tl.constexpr, ACT: tl.constexpr,
                     GATE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Sample n = program: finish gca from the partials of ``grad_channel``;
    gz = gca * gate'(ca); ghidden_k = (gz W2) * act'(hidden_k); ga / gm = ghidden_k W1."""
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
        tl.store(gz_out + n * C + c, gz, mask=c_ok)
        w2t = _weight_tile(w2, c, r, s2_c, s2_r, c_ok[:, None] & r_ok[None, :])  # [C, R]
        acc += tl.sum(w2t * gz[:, None], 0)
    first = tl.load(hidden + n * R + r, mask=r_ok, other=0.0)
    last = tl.load(hidden + ((K - 1) * N + n) * R + r, mask=r_ok, other=0.0)
    gh_first = acc * _activation_grad(first, ACT)
    gh_last = acc * _activation_grad(last, ACT)
    tl.store(ghidden_out + n * R + r, gh_first, mask=r_ok)
    tl.store(ghidden_out + ((K - 1) * N + n) * R + r, gh_last, mask=r_ok)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        w1t = _weight_tile(w1, c, r, s1_c, s1_r, c_ok[:, None] & r_ok[None, :])  # [C, R]
        if USE_AVG:
            tl.store(ga_out + n * C + c, tl.sum(w1t * gh_first[None, :], 1), mask=c_ok)
        if USE_MAX:
            tl.store(gm_out + n * C + c, tl.sum(w1t * gh_last[None, :], 1), mask=c_ok)


class ChannelGrads(NamedTuple):
    """The channel gate's backward: ga / gm for the grad-input pass, gz / ghidden for the
    tail (float32)."""

    ga: Optional[Tensor]  # (N, C) gradient of the average pool
    gm: Optional[Tensor]  # (N, C) gradient of the max pool
    gz: Tensor            # (N, C) gradient of the logits
    ghidden: Tensor       # (K, N, R) gradient of the hidden pre-activations


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
    _mlp_grad_kernel[(n,)](
        grad.sum, grad.sum.shape[0], n, c, r, saved.ca, saved.hidden, w1, w1.stride(0),
        w1.stride(1), w2, w2.stride(0), w2.stride(1), gz, ghidden, ga, gm, USE_AVG=use_avg,
        USE_MAX=use_max, ACT=ACT_CODES[act], GATE=GATE_CODES[gate], BLOCK_C=block_c,
        BLOCK_R=block_r, num_warps=WARPS)
    return ChannelGrads(ga, gm, gz, ghidden)


# ----------------------------------------------------------------------------- parameter grads

@triton.jit
def param_grads_task(task, N, C, R, gz, ghidden, pooled, hidden, gw1, sg1_r, sg1_c, gb1, gw2,
                     sg2_c, sg2_r, gb2, programs, wpart, bn_part, gconv, sgc_ch, sgc_i, sgc_j,
                     gbn_w, gbn_b,
                     CHANNEL: tl.constexpr, K: tl.constexpr, ACT: tl.constexpr,
                     HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, SPATIAL: tl.constexpr,
                     KSIZE: tl.constexpr, HAS_BN_W: tl.constexpr, HAS_BN_B: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PBLOCK: tl.constexpr,
                     TBLOCK: tl.constexpr):
    """One task of the parameter gradients (sums over the batch, in a fixed order). Task t
    takes channels [t BLOCK_C, (t + 1) BLOCK_C): gW1 = sum_kn ghidden (x) pooled,
    gW2 = sum_kn gz (x) act(hidden), gb2 = K sum_n gz; task 0 also gb1 = sum_kn ghidden and the
    spatial gate's conv and BatchNorm gradients from the per-program partials."""
    if CHANNEL:
        c = task * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            r_ok = r < R
            acc1 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
            acc2 = tl.zeros([BLOCK_C, BLOCK_R], tl.float32)
            for n in range(N):
                g = tl.load(gz + n * C + c, mask=c_ok, other=0.0)
                for k in tl.static_range(K):
                    row = k * N + n
                    gh = tl.load(ghidden + row * R + r, mask=r_ok, other=0.0)
                    pv = tl.load(pooled + row * C + c, mask=c_ok, other=0.0)
                    a = _activation(tl.load(hidden + row * R + r, mask=r_ok, other=0.0), ACT)
                    acc1 += gh[:, None] * pv[None, :]
                    acc2 += g[:, None] * a[None, :]
            ok1 = r_ok[:, None] & c_ok[None, :]
            tl.store(gw1 + r[:, None] * sg1_r + c[None, :] * sg1_c,
                     acc1.to(gw1.dtype.element_ty), mask=ok1)
            tl.store(gw2 + c[:, None] * sg2_c + r[None, :] * sg2_r,
                     acc2.to(gw2.dtype.element_ty), mask=c_ok[:, None] & r_ok[None, :])
        if HAS_B2:
            sum_gz = tl.zeros([BLOCK_C], tl.float32)
            for n in range(N):
                sum_gz += tl.load(gz + n * C + c, mask=c_ok, other=0.0)
            tl.store(gb2 + c, (sum_gz * K).to(gb2.dtype.element_ty), mask=c_ok)
        if HAS_B1:
            if task == 0:
                for r0 in range(0, R, BLOCK_R):
                    r = r0 + tl.arange(0, BLOCK_R)
                    r_ok = r < R
                    sum_gh = tl.zeros([BLOCK_R], tl.float32)
                    for row in range(K * N):
                        sum_gh += tl.load(ghidden + row * R + r, mask=r_ok, other=0.0)
                    tl.store(gb1 + r, sum_gh.to(gb1.dtype.element_ty), mask=r_ok)
    if SPATIAL:
        if task == 0:
            TAPS: tl.constexpr = KSIZE * KSIZE
            t = tl.arange(0, TBLOCK)
            t_ok = t < 2 * TAPS
            sum_w = tl.zeros([PBLOCK // TBLOCK, TBLOCK], tl.float32)
            for q0 in range(0, programs, PBLOCK // TBLOCK):
                q = q0 + tl.arange(0, PBLOCK // TBLOCK)
                sum_w += tl.load(wpart + q[:, None] * 2 * TAPS + t[None, :],
                                 mask=(q[:, None] < programs) & t_ok[None, :], other=0.0)
            ch = t // TAPS
            i = (t % TAPS) // KSIZE
            j = t % KSIZE
            tl.store(gconv + ch * sgc_ch + i * sgc_i + j * sgc_j,
                     tl.sum(sum_w, 0).to(gconv.dtype.element_ty), mask=t_ok)
            if HAS_BN_W:
                total = _batch_sum(bn_part, programs, 2, 1, PBLOCK)
                tl.store(gbn_w, total.to(gbn_w.dtype.element_ty))
            if HAS_BN_B:
                total = _batch_sum(bn_part, programs, 2, 0, PBLOCK)
                tl.store(gbn_b, total.to(gbn_b.dtype.element_ty))


class ParamGrads(NamedTuple):
    """The parameter gradients of a backward and what they are computed from.

    ``grads``: a :class:`GateParams` of them, each allocated like its parameter (strides
    included), None where the parameter is absent; the grad-input pass of either kernel backend
    fills them in its own launch, as sums over the batch in a fixed order. Channel gate (None
    without one): ``gz`` (N, C), ``ghidden`` (K, N, R), ``pooled`` (K, N, C), ``hidden``
    (K, N, R) and the MLP's activation ``act``; spatial gate (None without one): the
    per-program partials ``wpart`` (P, 2 k k) and ``bn_part`` (P, 2) of
    :func:`spatial_backward`."""

    grads: GateParams
    gz: Optional[Tensor]
    ghidden: Optional[Tensor]
    pooled: Optional[Tensor]
    hidden: Optional[Tensor]
    act: str
    wpart: Optional[Tensor]
    bn_part: Optional[Tensor]


TAIL_BLOCK_C = 16    # channels per task
TAIL_TILE = 2048     # elements of each of a task's two accumulators


def _empty_like_or_none(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else torch.empty_like(t)


def param_grads_work(params: GateParams, act: str,
                     channel: Optional[Tuple[ChannelSaved, ChannelGrads]],
                     spatial: Optional[SpatialGrads]) -> ParamGrads:
    """Allocate the parameter gradients (each like its parameter, strides included) and collect
    what they are computed from: the channel gate's saved tensors and gradients and the spatial
    gate's partials (either may be None: that gate is absent)."""
    gw1, gb1, gw2, gb2 = (_empty_like_or_none(t) if channel is not None else None for t in params[:4])
    gconv, gbn_w, gbn_b = (_empty_like_or_none(t) if spatial is not None else None for t in params[4:])
    grads = GateParams(gw1, gb1, gw2, gb2, gconv, gbn_w, gbn_b)
    gz = ghidden = pooled = hidden = wpart = bn_part = None
    if channel is not None:
        saved, channel_grads = channel
        gz, ghidden, pooled, hidden = (channel_grads.gz, channel_grads.ghidden, saved.pooled,
                                       saved.hidden)
    if spatial is not None:
        wpart, bn_part = spatial.wpart, spatial.bn_part
    return ParamGrads(grads, gz, ghidden, pooled, hidden, act, wpart, bn_part)


def param_grads_launch(work: ParamGrads) -> Tuple[int, tuple, dict]:
    """(tasks, runtime args, constexprs) of :func:`param_grads_task` for ``work``: one task
    per TAIL_BLOCK_C channels of the channel gate, or one for the spatial gate alone."""
    n = c = r = k = 0
    block_c = block_r = 1
    tasks = 1
    g = work.grads
    if work.gz is not None:
        k, n, c = work.pooled.shape
        r = work.hidden.shape[2]
        block_c = min(next_pow2(c), TAIL_BLOCK_C)
        block_r = min(next_pow2(r), max(1, TAIL_TILE // block_c))
        tasks = -(-c // block_c)
    spatial = work.wpart is not None
    programs = work.wpart.shape[0] if spatial else 0
    ksize = g.conv_w.shape[-1] if spatial else 1
    tblock = next_pow2(2 * ksize ** 2)
    args = (n, c, r, work.gz, work.ghidden, work.pooled, work.hidden, g.w1, *_strides(g.w1, 2),
            g.b1, g.w2, *_strides(g.w2, 2), g.b2, programs, work.wpart, work.bn_part,
            g.conv_w, *_strides(g.conv_w, 4)[1:], g.bn_w, g.bn_b)
    meta = dict(CHANNEL=work.gz is not None, K=max(k, 1), ACT=ACT_CODES[work.act],
                HAS_B1=g.b1 is not None, HAS_B2=g.b2 is not None, SPATIAL=spatial,
                KSIZE=ksize, HAS_BN_W=g.bn_w is not None, HAS_BN_B=g.bn_b is not None,
                T_BLOCK_C=block_c, T_BLOCK_R=block_r, TBLOCK=tblock,
                PBLOCK=max(PARTIAL_BLOCK, tblock))
    return tasks, args, meta


def _strides(t: Optional[Tensor], dims: int) -> Tuple[int, ...]:
    """The first ``dims`` strides of ``t`` (a 1x1-conv weight's first two are its matrix's)."""
    return (0,) * dims if t is None else t.stride()[:dims]
