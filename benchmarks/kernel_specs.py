"""The Triton kernel specialisations that the fused modules launch, found without a GPU.

A specialisation is what Triton compiles once: the kernel, its argument types (pointer dtypes,
i32/i64), which integer arguments are 1 (folded into the code) or multiples of 16 and which
pointers are 16-byte aligned (facts the vectoriser uses), the constexprs (flags, block sizes)
and num_warps / num_stages. It follows from the shapes, strides and dtypes of a call through
the launch plans that pick tiles, splits and warps at run time (``ops/triton/passes.py``:
``_blocks``, ``_reduce_plan``, ``_num_warps``; the block rules of the small kernels).

:func:`capture` runs each of :data:`WORKLOADS` through a fused module (eval forward, training
forward and backward) on CPU tensors, with the Triton backend in Triton's interpreter mode, but
runs no kernel: the launcher is replaced by one that binds the arguments with Triton's own
binder for an NVIDIA target (the code a GPU launch runs to choose the compiled kernel) and
records the result. The host path never reads a kernel's output, so full-size tensors are never
touched and real shapes cost nothing. The interpreter mode is fixed when ``ops/triton/passes.py`` is
first imported, so :func:`specialisations` runs the capture in a process of its own::

    TRITON_INTERPRET=1 python -m benchmarks.kernel_specs     # prints the specialisations (JSON)
"""

import collections
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
KERNEL_MODULES = tuple(f"cbam_kernels.ops.triton.{name}"
                       for name in ("passes", "channel_mlp", "spatial", "param_grads"))


class Workload(NamedTuple):
    """One module call (eval forward, training forward and backward) on x of ``shape``."""

    module: str                     # "cbam" or "se" (default parameters)
    shape: Tuple[int, int, int, int]
    dtype: str                      # fp32, fp16 or bf16 (x and the parameters)
    layout: str                     # x: "nchw" or "cl" (channels_last)
    residual: Optional[str] = None  # layout of a residual (and of gy); None: no residual

    @property
    def label(self) -> str:
        """A short name, e.g. ``cbam fp16 cl 64x256x56x56``."""
        extra = f" +res {self.residual}" if self.residual else ""
        return f"{self.module} {self.dtype} {self.layout} {'x'.join(map(str, self.shape))}{extra}"


# The benchmark's ResNet-50 stage shapes at batch 64, in channels_last (C innermost: wide
# reduction tiles) and in NCHW at 7x7 (H*W = 49: rows not 16-byte aligned); and a small odd
# shape (tiles below TILE, C and H*W not multiples of 16) through SE with the ResNet block
# epilogue, gy and the residual in the other layout (the narrow tiles of mixed layouts). Every
# dtype, gate kind and layout case of the launch plans, in few specialisations (each costs a
# compile per target).
WORKLOADS = (
    Workload("cbam", (64, 256, 56, 56), "fp16", "cl"),
    Workload("cbam", (64, 2048, 7, 7), "bf16", "nchw"),
    Workload("se", (2, 33, 9, 11), "fp32", "nchw", residual="cl"),
)


def _modules() -> Dict[str, object]:
    """Module factories by name (taking C)."""
    from cbam_kernels import CBAM, SE
    return {"cbam": CBAM, "se": SE}


def _empty(shape, dtype, layout):
    import torch
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, memory_format=fmt)


def _run(workload: Workload) -> None:
    """The workload's eval forward, training forward and backward."""
    import torch
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[workload.dtype]
    module = _modules()[workload.module](workload.shape[1]).to(dtype)
    x = _empty(workload.shape, dtype, workload.layout).requires_grad_()
    other = workload.residual or workload.layout
    extra = {"residual": _empty(workload.shape, dtype, other)} if workload.residual else {}
    with torch.no_grad():
        module.eval()(x, **extra)
    module.train()(x, **extra).backward(_empty(workload.shape, dtype, other))


