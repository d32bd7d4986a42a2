"""Capturing what each CBAM or SE module of a model attends to, during a forward.

``with capture_attention(model) as maps: model(x)`` fills ``maps`` with one
:class:`AttentionMaps` per attention module (by qualified name, in the order they ran): the
channel weights ``channel`` (N, C) and the spatial map ``spatial`` (N, H, W), None where the
module has no such gate. Forward hooks do the work, and they exist only inside the ``with``
block: outside it a model runs exactly as before (nothing is checked per call).

Modules captured:

* this package's ``CBAM``, ``ChannelGate``, ``SE`` and ``SpatialGate``: the maps are computed once
  more from the module's input by the specification (``ops.torch.pipeline.forward``, the math every
  backend implements; BatchNorm running statistics are read, never updated);
* the eager originals, exactly those that :func:`cbam_kernels.conversion.recognise.identify`
  recognises by structure, convertible or not (``cbam_kernels.reference``'s modules, the official
  CBAM repository's ``CBAM`` / ``ChannelGate`` / ``SpatialGate``, timm's ``CbamModule``,
  ``ChannelAttn``, ``SpatialAttn``, ``SEModule``, ``SqueezeExcite``, ``EffectiveSEModule``, ...,
  torchvision's ``SqueezeExcitation`` and a plain SE block ``AdaptiveAvgPool2d`` +
  ``Sequential(layer, act, layer, gate)``): each map is read where the recognition's
  :class:`~cbam_kernels.conversion.recognise.MapSource` says, off the output of the gate layer
  (or, where the sigmoid is a function, of the logits' layer, or for the official channel gate
  recomputed from its MLP).

Maps are detached; they are float32 (float64 for float64 inputs) for fused modules and in the
module's dtype for the originals. A module called several times in the block keeps its latest
maps.
"""

import contextlib
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional

import torch
from torch import Tensor, nn

from .conversion.recognise import OFFICIAL_POOLED_MLP, SIGMOID_OF_OUTPUT, MapSource, identify
from .ops.torch import pipeline as pipeline_torch
from .modules.cbam import CBAM, ChannelGate, SpatialGate
from .ops.types import BatchNormState, GateConfig, GateParams
from .reference import OfficialChannelGate


class AttentionMaps(NamedTuple):
    """The gates one attention module applied (None where it has no such gate)."""

    channel: Optional[Tensor] = None  # (N, C) channel weights
    spatial: Optional[Tensor] = None  # (N, H, W) spatial map


Reader = Callable[[tuple, dict, object], Dict[str, Tensor]]


class Tap(NamedTuple):
    """Where one attention module's maps come from: the submodule (or the module itself) whose
    forward hook sees them, and how that call's (args, kwargs, output) gives them (a dictionary
    of :class:`AttentionMaps` fields)."""

    module: nn.Module
    read: Reader


@contextlib.contextmanager
def capture_attention(model: nn.Module) -> Iterator[Dict[str, AttentionMaps]]:
    """Capture the attention maps of every CBAM / SE module of ``model`` (see the module
    docstring for which) while the ``with`` block runs.

    Yields a dictionary, filled as the model runs: qualified module name ->
    :class:`AttentionMaps`. The hooks are removed on exit. Raises ValueError if ``model`` has no
    attention module that this function knows.

    Example::

        with capture_attention(model) as maps:
            model(x)
        sa = maps["layer4.1.cbam"].spatial   # (N, H, W)
    """
    found = find_attention(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no CBAM or SE module that "
                         "capture_attention knows (see cbam_kernels.attention_maps)")
    maps: Dict[str, AttentionMaps] = {}
    handles = []
    try:
        for name, taps in found.items():
            for tap in taps:
                handles.append(tap.module.register_forward_hook(_recorder(maps, name, tap.read),
                                                                with_kwargs=True))
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def find_attention(model: nn.Module) -> Dict[str, List[Tap]]:
    """The attention modules of ``model`` by qualified name, each with its taps (the outermost
    module of each: a CBAM's gates belong to the CBAM)."""
    found: Dict[str, List[Tap]] = {}
    for name, module in model.named_modules():
        if any(outer == "" or name.startswith(outer + ".") for outer in found):
            continue
        taps = _taps(module)
        if taps:
            found[name] = taps
    return found


def _taps(module: nn.Module) -> List[Tap]:
    """The taps of ``module`` if it is an attention module, else []."""
    if isinstance(module, (CBAM, ChannelGate, SpatialGate)):
        return [Tap(module, _fused_reader(module))]
    match = identify(module)
    if match is None:
        return []
    # a source that is no submodule (a gate that is a function) shows no map
    children = dict(module.named_modules(remove_duplicate=False))
    return [Tap(children[source.path], _source_reader(source, children[source.path]))
            for source in match.maps if source.path in children]


def _recorder(maps: Dict[str, AttentionMaps], name: str, read: Reader):
    def hook(module, args, kwargs, output):
        maps[name] = maps.get(name, AttentionMaps())._replace(**read(args, kwargs, output))
    return hook


def _fused_reader(module: nn.Module) -> Reader:
    """The maps of a fused module, from its input, by the specification."""
    if isinstance(module, CBAM):
        channel, spatial = module.channel_gate, module.spatial_gate
    elif isinstance(module, SpatialGate):
        channel, spatial = None, module
    else:
        channel, spatial = module, None

    def read(args, kwargs, output):
        x = args[0] if args else kwargs["x"]
        params = GateParams() if channel is None else channel.gate_params()
        cfg = GateConfig() if channel is None else channel.gate_config()
        bn = BatchNormState()
        if spatial is not None:
            params = spatial.gate_params(params)
            cfg = cfg._replace(max_first=spatial.max_first)
            bn = spatial.bn_state()._replace(num_batches_tracked=None)  # no running update
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            _, ch, sp = pipeline_torch.forward(x, None, params, cfg, bn, keep=True)
        n, _, h, w = x.shape
        return {"channel": None if ch is None else ch.ca,
                "spatial": None if sp is None else sp.sa.view(n, h, w)}
    return read


def _source_reader(source: MapSource, seen: nn.Module) -> Reader:
    """The reader of one map, seen in the forward of ``seen`` as the recognition's ``source``
    says."""
    def read(args, kwargs, output):
        if source.value == OFFICIAL_POOLED_MLP:  # the official ChannelGate: sigmoid a function
            with torch.no_grad():
                logits = sum(seen.mlp(OfficialChannelGate.pool(args[0], p))
                             for p in seen.pool_types)
            return {source.field: torch.sigmoid(logits)}
        value = output.detach()
        if source.value == SIGMOID_OF_OUTPUT:
            value = torch.sigmoid(value)
        return {source.field: value.flatten(1) if source.field == "channel" else value[:, 0]}
    return read
