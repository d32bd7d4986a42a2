"""DistributedDataParallel over a model with fused CBAM and SE (gloo, two CPU processes): every
gradient has its parameter's strides, so DDP warns of no stride mismatch and copies nothing,
and both processes end a step with the same averaged gradients.

The processes meet through a file store (no port to race for), every collective gives up after
COLLECTIVE_SECONDS, and a rank that dies ends the run at once (torch.multiprocessing.spawn
terminates the other): a broken rank fails the test with both ranks' output, never a hang.
A rank that has checked everything leaves with os._exit: under torch 2.11 on a loaded 2-core
machine both ranks once printed "ok" and then hung in the interpreter's teardown (gloo's
threads), which is torch's exit path and nothing this test is about."""

import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

COLLECTIVE_SECONDS = 60
WORKER = textwrap.dedent("""
    import datetime, os, sys, warnings
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    from torch import nn
    from cbam_kernels import CBAM, SE

    def run(rank, store, seconds):
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=seconds))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), CBAM(16, 4), SE(16, 4),
                              nn.Conv2d(16, 4, 1))
        model = model.to(memory_format=torch.channels_last)
        ddp = nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(1 + rank)
        x = torch.randn(2, 3, 9, 7).to(memory_format=torch.channels_last)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                ddp.zero_grad()
                ddp(x).square().mean().backward()
        messages = [str(w.message) for w in caught if "stride" in str(w.message).lower()]
        assert not messages, messages
        for name, p in model.named_parameters():
            assert p.grad.stride() == p.stride(), (name, p.grad.stride(), p.stride())
            other = p.grad.clone()
            dist.broadcast(other, src=0)
            assert torch.equal(other, p.grad), name
        dist.destroy_process_group()
        print(f"rank {rank} ok", flush=True)
        os._exit(0)

    if __name__ == "__main__":
        mp.spawn(run, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
""")


def test_ddp_gradients_have_parameter_strides(tmp_path):
    script = tmp_path / "ddp_worker.py"
    script.write_text(WORKER)
    command = [sys.executable, str(script), str(tmp_path / "store"), str(COLLECTIVE_SECONDS)]
    try:  # the collectives' own timeout ends a stuck rank first; this is the last resort
        out = subprocess.run(command, capture_output=True, text=True,
                             timeout=3 * COLLECTIVE_SECONDS)
    except subprocess.TimeoutExpired as err:  # its output is bytes, whatever text= says
        output = b"".join(o if isinstance(o, bytes) else o.encode() for o in
                          (err.stdout, err.stderr) if o)
        pytest.fail(f"the DDP processes did not finish in {err.timeout} s:\n"
                    f"{output.decode(errors='replace')}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Grad strides do not match" not in out.stderr
    assert "rank 0 ok" in out.stdout and "rank 1 ok" in out.stdout
