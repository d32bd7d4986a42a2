"""The CUDA C++ backend: the Python side of the passes in ``csrc/`` (``cbam_kernels._C``)."""
