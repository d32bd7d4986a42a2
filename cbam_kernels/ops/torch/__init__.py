"""The PyTorch backend: the specification of every pass and of the whole pipeline, on any device."""
