"""Which implementation of the full-size passes runs for a tensor.

Backends:

* ``cuda``   -- CUDA C++ kernels (``csrc/``, ``ops.cuda.passes.py``), when the extension
  ``cbam_kernels._C`` was built (``pip install --no-build-isolation -e .`` with nvcc) and holds
  code for the GPU, whatever Triton says: its small kernels are Triton's where Triton is
  installed and compiles for the GPU, else PyTorch's (``ops.torch.small_kernels``; on sm_75,
  which Triton >= 3.3 dropped, or without Triton), see :func:`cuda_small_kernels`;
* ``triton`` -- fused Triton kernels (``ops.triton.passes.py``);
* ``torch``  -- plain PyTorch (``ops.torch.passes.py``), for any device and dtype.

The two kernel backends take CUDA tensors of dtype float16, bfloat16 or float32.
``CBAM_KERNELS_BACKEND=auto|cuda|triton|torch`` forces one; forcing a kernel backend that is
unavailable, or for a tensor it cannot take, is an error. ``auto``, the default,
gives such tensors the first available backend of the device's row in :data:`AUTO_ORDER`
(fastest measured first; Triton first where nothing was measured), and PyTorch everything
else (CPU tensors, float64).
:func:`describe_backends` reports all of this for the machine. The choice for a device and
dtype is made at its first call, with the variable as it is then, and cached (a dictionary
lookup per call): after changing the variable at run time, call :func:`forget_choices`.
:func:`pipeline_for` gives the pipeline that runs it (``ops.torch.pipeline``, or a
``ops.kernel_pipeline.KernelPipeline`` over the backend's passes and small kernels), also a
dictionary lookup per call.
"""

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from typing import Dict, Iterator, Optional, Tuple, Union

import torch

from .torch import pipeline as pipeline_torch
from .types import KERNEL_DTYPES

BACKENDS = ("auto", "cuda", "triton", "torch")
ENV_VAR = "CBAM_KERNELS_BACKEND"
# Written by setup.py into the package's top folder (package data of cbam_kernels).
BUILD_INFO = os.path.join(os.path.dirname(os.path.dirname(__file__)), "build_info.json")

# Kernel backends by measured speed, fastest first, per compute capability (None: any other
# GPU). sm_90: on an H200 (benchmarks/results/), the CUDA backend took less time than Triton in
# every CBAM and SE case (ResNet-50 stage shapes, batch 64, float16, NCHW and channels_last,
# forward and forward+backward). No other GPU has been measured: there Triton, which needs no
# build, stays first. Put "cuda" first in a device's row only once benchmarks/ shows it faster.
AUTO_ORDER: Dict[Optional[Tuple[int, int]], Tuple[str, ...]] = {
    (9, 0): ("cuda", "triton"),
    None: ("triton", "cuda"),
}


def requested_backend() -> str:
    """The backend named by ``CBAM_KERNELS_BACKEND`` (``auto`` when unset)."""
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not one of {', '.join(BACKENDS)}")
    return name


#: The oldest GPU architecture the Triton kernels compile for: Triton 3.3 dropped Turing
#: (sm_75) and older.
TRITON_MIN_CAPABILITY = (8, 0)


def _gpu_index(device: Optional[torch.device]) -> int:
    """The index of ``device`` (default, or no index given: the current GPU)."""
    return torch.cuda.current_device() if device is None or device.index is None else device.index


def _capability(device: Optional[torch.device]) -> Tuple[int, int]:
    """Compute capability of ``device`` (default: the current GPU)."""
    return tuple(torch.cuda.get_device_capability(_gpu_index(device)))


def triton_unavailable_reason(device: Optional[torch.device] = None) -> str:
    """Why the Triton backend cannot run here (on ``device``, default: the current GPU), or ''
    when it can (does not import triton, so that TRITON_INTERPRET can still be set
    afterwards)."""
    if "triton" not in sys.modules and importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if _interpreted():
        return ""
    if torch.cuda.is_available():
        major, minor = _capability(device)
        if (major, minor) < TRITON_MIN_CAPABILITY:
            return (f"Triton {importlib.metadata.version('triton')} does not compile for "
                    f"sm_{major}{minor} (Triton 3.3 dropped sm_75 and older)")
        return ""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return ("no CUDA device, and TRITON_INTERPRET=1 was set after triton was imported (the "
                "interpreter must be chosen before the first import of triton)")
    return "no CUDA device (and TRITON_INTERPRET is not set)"


