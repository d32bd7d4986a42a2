"""Turn a pytest-benchmark JSON file into a Markdown report and PNG charts.

    python benchmarks/report.py results.json [more.json ...] --out benchmarks/results/ \
        [--readme README.md]

Writes ``results.md``: a header (GPU, torch / Triton / CUDA versions, git commit), the
performance targets, one table per op (median ms per provider; for the fastest of our providers
the speedup over eager and over torch.compile, GB/s, % of the copy bandwidth, times the two-pass
floor; the launches per call of each provider), the host time per call, peak memory of
forward+backward, and the ResNet-50 table; several JSON files (one run split over processes)
are read as one. Charts:
``speedup_<op>_<dtype>.png`` (speedup over eager per shape and provider, a panel per pass and
format) and
``bandwidth_<dtype>.png`` (% of the copy bandwidth, a panel per op and pass). With ``--readme``
the text between ``<!-- results:start -->`` and ``<!-- results:end -->`` in that file becomes
a brief form of it (header, ResNet-50, a link to results.md for the targets and op tables, the
charts), its links relative to the README.
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

PROVIDERS = ("eager", "compile", "triton", "cuda", "torch", "torch+compile")
BASELINES = ("eager", "compile")
COMPILED = ("compile", "torch+compile")
PASS_ORDER = ("forward", "backward", "fwd+bwd")
#: (op, pass, metric, goal, at least): what our fastest provider must reach at batch 64 in
#: fp16 at every stage shape. ``floor_ratio``: times the two-pass floor (at most ``goal``);
#: ``speedup_vs_*``: the baseline's time over ours (at least ``goal``).
OP_TARGETS = (("cbam", "forward", "floor_ratio", 2.0, False),
              ("cbam", "fwd+bwd", "floor_ratio", 8.0, False),
              ("cbam", "forward", "speedup_vs_eager", 4.0, True),
              ("cbam", "forward", "speedup_vs_compile", 2.0, True),
              ("cbam", "fwd+bwd", "speedup_vs_eager", 4.0, True),
              ("cbam", "fwd+bwd", "speedup_vs_compile", 2.0, True),
              ("se", "forward", "floor_ratio", 1.5, False))
TARGET_BATCH, TARGET_DTYPE = 64, "fp16"
#: Largest overhead over the plain ResNet-50: attention -> (inference, training step, peak memory).
MODEL_TARGETS = {"cbam": (10, 15, 25), "se": (10, 15, None)}
#: The (pass, metric) of each overhead column, in the order of MODEL_TARGETS' tuples.
MODEL_OVERHEADS = (("forward", "median_ms"), ("fwd+bwd", "median_ms"),
                   ("fwd+bwd", "peak_mem_bytes"))
OPS_NOTE = ("Median ms per provider. × eager: the eager reference over the fastest of our "
            "providers run eagerly; × compile: the compiled reference over the fastest of ours, "
            "compiled (torch+compile: ours under torch.compile) or not. GB/s "
            "and % copy BW count the op's own minimum passes over x (benchmarks/traffic.py); × floor is "
            "the "
            "time over the two-pass floor (read x + write y at the measured copy bandwidth; 3 and "
            "5 passes for backward and forward+backward). Launches: kernels one call launches, per "
            "provider (benchmarks/launches.py).")
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"
REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """Short hash of the checked-out commit, or 'unknown' (no git, no commit yet)."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def environment_info() -> Dict[str, str]:
    """GPU name, torch / Triton / CUDA versions and the git commit of this machine."""
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)",
            "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda or "none", "commit": git_commit()}


@dataclass
class Results:
    """The op, host-time and model results of one JSON file (their ``extra_info``) and its
    metadata."""

    ops: List[dict]
    host: List[dict]
    models: List[dict]
    machine: Dict[str, object]
    datetime: str


