"""``benchmarks/gpu_checks.py``, the GPU checks of the GPU round, as far as they go without
a GPU: the command line, the skip without a GPU, and the determinism check on the CPU (the
``torch`` backend, a small image). On a GPU, ``benchmarks/gpu_round.py`` runs them all."""

import pytest
import torch

from benchmarks import gpu_checks


def test_unknown_check_is_an_error():
    with pytest.raises(SystemExit):
        gpu_checks.main(["no-such-check"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the checks run instead")
def test_skips_without_a_gpu(capsys):
    assert gpu_checks.main([]) == 0
    assert "skipped, no GPU" in capsys.readouterr().out


def test_determinism_on_the_cpu(monkeypatch, capsys):
    monkeypatch.setattr(gpu_checks, "IMAGE", (2, 3, 32, 32))
    assert gpu_checks.main(["determinism", "graph", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "determinism  torch   ok" in out and "graph        torch   skipped" in out
