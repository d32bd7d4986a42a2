"""What the suite runs: the axes of a benchmark case, their presets, and how options select them.

Each axis has a default per device and a wider value under ``--bench-full``; a pytest option or
its environment variable (``--bench-dtypes`` / ``CBAM_BENCH_DTYPES``; the option wins) replaces
it. conftest.py documents the options.
"""

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

Shape = Tuple[int, int, int]

PASSES = ("forward", "backward", "fwd+bwd")
PROVIDERS = ("eager", "compile", "triton", "cuda", "torch", "torch+compile")
#: Providers that run the eager reference modules; the others run ours on that backend.
BASELINES = ("eager", "compile")
#: Providers timed under ``torch.compile``: the reference's, and ours on the torch backend.
COMPILED = ("compile", "torch+compile")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
SHAPE_SETS: Dict[str, Tuple[Shape, ...]] = {
    "resnet50": ((256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)),
    "vgg16": ((64, 224, 224), (128, 112, 112), (256, 56, 56), (512, 28, 28), (512, 14, 14)),
    "small": ((64, 28, 28), (256, 14, 14)),
    "tiny": ((32, 6, 5),),
}

#: Axis values (as they would be written on the command line) per device.
DEFAULTS = {
    "cuda": dict(providers="eager,compile,triton,cuda", batches="64", shapes="resnet50",
                 dtypes="fp16", formats="nchw,nhwc", passes="forward,backward,fwd+bwd",
                 rounds="100", compile_backend="inductor"),
    "cpu": dict(providers="eager,compile,torch,torch+compile", batches="8", shapes="small", dtypes="fp32",
                formats="nchw,nhwc", passes="forward,backward,fwd+bwd", rounds="40",
                compile_backend="inductor"),
}
FULL = dict(batches="32,64,128", shapes="resnet50,vgg16", dtypes="fp32,fp16,bf16")
#: Settings read from ``--bench-<name>`` / ``CBAM_BENCH_<NAME>``, with their help text.
OPTIONS = {
    "device": "cuda (default) or cpu",
    "providers": f"comma list of {', '.join(PROVIDERS)}",
    "batches": "comma list of batch sizes",
    "shapes": f"comma list of presets ({', '.join(SHAPE_SETS)}) or CxHxW",
    "dtypes": f"comma list of {', '.join(DTYPES)}",
    "formats": f"comma list of {', '.join(FORMATS)} (nhwc = channels_last)",
    "passes": f"comma list of {', '.join(PASSES)}",
    "rounds": "timed rounds per case (warm-up: a tenth of it, at least 1)",
    "compile_backend": "torch.compile backend of the compiled providers",
}


def backend_of(provider: str) -> str:
    """The ``CBAM_KERNELS_BACKEND`` a provider of ours runs on (``torch+compile``: torch)."""
    return provider.split("+")[0]


class SettingsError(ValueError):
    """An option or environment variable names a value the suite does not know."""


