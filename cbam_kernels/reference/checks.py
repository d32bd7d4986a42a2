"""Argument checks shared by the reference modules (clear errors for bad constructor arguments)."""


def check_channels(name: str, channels: int) -> None:
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise ValueError(f"{name} must be a positive int, got {channels!r}")


def check_kernel_size(kernel_size: int) -> None:
    # An even kernel with symmetric padding (k - 1) // 2 (both originals) shrinks the map by one
    # pixel, and the gate then no longer broadcasts against x; reject it up front.
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"spatial kernel_size must be a positive odd int (the gate must keep the H x W "
            f"size), got {kernel_size!r}")


def reduced_width(channels: int, reduction: int, what: str) -> int:
    """``channels // reduction`` with clear errors (the official / Hu et al. rule)."""
    if not isinstance(reduction, int) or isinstance(reduction, bool) or reduction < 1:
        raise ValueError(f"{what} must be a positive int, got {reduction!r}")
    hidden = channels // reduction
    if hidden == 0:
        raise ValueError(
            f"hidden width channels // {what} = {channels} // {reduction} = 0; use at most "
            f"{channels} for {what} or more channels")
    return hidden