def _interpreted() -> bool:
    """Whether the Triton kernels run in Triton's interpreter. Triton decides when it is first
    imported (TRITON_INTERPRET=1 at that moment interprets its own library functions, which
    every kernel calls), and ``ops.triton.passes`` when it is; until then the environment
    variable tells."""
    if "triton" not in sys.modules:
        return os.environ.get("TRITON_INTERPRET") == "1"
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction
    module = sys.modules.get(f"{__package__}.triton.passes")
    return (isinstance(standard.sigmoid, InterpretedFunction)
            and (module is None or module.INTERPRETED))


@functools.lru_cache(maxsize=None)
def _extension_error() -> str:
    try:
        importlib.import_module(".._C", __package__)
    except ImportError as err:
        return str(err)
    return ""


@functools.lru_cache(maxsize=None)
def _has_kernel_image(index: int) -> bool:
    return bool(torch.ops.cbam_kernels_cuda.has_kernel_image(index))


def cuda_unavailable_reason(device: Optional[torch.device] = None) -> str:
    """Why the CUDA backend cannot run on ``device`` (default: the current GPU), or ''. Its
    full-size passes are ``_C``'s: it runs where ``_C`` loads and holds code for the GPU (its
    small kernels are Triton's or PyTorch's, :func:`cuda_small_kernels`)."""
    err = _extension_error()
    if err:
        return (f"the extension cbam_kernels._C is not built or does not load ({err}); build it "
                "with nvcc present: pip install --no-build-isolation -e .")
    if not torch.cuda.is_available():
        return "no CUDA device"
    index = _gpu_index(device)
    if not _has_kernel_image(index):
        major, minor = torch.cuda.get_device_capability(index)
        return (f"cbam_kernels._C has no code for {torch.cuda.get_device_name(index)} "
                f"(sm_{major}{minor}); rebuild with TORCH_CUDA_ARCH_LIST including {major}.{minor}")
    return ""


def cuda_small_kernels(device: Optional[torch.device] = None) -> Tuple[str, str]:
    """The small kernels (channel MLP, spatial conv + BatchNorm, their backward) that the CUDA
    backend runs on ``device`` (default: the current GPU), and why: ('triton', '') where the
    Triton backend could run there, else ('torch', why Triton cannot): the PyTorch ones of
    ``ops.torch.small_kernels``."""
    reason = triton_unavailable_reason(device)
    return ("torch", reason) if reason else ("triton", "")


def _small_kernels_note(device: Optional[torch.device]) -> str:
    """'' where the CUDA backend's small kernels on ``device`` are Triton's, else what they
    are and why."""
    kind, why = cuda_small_kernels(device)
    return "" if kind == "triton" else f"small kernels in PyTorch: {why}"


def extension_code(capability: Tuple[int, int], arch_list: str) -> str:
    """What ``_C``, built for ``arch_list`` (a TORCH_CUDA_ARCH_LIST), holds for a GPU of
    ``capability``: a kernel image (machine code of the same major version and no newer
    minor one runs), PTX that the driver compiles at first use, or nothing."""
    images, ptx = [], []
    for entry in arch_list.replace(" ", ";").split(";"):
        arch = entry.replace("+PTX", "")
        if not arch:
            continue
        exact = arch[-1].isalpha()  # 9.0a: features of that GPU alone
        major, minor = (int(v) for v in arch.rstrip("abf").split("."))
        if major == capability[0] and (minor == capability[1] or
                                       (not exact and minor < capability[1])):
            images.append((major, minor))
        if entry.endswith("+PTX") and (major, minor) <= tuple(capability):
            ptx.append((major, minor))
    if images:
        major, minor = max(images)
        return f"kernel image (sm_{major}{minor})"
    if ptx:
        major, minor = max(ptx)
        return f"PTX of compute_{major}{minor} (compiled by the driver at first use)"
    return "no code"


