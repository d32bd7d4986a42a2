"""Loading checkpoints saved by the official CBAM repository (or any DataParallel run)."""

import os
from typing import Mapping, Union

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present


def load_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping],
                    strict: bool = True):
    """Load ``checkpoint`` into ``model``; returns ``load_state_dict``'s missing/unexpected keys.

    ``checkpoint`` is a path (read with ``torch.load(weights_only=True)`` onto the CPU) or an
    already loaded object: either a state_dict or a dict holding one under ``"state_dict"`` (as
    the official repository saves it, next to ``epoch``, ``arch``, ``best_prec1`` and
    ``optimizer``). A ``module.`` prefix (DataParallel) is removed.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = dict(checkpoint.get("state_dict", checkpoint))
    consume_prefix_in_state_dict_if_present(state, "module.")
    return model.load_state_dict(state, strict=strict)
