"""The parameter gradients as Triton tasks that ride in the grad-input launch.

:func:`param_grads_task` sums the gradients of the MLP weights and biases, the conv weight and
the BatchNorm affine terms over the batch, in a fixed order; the Triton grad-input pass runs
its tasks in its first programs (one launch for both), and the CUDA backend's grad-input kernel
has the same tasks in C++ (``csrc/passes.cuh``).
"""

import functools
from typing import NamedTuple, Optional, Tuple

import triton
import triton.language as tl
from torch import Tensor

from ..types import ParamGrads
from .common import ACT_CODES, PARTIAL_BLOCK, _activation, _batch_sum, next_pow2


class ParamGradsTail(NamedTuple):
    """What :func:`param_grads_task` takes, as one (tuple) kernel argument: the number of
    tasks, the channel gate's sizes and tensors (N, C, R; gz, ghidden, pooled, hidden), the
    gradients with their strides (gW1, gb1, gW2, gb2), the spatial gate's partials (P programs)
    and gradients (conv weight, BatchNorm affine terms; None where absent), and the constexprs
    (``T_``: the task's blocks)."""

    tasks: int
    n: int
    c: int
    r: int
    gz: Optional[Tensor]
    ghidden: Optional[Tensor]
    pooled: Optional[Tensor]
    hidden: Optional[Tensor]
    gw1: Optional[Tensor]
    sg1_r: int
    sg1_c: int
    gb1: Optional[Tensor]
    gw2: Optional[Tensor]
    sg2_c: int
    sg2_r: int
    gb2: Optional[Tensor]
    programs: int
    wpart: Optional[Tensor]
    bn_part: Optional[Tensor]
    gconv: Optional[Tensor]
    sgc_ch: int
    sgc_i: int
    sgc_j: int
    gbn_w: Optional[Tensor]
    gbn_b: Optional[Tensor]
    CHANNEL: tl.constexpr
    K: tl.constexpr
    ACT: tl.constexpr
    HAS_B1: tl.constexpr
    HAS_B2: tl.constexpr
    SPATIAL: tl.constexpr
    KSIZE: tl.constexpr
    HAS_BN_W: tl.constexpr
    HAS_BN_B: tl.constexpr
    T_BLOCK_C: tl.constexpr
    T_BLOCK_R: tl.constexpr
    PBLOCK: tl.constexpr
    TBLOCK: tl.constexpr


