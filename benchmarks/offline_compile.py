"""The kernels compiled for the real targets without a GPU, and what each one uses.

* Triton: every specialisation that ``kernel_specs`` captures, through Triton's own compiler
  (``triton.compile`` of an ``ASTSource``) for each target of :data:`TRITON_ARCHS`; registers, stack and
  spills from the ``ptxas -v`` run that Triton makes itself (TRITON_DUMP_PTXAS_LOG=1), shared
  memory from the kernel's metadata (Triton allocates it at launch).
* CUDA C++: ``csrc/passes.cu`` with ``nvcc -cubin -Xptxas -v`` per target of :data:`CSRC_ARCHS`
  (Turing too: the CUDA backend's passes are the only kernels that could serve it), with the device flags
  of the extension's build (``setup.py``: -O3, torch's CUDAExtension flags, C++20).

The SASS of each (``cuobjdump -sass``) gives the global-load widths and local-memory accesses.
Each job (one Triton specialisation for one target, or csrc for one target) is cached under
``build/offline_compile/`` by a hash of everything it reads (sources, versions, flags, this
tool); the missing ones run on a pool of processes, one per core (two in CI).
:func:`compile_all` returns the results, one :class:`Compiled` per kernel and target.
"""

import concurrent.futures
import contextlib
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional

from benchmarks import kernel_resources, kernel_specs

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
CACHE = REPO / "build" / "offline_compile"
#: The targets of our users' GPUs: Ampere (A100; RTX 30xx, A-series), Ada (RTX 40xx, L4, L40),
#: Hopper (H100, H200), Blackwell (B200; RTX 50xx, RTX PRO), and for csrc Turing (RTX 20xx, T4),
#: for which Triton (3.3 and later) no longer compiles.
TRITON_ARCHS = (80, 86, 89, 90, 100, 120)
CSRC_ARCHS = (75,) + TRITON_ARCHS
ARCHS = CSRC_ARCHS  # every target, in order
WORKERS = min(8, len(os.sched_getaffinity(0)))  # compile processes: a core each (2 in CI)
TRITON_SOURCES = tuple(sorted(str(p.relative_to(REPO))
                              for p in (REPO / "cbam_kernels" / "ops" / "triton").glob("*.py")))
TOOL_SOURCES = ("benchmarks/offline_compile.py", "benchmarks/kernel_resources.py")


class Compiled(NamedTuple):
    """One kernel compiled for one target: what ptxas reports and what its SASS does."""

    backend: str         # "triton" or "cuda" (csrc)
    kernel: str
    variant: str         # Triton: constexpr flags and blocks; csrc: template arguments
    origin: str          # Triton: the pass and workload that launch it; csrc: ""
    arch: int
    threads: int         # per block (program)
    registers: int
    stack: int           # bytes of stack frame (local memory)
    spill_stores: int    # bytes
    spill_loads: int     # bytes
    local_accesses: int  # LDL / STL instructions in the SASS
    shared: int          # bytes per block, static and dynamic
    loads_in_loops: Dict[int, int]    # global loads by width in bits, inside loops
    loads_elsewhere: Dict[int, int]

    @property
    def resident_blocks(self) -> int:
        """Blocks (programs) of this kernel that fit on one SM of its target."""
        return kernel_resources.resident_blocks(self.arch, self.registers, self.threads,
                                                self.shared)


def tool(name: str) -> Optional[str]:
    """The CUDA tool ``name``: in CUDA_HOME/bin (default /usr/local/cuda), on PATH, or among
    the tools Triton ships; None when none is found."""
    home = Path(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda")
    found = [home / "bin" / name, shutil.which(name)]
    with contextlib.suppress(metadata.PackageNotFoundError):
        triton_dir = Path(metadata.distribution("triton").locate_file("triton"))
        found.append(triton_dir / "backends" / "nvidia" / "bin" / name)
    return next((str(p) for p in found if p and Path(p).is_file()), None)


def missing_tools() -> List[str]:
    """The tools this needs that are not here (nvcc, cuobjdump; Triton's ptxas comes with it)."""
    return [name for name in ("nvcc", "cuobjdump") if tool(name) is None]


# ----------------------------------------------------------------------------- jobs (workers)

def _worker_environment(triton_cache: str) -> None:
    """Compile, not interpret; Triton prints its ptxas report and compiles even when cached."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1",
                      TRITON_CACHE_DIR=triton_cache)


def _sass(cubin: bytes) -> Dict[str, kernel_resources.MemoryOps]:
    """The memory operations of every kernel in ``cubin``, by (mangled) name."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([tool("cuobjdump"), "-sass", str(path)], check=True,
                              capture_output=True, text=True).stdout
    return {name: kernel_resources.memory_ops(code)
            for name, code in kernel_resources.sass_kernels(sass).items()}


def _result(backend, kernel, variant, origin, arch, threads, report, ops, shared) -> dict:
    return Compiled(backend, kernel, variant, origin, arch, threads, report.registers,
                    report.stack, report.spill_stores, report.spill_loads, ops.local,
                    shared, ops.loads_in_loops, ops.loads_elsewhere)._asdict()