def _caller() -> str:
    """The public function of the kernel modules that launches (``pool_hw``, ``spatial_gate``)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_name
        if frame.f_globals.get("__name__") in KERNEL_MODULES and not name.startswith("_"):
            return name
        frame = frame.f_back
    return "?"


def _flat(values) -> Iterator[str]:
    """The type strings of a signature, tuple arguments flattened."""
    for value in values:
        if isinstance(value, tuple):
            yield from _flat(value)
        else:
            yield value


def _constexprs(jit, bound: dict) -> Iterator[Tuple[str, object]]:
    """(name, value) of every constexpr: the kernel's own and the fields of its tuple
    arguments that are constexprs (e.g. ``ParamGradsTail.CHANNEL``)."""
    for param in jit.params:
        value = bound[param.name]
        if param.is_constexpr:
            yield param.name, value
        elif isinstance(value, tuple) and hasattr(value, "_fields"):
            for name, field in zip(value._fields, value):
                if isinstance(field, tl_constexpr()):
                    yield name, field.value


def tl_constexpr() -> type:
    """``triton.language.constexpr`` (imported late: the interpreter mode must be set first)."""
    import triton.language as tl
    return tl.constexpr


def _variant(jit, bound: dict, signature: dict) -> str:
    """The element type of the first tensor, the constexpr flags that are set and the block
    sizes (but blocks of 1: unused), e.g. ``fp16 WITH_MAX BLOCK_C=256 BLOCK_HW=16``."""
    words = [next((t[1:] for t in _flat(signature.values()) if t.startswith("*")), "")]
    for name, value in _constexprs(jit, bound):
        if value is True:
            words.append(name)
        elif "BLOCK" in name and value != 1:
            words.append(f"{name}={value}")
    return " ".join(words)


def encode_types(value):
    """A signature entry as JSON: a (named) tuple argument as ``{"tuple": name, "fields": [...],
    "items": [...]}``; :func:`decode_types` inverts it."""
    if isinstance(value, tuple):
        return {"tuple": type(value).__name__, "fields": list(getattr(value, "_fields", ())),
                "items": [encode_types(v) for v in value]}
    return value


def decode_types(value):
    """The signature entry that :func:`encode_types` wrote (tuple arguments as named tuples with
    their fields, which the kernel's attribute accesses need)."""
    if isinstance(value, dict):
        items = [decode_types(v) for v in value["items"]]
        if not value["fields"]:
            return tuple(items)
        return collections.namedtuple(value["tuple"], value["fields"])(*items)
    return value


def _plain(value):
    """A constexpr or attribute value as JSON (Triton constexpr objects unwrapped)."""
    return getattr(value, "value", value) if isinstance(value, tl_constexpr()) else value


def nvidia_binders() -> Tuple[object, Callable[[Callable], tuple]]:
    """(target, binder_of): an NVIDIA target (the same specialisation on every NVIDIA GPU) and
    a function giving, for a kernel's Python function, its ``JITFunction`` and Triton's own
    argument binder for that target (made once per kernel): what a GPU launch runs in Python
    to choose the compiled kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature
    target = make_backend(GPUTarget("cuda", 90, 32))
    binders = {}

    def binder_of(fn: Callable) -> tuple:
        found = binders.get(fn)
        if found is None:
            jit = JITFunction(fn)
            found = binders[fn] = jit, create_function_from_signature(jit.signature, jit.params,
                                                                      target)
        return found
    return target, binder_of


@contextlib.contextmanager
def _recording(keep: Callable[[dict], None]) -> Iterator[None]:
    """Meanwhile every ``kernel[grid](...)`` passes its specialisation to ``keep`` instead of
    running."""
    from triton.runtime.jit import KernelInterface
    target, binder_of = nvidia_binders()

    def getitem(kernel, grid):
        def launch(*args, **kwargs):
            fn = kernel.fn
            jit, binder = binder_of(fn)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = jit._pack_args(target, kwargs, bound,
                                                                   specialization, options)
            keep(dict(kernel=f"{fn.__module__}:{fn.__name__}",
                      variant=_variant(jit, bound, signature), caller=_caller(),
                      signature={k: encode_types(v) for k, v in signature.items()},
                      constexprs=[[list(k), _plain(v)] for k, v in constexprs.items()],
                      attrs=[[list(k), v] for k, v in attrs.items()],
                      num_warps=options.num_warps, num_stages=options.num_stages))
        return launch

    original = KernelInterface.__getitem__
    KernelInterface.__getitem__ = getitem
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


def capture(workloads=WORKLOADS) -> List[dict]:
    """The distinct specialisations that ``workloads`` launch, in first-launch order, each a dict:
    kernel (``module:name``), variant (see :func:`_variant`), caller, signature, constexprs and
    attrs (as ``[path, value]`` pairs, the form ``triton.compiler.ASTSource`` takes), num_warps,
    num_stages, and workload (the label of the first that launched it). Needs TRITON_INTERPRET=1
    before ``ops/triton/passes.py`` is imported."""
    from cbam_kernels.ops.triton import passes as passes_triton
    assert passes_triton.INTERPRETED, "run with TRITON_INTERPRET=1 (see specialisations())"
    os.environ["CBAM_KERNELS_BACKEND"] = "triton"
    unique: Dict[str, dict] = {}
    label = ""

    def keep(record: dict) -> None:
        unique.setdefault(json.dumps(record, sort_keys=True), dict(record, workload=label))

    with _recording(keep):
        for workload in workloads:
            label = workload.label
            _run(workload)
    return list(unique.values())


def specialisations() -> List[dict]:
    """:func:`capture` of :data:`WORKLOADS`, run in a fresh process (``python -m
    benchmarks.kernel_specs`` with TRITON_INTERPRET=1)."""
    env = dict(os.environ, TRITON_INTERPRET="1", CBAM_KERNELS_BACKEND="triton")
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernel_specs"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"capturing the Triton specialisations failed:\n{done.stderr}")
    return json.loads(done.stdout)


if __name__ == "__main__":
    json.dump(capture(), sys.stdout)
