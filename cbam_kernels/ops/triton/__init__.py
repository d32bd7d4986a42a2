"""The Triton backend: the full-size passes and the small kernels between them."""
