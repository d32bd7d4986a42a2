"""Bytes each op must move through device memory, counted in passes over an x-sized tensor.

Two counts per case (the same for every provider, so GB/s compares providers honestly):

* the I/O floor: what any implementation must touch. Forward reads x and writes y (2 passes, the
  "two-pass floor"); backward reads gy and x and writes gx (3); forward+backward 5.
* the op's own minimum (docs/design.md, "Floors"): without keeping a whole sample on chip, each reduction over a
  sample needs its own pass. CBAM forward 4 (pool x over H*W, pool x*ca over C, read x + write
  y), backward 6 (gy and x for grad of sa, gy and x for grad of ca, then gy + gx: gx needs no x,
  no x needed there). SE, and either gate alone, forward 3 (one pool, then read
  x + write y), backward 4 (gy and x for the pooled gradient, then gy + gx). Forward+backward is
  their sum.

Small tensors (weights, pooled vectors, the 2 x H x W maps) are not counted.
"""

from typing import Dict

IO_PASSES = {"forward": 2, "backward": 3}
MIN_PASSES: Dict[str, Dict[str, int]] = {
    "cbam": {"forward": 4, "backward": 6},
    "se": {"forward": 3, "backward": 4},
    "channel_gate": {"forward": 3, "backward": 4},
    "spatial_gate": {"forward": 3, "backward": 4},
}


def _total(per_pass: Dict[str, int], pass_name: str) -> int:
    if pass_name == "fwd+bwd":
        return per_pass["forward"] + per_pass["backward"]
    return per_pass[pass_name]


def io_floor_passes(pass_name: str) -> int:
    """Tensor passes any implementation makes: x in, y out (and gy, x in, gx out)."""
    return _total(IO_PASSES, pass_name)


def min_passes(op: str, pass_name: str) -> int:
    """Tensor passes of the op's own minimum (docs/design.md)."""
    return _total(MIN_PASSES[op], pass_name)
