"""The six full-size passes of CBAM and SE as Triton kernels.

Same functions and results as :mod:`cbam_kernels.ops.torch.passes` (the specification), for
float16, bfloat16 and float32 ``x`` and ``gy``, accumulating in float32, with two differences
that save launches: the reductions return their :class:`~cbam_kernels.ops.torch.passes.Partials`
unfinished (the small kernel that reads them finishes them), and the first backward reduction
applies the ResNet epilogue's ReLU mask itself. Two kernels do all the work:

* ``_reduce_kernel`` sums (and optionally takes the first arg-max of) a value over H*W or over C.
  The value is ``x * ca * gx1(gy)`` with each factor optional, which covers ``pool_hw`` (x over
  H*W), ``channel_pool`` (x * ca over C), ``grad_spatial`` (x * ca * gy over C) and
  ``grad_channel`` (x * gx1 over H*W). Each program reduces one contiguous range (of S) of the
  reduced axis for one block of the kept axis of one sample and writes its results to
  (S, N, K) partials. With ``out`` (the forward output relu(... + residual)), gy is first
  zeroed where out <= 0 (the ReLU's backward) and written to ``gres``, the residual's gradient.
* ``_gate_kernel`` writes ``gx1(src) * ca + ga / (H*W) + gm * [hw == pstar]``: ``grad_input``
  with src = gy, and ``apply_gates`` (y = x * sa * ca, or the ResNet block epilogue
  relu(x * sa * ca + residual)) with src = x and no gradient terms. ``grad_input`` may carry
  the parameter-gradient tasks of ``ops.triton.param_grads_task``, which its first
  programs run (one launch for both).

``gx1 = gy * sa + gp_mean / C + gp_max * [c == cstar]`` is the gradient reaching x1 = x * ca;
constexpr flags drop absent factors, so SE, the spatial gate alone and CBAM share the kernels.

Layouts: a 4-D tensor is addressed as (N, C, H*W) with strides (sN, sC, sHW), which covers
NCHW, channels_last and every other layout whose H and W dims merge; each kernel tile is
[BLOCK_C, BLOCK_HW], wide along the axis that is contiguous in memory. A tensor whose H and W
do not merge is copied once with ``.contiguous()`` (an output of such a layout is written to a
contiguous buffer and copied into place). Launch plans (tiles, splits, grids) depend on shapes,
strides and flags only, and are cached.
"""

import functools
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from ..types import KERNEL_DTYPES, ParamGrads, Partials, merged_hw_stride
from .common import cdiv, next_pow2
from .param_grads import param_grads_launch, param_grads_task

TILE = 4096             # elements per program tile
FAST_BLOCK_MAX = 1024   # widest block along the contiguous axis
MIXED_BLOCK_MAX = 64    # widest block along either axis when tensors disagree on the layout
TARGET_PROGRAMS = 512   # reductions split until they launch about this many programs
NO_INDEX = tl.constexpr(2**31 - 1)


class Full(NamedTuple):
    """A full-size tensor as one (tuple) kernel argument: the tensor (None when absent) and its
    (sN, sC, sHW) strides."""

    ptr: Optional[Tensor]
    s_n: int
    s_c: int
    s_hw: int


class Gates(NamedTuple):
    """The small per-sample tensors of a pass as one (tuple) kernel argument, contiguous, None
    where absent: the gates ca (N, C) and sa (N, H*W), the pooled map's gradient gp (N, 2, H*W)
    and its channel arg-max cstar (N, H*W); for grad_input also the pooled vectors' gradients
    ga, gm (N, C) and the position arg-max pstar (N, C)."""

    ca: Optional[Tensor]
    sa: Optional[Tensor]
    gp: Optional[Tensor]
    cstar: Optional[Tensor]
    ga: Optional[Tensor] = None
    gm: Optional[Tensor] = None
    pstar: Optional[Tensor] = None


class PartialsOut(NamedTuple):
    """Where a reduction writes its (S, N, K) partials, as one (tuple) kernel argument: sums,
    and with WITH_MAX the maxes and their indices (else None)."""

    sums: Tensor
    maxes: Optional[Tensor]
    idx: Optional[Tensor]


# ----------------------------------------------------------------------------- jit helpers

