"""Build script for cbam_kernels.

The package is Python (its Triton kernels compile at first use) plus an optional CUDA C++
extension, ``cbam_kernels._C`` (``csrc/``), built with torch's ``CUDAExtension`` and ninja when
nvcc and a CUDA-enabled torch are present. Without it the package installs as pure Python and
prints one line saying why. This file imports torch, so install with

    pip install --no-build-isolation -e .

Environment switches, read when this file runs:

    CBAM_KERNELS_BUILD_CUDA  auto (default): build _C when torch (with CUDA) and nvcc are found,
                             else install pure Python; 1: build _C or fail; 0: never build it
    TORCH_CUDA_ARCH_LIST     compute capabilities to build for. Unset: those of the visible GPUs
                             (as torch's extension builder does), or where none is visible (a
                             wheel, a container, CI) those torch itself was built for (torch
                             2.11-2.15 cu130: 7.5;8.0;8.6;9.0;10.0;12.0); the newest gets
                             "+PTX" (forward-compatible PTX). One ("9.0") builds fastest
    DEBUG                    1: -O0 -g -lineinfo (host -O0 -g); default -O3
    MAX_JOBS                 parallel compile jobs (torch's default: one per CPU core)
    CUDA_HOME                the CUDA toolkit; default: CUDA_PATH, then the toolkit of the nvcc
                             on PATH or /usr/local/cuda, whichever has the CUDA headers
"""

import glob
import json
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

BUILD_CUDA = os.environ.get("CBAM_KERNELS_BUILD_CUDA", "auto").strip().lower()
DEBUG = os.environ.get("DEBUG", "0") == "1"

HERE = os.path.dirname(os.path.abspath(__file__))
os.chdir(HERE)  # setuptools resolves package and source paths against the working directory
# The version is written once, in the package (cbam_kernels.__version__).
VERSION = re.search(r'^__version__ = "([^"]+)"', open(os.path.join("cbam_kernels", "__init__.py"),
                    encoding="utf-8").read(), re.M).group(1)


def find_cuda_home():
    """The CUDA toolkit root: CUDA_HOME, CUDA_PATH, or the first candidate with the headers."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for path in candidates + ["/usr/local/cuda"]:
        if os.path.exists(os.path.join(path, "include", "cuda_runtime.h")):
            return path
    return None


def cuda_extension():
    """(ext_modules, cmdclass) for _C, or raise RuntimeError saying why it cannot be built."""
    try:
        import torch
    except ImportError as err:
        raise RuntimeError(f"torch is not importable ({err}); install with "
                           "--no-build-isolation next to an installed torch") from None
    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} was built without CUDA")
    cuda_home = find_cuda_home()
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        raise RuntimeError("nvcc not found (set CUDA_HOME)")
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension when imported
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(torch)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    # --threads 0: nvcc compiles the architectures of a file in parallel, one per core.
    ext = CUDAExtension(
        name="cbam_kernels._C",
        sources=["csrc/bindings.cpp", "csrc/ops.cpp", "csrc/passes.cu"],
        extra_compile_args={
            "cxx": opt + ["-Wall"],
            "nvcc": opt + (["-lineinfo"] if DEBUG else []) + ["-Xcompiler=-Wall",
                                                              "--threads", "0"],
        },
    )
    return [ext], {"build_ext": BuildExtension}


def default_arch_list(torch) -> str:
    """TORCH_CUDA_ARCH_LIST when none is given: the visible GPUs' compute capabilities, else
    the ones torch was built for; the newest with +PTX, so that later GPUs can JIT it."""
    visible = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    if visible:
        archs = sorted(visible)
    else:  # torch's own kernels: "sm_75 sm_80 ... sm_120"
        flags = torch._C._cuda_getArchFlags().split()
        archs = sorted({divmod(int(f[3:].rstrip("af")), 10) for f in flags if f.startswith("sm_")})
    if not archs:
        raise RuntimeError("no GPU is visible and torch names no CUDA architecture; set "
                           "TORCH_CUDA_ARCH_LIST")
    return ";".join(f"{major}.{minor}" for major, minor in archs) + "+PTX"


def record_build(built: bool, why: str) -> None:
    """Write cbam_kernels/build_info.json (what this install built, for which architectures,
    or why not: ``describe_backends()`` reports it, since pip hides this script's output), and
    without a build remove a _C left in the source tree by an earlier one."""
    info = {"built": built, "why": why,
            "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if built else None}
    with open(os.path.join("cbam_kernels", "build_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    if not built:
        for stale in glob.glob(os.path.join("cbam_kernels", "_C.*")):
            os.remove(stale)
    print(f"cbam_kernels: {why}", file=sys.stderr)


def extensions():
    if BUILD_CUDA not in ("auto", "1", "0"):
        raise SystemExit(f"CBAM_KERNELS_BUILD_CUDA={BUILD_CUDA!r}: use auto, 1 or 0")
    if BUILD_CUDA == "0":
        record_build(False, "installed without cbam_kernels._C (CBAM_KERNELS_BUILD_CUDA=0)")
        return [], {}
    try:
        ext_modules, cmdclass = cuda_extension()
    except RuntimeError as err:
        if BUILD_CUDA == "1":
            raise SystemExit(f"cbam_kernels: CBAM_KERNELS_BUILD_CUDA=1 but {err}")
        record_build(False, f"installed without cbam_kernels._C: {err}")
        return [], {}
    import torch
    record_build(True, f"cbam_kernels._C built with torch {torch.__version__}, "
                       f"nvcc of {os.environ['CUDA_HOME']}")
    return ext_modules, cmdclass


ext_modules, cmdclass = extensions()

setup(
    name="cbam_kernels",
    version=VERSION,
    description="Fused CBAM and Squeeze-and-Excitation attention for CNNs (forward and backward)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["cbam_kernels", "cbam_kernels.*"]),
    package_data={"cbam_kernels": ["build_info.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "torchvision", "timm", "onnx", "onnxscript",
                 "onnxruntime", "grad-cam", "matplotlib"],
        "bench": ["pytest-benchmark", "matplotlib", "torchvision"],
        "export": ["onnx", "onnxscript", "onnxruntime"],
        "plot": ["matplotlib"],
    },
)