@dataclass(frozen=True)
class Settings:
    """The resolved axes of one run."""

    device: str
    providers: Tuple[str, ...]
    batches: Tuple[int, ...]
    shapes: Tuple[Shape, ...]
    dtypes: Tuple[str, ...]
    formats: Tuple[str, ...]
    passes: Tuple[str, ...]
    rounds: int
    compile_backend: str

    @property
    def warmup_rounds(self) -> int:
        return max(1, self.rounds // 10)


def resolve_settings(lookup: Callable[[str], Optional[str]], full: bool) -> Settings:
    """Settings from ``lookup(name)`` (an explicit value or None), ``--bench-full`` and defaults."""
    device = lookup("device") or "cuda"
    if device not in DEFAULTS:
        raise SettingsError(f"device must be one of {', '.join(DEFAULTS)}, got {device!r}")
    raw = {**DEFAULTS[device], **(FULL if full else {})}
    raw.update({name: value for name in raw if (value := lookup(name))})
    return Settings(
        device=device,
        providers=_choices(raw["providers"], PROVIDERS, "providers"),
        batches=tuple(_positive_int(v, "batches") for v in _split(raw["batches"])),
        shapes=tuple(dict.fromkeys(s for v in _split(raw["shapes"]) for s in _shapes(v))),
        dtypes=_choices(raw["dtypes"], DTYPES, "dtypes"),
        formats=_choices(raw["formats"], FORMATS, "formats"),
        passes=_choices(raw["passes"], PASSES, "passes"),
        rounds=_positive_int(raw["rounds"], "rounds"),
        compile_backend=raw["compile_backend"])


def env_lookup(name: str) -> Optional[str]:
    """The value of ``CBAM_BENCH_<NAME>``, or None."""
    return os.environ.get(f"CBAM_BENCH_{name.upper()}") or None


def _split(value: str) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _choices(value: str, known, axis: str) -> Tuple[str, ...]:
    names = tuple(dict.fromkeys(_split(value)))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SettingsError(f"unknown {axis} {unknown}; choose from {', '.join(known)}")
    return names


def _positive_int(value: str, axis: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise SettingsError(f"{axis} must be positive integers, got {value!r}")
    return int(value)


def _shapes(value: str) -> Tuple[Shape, ...]:
    if value in SHAPE_SETS:
        return SHAPE_SETS[value]
    dims = value.lower().split("x")
    if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise SettingsError(f"a shape is a preset ({', '.join(SHAPE_SETS)}) or CxHxW, "
                            f"got {value!r}")
    return (tuple(int(d) for d in dims),)


@dataclass(frozen=True)
class OpCase:
    """One op benchmark: op, provider, pass, and the input's batch, shape, dtype and format."""

    op: str
    provider: str
    pass_name: str
    batch: int
    shape: Shape
    dtype: str
    fmt: str
    device: str

    @property
    def id(self) -> str:
        """The pytest id: ``<pass>-<dtype>-<format>-b<batch>-<C>x<H>x<W>-<provider>``."""
        return f"{self.pass_name}-{self.dtype}-{self.fmt}-b{self.batch}-{self.shape_name}-" \
               f"{self.provider}"

    @property
    def shape_name(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def group(self) -> str:
        """pytest-benchmark group: the providers of one configuration side by side."""
        return f"{self.op} {self.pass_name} {self.dtype} {self.fmt} b{self.batch} {self.shape_name}"

    @property
    def key(self) -> tuple:
        """Everything but the provider: the providers compared against each other."""
        return dataclasses.astuple(dataclasses.replace(self, provider=""))

    @property
    def module_key(self) -> tuple:
        """Everything but provider and pass: one compiled module serves all passes."""
        return dataclasses.astuple(dataclasses.replace(self, provider="", pass_name=""))

    @property
    def input_shape(self) -> Tuple[int, int, int, int]:
        return (self.batch, *self.shape)

    @property
    def numel(self) -> int:
        return self.batch * self.shape[0] * self.shape[1] * self.shape[2]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def memory_format(self) -> torch.memory_format:
        return FORMATS[self.fmt]

    def with_provider(self, provider: str) -> "OpCase":
        return dataclasses.replace(self, provider=provider)


def op_cases(op: str, settings: Settings) -> List[OpCase]:
    """All cases of ``op``, each configuration's providers adjacent (baselines first)."""
    return [OpCase(op, provider, pass_name, batch, shape, dtype, fmt, settings.device)
            for dtype in settings.dtypes for fmt in settings.formats
            for batch in settings.batches for shape in settings.shapes
            for pass_name in settings.passes for provider in settings.providers]


#: The host-time benchmark's input (N, C, H, W): so small that a call's time is its host time.
HOST_SHAPE = (2, 64, 4, 4)
HOST_OPS = ("cbam", "se")
#: Calls timed per round of a host-time case.
HOST_ITERATIONS = 50


def host_cases(settings: Settings) -> List[OpCase]:
    """Host-time cases: CBAM and SE at HOST_SHAPE in float32, NCHW, in the run's passes but
    backward alone (forward and forward+backward), for every provider of the run but the
    compiled ones (whose compiled graph hides the module's own host work)."""
    batch, *shape = HOST_SHAPE
    return [OpCase(op, provider, pass_name, batch, tuple(shape), "fp32", "nchw",
                   settings.device)
            for op in HOST_OPS for pass_name in settings.passes if pass_name != "backward"
            for provider in settings.providers if provider not in COMPILED]


#: Model variants: name -> (attention, reference modules).
MODEL_VARIANTS = {
    "plain": (None, False),
    "se-reference": ("se", True),
    "se-ours": ("se", False),
    "cbam-reference": ("cbam", True),
    "cbam-ours": ("cbam", False),
}
#: The model benchmark's passes: inference and one training step.
MODEL_PASSES = ("forward", "fwd+bwd")


@dataclass(frozen=True)
class ModelCase:
    """One model benchmark: a ResNet-50 variant, eager or compiled, inference or training step."""

    variant: str
    execution: str
    pass_name: str
    device: str

    @property
    def id(self) -> str:
        return f"{self.variant}-{self.execution}-{self.pass_name}"


def model_cases(settings: Settings) -> List[ModelCase]:
    """Variants x executions (the eager/compile providers selected) x passes selected."""
    return [ModelCase(variant, execution, pass_name, settings.device)
            for variant in MODEL_VARIANTS for execution in BASELINES
            if execution in settings.providers
            for pass_name in MODEL_PASSES if pass_name in settings.passes]