@triton.jit
def _tile(c_start, hw_start, C, HW, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Channel and position indices of a [BLOCK_C, BLOCK_HW] tile, and its in-bounds mask."""
    c = c_start + tl.arange(0, BLOCK_C)
    hw = hw_start + tl.arange(0, BLOCK_HW)
    return c, hw, (c[:, None] < C) & (hw[None, :] < HW)


@triton.jit
def _offsets(c, hw, s_c, s_hw):
    return c[:, None] * s_c + hw[None, :] * s_hw


@triton.jit
def _tile_ptrs(t, n, c, hw):
    """The addresses of a tile of the :class:`Full` tensor ``t`` (n is int64)."""
    return t.ptr + n * t.s_n + _offsets(c, hw, t.s_c, t.s_hw)


@triton.jit
def _load_tile(t, n, c, hw, mask):
    """A tile of the :class:`Full` tensor ``t`` as float32, zero outside ``mask``."""
    return tl.load(_tile_ptrs(t, n, c, hw), mask=mask, other=0).to(tl.float32)


@triton.jit
def _load_vec(row_ptr, idx, size):
    return tl.load(row_ptr + idx, mask=idx < size, other=0)


@triton.jit
def _grad_x1(gy, n, c, hw, C, HW, gates,
             HAS_SA: tl.constexpr, HAS_GP: tl.constexpr, MAX_PLANE: tl.constexpr):
    """gx1 = gy * sa + gp_mean / C + gp_max * [c == cstar] on a tile (sa, gp, cstar of the
    :class:`Gates` ``gates``); absent terms drop out."""
    g = gy
    if HAS_SA:
        g = g * _load_vec(gates.sa + n * HW, hw, HW)[None, :]
    if HAS_GP:
        gp_row = gates.gp + n * 2 * HW
        g = g + (_load_vec(gp_row + (1 - MAX_PLANE) * HW, hw, HW) / C)[None, :]
        is_max = c[:, None] == _load_vec(gates.cstar + n * HW, hw, HW)[None, :]
        g = g + tl.where(is_max, _load_vec(gp_row + MAX_PLANE * HW, hw, HW)[None, :], 0.0)
    return g


@triton.jit
def _max_update(v, idx, valid, best, best_idx):
    """Fold a tile into the per-lane running max: lanes scan increasing indices, take strictly
    greater values (so the first occurrence wins) and stop at their first NaN."""
    unset = best_idx == NO_INDEX
    take = valid & (best == best) & ((v > best) | (v != v) | unset)
    return tl.where(take, v, best), tl.where(take, idx, best_idx)


@triton.jit
def _max_finish(best, best_idx, AXIS: tl.constexpr):
    """Reduce per-lane (max, index) along AXIS: a NaN wins, then the max; lowest index on ties."""
    is_nan = best != best
    nan_idx = tl.min(tl.where(is_nan, best_idx, NO_INDEX), AXIS)
    row_max = tl.max(tl.where(is_nan, float("-inf"), best), AXIS)
    at_max = best == tl.expand_dims(row_max, AXIS)
    max_idx = tl.min(tl.where(at_max, best_idx, NO_INDEX), AXIS)
    has_nan = nan_idx != NO_INDEX
    return tl.where(has_nan, float("nan"), row_max), tl.where(has_nan, nan_idx, max_idx)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _reduce_kernel(x, gy, out, gres, gates, partials, N, C, HW, divisor, kept_blocks, splits,
                   chunk, OVER_C: tl.constexpr, WITH_MAX: tl.constexpr, HAS_CA: tl.constexpr,
                   HAS_GY: tl.constexpr, HAS_OUT: tl.constexpr, HAS_SA: tl.constexpr,
                   HAS_GP: tl.constexpr, MAX_PLANE: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_HW: tl.constexpr):
    """Partials over the range [split * chunk, (split + 1) * chunk) of the reduced axis (C when
    OVER_C, else H*W) of v = x * ca * gx1(g): sum / divisor, and with WITH_MAX the max of v and
    its first index. g = gy, or with HAS_OUT gy zeroed where out <= 0 (and written to gres).
    x, gy, out, gres: :class:`Full` (None where the flags say absent); ca, sa, gp, cstar: of
    the :class:`Gates` ``gates``; the results go to the :class:`PartialsOut` ``partials``.
    ``chunk`` is a multiple of the reduced axis' block. Grid: N * kept_blocks * splits
    programs; partials are (splits, N, K) with K the kept axis' length."""
    pid = tl.program_id(0)
    split = pid % splits
    block = (pid // splits) % kept_blocks
    n = (pid // (splits * kept_blocks)).to(tl.int64)
    start = split * chunk
    end = tl.minimum(start + chunk, C if OVER_C else HW)
    total = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    best = tl.full([BLOCK_C, BLOCK_HW], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK_C, BLOCK_HW], NO_INDEX, tl.int32)
    for pos in range(start, end, BLOCK_C if OVER_C else BLOCK_HW):
        if OVER_C:
            c, hw, mask = _tile(pos, block * BLOCK_HW, C, HW, BLOCK_C, BLOCK_HW)
        else:
            c, hw, mask = _tile(block * BLOCK_C, pos, C, HW, BLOCK_C, BLOCK_HW)
        v = _load_tile(x, n, c, hw, mask)
        if HAS_CA:
            v = v * _load_vec(gates.ca + n * C, c, C)[:, None]
        if HAS_GY:
            g = _load_tile(gy, n, c, hw, mask)
            if HAS_OUT:
                shut = _load_tile(out, n, c, hw, mask) <= 0
                g = tl.where(shut, 0.0, g)  # a NaN output passes g, as threshold_backward
                tl.store(_tile_ptrs(gres, n, c, hw), g.to(gres.ptr.dtype.element_ty), mask=mask)
            v = v * _grad_x1(g, n, c, hw, C, HW, gates, HAS_SA, HAS_GP, MAX_PLANE)
        total += v
        if WITH_MAX:
            best, best_idx = _max_update(v, c[:, None] if OVER_C else hw[None, :], mask,
                                         best, best_idx)
    if OVER_C:
        kept = block * BLOCK_HW + tl.arange(0, BLOCK_HW)
        K = HW
    else:
        kept = block * BLOCK_C + tl.arange(0, BLOCK_C)
        K = C
    at = (split * N + n) * K + kept
    AXIS: tl.constexpr = 0 if OVER_C else 1
    tl.store(partials.sums + at, tl.sum(total, AXIS) / divisor, mask=kept < K)
    if WITH_MAX:
        row_max, row_idx = _max_finish(best, best_idx, AXIS)
        tl.store(partials.maxes + at, row_max, mask=kept < K)
        tl.store(partials.idx + at, row_idx, mask=kept < K)


@triton.jit
def _gate_kernel(src, res, out, gates, C, HW, c_blocks, hw_blocks, tail,
                 HAS_CA: tl.constexpr, HAS_SA: tl.constexpr, HAS_GP: tl.constexpr,
                 MAX_PLANE: tl.constexpr, HAS_GA: tl.constexpr, HAS_GM: tl.constexpr,
                 HAS_RES: tl.constexpr, HAS_TAIL: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_HW: tl.constexpr):
    """With HAS_TAIL, programs [0, tail.tasks) run the parameter-gradient tasks of the
    :class:`~.param_grads.ParamGradsTail` ``tail`` (else None). The others, one tile each
    (N * c_blocks * hw_blocks): out = gx1(src) * ca + ga / HW + gm * [hw == pstar], then
    relu(out + res) with HAS_RES; src, res (None without HAS_RES), out: :class:`Full`, the
    rest of :class:`Gates`."""
    pid = tl.program_id(0)
    tasks = tail.tasks if HAS_TAIL else 0
    if pid < tasks:
        if HAS_TAIL:
            param_grads_task(pid, tail)
    else:
        pid -= tasks
        hw_block = pid % hw_blocks
        c_block = (pid // hw_blocks) % c_blocks
        n = (pid // (hw_blocks * c_blocks)).to(tl.int64)
        c, hw, mask = _tile(c_block * BLOCK_C, hw_block * BLOCK_HW, C, HW, BLOCK_C, BLOCK_HW)
        g = _grad_x1(_load_tile(src, n, c, hw, mask), n, c, hw, C, HW, gates, HAS_SA, HAS_GP,
                     MAX_PLANE)
        if HAS_CA:
            g = g * _load_vec(gates.ca + n * C, c, C)[:, None]
        if HAS_GA:
            g = g + (_load_vec(gates.ga + n * C, c, C) / HW)[:, None]
        if HAS_GM:
            is_max = hw[None, :] == _load_vec(gates.pstar + n * C, c, C)[:, None]
            g = g + tl.where(is_max, _load_vec(gates.gm + n * C, c, C)[:, None], 0.0)
        if HAS_RES:
            g = g + _load_tile(res, n, c, hw, mask)
            g = tl.where(g < 0, 0.0, g)  # relu that keeps NaN, as torch.relu
        tl.store(_tile_ptrs(out, n, c, hw), g.to(out.ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launch plans

def _hw_stride(t: Tensor) -> Optional[int]:
    """Stride of t's merged H*W axis, or None when its H and W dims do not merge."""
    return merged_hw_stride(t.shape, t.stride())


def _as_full(t: Tensor) -> Full:
    """The :class:`Full` of ``t`` (copied to contiguous if its H and W do not merge)."""
    assert t.dtype in KERNEL_DTYPES, f"Triton passes take float16/bfloat16/float32, got {t.dtype}"
    strides = _nc_hw_strides(t.shape, t.stride())
    if strides is None:
        t = t.contiguous()
        strides = _nc_hw_strides(t.shape, t.stride())
    return Full._make((t, *strides))  # _make: tuple.__new__ directly (this runs per pass)


def _strides(t: Optional[Full], like: Full) -> Tuple[int, int, int]:
    """The strides of ``t``, or of ``like`` where ``t`` is absent (what launch plans key on;
    the kernel gets None for an absent tensor, which its constexpr flags never read)."""
    return like[1:] if t is None else t[1:]


@functools.lru_cache(maxsize=4096)
def _nc_hw_strides(shape: Tuple[int, ...], strides: Tuple[int, ...]
                   ) -> Optional[Tuple[int, int, int]]:
    """(sN, sC, sHW) of a tensor of this shape and these strides, None when H and W do not
    merge."""
    s_hw = merged_hw_stride(shape, strides)
    if s_hw is None:
        return None
    _, c, h, w = shape
    assert (c - 1) * strides[1] + (h * w - 1) * s_hw < 2**31, \
        "one sample spans 2**31 elements or more; int32 offsets would overflow"
    return strides[0], strides[1], s_hw


def _full_output(like: Tensor) -> Tuple[Tensor, Tensor]:
    """A full-size output laid out like ``torch.empty_like(like)``, and the tensor a kernel
    writes: the output itself, or a contiguous buffer when its H and W do not merge."""
    out = torch.empty_like(like)
    if _hw_stride(out) is not None:
        return out, out
    return out, torch.empty(like.shape, dtype=like.dtype, device=like.device)


def _finish(out: Optional[Tensor], dst: Optional[Tensor]) -> Optional[Tensor]:
    """``out`` once the kernel has written ``dst`` (copied into place if it is a buffer)."""
    if dst is not out:
        out.copy_(dst)
    return out


def _c_fastest(strides: Tuple[int, int, int]) -> bool:
    return strides[1] == 1 and strides[2] != 1


@functools.lru_cache(maxsize=4096)
def _blocks(c: int, hw: int, *strides: Tuple[int, int, int]) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_HW): about TILE elements, wide along the axis that the tensors with these
    strides store contiguously (channels for channels_last, H*W otherwise); at most
    MIXED_BLOCK_MAX wide on either axis when the tensors disagree."""
    c_fastest = [_c_fastest(st) for st in strides]
    fast_max = FAST_BLOCK_MAX if len(set(c_fastest)) == 1 else MIXED_BLOCK_MAX
    fast, slow = (c, hw) if c_fastest[0] else (hw, c)
    block_fast = min(next_pow2(fast), fast_max)
    block_slow = min(next_pow2(slow), TILE // block_fast)
    return (block_fast, block_slow) if c_fastest[0] else (block_slow, block_fast)


def _num_warps(block_c: int, block_hw: int) -> int:
    return max(1, min(8, block_c * block_hw // 512))


@functools.lru_cache(maxsize=4096)
def _reduce_plan(n: int, c: int, hw: int, over_c: bool, split: Optional[int],
                 *strides: Tuple[int, int, int]) -> Tuple[int, int, int, int, int]:
    """(block_c, block_hw, kept_blocks, splits, chunk) of a reduction: ``split`` ranges of the
    reduced axis if given, else enough for about TARGET_PROGRAMS programs (at most one range
    per block of the reduced axis). The shape alone decides, so results are the same on every
    GPU."""
    block_c, block_hw = _blocks(c, hw, *strides)
    length, kept = (c, hw) if over_c else (hw, c)
    step, kept_block = (block_c, block_hw) if over_c else (block_hw, block_c)
    kept_blocks = cdiv(kept, kept_block)
    if split is None:
        split = min(cdiv(TARGET_PROGRAMS, n * kept_blocks), cdiv(length, step))
    split = max(1, min(split, length))
    step = min(step, next_pow2(cdiv(length, split)))
    chunk = cdiv(cdiv(length, split), step) * step
    splits = cdiv(length, chunk)
    block_c, block_hw = (step, kept_block) if over_c else (kept_block, step)
    return block_c, block_hw, kept_blocks, splits, chunk


def _small(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _reduce(x: Tensor, over_c: bool, with_max: bool, divisor: int, split: Optional[int],
            gy: Optional[Tensor] = None, out: Optional[Tensor] = None,
            ca: Optional[Tensor] = None, sa: Optional[Tensor] = None,
            gp: Optional[Tensor] = None, cstar: Optional[Tensor] = None,
            max_first: bool = True) -> Tuple[Partials, Optional[Tensor]]:
    """Launch ``_reduce_kernel``: the partials (S, N, K) with K = H*W when ``over_c`` else C,
    and with ``out`` the masked gy (laid out like ``torch.empty_like(x)``), else None."""
    n, c, h, w = x.shape
    assert gy is None or gy.shape == x.shape, "gy and x differ in shape"
    assert out is None or out.shape == x.shape, "out and x differ in shape"
    gres = dst = None
    if out is not None:
        gres, dst = _full_output(x)
    xf = _as_full(x)
    gy = None if gy is None else _as_full(gy)
    out, dst = (None, None) if out is None else (_as_full(out), _as_full(dst))
    length, kept = (c, h * w) if over_c else (h * w, c)
    if x.numel() == 0:  # no launch: an empty sum is 0 and an empty mean NaN, as in torch
        if with_max and n * kept > 0:
            raise RuntimeError("cannot take the max over a zero-size axis")
        sums = torch.zeros((1, n, kept), dtype=torch.float32, device=x.device) / divisor
        maxes = (sums.clone(), sums.int()) if with_max else (None, None)
        return Partials(sums, *maxes), gres
    block_c, block_hw, kept_blocks, splits, chunk = _reduce_plan(
        n, c, h * w, over_c, split, xf[1:], _strides(gy, xf), _strides(out, xf),
        _strides(dst, xf))
    sums = torch.empty((splits, n, kept), dtype=torch.float32, device=x.device)
    maxes = torch.empty_like(sums) if with_max else None
    idx = torch.empty_like(sums, dtype=torch.int32) if with_max else None
    _reduce_kernel[(n * kept_blocks * splits,)](
        xf, gy, out, dst, Gates(_small(ca), _small(sa), _small(gp), _small(cstar)),
        PartialsOut(sums, maxes, idx), n, c, h * w, divisor, kept_blocks, splits, chunk,
        OVER_C=over_c, WITH_MAX=with_max, HAS_CA=ca is not None, HAS_GY=gy is not None,
        HAS_OUT=out is not None, HAS_SA=sa is not None, HAS_GP=gp is not None,
        MAX_PLANE=0 if max_first else 1, BLOCK_C=block_c, BLOCK_HW=block_hw,
        num_warps=_num_warps(block_c, block_hw))
    return Partials(sums, maxes, idx), _finish(gres, None if dst is None else dst.ptr)


# ----------------------------------------------------------------------------- the passes

def pool_hw(x: Tensor, with_max: bool, *, split: Optional[int] = None) -> Partials:
    """Global pooling over H*W as partials (S, N, C): mean, and with ``with_max`` the max and
    its first index (None otherwise). ``split`` sets the number of H*W ranges S."""
    h, w = x.shape[2:]
    return _reduce(x, over_c=False, with_max=with_max, divisor=h * w, split=split)[0]


def channel_pool(x: Tensor, ca: Optional[Tensor], *, split: Optional[int] = None) -> Partials:
    """Pooling of x1 = x * ca over channels as partials (S, N, H*W): mean, max and the first
    channel arg-max. ``split`` sets the number of channel ranges S."""
    return _reduce(x, over_c=True, with_max=True, divisor=x.shape[1], split=split, ca=ca)[0]


def apply_gates(x: Tensor, ca: Optional[Tensor], sa: Optional[Tensor],
                residual: Optional[Tensor] = None) -> Tensor:
    """y = x * ca[n, c] * sa[n, h, w] in x's dtype, laid out like ``torch.empty_like(x)``;
    with ``residual`` (any layout) the block epilogue relu(x * ca * sa + residual)."""
    return _launch_gate(x, x, ca, sa, None, None, True, None, None, None, residual)


def grad_spatial(gy: Tensor, x: Tensor, ca: Optional[Tensor], out: Optional[Tensor] = None, *,
                 split: Optional[int] = None) -> Tuple[Partials, Optional[Tensor]]:
    """Partials (S, N, H*W) of gsa = sum_c g * x * ca, with g = gy, or with ``out`` gy zeroed
    where out <= 0 (``threshold_backward(gy, out, 0)``); that g (None without ``out``).
    ``split``: channel ranges."""
    return _reduce(x, over_c=True, with_max=False, divisor=1, split=split, gy=gy, out=out, ca=ca)


def grad_channel(gy: Tensor, x: Tensor, sa: Optional[Tensor], gp: Optional[Tensor],
                 cstar: Optional[Tensor], max_first: bool, out: Optional[Tensor] = None, *,
                 split: Optional[int] = None) -> Tuple[Partials, Optional[Tensor]]:
    """Partials (S, N, C) of gca = sum_hw gx1 * x, with
    gx1 = g * sa + gp_mean / C + gp_max * [c == cstar] and g as in :func:`grad_spatial`; the
    masked gy (None without ``out``). ``split``: H*W ranges."""
    assert gp is None or cstar is not None, "gp needs cstar"
    return _reduce(x, over_c=False, with_max=False, divisor=1, split=split, gy=gy, out=out, sa=sa,
                   gp=gp, cstar=cstar, max_first=max_first)


def grad_input(gy: Tensor, x: Tensor, ca: Optional[Tensor], sa: Optional[Tensor],
               gp: Optional[Tensor], cstar: Optional[Tensor], max_first: bool,
               ga: Optional[Tensor], gm: Optional[Tensor], pstar: Optional[Tensor], *,
               tail: Optional[ParamGrads] = None) -> Tensor:
    """gx = gx1 * ca + ga / (H*W) + gm * [hw == pstar] in x's dtype, laid out like
    ``torch.empty_like(x)``; gx1 as in :func:`grad_channel`. With ``tail``, the same launch also
    fills the parameter gradients ``tail.grads``."""
    assert gp is None or cstar is not None, "gp needs cstar"
    assert gm is None or pstar is not None, "gm needs pstar"
    return _launch_gate(gy, x, ca, sa, gp, cstar, max_first, ga, gm, pstar, tail=tail)


def _launch_gate(src: Tensor, like: Tensor, ca: Optional[Tensor], sa: Optional[Tensor],
          gp: Optional[Tensor], cstar: Optional[Tensor], max_first: bool, ga: Optional[Tensor],
          gm: Optional[Tensor], pstar: Optional[Tensor],
          residual: Optional[Tensor] = None, tail: Optional[ParamGrads] = None) -> Tensor:
    """Launch ``_gate_kernel`` on ``src`` (plus ``residual``, then relu, when given); the result
    has the dtype and layout of ``torch.empty_like(like)`` (written via a contiguous buffer if
    its H and W do not merge)."""
    assert src.shape == like.shape, "gy and x differ in shape"
    assert residual is None or residual.shape == like.shape, "residual and x differ in shape"
    out, dst = _full_output(like)
    if out.numel() == 0:
        assert tail is None, "no parameter gradients from an empty batch"
        return out
    tail_args = None if tail is None else param_grads_launch(tail)
    n, c, h, w = like.shape
    src, dst = _as_full(src), _as_full(dst)
    res = None if residual is None else _as_full(residual)
    block_c, block_hw = _blocks(c, h * w, dst[1:], src[1:], _strides(res, src))
    c_blocks, hw_blocks = cdiv(c, block_c), cdiv(h * w, block_hw)
    tasks = 0 if tail_args is None else tail_args.tasks
    _gate_kernel[(tasks + n * c_blocks * hw_blocks,)](
        src, res, dst, Gates(_small(ca), _small(sa), _small(gp), _small(cstar), _small(ga),
                             _small(gm), _small(pstar)),
        c, h * w, c_blocks, hw_blocks, tail_args, HAS_CA=ca is not None, HAS_SA=sa is not None,
        HAS_GP=gp is not None, MAX_PLANE=0 if max_first else 1, HAS_GA=ga is not None,
        HAS_GM=gm is not None, HAS_RES=residual is not None, HAS_TAIL=tail is not None,
        BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=_num_warps(block_c, block_hw))
    return _finish(out, dst.ptr)


#: Whether these kernels run in Triton's interpreter (TRITON_INTERPRET=1 when first imported).
INTERPRETED = isinstance(_gate_kernel, InterpretedFunction)
