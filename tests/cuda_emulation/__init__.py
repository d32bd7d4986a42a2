"""The CUDA kernels of ``csrc/`` run on the CPU, for the tests.

``csrc/passes.cu`` (the file nvcc compiles) and ``csrc/ops.cpp`` are compiled with the host
compiler against a shim of the CUDA built-ins (``include/``): each block's threads run as
fibers, ``__syncthreads`` is a barrier between them, warp shuffles and votes wait for every lane
of their mask, shared memory is checked for races and device pointers for bounds and alignment.
The ops are registered for CPU tensors as ``torch.ops.cbam_kernels_emulated``, with the schemas
of ``torch.ops.cbam_kernels_cuda``; :data:`passes` has the functions of
``cbam_kernels.ops.cuda.passes`` over them. The library is built once per content of its sources
(``build/cuda_emulation/<hash>/``, git-ignored) and loaded at the first use.
"""

import contextlib
import functools
import hashlib
from pathlib import Path

import torch
from torch.utils import cpp_extension

from cbam_kernels.ops.cuda.passes import OpPasses

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"
SOURCES = [CSRC / "ops.cpp", HERE / "kernels.cpp", HERE / "emulator.cpp", HERE / "memory.cpp",
           HERE / "self_test.cpp", HERE / "library.cpp"]
INCLUDES = [HERE / "include", HERE, CSRC]
FLAGS = ["-DCBAM_EMULATION", "-O2", "-Wall", "-Wno-unknown-pragmas"]


def _source_hash() -> str:
    """A hash of everything the build reads: the sources, headers, flags and torch version."""
    digest = hashlib.sha256(f"{FLAGS} {torch.__version__}".encode())
    for path in sorted(p for d in (CSRC, HERE) for p in d.rglob("*") if p.suffix in
                       {".cpp", ".cu", ".cuh", ".h"}):
        digest.update(str(path.relative_to(HERE.parents[1])).encode() + path.read_bytes())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def ops():
    """``torch.ops.cbam_kernels_emulated``, once the library is built (or found built) and
    loaded."""
    build = HERE.parents[1] / "build" / "cuda_emulation" / _source_hash()
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name="cbam_kernels_emulated", sources=[str(s) for s in SOURCES],
                       extra_cflags=FLAGS, extra_include_paths=[str(i) for i in INCLUDES],
                       build_directory=str(build), is_python_module=False)
    return torch.ops.cbam_kernels_emulated


passes = OpPasses(ops)


@contextlib.contextmanager
def memory_checks():
    """Within: every CPU tensor is allocated so that the emulated kernels' pointers into it are
    checked, its bytes set to 0xff first (an element a kernel does not write reads as NaN)."""
    ops().check_memory(True)
    try:
        yield
    finally:
        ops().check_memory(False)


def launched_kernels():
    """The kernels launched since the last call, by name with their template arguments."""
    return list(ops().take_launched_kernels())
