"""The shape of the package: imports go one way (models, conversion and inspection -> modules ->
the op -> the backend choice -> the backends, with the shared types below them all), no backend
imports another, a forward is a short walk, files and kernel signatures stay small.

Imports are read from the source (every ``import`` statement, those inside functions too), so a
new import that climbs a layer fails here before anyone has to find the cycle.
"""

import ast
import sys
from pathlib import Path

import pytest
import torch

import cbam_kernels
from cbam_kernels import CBAM, SE, ChannelGate, SpatialGate

PACKAGE = Path(cbam_kernels.__file__).resolve().parent
MAX_LINES = 500
MAX_FORWARD_FILES = 5
MAX_KERNEL_ARGUMENTS = 25

#: Layers, lowest first: a module may import its own layer and those below it.
LAYERS = [
    ("types", ("ops.types",)),
    ("backends", ("ops.torch", "ops.triton", "ops.cuda", "_C")),
    ("kernel pipeline", ("ops.kernel_pipeline",)),
    ("backend choice", ("ops.backend",)),
    ("op", ("ops.gate", "ops")),
    ("modules", ("modules",)),
    ("reference", ("reference",)),
    ("models, conversion, inspection", ("models", "conversion", "attention_maps", "plotting",
                                        "finetune")),
    ("package", ("", "__main__")),
]
BACKENDS = ("ops.torch", "ops.triton", "ops.cuda")


def _name(path: Path) -> str:
    """``ops/triton/passes.py`` -> ``ops.triton.passes``; a package's ``__init__`` is the
    package."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or (prefix != "" and name.startswith(prefix + "."))


def _layer(name: str) -> int:
    """The index in LAYERS of the most specific prefix of ``name``."""
    best = max(((len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS)
                for prefix in prefixes if _within(name, prefix)), default=None)
    assert best is not None, f"cbam_kernels.{name} is in no layer of LAYERS: add it"
    return best[1]


def _backend(name: str):
    return next((b for b in BACKENDS if _within(name, b)), None)


def _imports(path: Path):
    """The package modules that ``path`` imports (relative to ``cbam_kernels``)."""
    parts = _name(path).split(".") if _name(path) else []
    package = parts if path.name == "__init__.py" else parts[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("cbam_kernels"):
                target = node.module[len("cbam_kernels."):] if "." in node.module else ""
            else:
                continue
            # ``from . import passes``: the names may be modules themselves
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                spec = PACKAGE.joinpath(*sub.split("."))
                module = spec.with_suffix(".py").exists() or spec.is_dir() or sub == "_C"
                yield sub if module else target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("cbam_kernels."):
                    yield alias.name[len("cbam_kernels."):]


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path):
    name = _name(path)
    own = _layer(name)
    climbs = [(target, LAYERS[_layer(target)][0]) for target in _imports(path)
              if _layer(target) > own]
    assert not climbs, f"cbam_kernels.{name} ({LAYERS[own][0]}) imports {climbs}"


@pytest.mark.parametrize("path", [p for p in SOURCES if _backend(_name(p))],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_backend_imports_another(path):
    own = _backend(_name(path))
    others = [t for t in _imports(path) if _backend(t) not in (None, own)]
    assert not others, f"cbam_kernels.{_name(path)} ({own}) imports {others}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_stay_short(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines (> {MAX_LINES})"


def _files_of_a_call(module: torch.nn.Module, x: torch.Tensor):
    """The package files whose functions one call of ``module(x)`` runs (after a first call
    that made the backend choice)."""
    module(x)
    files = set()

    def profile(frame, event, arg):
        if event == "call":
            where = Path(frame.f_code.co_filename)
            if where.is_relative_to(PACKAGE):
                files.add(str(where.relative_to(PACKAGE)))
    sys.setprofile(profile)
    try:
        module(x)
    finally:
        sys.setprofile(None)
    return sorted(files)


@pytest.mark.parametrize("make", [lambda: CBAM(16, 4), lambda: CBAM(16, 4, style="timm"),
                                  lambda: SE(16, 4), lambda: ChannelGate(16, 4),
                                  lambda: SpatialGate()],
                         ids=["cbam", "cbam-timm", "se", "channel", "spatial"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_a_forward_on_the_cpu_walks_at_most_five_files(make, training):
    module = make().train(training)
    x = torch.randn(2, 16, 5, 5, requires_grad=training)
    files = _files_of_a_call(module, x)
    assert len(files) <= MAX_FORWARD_FILES, files


def test_the_walk_is_counted():
    """The profile sees the package (else the bound above would pass vacuously)."""
    files = _files_of_a_call(CBAM(16, 4).eval(), torch.randn(2, 16, 5, 5))
    assert "modules/cbam.py" in files and "ops/gate.py" in files