def triton_job(spec: dict, arch: int) -> List[dict]:
    """Compile one captured specialisation for sm_``arch``; its :class:`Compiled` as a dict."""
    import triton
    from triton.backends.compiler import GPUTarget
    module, name = spec["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    signature = {k: kernel_specs.decode_types(v) for k, v in spec["signature"].items()}
    source = triton.compiler.ASTSource(fn, signature,
                                       {tuple(p): v for p, v in spec["constexprs"]},
                                       {tuple(p): v for p, v in spec["attrs"]})
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                options=dict(num_warps=spec["num_warps"],
                                             num_stages=spec["num_stages"]))
    reports = kernel_resources.ptxas_report(log.getvalue())
    if kernel.metadata.name not in reports:
        raise RuntimeError(f"Triton printed no ptxas report for {name} (TRITON_DUMP_PTXAS_LOG=1 "
                           f"and TRITON_ALWAYS_COMPILE=1 are set; output: {log.getvalue()!r})")
    report = reports[kernel.metadata.name]
    ops = _sass(kernel.asm["cubin"])[kernel.metadata.name]
    origin = f"{spec['caller']}, {spec['workload']}"
    return [_result("triton", name, spec["variant"], origin, arch, spec["num_warps"] * 32,
                    report, ops, kernel.metadata.shared + report.shared)]


def nvcc_flags() -> List[str]:
    """Device flags of the extension's build (setup.py's -O3 plus torch's CUDAExtension ones)."""
    import torch
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    include = Path(torch.__file__).parent / "include"
    return ["-O3", "-std=c++20", *COMMON_NVCC_FLAGS, f"-I{include}",
            f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}"]


def _threads_per_block() -> int:
    """``kThreads`` of csrc/passes.cuh: the block size of every csrc kernel."""
    return int(re.search(r"constexpr int kThreads = (\d+);",
                         (CSRC / "passes.cuh").read_text()).group(1))


def _demangle(names: Iterable[str]) -> Dict[str, str]:
    """Mangled C++ names -> readable ones (``c++filt``; the mangled name where it is missing)."""
    names = list(names)
    filt = shutil.which("c++filt")
    if filt is None:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


def _split_name(demangled: str) -> tuple:
    """``void cbam::k<1, cbam::Op<float>>(...)`` -> (``k``, ``<1, Op<float>>``)."""
    name = demangled.replace("(anonymous namespace)::", "").replace("cbam::", "")
    name = name.removeprefix("void ").split("(")[0]
    kernel, _, args = name.partition("<")
    return kernel, f"<{args}" if args else ""


def csrc_job(arch: int) -> List[dict]:
    """Compile csrc/passes.cu for sm_``arch``; one :class:`Compiled` (as a dict) per kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "passes.cubin"
        done = subprocess.run([tool("nvcc"), "-cubin", f"-arch=sm_{arch}", *nvcc_flags(),
                               "-Xptxas", "-v", str(CSRC / "passes.cu"), "-o", str(cubin)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nvcc failed for sm_{arch}:\n{done.stderr[-4000:]}")
        ops = _sass(cubin.read_bytes())
    reports = kernel_resources.ptxas_report(done.stdout + done.stderr)
    names = _demangle(reports)
    threads = _threads_per_block()
    return [_result("cuda", *_split_name(names[mangled]), "", arch, threads, report,
                    ops[mangled], report.shared)
            for mangled, report in sorted(reports.items(), key=lambda kv: names[kv[0]])]


# ----------------------------------------------------------------------------- cache, pool

def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _contents(paths: Iterable[Path]) -> List[str]:
    """Hashes of the files' contents, in path order."""
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(paths)]


def _versions() -> List[str]:
    nvcc = subprocess.run([tool("nvcc"), "--version"], capture_output=True, text=True).stdout
    return [metadata.version("triton"), metadata.version("torch"), nvcc]


def _cached(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _store(path: Path, data) -> None:
    """Write ``data`` as JSON to ``path`` atomically (runs may share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(data))
    os.replace(partial, path)


def cached_specialisations(versions: List[str]) -> List[dict]:
    """``kernel_specs.specialisations()``, cached by the package's sources and ``versions``."""
    sources = [*sorted((REPO / "cbam_kernels").rglob("*.py")), REPO / "benchmarks" / "kernel_specs.py"]
    path = CACHE / f"specs-{_digest(_contents(sources), versions)}.json"
    specs = _cached(path)
    if specs is None:
        specs = kernel_specs.specialisations()
        _store(path, specs)
    return specs


def compile_all(archs=ARCHS) -> List[Compiled]:
    """Every Triton specialisation and every csrc kernel compiled for each of ``archs`` that
    it targets (:data:`TRITON_ARCHS`, :data:`CSRC_ARCHS`): cached results, the others
    compiled now on :data:`WORKERS` processes."""
    versions = _versions()
    this = _contents(REPO / p for p in TOOL_SOURCES)
    csrc = _contents(p for p in CSRC.iterdir() if p.suffix in (".cu", ".cuh", ".h"))
    kernels = _contents(REPO / p for p in TRITON_SOURCES)
    paths = []
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as triton_cache, concurrent.futures.ProcessPoolExecutor(
            WORKERS, context, _worker_environment, (triton_cache,)) as pool:
        futures = {}
        for arch in (a for a in archs if a in CSRC_ARCHS):  # the longest jobs first
            paths.append(CACHE / f"csrc-{arch}-{_digest(arch, csrc, versions, this)}.json")
            if not paths[-1].is_file():
                futures[paths[-1]] = pool.submit(csrc_job, arch)
        for spec in cached_specialisations(versions):  # captured while nvcc runs
            for arch in (a for a in archs if a in TRITON_ARCHS):
                key = _digest(spec, arch, kernels, versions, this)
                paths.append(CACHE / f"triton-{arch}-{key}.json")
                if not paths[-1].is_file():
                    futures[paths[-1]] = pool.submit(triton_job, spec, arch)
        for path, future in futures.items():
            _store(path, future.result())
    return [Compiled(**{**row, "loads_in_loops": _int_keys(row["loads_in_loops"]),
                        "loads_elsewhere": _int_keys(row["loads_elsewhere"])})
            for path in paths for row in _cached(path)]


def _int_keys(loads: dict) -> Dict[int, int]:
    return {int(k): v for k, v in loads.items()}