def load(*paths: Path) -> Results:
    """Read one or more ``--benchmark-json`` files of one run (the first one's machine and
    date stand for all)."""
    files = [json.loads(Path(path).read_text()) for path in paths]
    infos = [b["extra_info"] for data in files for b in data.get("benchmarks", [])
             if b.get("extra_info")]
    return Results(ops=[i for i in infos if "op" in i and i.get("kind") != "host"],
                   host=[i for i in infos if i.get("kind") == "host"],
                   models=[i for i in infos if "model" in i],
                   machine=files[0].get("machine_info", {}), datetime=files[0].get("datetime", ""))


def _fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    """``value`` in ``spec`` ("sig" = three significant digits, no exponent), '–' for None."""
    if value is None:
        return "–"
    if spec == "sig":
        return f"{value:.0f}{suffix}" if abs(value) >= 100 else f"{value:.3g}{suffix}"
    return f"{value:{spec}}{suffix}"


def _table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


class Config(NamedTuple):
    """Every axis of an op result but the provider, in sorting order."""

    op: str
    pass_index: int
    dtype: str
    format: str
    batch: int
    shape: Tuple[int, ...]

    @property
    def cells(self) -> List[str]:
        """Table cells: pass, dtype, format, batch, shape."""
        return [PASS_ORDER[self.pass_index], self.dtype, self.format, str(self.batch),
                "x".join(map(str, self.shape))]


def _config(row: dict) -> Config:
    return Config(row["op"], PASS_ORDER.index(row["pass_name"]), row["dtype"], row["format"],
                  row["batch"], tuple(row["shape"]))


def _by_config(rows: List[dict]) -> Dict[Config, Dict[str, dict]]:
    """config -> provider -> row, configurations sorted."""
    grouped: Dict[Config, Dict[str, dict]] = {}
    for row in sorted(rows, key=_config):
        grouped.setdefault(_config(row), {})[row["provider"]] = row
    return grouped


def _providers(rows: List[dict]) -> List[str]:
    present = {r["provider"] for r in rows}
    return [p for p in PROVIDERS if p in present]


def _fastest_fused(by_provider: Dict[str, dict], compiled: bool = True) -> Optional[dict]:
    """The fastest of our providers' rows (``compiled`` False: of those run eagerly)."""
    fused = [r for p, r in by_provider.items()
             if p not in BASELINES and (compiled or p not in COMPILED)]
    return min(fused, key=lambda r: r["median_ms"]) if fused else None


def header(results: Results) -> str:
    """The machine the numbers come from (as stamped by the run) and the commit."""
    info = results.machine
    commit = info.get("commit", "unknown")
    commit = git_commit() if commit == "unknown" else commit
    text = (f"GPU: {info.get('gpu', '?')} · torch {info.get('torch', '?')} · "
            f"Triton {info.get('triton', '?')} · CUDA {info.get('cuda', '?')} · "
            f"commit {commit} · {results.datetime or 'date unknown'}")
    copy = {r["copy_gbps"] for r in results.ops}
    if copy:
        text += f"\n\nMeasured copy bandwidth (read + write): {max(copy):.0f} GB/s."
    return text


def op_tables(rows: List[dict], heading: str = "###") -> str:
    """One table per op: medians per provider and the fastest fused provider's ratios."""
    sections = []
    for op in dict.fromkeys(r["op"] for r in sorted(rows, key=_config)):
        op_rows = [r for r in rows if r["op"] == op]
        providers = _providers(op_rows)
        head = ["pass", "dtype", "format", "batch", "shape", *(f"{p} ms" for p in providers),
                "fastest fused", "× eager", "× compile", "GB/s", "% copy BW", "× floor",
                "launches"]
        body = []
        for config, by_provider in _by_config(op_rows).items():
            best = _fastest_fused(by_provider) or {}
            eager_best = _fastest_fused(by_provider, compiled=False) or {}
            medians = [_fmt(by_provider.get(p, {}).get("median_ms"), ".3f") for p in providers]
            body.append([*config.cells, *medians, best.get("provider", "–"),
                         _fmt(eager_best.get("speedup_vs_eager"), ".2f", "×"),
                         _fmt(best.get("speedup_vs_compile"), ".2f", "×"),
                         _fmt(best.get("gbps"), "sig"), _fmt(best.get("pct_copy_bw"), "sig", "%"),
                         _fmt(best.get("floor_ratio"), "sig", "×"), _launches(by_provider)])
        sections.append(f"{heading} {op}\n\n{_table(head, body)}")
    return "\n\n".join(sections)


