"""The offline compile report: every kernel for every target (sm_75 ... sm_120), as a table.

    python benchmarks/compile_report.py        # no GPU needed; nvcc and cuobjdump are

One row per kernel specialisation (Triton: as the modules launch it, see ``kernel_specs``;
CUDA: each instantiation in csrc/passes.cu), with per target (``a/b/...`` in the order of the
targets the kernel is compiled for, one value when all agree): registers per thread, spilled bytes (stores + loads), stack frame
and shared memory per block (bytes), resident blocks (programs) per SM, and the global loads
of the SASS by width in bits x count, inside loops (the hot loops) and elsewhere. Results are
cached under build/offline_compile/ (``offline_compile``).
"""

import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout, not installed

from benchmarks.kernel_resources import describe_loads  # noqa: E402
from benchmarks.offline_compile import (CSRC_ARCHS, TRITON_ARCHS, Compiled,  # noqa: E402
                                        compile_all, missing_tools)

COLUMNS = ("backend", "kernel", "specialisation", "launched by", "threads", "registers",
           "spilled B", "stack B", "smem B", "programs/SM", "loads in loops", "other loads")


def _per_arch(values: List) -> str:
    """One value when every target agrees, else ``a/b/c/d`` in target order."""
    return str(values[0]) if len(set(values)) == 1 else "/".join(map(str, values))


def rows_by_kernel(compiled: List[Compiled]) -> Dict[tuple, List[Compiled]]:
    """The results grouped by kernel specialisation (first-seen order), targets in order."""
    groups: Dict[tuple, List[Compiled]] = {}
    for c in compiled:
        groups.setdefault((c.backend, c.kernel, c.variant, c.origin), []).append(c)
    return {key: sorted(group, key=lambda c: c.arch) for key, group in groups.items()}


def table(compiled: List[Compiled]) -> str:
    """The Markdown table of ``compiled``."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for (backend, kernel, variant, origin), group in rows_by_kernel(compiled).items():
        cells = [backend, kernel, variant, origin, _per_arch([c.threads for c in group]),
                 _per_arch([c.registers for c in group]),
                 _per_arch([c.spill_stores + c.spill_loads for c in group]),
                 _per_arch([c.stack for c in group]), _per_arch([c.shared for c in group]),
                 _per_arch([c.resident_blocks for c in group]),
                 _per_arch([describe_loads(c.loads_in_loops) for c in group]),
                 _per_arch([describe_loads(c.loads_elsewhere) for c in group])]
        lines.append("| " + " | ".join(cells) + " |")
    return (f"Kernels compiled for {_targets(TRITON_ARCHS)} (Triton) and {_targets(CSRC_ARCHS)} "
            "(csrc); a/b/...: per target, in that order:\n\n" + "\n".join(lines))


def _targets(archs) -> str:
    return ", ".join(f"sm_{a}" for a in archs)


if __name__ == "__main__":
    missing = missing_tools()
    if missing:
        sys.exit(f"compile_report: {', '.join(missing)} not found (set CUDA_HOME)")
    print(table(compile_all()))