@triton.jit
def param_grads_task(task, tail):
    """One task of the parameter gradients (sums over the batch, in a fixed order); ``tail``
    is a :class:`ParamGradsTail`. Task t takes channels [t T_BLOCK_C, (t + 1) T_BLOCK_C):
    gW1 = sum_kn ghidden (x) pooled, gW2 = sum_kn gz (x) act(hidden), gb2 = K sum_n gz; task 0
    also gb1 = sum_kn ghidden and the spatial gate's conv and BatchNorm gradients from the
    per-program partials."""
    if tail.CHANNEL:
        c = task * tail.T_BLOCK_C + tl.arange(0, tail.T_BLOCK_C)
        c_ok = c < tail.c
        for r0 in range(0, tail.r, tail.T_BLOCK_R):
            r = r0 + tl.arange(0, tail.T_BLOCK_R)
            r_ok = r < tail.r
            acc1 = tl.zeros([tail.T_BLOCK_R, tail.T_BLOCK_C], tl.float32)
            acc2 = tl.zeros([tail.T_BLOCK_C, tail.T_BLOCK_R], tl.float32)
            for n in range(tail.n):
                g = tl.load(tail.gz + n * tail.c + c, mask=c_ok, other=0.0)
                for k in tl.static_range(tail.K):
                    row = k * tail.n + n
                    gh = tl.load(tail.ghidden + row * tail.r + r, mask=r_ok, other=0.0)
                    pv = tl.load(tail.pooled + row * tail.c + c, mask=c_ok, other=0.0)
                    h = tl.load(tail.hidden + row * tail.r + r, mask=r_ok, other=0.0)
                    a = _activation(h, tail.ACT)
                    acc1 += gh[:, None] * pv[None, :]
                    acc2 += g[:, None] * a[None, :]
            ok1 = r_ok[:, None] & c_ok[None, :]
            tl.store(tail.gw1 + r[:, None] * tail.sg1_r + c[None, :] * tail.sg1_c,
                     acc1.to(tail.gw1.dtype.element_ty), mask=ok1)
            tl.store(tail.gw2 + c[:, None] * tail.sg2_c + r[None, :] * tail.sg2_r,
                     acc2.to(tail.gw2.dtype.element_ty), mask=c_ok[:, None] & r_ok[None, :])
        if tail.HAS_B2:
            sum_gz = tl.zeros([tail.T_BLOCK_C], tl.float32)
            for n in range(tail.n):
                sum_gz += tl.load(tail.gz + n * tail.c + c, mask=c_ok, other=0.0)
            tl.store(tail.gb2 + c, (sum_gz * tail.K).to(tail.gb2.dtype.element_ty), mask=c_ok)
        if tail.HAS_B1:
            if task == 0:
                for r0 in range(0, tail.r, tail.T_BLOCK_R):
                    r = r0 + tl.arange(0, tail.T_BLOCK_R)
                    r_ok = r < tail.r
                    sum_gh = tl.zeros([tail.T_BLOCK_R], tl.float32)
                    for k in tl.static_range(tail.K):  # rows k * N + n, in order
                        for n in range(tail.n):
                            row = k * tail.n + n
                            sum_gh += tl.load(tail.ghidden + row * tail.r + r, mask=r_ok,
                                              other=0.0)
                    tl.store(tail.gb1 + r, sum_gh.to(tail.gb1.dtype.element_ty), mask=r_ok)
    if tail.SPATIAL:
        if task == 0:
            TAPS: tl.constexpr = tail.KSIZE * tail.KSIZE
            t = tl.arange(0, tail.TBLOCK)
            t_ok = t < 2 * TAPS
            sum_w = tl.zeros([tail.PBLOCK // tail.TBLOCK, tail.TBLOCK], tl.float32)
            for q0 in range(0, tail.programs, tail.PBLOCK // tail.TBLOCK):
                q = q0 + tl.arange(0, tail.PBLOCK // tail.TBLOCK)
                sum_w += tl.load(tail.wpart + q[:, None] * 2 * TAPS + t[None, :],
                                 mask=(q[:, None] < tail.programs) & t_ok[None, :], other=0.0)
            ch = t // TAPS
            i = (t % TAPS) // tail.KSIZE
            j = t % tail.KSIZE
            tl.store(tail.gconv + ch * tail.sgc_ch + i * tail.sgc_i + j * tail.sgc_j,
                     tl.sum(sum_w, 0).to(tail.gconv.dtype.element_ty), mask=t_ok)
            if tail.HAS_BN_W:
                total = _batch_sum(tail.bn_part, tail.programs, 2, 1, tail.PBLOCK)
                tl.store(tail.gbn_w, total.to(tail.gbn_w.dtype.element_ty))
            if tail.HAS_BN_B:
                total = _batch_sum(tail.bn_part, tail.programs, 2, 0, tail.PBLOCK)
                tl.store(tail.gbn_b, total.to(tail.gbn_b.dtype.element_ty))


TAIL_BLOCK_C = 16    # channels per task
TAIL_TILE = 2048     # elements of each of a task's two accumulators


def param_grads_launch(work: ParamGrads) -> ParamGradsTail:
    """The :class:`ParamGradsTail` of ``work``: one task per TAIL_BLOCK_C channels of the
    channel gate, or one for the spatial gate alone."""
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
    return ParamGradsTail(
        tasks, n, c, r, work.gz, work.ghidden, work.pooled, work.hidden, g.w1,
        *_strides(g.w1, 2), g.b1, g.w2, *_strides(g.w2, 2), g.b2, programs, work.wpart,
        work.bn_part, g.conv_w, *_strides(g.conv_w, 4)[1:], g.bn_w, g.bn_b,
        *_constexprs(work.gz is not None, max(k, 1), ACT_CODES[work.act], g.b1 is not None,
                     g.b2 is not None, spatial, ksize, g.bn_w is not None, g.bn_b is not None,
                     block_c, block_r, max(PARTIAL_BLOCK, tblock), tblock))


@functools.lru_cache(maxsize=256)
def _constexprs(*values) -> tuple:
    """``values`` as Triton constexprs (built once per specialisation)."""
    return tuple(map(tl.constexpr, values))


def _strides(t: Optional[Tensor], dims: int) -> Tuple[int, ...]:
    """The first ``dims`` strides of ``t`` (a 1x1-conv weight's first two are its matrix's)."""
    return (0,) * dims if t is None else t.stride()[:dims]
