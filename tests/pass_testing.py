"""Helpers shared by the pass-level tests (``test_passes.py``, ``test_extension.py``): inputs of
the six passes and the checks of their results against the specification ``passes_torch``.

Both sides of a comparison get the same (possibly low-precision) inputs and accumulate in
float32, so float32 results agree to ~1e-5 and full-size low-precision outputs to one ulp of
their dtype. Comparisons use ``equal_nan=False`` unless told, so they also fail on a NaN that the
reference does not have.
"""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # ~1 ulp
# Optional inputs of the backward passes per gate: SE has a channel gate fed by the average
# pool only, the CBAM channel gate adds the max pool; the spatial gate brings sa, gp, cstar.
GATES = {
    "se": ("ca", "ga"),
    "channel": ("ca", "ga", "gm"),
    "channel_max_only": ("ca", "gm"),
    "spatial": ("sa", "gp"),
    "cbam": ("ca", "sa", "gp", "ga", "gm"),
}


def to_layout(t, layout):
    """``t`` in channels_last for layout "cl", else contiguous (NCHW)."""
    return t.contiguous(memory_format=torch.channels_last) if layout == "cl" else t.contiguous()


def rand_full(shape, dtype, layout="nchw", seed=0):
    """A random full-size tensor (x, gy, residual) of ``dtype`` on DEVICE in ``layout``."""
    g = torch.Generator().manual_seed(seed)
    return to_layout(torch.randn(shape, generator=g).to(dtype).to(DEVICE), layout)


def rand_small(shape, names, seed=1):
    """The small optional inputs named in ``names`` (others None) for an x of ``shape``, on
    DEVICE; cstar comes with gp and pstar with gm."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    make = {
        "ca": lambda: torch.rand(n, c, generator=g),
        "sa": lambda: torch.rand(n, h, w, generator=g),
        "gp": lambda: torch.randn(n, 2, h, w, generator=g),
        "cstar": lambda: torch.randint(0, max(c, 1), (n, h, w), generator=g, dtype=torch.int32),
        "ga": lambda: torch.randn(n, c, generator=g),
        "gm": lambda: torch.randn(n, c, generator=g),
        "pstar": lambda: torch.randint(0, max(h * w, 1), (n, c), generator=g, dtype=torch.int32),
    }
    partner = {"gp": "cstar", "gm": "pstar"}
    wanted = set(names) | {partner[k] for k in names if k in partner}
    return {k: make[k]().to(DEVICE) if k in wanted else None for k in make}


def grad_channel_args(gy, x, s, max_first):
    """The arguments of ``grad_channel`` with the small inputs ``s`` of :func:`rand_small`."""
    return gy, x, s["sa"], s["gp"], s["cstar"], max_first


def grad_input_args(gy, x, s, max_first):
    """The arguments of ``grad_input`` with the small inputs ``s`` of :func:`rand_small`."""
    return (gy, x, s["ca"], s["sa"], s["gp"], s["cstar"], max_first, s["ga"], s["gm"],
            s["pstar"])


def check_small(out, expected):
    """A float32/int32 result: same shape and dtype, contiguous, equal to ~1e-5."""
    assert out.shape == expected.shape and out.dtype == expected.dtype and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def check_full(out, expected, x, equal_nan=False):
    """A full-size result: x's shape and dtype, empty_like(x) strides, equal to about one ulp."""
    assert out.dtype == x.dtype and out.shape == x.shape
    assert out.stride() == torch.empty_like(x).stride()
    torch.testing.assert_close(out, expected, rtol=RTOL[x.dtype], atol=1e-5, equal_nan=equal_nan)


def poison_free_memory():
    """On a GPU, fill the caching allocator's free blocks with NaN, so that an output element a
    kernel does not write shows up as a NaN the reference does not have (no-op on the CPU)."""
    if DEVICE == "cuda":
        poison = [torch.full((1 << 24,), float("nan"), device=DEVICE)]  # large-block pool
        poison += [torch.full((1 << 17,), float("nan"), device=DEVICE) for _ in range(16)]
        poison.clear()