def _launches(by_provider: Dict[str, dict]) -> str:
    """'eager 18 · torch 16': kernels launched per call, by provider (those counted)."""
    counted = [(p, by_provider[p].get("launches")) for p in PROVIDERS if p in by_provider]
    return " · ".join(f"{p} {n}" for p, n in counted if n is not None) or "–"


def host_table(rows: List[dict]) -> str:
    """Host time per call on a tiny input, per op, pass and provider: µs, ours over eager and
    the launches."""
    order = {p: i for i, p in enumerate(PROVIDERS)}
    rows = sorted(rows, key=lambda r: (r["op"], PASS_ORDER.index(r["pass_name"]),
                                       order[r["provider"]]))
    body = [[r["op"], r["pass_name"], r["provider"], _fmt(r["us_per_call"], ".1f"),
             _fmt(r.get("host_vs_eager"), ".2f", "×") if r["provider"] != "eager" else "",
             _fmt(r.get("launches"), "d")] for r in rows]
    shape = "x".join(map(str, rows[0]["shape"])) if rows else "?"
    return (f"Input {shape}, float32, NCHW, on {rows[0]['device'] if rows else '?'}; "
            "× eager is our host time over the eager reference's (1.0 or less: no more).\n\n"
            + _table(["op", "pass", "provider", "µs per call", "× eager", "launches"], body))


def memory_table(rows: List[dict]) -> str:
    """Peak memory of forward+backward beyond the inputs, MiB per provider ('' if none)."""
    rows = [r for r in rows if r.get("peak_mem_bytes") is not None]
    if not rows:
        return ""
    providers = _providers(rows)
    body = [[config.op, *config.cells[1:],
             *(_fmt(by[p]["peak_mem_bytes"] / 2 ** 20 if p in by else None, ".0f")
               for p in providers)]
            for config, by in _by_config(rows).items()]
    return _table(["op", "dtype", "format", "batch", "shape", *(f"{p} MiB" for p in providers)],
                  body)


def targets_table(rows: List[dict], fastest_only: bool = False) -> str:
    """Each target, per provider of ours (``fastest_only``: the fastest of ours at each shape)
    and format: the worst value over the stage shapes and how many shapes meet it."""
    rows = [r for r in rows if r["batch"] == TARGET_BATCH and r["dtype"] == TARGET_DTYPE]
    if fastest_only:
        by_provider = {"fastest of ours": [best for by in _by_config(rows).values()
                                           if (best := _fastest_fused(by)) is not None]}
    else:
        by_provider = {p: [r for r in rows if r["provider"] == p] for p in _providers(rows)
                       if p not in BASELINES}
    body = []
    for op, pass_name, metric, goal, at_least in OP_TARGETS:
        what = (f"{op} {pass_name} ≥ {goal:g}× faster than {metric.rsplit('_', 1)[1]}"
                if at_least else f"{op} {pass_name} ≤ {goal:g}× the 2-pass floor")
        for provider, provider_rows in by_provider.items():
            picked = [r for r in provider_rows if r["op"] == op and r["pass_name"] == pass_name
                      and r.get(metric) is not None]
            for fmt in sorted({r["format"] for r in picked}):
                values = [r[metric] for r in picked if r["format"] == fmt]
                met = sum(v >= goal if at_least else v <= goal for v in values)
                worst = min(values) if at_least else max(values)
                body.append([what, provider, fmt, f"{worst:.2f}×", f"{met}/{len(values)}"])
    if not body:
        return ""
    return _table(["target (batch 64, fp16)", "provider", "format", "worst shape",
                   "shapes meeting it"], body)


