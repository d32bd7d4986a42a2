"""Device timing: a pytest-benchmark timer on CUDA events, medians, copy bandwidth, peak memory.

On CUDA every round is timed with a pair of CUDA events around one call; elsewhere with
``time.perf_counter`` (CPU work is synchronous). Setup (fresh inputs, the forward before a
backward-only round) runs outside the timed region.
"""

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

Arguments = Tuple[tuple, Dict[str, Any]]
#: Size of the buffer copied to measure the device's copy bandwidth.
COPY_BUFFER_BYTES = {"cuda": 1 << 30, "cpu": 1 << 26}


@dataclass
class Workload:
    """A timed callable, and the setup that hands it fresh arguments each round (untimed)."""

    run: Callable[..., Any]
    setup: Callable[[], Arguments]

    def call(self) -> Any:
        """One untimed setup + run."""
        args, kwargs = self.setup()
        return self.run(*args, **kwargs)


def device_clock(device: torch.device) -> Callable[[], float]:
    """A timer for pytest-benchmark that measures device time.

    pytest-benchmark reads the timer before and after each call. On CUDA the first reading of a
    pair records a start event, the second records an end event, waits for it and advances the
    returned clock by the elapsed device time, so the difference is the call's GPU time.
    """
    if device.type != "cuda":
        return time.perf_counter
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    now, started = 0.0, False

    def cuda_event_clock() -> float:
        nonlocal now, started
        if not started:
            start.record()
        else:
            end.record()
            end.synchronize()
            now += start.elapsed_time(end) / 1e3
        started = not started
        return now

    return cuda_event_clock


def median_seconds(workload: Workload, clock: Callable[[], float], rounds: int,
                   warmup: int) -> float:
    """Median time of ``rounds`` calls after ``warmup`` untimed ones (as pedantic mode does)."""
    for _ in range(warmup):
        workload.call()
    times = []
    for _ in range(rounds):
        args, kwargs = workload.setup()
        start = clock()
        workload.run(*args, **kwargs)
        times.append(clock() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, clock: Callable[[], float]) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(COPY_BUFFER_BYTES[device.type] // 4, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(Workload(run=dst.copy_, setup=lambda: ((src,), {})), clock,
                             rounds=20, warmup=3)
    return 2 * src.numel() * src.element_size() / seconds


def peak_memory_bytes(workload: Workload, device: torch.device,
                      above_resident: bool = True) -> Optional[int]:
    """Peak device memory allocated during one call; with ``above_resident``, minus what was
    allocated before it (inputs, parameters). None off CUDA."""
    if device.type != "cuda":
        return None
    args, kwargs = workload.setup()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device) if above_resident else 0
    workload.run(*args, **kwargs)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - resident