def _unavailable(name: str, device: torch.device) -> str:
    if name == "cuda":
        return cuda_unavailable_reason(device)
    return triton_unavailable_reason(device) if name == "triton" else ""


def _choose(name: str, device: torch.device, dtype: torch.dtype) -> Tuple[str, str]:
    """(backend, why) for tensors of ``dtype`` on ``device`` when ``name`` is requested."""
    return _choose_cached(name, device, dtype, name == "triton" and _interpreted())


@functools.lru_cache(maxsize=None)
def _choose_cached(name: str, device: torch.device, dtype: torch.dtype,
                   interpreted: bool) -> Tuple[str, str]:
    if name == "torch":
        return "torch", f"{ENV_VAR}=torch"
    # Triton's interpreter (TRITON_INTERPRET=1) runs the Triton kernels on CPU tensors when asked.
    interpreted = name == "triton" and interpreted
    fits = (device.type == "cuda" or interpreted) and dtype in KERNEL_DTYPES
    if name != "auto":
        if not fits:
            raise RuntimeError(
                f"{ENV_VAR}={name}, but the {name} kernels need a CUDA tensor of dtype float16, "
                f"bfloat16 or float32; got a {device.type} tensor of dtype {dtype}")
        reason = _unavailable(name, device)
        if reason:
            raise RuntimeError(f"{ENV_VAR}={name}, but the {name} backend is unavailable: "
                               f"{reason}")
        return name, _with_small_kernels(name, device, f"{ENV_VAR}={name}")
    if not fits:
        return "torch", "the kernels take CUDA tensors of dtype float16, bfloat16 or float32"
    capability = torch.cuda.get_device_capability(device)
    order = AUTO_ORDER.get(capability, AUTO_ORDER[None])
    skipped = []
    for candidate in order:
        reason = _unavailable(candidate, device)
        if not reason:
            why = f"fastest available of {', '.join(order)} on sm_{capability[0]}{capability[1]}"
            return candidate, _with_small_kernels(candidate, device,
                                                  why + "".join(f"; {s}" for s in skipped))
        skipped.append(f"{candidate} unavailable: {reason}")
    return "torch", "; ".join(skipped)


def _with_small_kernels(name: str, device: torch.device, why: str) -> str:
    """``why`` the backend ``name`` runs, with what its small kernels are when they are not
    Triton's."""
    note = _small_kernels_note(device) if name == "cuda" else ""
    return f"{why}; {note}" if note else why


_CHOSEN: Dict[Tuple[torch.device, torch.dtype], str] = {}
_NAMED: Dict[Tuple[str, Optional[torch.device]], object] = {}


def forget_choices() -> None:
    """Drop the cached choices, so that the next call chooses again (after what decides them
    changed: ``CBAM_KERNELS_BACKEND``, the availability of a backend or of Triton,
    :data:`AUTO_ORDER`)."""
    _CHOSEN.clear()
    _NAMED.clear()
    _choose_cached.cache_clear()


@contextlib.contextmanager
def forced(name: str) -> Iterator[None]:
    """Meanwhile, the fused modules run on backend ``name`` (``CBAM_KERNELS_BACKEND`` set in
    this process's environment; the cached choices dropped on entry and on exit, so that the
    variable as it was applies again afterwards). Not for concurrent use from threads."""
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = name
    forget_choices()
    try:
        yield
    finally:
        if previous is None:
            del os.environ[ENV_VAR]
        else:
            os.environ[ENV_VAR] = previous
        forget_choices()


def backend_for(x: torch.Tensor) -> str:
    """The backend that runs the passes for tensor ``x``: 'cuda', 'triton' or 'torch' (a
    dictionary lookup per call once the choice for its device and dtype is made)."""
    key = (x.device, x.dtype)
    name = _CHOSEN.get(key)
    if name is None:
        name = _CHOSEN[key] = backend_name(x.device, x.dtype)
    return name


@torch.compiler.assume_constant_result
def backend_name(device: torch.device, dtype: torch.dtype) -> str:
    """The backend for tensors of ``dtype`` on ``device`` (a constant while torch.compile
    traces: the compiled graph calls the chosen path directly)."""
    return _choose(requested_backend(), device, dtype)[0]