def model_table(rows: List[dict]) -> str:
    """ResNet-50 variants: times, images/s, peak training memory and overhead over plain."""
    cells: Dict[Tuple[str, str], Dict[str, dict]] = {}
    for row in rows:
        cells.setdefault((row["variant"], row["execution"]), {})[row["pass_name"]] = row
    body = []
    for (variant, execution), passes in cells.items():
        plain = cells.get(("plain", execution), {})
        infer, train = passes.get("forward", {}), passes.get("fwd+bwd", {})
        peak = train.get("peak_mem_bytes")
        goals = MODEL_TARGETS.get(next(iter(passes.values()))["attention"], (None,) * 3)
        overheads = [_overhead(passes.get(p, {}).get(key), plain.get(p, {}).get(key), goal)
                     for (p, key), goal in zip(MODEL_OVERHEADS, goals)]
        body.append([variant, execution,
                     _fmt(infer.get("median_ms"), ".1f"), _fmt(infer.get("images_per_s"), ".0f"),
                     _fmt(train.get("median_ms"), ".1f"), _fmt(train.get("images_per_s"), ".0f"),
                     _fmt(None if peak is None else peak / 2 ** 30, ".2f"), *overheads])
    first = next(iter(rows), {})
    title = (f"batch {first.get('batch', '?')}, {first.get('image_size', '?')} px, "
             f"{first.get('precision', '?')}, channels_last")
    return title + "\n\n" + _table(
        ["variant", "execution", "inference ms", "img/s", "train step ms", "img/s",
         "peak train GiB", "+inference", "+train step", "+peak memory"], body)


def _overhead(value: Optional[float], plain: Optional[float], goal: Optional[int]) -> str:
    """'+12% (≤ 20%)': the increase over the plain network, with the target if there is one."""
    if value is None or not plain:
        return "–"
    text = f"{100 * (value / plain - 1):+.0f}%"
    return text if goal is None else f"{text} (≤ {goal}%)"


def speedup_charts(rows: List[dict], out: Path) -> List[Path]:
    """speedup_<op>_<dtype>.png: speedup over eager per configuration and provider."""
    paths = []
    for op in sorted({r["op"] for r in rows}):
        for dtype in sorted({r["dtype"] for r in rows if r["op"] == op}):
            picked = [r for r in rows if r["op"] == op and r["dtype"] == dtype
                      and r["provider"] != "eager"]
            panels = {(p, f): [r for r in picked if r["pass_name"] == p and r["format"] == f]
                      for p in PASS_ORDER for f in ("nchw", "nhwc")}
            paths.append(_bar_chart(out / f"speedup_{op}_{dtype}.png",
                                    f"{op}, {dtype}: speedup over eager (higher is better)",
                                    panels, "speedup_vs_eager", reference_line=1.0,
                                    label=lambda c: f"b{c.batch}\n{c.cells[4]}"))
    return paths


def bandwidth_charts(rows: List[dict], out: Path) -> List[Path]:
    """bandwidth_<dtype>.png: % of the copy bandwidth per configuration and provider."""
    paths = []
    for dtype in sorted({r["dtype"] for r in rows}):
        picked = [r for r in rows if r["dtype"] == dtype]
        panels = {(op, p): [r for r in picked if r["op"] == op and r["pass_name"] == p]
                  for op in sorted({r["op"] for r in picked}) for p in PASS_ORDER}
        paths.append(_bar_chart(out / f"bandwidth_{dtype}.png",
                                f"{dtype}: % of copy bandwidth (op's minimum passes)", panels,
                                "pct_copy_bw", reference_line=100.0,
                                label=lambda c: f"b{c.batch} {c.format}\n{c.cells[4]}"))
    return paths


