"""``python -m cbam_kernels``: print :func:`cbam_kernels.describe_backends` (what was built at
install, which backends run here, and which one each device and dtype gets)."""

from .ops.backend import describe_backends

print(describe_backends())
