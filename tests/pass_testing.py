"""Helpers shared by the pass-level tests (``test_passes.py``, ``test_extension.py``): inputs of
the six passes and the checks of their results against the specification ``ops.torch.passes``.

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
    """``t`` in channels_last for layout "cl", dense with H and W apart (strides of an
    (N, H, C, W) tensor: they do not merge) for "hw_apart", else contiguous (NCHW)."""
    if layout == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "hw_apart":
        return t.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    return t.contiguous()


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


def check_partials(partials, total, mx=None, arg=None, atol=1e-5):
    """Reduction partials (``ops.torch.passes.Partials``): (S, N, K) with S >= 1, float32 sums and
    max, int32 arg, contiguous, max and arg present exactly when ``mx`` is given; combined in
    range order (``combine_partials``) the sums equal ``total`` (N, K) to 1e-5 relative and
    ``atol`` absolute (a long sum wants more), the max ``mx`` and the arg ``arg`` exactly (NaN
    where the reference has NaN). Returns S."""
    from cbam_kernels.ops.torch.passes import combine_partials
    s = partials.sum
    assert s.dim() == 3 and s.shape[0] >= 1 and s.shape[1:] == total.shape
    assert s.dtype == torch.float32 and s.is_contiguous()
    assert (partials.max is None) == (mx is None) and (partials.arg is None) == (mx is None)
    got_total, got_max, got_arg = combine_partials(partials)
    torch.testing.assert_close(got_total, total, rtol=1e-5, atol=atol, equal_nan=True)
    if mx is not None:
        for t, dtype in ((partials.max, torch.float32), (partials.arg, torch.int32)):
            assert t.shape == s.shape and t.dtype == dtype and t.is_contiguous()
        torch.testing.assert_close(got_max, mx, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(got_arg, arg)
    return s.shape[0]


def relu_masked(gy, out):
    """gy through the ReLU of the epilogue relu(... + residual) whose output is ``out``: 0 where
    out <= 0, else gy (a NaN in out passes gy, as in autograd's ReLU)."""
    return torch.ops.aten.threshold_backward(gy, out, 0)


def check_masked_gy(gres, gy, out, x):
    """The masked gy that a backward reduction returns with the epilogue output ``out``: exactly
    :func:`relu_masked`, in x's dtype, laid out like ``torch.empty_like(x)``."""
    assert gres.dtype == x.dtype and gres.shape == x.shape
    assert gres.stride() == torch.empty_like(x).stride()
    assert torch.equal(gres, relu_masked(gy, out))


def odd_layout(name, shape, seed=0):
    """A float32 tensor of ``shape`` on DEVICE in the layout ``name`` (neither NCHW nor
    channels_last): "sliced" (H and W merge, H*W stride 2), "sliced_odd_w" (they do not merge),
    "h_is_1" / "w_is_1" (a dimension of size 1 with an unrelated stride), "permuted_dense"
    (dense, H and W apart), "expanded" (H*W stride 0) or "offset" (contiguous, but its data
    starts one element past an aligned address)."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 2 * c, h + 2, 2 * w + 1, generator=g).to(DEVICE)
    x = {
        "sliced": lambda: base[:, ::2, :h, :-1].contiguous()[..., ::2],
        "sliced_odd_w": lambda: base[:, :c, :h, 1::2],
        "h_is_1": lambda: base[:, :c, 1:2, :w],
        "w_is_1": lambda: base[:, :c, :h, 2:3],
        "permuted_dense": lambda: base[:, :c, :h, :w].permute(0, 2, 1, 3).contiguous()
                                                     .permute(0, 2, 1, 3),
        "expanded": lambda: base[:, :c, :1, :1].expand(shape),
        "offset": lambda: base.flatten()[1:1 + n * c * h * w].view(shape),
    }[name]()
    assert x.shape == shape
    return x
