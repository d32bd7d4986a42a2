"""DistributedDataParallel over a model with fused CBAM and SE (gloo, two CPU processes): every
gradient has its parameter's strides, so DDP warns of no stride mismatch and copies nothing,
and both processes end a step with the same averaged gradients."""

import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORKER = textwrap.dedent("""
    import os, sys, warnings
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    from torch import nn
    from cbam_kernels import CBAM, SE

    def run(rank, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
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

    if __name__ == "__main__":
        mp.spawn(run, args=(int(sys.argv[1]),), nprocs=2)
""")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_have_parameter_strides(tmp_path):
    script = tmp_path / "ddp_worker.py"
    script.write_text(WORKER)
    out = subprocess.run([sys.executable, str(script), str(_free_port())], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Grad strides do not match" not in out.stderr
    assert "rank 0 ok" in out.stdout and "rank 1 ok" in out.stdout
