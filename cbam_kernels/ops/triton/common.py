"""What the small Triton kernels share: block sizes, host helpers and jit helpers.

The small kernels (``channel_mlp``, ``spatial``, ``param_grads``) see only pooled vectors (N, C)
and pooled maps (N, 2, H, W). Each finishes the reduction partials it reads (S ranges combined
in range order, as ``ops/torch/passes.combine_partials`` specifies), so split reductions cost
no extra launch, and every cross-program sum runs in a fixed order (no atomics): results are
bitwise repeatable. Small tensors are float32, arg-maxes int32; parameters and BatchNorm
buffers are read and written in their own dtype and strides.
"""

import triton
import triton.language as tl

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