def pipeline_named(name: str, device: Optional[torch.device] = None
                   ) -> Union["pipeline_torch", "KernelPipeline"]:  # noqa: F821
    """The pipeline of backend ``name``: the module ``ops.torch.pipeline``, or the
    ``KernelPipeline`` over the backend's passes and small kernels (both have ``forward`` and
    ``backward``). The CUDA backend's small kernels depend on the GPU: those of
    :func:`cuda_small_kernels` on ``device`` (default: the current GPU). Made once per (name,
    device): a dictionary lookup per call after that."""
    key = (name, device)
    pipeline = _NAMED.get(key)
    if pipeline is None:
        if name == "torch":
            pipeline = pipeline_torch
        elif name == "triton":
            pipeline = _kernel_pipeline(name, "triton")
        else:
            pipeline = _kernel_pipeline(name, cuda_small_kernels(device)[0])
        _NAMED[key] = pipeline
    return pipeline


@functools.lru_cache(maxsize=None)
def _kernel_pipeline(name: str, small: str) -> "KernelPipeline":  # noqa: F821
    """The ``KernelPipeline`` over the passes of backend ``name`` and the small kernels
    ``small`` ('triton' or 'torch'), one per pair."""
    from .kernel_pipeline import KernelPipeline, small_kernels
    return KernelPipeline(importlib.import_module(f"{__package__}.{name}.passes"),
                          small_kernels(small))


def pipeline_for(x: torch.Tensor) -> Union["pipeline_torch", "KernelPipeline"]:  # noqa: F821
    """What runs the fused gate for ``x``: :func:`pipeline_named` of its backend and device
    (two dictionary lookups per call once both are made)."""
    return pipeline_named(backend_for(x), x.device)


def available_backends() -> Dict[str, str]:
    """Map each backend to 'available' or the reason it is not, for this machine (its current
    GPU). Where the CUDA backend's small kernels are PyTorch's, its entry says so and why:
    'available (small kernels in PyTorch: ...)'."""
    reason = cuda_unavailable_reason()
    note = "" if reason else _small_kernels_note(None)
    return {"cuda": reason or ("available" + (f" ({note})" if note else "")),
            "triton": triton_unavailable_reason() or "available",
            "torch": "available"}


def _build_info() -> Optional[dict]:
    """What setup.py recorded of the last install (``build_info.json``), or None."""
    try:
        with open(BUILD_INFO) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def extension_build() -> str:
    """What the last ``pip install`` of this package did about ``cbam_kernels._C``: built (for
    which architectures, with which torch) or not, and why (from ``build_info.json``, which
    setup.py writes)."""
    info = _build_info()
    if info is None:
        return "no record of an install by setup.py (build_info.json is missing)"
    if info["built"]:
        return f"{info['why']}, for TORCH_CUDA_ARCH_LIST={info['arch_list']}"
    return info["why"]


def describe_backends() -> str:
    """A report: which backends are available (or why not), and which one runs the passes of
    every op (CBAM, SE, ChannelGate, SpatialGate, forward and backward) for each device and
    dtype, and why."""
    name = requested_backend()
    lines = [f"cbam_kernels backends ({ENV_VAR}={name}):"]
    lines += [f"  {b:<7} {r}" for b, r in available_backends().items()]
    lines.append(f"Extension: {extension_build()}")
    lines.append("Backend of every pass of every op, by the device and dtype of its input x:")
    devices = [("cpu", torch.device("cpu"))]
    info = _build_info() or {}
    arch_list = info.get("arch_list") if info.get("built") else None
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        major, minor = torch.cuda.get_device_capability(i)
        label = f"cuda:{i} ({torch.cuda.get_device_name(i)}, sm_{major}{minor})"
        if arch_list:
            lines.append(f"  _C for {label}: {extension_code((major, minor), arch_list)}")
        devices.append((label, torch.device("cuda", i)))
    for label, device in devices:
        for dtype in KERNEL_DTYPES + (torch.float64,):
            try:
                choice = "{} ({})".format(*_choose(name, device, dtype))
            except RuntimeError as err:
                choice = f"error: {err}"
            lines.append(f"  {label} {str(dtype).replace('torch.', '')}: {choice}")
    return "\n".join(lines)
