"""What a compiled kernel uses, read from ptxas's report and the SASS, and what that allows.

* :func:`ptxas_report`: registers, stack frame, spill stores / loads and static shared memory
  per kernel, from the output of ``ptxas -v`` (nvcc ``-Xptxas -v``, or the ptxas run Triton
  makes itself).
* :func:`sass_kernels` and :func:`memory_ops`: the global loads by width, inside loops (the
  ranges that a backward branch closes: the hot loops) and elsewhere, and the local-memory
  accesses (LDL / STL), from ``cuobjdump -sass``.
* :func:`resident_blocks`: how many blocks (programs) of a kernel fit on one SM of each target,
  from its registers, threads and shared memory.
"""

import re
from collections import Counter
from typing import Dict, List, NamedTuple, Tuple


class ArchLimits(NamedTuple):
    """Per-SM limits of a compute capability (CUDA programming guide, occupancy tables)."""

    threads: int  # resident threads
    blocks: int   # resident blocks
    shared: int   # shared memory, bytes (the largest carveout)


LIMITS = {75: ArchLimits(1024, 16, 64 * 1024), 80: ArchLimits(2048, 32, 164 * 1024),
          86: ArchLimits(1536, 16, 100 * 1024), 89: ArchLimits(1536, 24, 100 * 1024),
          90: ArchLimits(2048, 32, 228 * 1024), 100: ArchLimits(2048, 32, 228 * 1024),
          120: ArchLimits(1536, 32, 100 * 1024)}
REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256      # registers are allocated per warp, in units of this many
WARP_GRANULE = 4         # warps are allocated by registers in groups of this many
#: Bytes of shared memory the system takes per block: 1 KB from sm_80 on, none before.
RESERVED_SHARED = {75: 0}


def resident_blocks(arch: int, registers: int, threads: int, shared: int) -> int:
    """Blocks of ``threads`` threads using ``registers`` per thread and ``shared`` bytes that
    can reside on one SM of compute capability ``arch`` (e.g. 90) at once."""
    limits = LIMITS[arch]
    warps = -(-threads // 32)
    per_warp = -(-max(registers, 1) * 32 // REGISTER_UNIT) * REGISTER_UNIT
    warps_by_registers = REGISTERS_PER_SM // per_warp // WARP_GRANULE * WARP_GRANULE
    per_block = shared + RESERVED_SHARED.get(arch, 1024)
    return min(limits.blocks, limits.threads // (warps * 32), warps_by_registers // warps,
               limits.shared // per_block if per_block else limits.blocks)


class PtxasEntry(NamedTuple):
    """ptxas's report of one kernel (bytes, except registers)."""

    registers: int
    stack: int
    spill_stores: int
    spill_loads: int
    shared: int


_ENTRY = re.compile(r"Compiling entry function '([\w$.]+)'")
_PROPERTIES = re.compile(r"Function properties for ([\w$.]+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_report(log: str) -> Dict[str, PtxasEntry]:
    """Each kernel's entry in the output of ``ptxas -v``."""
    entries: Dict[str, PtxasEntry] = {}
    frames: Dict[str, Tuple[int, int, int]] = {}
    kernel = function = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            kernel = m.group(1)
        elif m := _PROPERTIES.search(line):
            function = m.group(1)
        elif (m := _FRAME.search(line)) and function is not None:
            frames[function] = tuple(int(g) for g in m.groups())
        elif (m := _USED.search(line)) and kernel is not None:
            smem = _SMEM.search(line)
            entries[kernel] = PtxasEntry(int(m.group(1)), *frames.get(kernel, (0, 0, 0)),
                                         int(smem.group(1)) if smem else 0)
    return entries


_FUNCTION = re.compile(r"^\s*Function : (\S+)")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)([^;]*);")


def sass_kernels(sass: str) -> Dict[str, List[Tuple[int, str, str]]]:
    """The instructions of each kernel in ``cuobjdump -sass`` output: (address, opcode,
    operands)."""
    kernels: Dict[str, List[Tuple[int, str, str]]] = {}
    current: List[Tuple[int, str, str]] = []
    for line in sass.splitlines():
        if m := _FUNCTION.match(line):
            current = kernels.setdefault(m.group(1), [])
        elif m := _INSTRUCTION.search(line):
            current.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return kernels


def _bits(opcode: str) -> int:
    """Width of a load, from its opcode (LDG.E.128, LDG.E.U16, LDG.E ...)."""
    for part in opcode.split(".")[1:]:
        if part in ("128", "64"):
            return int(part)
        if part in ("U16", "S16", "U8", "S8"):
            return int(part[1:])
    return 32


class MemoryOps(NamedTuple):
    """Global loads by width in bits ({128: 2} = two LDG.E.128), and local-memory accesses."""

    loads_in_loops: Dict[int, int]
    loads_elsewhere: Dict[int, int]
    local: int


def memory_ops(instructions: List[Tuple[int, str, str]]) -> MemoryOps:
    """Global loads of a kernel, inside its loops and elsewhere, and its LDL/STL count."""
    loops = []
    for address, opcode, operands in instructions:
        target = re.search(r"0x([0-9a-f]+)\s*$", operands)
        if opcode.startswith("BRA") and target and int(target.group(1), 16) <= address:
            loops.append((int(target.group(1), 16), address))
    inside, elsewhere, local = Counter(), Counter(), 0
    for address, opcode, _ in instructions:
        if opcode.startswith("LDG"):
            in_loop = any(start <= address <= end for start, end in loops)
            (inside if in_loop else elsewhere)[_bits(opcode)] += 1
        local += opcode.startswith(("LDL", "STL"))
    return MemoryOps(dict(inside), dict(elsewhere), local)


def describe_loads(loads: Dict[int, int]) -> str:
    """``{128: 2, 32: 3}`` as ``128x2 32x3`` (widest first), ``-`` for none."""
    return " ".join(f"{bits}x{n}" for bits, n in sorted(loads.items(), reverse=True)) or "-"
