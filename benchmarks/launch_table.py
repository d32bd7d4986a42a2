"""The launch table: kernels one call of each module launches, eager reference against ours.

    python benchmarks/launch_table.py

Counts as ``launches.py`` does (Triton launches, ops of the C++ extension, ATen ops that run on
the device) for the eval forward, the training forward and its backward, at a small float32
NCHW shape and a float16 channels_last one (parameters in the input's dtype). Providers: the
eager reference, ours on the ``torch`` backend and on ``triton`` (with no GPU through Triton's
interpreter on the CPU, which this script turns on for itself) and, on a GPU with the extension
built, ``cuda``. Prints a Markdown table.
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before the Triton kernels are first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout, not installed

from cbam_kernels import CBAM, SE, ChannelGate, SpatialGate, reference  # noqa: E402
from cbam_kernels.ops import backend  # noqa: E402

from benchmarks.launches import module_launches  # noqa: E402

MODULES = {
    "cbam": (lambda c: reference.OfficialCBAM(c, 16), lambda c: CBAM(c, 16)),
    "se": (lambda c: reference.SEModule(c, 16), lambda c: SE(c, 16)),
    "channel_gate": (lambda c: reference.OfficialCBAM(c, 16).ChannelGate,
                     lambda c: ChannelGate(c, 16)),
    "spatial_gate": (lambda c: reference.OfficialCBAM(c, 16).SpatialGate, lambda c: SpatialGate()),
}
CASES = [((2, 64, 6, 6), torch.float32, torch.contiguous_format),
         ((4, 256, 14, 14), torch.float16, torch.channels_last)]


def providers() -> list:
    """The providers this machine can count: eager, torch, and the kernel backends that run."""
    names = ["eager", "torch"]
    return names + [b for b in ("triton", "cuda") if backend.available_backends()[b] == "available"]


def counts(module: torch.nn.Module, x: torch.Tensor) -> tuple:
    """(eval forward, training forward, training backward) launches of ``module`` on ``x``."""
    train = module_launches(module, x, True, True)
    return (module_launches(module, x, False, False)["forward"].total, train["forward"].total,
            train["backward"].total)


def table() -> str:
    """The Markdown launch table of this machine."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name, (make_reference, make_ours) in MODULES.items():
        for shape, dtype, layout in CASES:
            x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
            fmt = "nhwc" if layout == torch.channels_last else "nchw"
            label = f"{name} {'x'.join(map(str, shape))} {str(dtype)[6:]} {fmt}"
            for provider in providers():
                make = make_reference if provider == "eager" else make_ours
                os.environ[backend.ENV_VAR] = "auto" if provider == "eager" else provider
                backend.forget_choices()
                module = make(shape[1]).to(device, dtype)
                rows.append([label, provider, *map(str, counts(module, x))])
    head = "| module, input | provider | eval forward | train forward | train backward |"
    lines = [head, "|---|---|---|---|---|"] + ["| " + " | ".join(r) + " |" for r in rows]
    where = f"{device}" + (" (Triton through its interpreter)" if device == "cpu" else "")
    return f"Kernels launched per call, on {where}:\n\n" + "\n".join(lines)


if __name__ == "__main__":
    print(table())
