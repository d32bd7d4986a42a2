"""The parameter gradients as Triton tasks that ride in the grad-input launch.

:func:`param_grads_task` sums the gradients of the MLP weights and biases, the conv weight and
the BatchNorm affine terms over the batch, in a fixed order; the Triton grad-input pass runs
its tasks in its first programs (one launch for both), and the CUDA backend's grad-input kernel
has the same tasks in C++ (``csrc/passes.cuh``).
"""

from typing import Optional, Tuple

import triton
import triton.language as tl
from torch import Tensor

from ..types import ParamGrads
from .common import ACT_CODES, PARTIAL_BLOCK, _activation, _batch_sum, next_pow2

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


TAIL_BLOCK_C = 16    # channels per task
TAIL_TILE = 2048     # elements of each of a task's two accumulators


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