def _bar_chart(path: Path, title: str, panels: Dict[Tuple[str, str], List[dict]], key: str,
               reference_line: float, label: Callable[[Config], str]) -> Path:
    """Grouped bars of ``key`` (a group per configuration, named by ``label``; a bar per
    provider), one panel per entry of ``panels`` on a (name[0], name[1]) grid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    filled = [name for name, rows in panels.items() if rows]
    grid_rows = list(dict.fromkeys(name[0] for name in filled))
    grid_cols = list(dict.fromkeys(name[1] for name in filled))
    fig, axes = plt.subplots(len(grid_rows), len(grid_cols), squeeze=False,
                             figsize=(5.5 * len(grid_cols), 3.2 * len(grid_rows)))
    for (i, row_name), (j, col_name) in itertools.product(enumerate(grid_rows),
                                                          enumerate(grid_cols)):
        ax = axes[i][j]
        ax.set_title(f"{row_name} · {col_name}", fontsize=9)
        by_config = _by_config(panels.get((row_name, col_name), []))
        if not by_config:
            ax.axis("off")
            continue
        providers = _providers([r for by in by_config.values() for r in by.values()])
        width = 0.8 / len(providers)
        for k, provider in enumerate(providers):
            values = [by.get(provider, {}).get(key) or 0.0 for by in by_config.values()]
            ax.bar([n + k * width for n in range(len(values))], values, width, label=provider)
        ax.axhline(reference_line, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks([n + 0.4 - width / 2 for n in range(len(by_config))])
        ax.set_xticklabels([label(c) for c in by_config], fontsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(results: Results, charts: List[Path], chart_dir: str, level: int = 1,
           brief: bool = False) -> str:
    """The Markdown report, its title at heading ``level``; charts link to
    ``chart_dir/<name>``. ``brief``: header, ResNet-50, a link to ``chart_dir/results.md`` for the
    targets and the op tables, the charts (the README's form)."""
    title, section = "#" * level, "#" * (level + 1)
    parts = [f"{title} cbam_kernels benchmark results", header(results)]
    if brief:
        if results.models:
            parts.append(f"{section} ResNet-50\n\n" + model_table(results.models))
        if results.ops:
            parts.append(f"The targets met and missed, every op time (ms per provider, GB/s, % "
                         f"of the copy bandwidth, times the floor, launches), the host time and "
                         f"the peak memory: [results.md]({chart_dir}/results.md).")
        return "\n\n".join(parts + _chart_links(charts, chart_dir, section)) + "\n"
    fastest = targets_table(results.ops, fastest_only=True)
    if fastest:
        parts.append(f"{section} Targets\n\nThe fastest of ours at each shape:\n\n{fastest}\n\n"
                     f"Per provider:\n\n{targets_table(results.ops)}")
    if results.ops:
        parts.append(f"{section} Ops\n\n{OPS_NOTE}\n\n"
                     + op_tables(results.ops, "#" * (level + 2)))
    if results.host:
        parts.append(f"{section} Host time per call\n\n" + host_table(results.host))
    memory = memory_table(results.ops)
    if memory:
        parts.append(f"{section} Peak memory, forward+backward (beyond the inputs)\n\n" + memory)
    if results.models:
        parts.append(f"{section} ResNet-50\n\n" + model_table(results.models))
    return "\n\n".join(parts + _chart_links(charts, chart_dir, section)) + "\n"


def _chart_links(charts: List[Path], chart_dir: str, section: str) -> List[str]:
    """The charts section (none without charts)."""
    if not charts:
        return []
    return [f"{section} Charts\n\n" + "\n".join(f"![{p.stem}]({chart_dir}/{p.name})"
                                                for p in charts)]


def write_report(json_paths: Sequence[Path], out: Path, readme: Optional[Path] = None) -> Path:
    """Write results.md and the charts into ``out`` (and the README section); return results.md."""
    results = load(*json_paths)
    out.mkdir(parents=True, exist_ok=True)
    charts = speedup_charts(results.ops, out) + bandwidth_charts(results.ops, out)
    target = out / "results.md"
    target.write_text(render(results, charts, "."))
    if readme is not None:
        text = readme.read_text()
        if README_START not in text or README_END not in text:
            raise SystemExit(f"{readme} has no {README_START} ... {README_END} section")
        before, rest = text.split(README_START, 1)
        after = rest.split(README_END, 1)[1]
        chart_dir = os.path.relpath(out, readme.parent).replace(os.sep, "/")
        section = render(results, charts, chart_dir, level=3, brief=True)
        readme.write_text(f"{before}{README_START}\n{section}{README_END}{after}")
    return target


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+",
                        help="pytest --benchmark-json files of one run")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="directory for results.md and the PNGs")
    parser.add_argument("--readme", type=Path, help="README whose results section to replace")
    args = parser.parse_args(argv)
    print(f"wrote {write_report(args.json, args.out, args.readme)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
