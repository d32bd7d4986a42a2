"""CPU smoke test of the benchmark suite (``benchmarks/``), so that it cannot rot.

The main job and the ResNet-50 benchmark run in subprocesses, as a user runs them, on tiny shapes
with one round; the checks read the JSON, the Markdown and the charts they leave. Nothing here
asserts on timings.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import report, traffic
from benchmarks.suite import SettingsError, op_cases, resolve_settings

REPO = Path(__file__).resolve().parents[1]
TINY = ["--bench-device=cpu", "--bench-shapes=tiny", "--bench-batches=2", "--bench-rounds=1",
        "--bench-compile-backend=aot_eager"]
PROVIDERS = {"eager", "compile", "torch", "torch+compile"}
COMPILED = {"compile", "torch+compile"}
METRICS = {"median_ms", "tensor_bytes", "bytes_moved", "gbps", "copy_gbps", "pct_copy_bw",
           "io_floor_bytes", "floor_ratio", "peak_mem_bytes", "speedup_vs_eager",
           "speedup_vs_compile", "launches", "launch_names"}


def run_python(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python ARGS`` in the repository, one thread, no benchmark settings from the caller."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CBAM_BENCH_") and k != "CBAM_KERNELS_BACKEND"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """The main job on tiny shapes with the CPU providers (eager and compiled, the reference's
    and ours): (stdout, out)."""
    out = tmp_path_factory.mktemp("main_job")
    done = run_python("benchmarks/main.py", "--out", str(out), "--", *TINY,
                      f"--bench-providers={','.join(sorted(PROVIDERS))}")
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    return done.stdout, out


def test_main_job_prints_the_table(main_job):
    stdout, _ = main_job
    assert "| pass | dtype | format | batch | shape |" in stdout
    assert "### cbam" in stdout
    assert "### host time per call" in stdout and "| op | pass | provider | µs per call |" in stdout
    assert "### launches per call" in stdout
    assert "| cbam 2x64x6x6 float32 nchw | eager | 18 | 19 | 39 |" in stdout
    assert "### host time per call without the launches" in stdout
    assert ("| op | pass | ours, µs | ours + binding, µs | eager, µs | ours / eager | "
            "ours + binding / eager |") in stdout
    if not torch.cuda.is_available():
        assert "need a GPU" in stdout


def _infos(out, host):
    """The extra_info of the op results (host=False) or of the host-time ones (host=True)."""
    infos = [b["extra_info"] for b in json.loads((out / "results.json").read_text())["benchmarks"]]
    return [i for i in infos if (i.get("kind") == "host") == host]


def test_every_result_carries_its_metrics(main_job):
    _, out = main_job
    infos = _infos(out, host=False)
    assert {"cbam", "se"} <= {i["op"] for i in infos}
    providers = {}
    for info in infos:
        assert METRICS <= set(info), sorted(METRICS - set(info))
        counted = info["provider"] not in COMPILED
        assert (info["launches"] is not None) == counted
        assert not counted or info["launches"] == len(info["launch_names"]) > 0
        assert info["bytes_moved"] == info["min_passes"] * info["tensor_bytes"]
        assert info["speedup_vs_eager"] > 0 and info["speedup_vs_compile"] > 0
        config = (info["op"], info["pass_name"], info["format"])
        providers.setdefault(config, set()).add(info["provider"])
    assert all(found == PROVIDERS for found in providers.values()), providers


def test_host_time_rows(main_job):
    """Host time per call of CBAM and SE, forward and forward+backward, eager and ours, with
    ours over eager and the launches per call."""
    _, out = main_job
    rows = _infos(out, host=True)
    assert {(r["op"], r["pass_name"], r["provider"]) for r in rows} == {
        (op, p, provider) for op in ("cbam", "se") for p in ("forward", "fwd+bwd")
        for provider in ("eager", "torch")}
    for row in rows:
        assert row["us_per_call"] > 0 and row["launches"] > 0
        assert row["host_vs_eager"] == 1.0 if row["provider"] == "eager" else \
            row["host_vs_eager"] > 0
    markdown = (out / "results.md").read_text()
    assert "## Host time per call" in markdown


def test_report_writes_markdown_and_charts(main_job):
    _, out = main_job
    markdown = (out / "results.md").read_text()
    assert "GPU:" in markdown and "torch " in markdown and "commit " in markdown
    assert "### cbam" in markdown and "## Charts" in markdown
    charts = sorted(out.glob("*.png"))
    assert {"speedup_cbam_fp32.png", "bandwidth_fp32.png"} <= {p.name for p in charts}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in charts)


def test_report_replaces_the_readme_section(main_job, tmp_path):
    _, out = main_job
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold\n{report.README_END}\nafter\n")
    report.main([str(out / "results.json"), "--out", str(tmp_path / "results"),
                 "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{report.README_END}\nafter\n")
    assert "old" not in text and "### cbam_kernels benchmark results" in text
    assert "](results/speedup_cbam_fp32.png)" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the whole suite")
def test_gpu_suite_skips_cleanly_without_a_gpu():
    done = run_python("-m", "pytest", "benchmarks", "--benchmark-only", "-q", "-rs",
                      "-p", "no:cacheprovider")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "need a CUDA device" in done.stdout


def test_resnet_benchmark_runs_on_cpu(tmp_path):
    pytest.importorskip("cbam_kernels.models")
    results = tmp_path / "resnet.json"
    done = run_python("-m", "pytest", "benchmarks/test_bench_resnet.py", "--benchmark-only",
                      "-q", "-p", "no:cacheprovider", *TINY, "--bench-providers=eager",
                      f"--benchmark-json={results}")
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    assert "ResNet-50" in done.stdout
    models = report.load(results).models
    assert {m["variant"] for m in models} == {"plain", "se-reference", "se-ours",
                                             "cbam-reference", "cbam-ours"}
    assert all(m["images_per_s"] > 0 for m in models)
    assert "cbam-ours" in report.model_table(models)


def test_settings_defaults_full_and_overrides():
    default = resolve_settings(lambda name: None, full=False)
    assert (default.device, default.batches, default.dtypes) == ("cuda", (64,), ("fp16",))
    assert default.shapes == ((256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7))
    full = resolve_settings(lambda name: None, full=True)
    assert full.batches == (32, 64, 128) and full.dtypes == ("fp32", "fp16", "bf16")
    assert len(full.shapes) == 7  # VGG16's (256,56,56) and (512,28,28) are stage shapes too
    given = {"device": "cpu", "shapes": "tiny,16x4x4", "rounds": "3"}
    cpu = resolve_settings(given.get, full=False)
    assert cpu.providers == ("eager", "compile", "torch", "torch+compile") and cpu.shapes == ((32, 6, 5), (16, 4, 4))
    assert (cpu.rounds, cpu.warmup_rounds) == (3, 1)
    for bad in ({"dtypes": "fp8"}, {"shapes": "7x7"}, {"batches": "0"}, {"device": "tpu"}):
        with pytest.raises(SettingsError):
            resolve_settings(bad.get, full=False)


def test_providers_of_a_configuration_are_adjacent():
    settings = resolve_settings({"device": "cpu", "providers": "eager,compile,torch"}.get, False)
    cases = op_cases("cbam", settings)
    assert len(cases) == 2 * 3 * 2 * 3  # shapes x passes x formats x providers
    assert [c.provider for c in cases[:3]] == ["eager", "compile", "torch"]
    assert len({c.key for c in cases[:3]}) == 1 and len({c.id for c in cases}) == len(cases)


def test_byte_counts_follow_the_design():
    assert [traffic.min_passes("cbam", p) for p in ("forward", "backward", "fwd+bwd")] == [4, 6, 10]
    assert [traffic.min_passes("se", p) for p in ("forward", "backward", "fwd+bwd")] == [3, 4, 7]
    assert [traffic.io_floor_passes(p) for p in ("forward", "backward", "fwd+bwd")] == [2, 3, 5]


def _op_row(provider, shape, median_ms, floor_ratio, vs_eager, vs_compile, fmt="nhwc"):
    return dict(op="cbam", provider=provider, pass_name="forward", batch=64, shape=shape,
                dtype="fp16", format=fmt, median_ms=median_ms, floor_ratio=floor_ratio,
                speedup_vs_eager=vs_eager, speedup_vs_compile=vs_compile, launches=5)


def test_targets_table_counts_the_shapes_that_meet_each_target():
    """Floor targets hold at most the goal, speedup targets at least; the fastest of ours is
    taken shape by shape (here cuda at one shape, triton at the other)."""
    rows = [_op_row("cuda", [256, 56, 56], 0.1, 1.5, 5.0, 2.5),
            _op_row("triton", [256, 56, 56], 0.2, 3.0, 2.5, 1.2),
            _op_row("cuda", [2048, 7, 7], 0.4, 9.0, 1.1, 0.9),
            _op_row("triton", [2048, 7, 7], 0.3, 7.0, 1.4, 1.2)]
    lines = report.targets_table(rows, fastest_only=True).splitlines()
    floor = next(ln for ln in lines if "forward ≤ 2× the 2-pass floor" in ln)
    assert "fastest of ours" in floor and "| 7.00× | 1/2 |" in floor
    eager = next(ln for ln in lines if "forward ≥ 4× faster than eager" in ln)
    assert "| 1.40× | 1/2 |" in eager
    per_provider = report.targets_table(rows)
    assert "| cuda | nhwc | 9.00× | 1/2 |" in per_provider
    assert "| triton | nhwc | 7.00× | 0/2 |" in per_provider


def test_report_reads_one_run_split_over_files(tmp_path):
    """The GPU round writes one JSON per op and layout: report.load reads them as one run,
    with the first file's machine."""
    for i, fmt in enumerate(("nchw", "nhwc")):
        data = {"machine_info": {"gpu": f"GPU {i}"}, "datetime": f"day {i}",
                "benchmarks": [{"extra_info": _op_row("cuda", [64, 8, 8], 0.1, 2, 3, 1, fmt)}]}
        (tmp_path / f"{fmt}.json").write_text(json.dumps(data))
    results = report.load(tmp_path / "nchw.json", tmp_path / "nhwc.json")
    assert [r["format"] for r in results.ops] == ["nchw", "nhwc"]
    assert results.machine["gpu"] == "GPU 0" and results.datetime == "day 0"
