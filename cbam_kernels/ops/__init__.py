"""The fused gate as one custom op (``gate``), the choice of backend, and the backends beneath it."""
