"""Tests of the pure-PyTorch oracle (cbam_kernels.reference), on CPU, in float64.

The expected values are written independently of the implementation: pools with numpy, the
MLPs as explicit matrix products, the spatial map with explicit channel max/mean and a plain
``F.conv2d``, BatchNorm from explicit batch / running statistics. timm and torchvision modules
are used as second, external oracles where they exist.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cbam_kernels import reference as ref

DT = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _rand(*shape):
    return torch.randn(*shape, dtype=DT)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _relu(z):
    return np.maximum(z, 0.0)


def _np(t):
    return t.detach().cpu().numpy()


def _randomise(module, scale=0.5):
    """Non-trivial weights, and non-trivial BN affine params / running stats, in float64."""
    module.double()
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * scale)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(1.3)
                m.bias.fill_(-0.2)
                m.running_mean.fill_(0.25)
                m.running_var.fill_(1.7)
    return module


# ---------------------------------------------------------------------------------------------
# independent math
# ---------------------------------------------------------------------------------------------


def pool_np(x, kind):
    """Global pool of an (N, C, H, W) numpy array -> (N, C), by explicit loops."""
    n, c, h, w = x.shape
    out = np.zeros((n, c))
    for i in range(n):
        for j in range(c):
            vals = [x[i, j, a, b] for a in range(h) for b in range(w)]
            if kind == "avg":
                out[i, j] = sum(vals) / len(vals)
            elif kind == "max":
                out[i, j] = max(vals)
            elif kind == "lp":
                out[i, j] = np.sqrt(sum(v * v for v in vals))
            elif kind == "lse":
                m = max(vals)
                out[i, j] = m + np.log(sum(np.exp(v - m) for v in vals))
            else:
                raise AssertionError(kind)
    return out


def mlp_np(v, w1, b1, w2, b2):
    """(N, C) -> (N, C): W2 relu(W1 v + b1) + b2 with explicit matrix products."""
    h = v @ w1.T
    if b1 is not None:
        h = h + b1
    out = _relu(h) @ w2.T
    if b2 is not None:
        out = out + b2
    return out


def bn_np(z, weight, bias, eps, running_mean, running_var, momentum, train):
    """BatchNorm of (N, 1, H, W) z. Returns (y, new_running_mean, new_running_var)."""
    if train:
        mean = z.mean()
        var_b = ((z - mean) ** 2).mean()
        var_u = ((z - mean) ** 2).sum() / (z.size - 1)
        y = (z - mean) / np.sqrt(var_b + eps) * weight + bias
        new_rm = (1 - momentum) * running_mean + momentum * mean
        new_rv = (1 - momentum) * running_var + momentum * var_u
        return y, new_rm, new_rv
    y = (z - running_mean) / np.sqrt(running_var + eps) * weight + bias
    return y, running_mean, running_var


def spatial_np(x, conv_w, order, bn, momentum, train):
    """Spatial gate, x (N, C, H, W) numpy. ``order`` is "max_mean" or "mean_max"."""
    n, c, h, w = x.shape
    mx = np.zeros((n, 1, h, w))
    mean = np.zeros((n, 1, h, w))
    for i in range(n):
        for a in range(h):
            for b in range(w):
                col = [x[i, j, a, b] for j in range(c)]
                mx[i, 0, a, b] = max(col)
                mean[i, 0, a, b] = sum(col) / c
    maps = [mx, mean] if order == "max_mean" else [mean, mx]
    pooled = np.concatenate(maps, axis=1)
    k = conv_w.shape[-1]
    z = _np(F.conv2d(torch.from_numpy(pooled), torch.from_numpy(conv_w), padding=k // 2))
    y, rm, rv = bn_np(z, *bn, momentum=momentum, train=train)
    return x * _sigmoid(y), rm, rv


def bn_params(bn_module):
    return (_np(bn_module.weight)[0], _np(bn_module.bias)[0], bn_module.eps,
            _np(bn_module.running_mean)[0], _np(bn_module.running_var)[0])


def official_channel_np(x, gate, pool_types):
    w1, b1 = _np(gate.mlp[1].weight), _np(gate.mlp[1].bias)
    w2, b2 = _np(gate.mlp[3].weight), _np(gate.mlp[3].bias)
    logits = sum(mlp_np(pool_np(x, p), w1, b1, w2, b2) for p in pool_types)
    return x * _sigmoid(logits)[:, :, None, None]


def timm_channel_np(x, attn):
    w1 = _np(attn.fc1.weight)[:, :, 0, 0]
    w2 = _np(attn.fc2.weight)[:, :, 0, 0]
    logits = sum(mlp_np(pool_np(x, p), w1, None, w2, None) for p in ("avg", "max"))
    return x * _sigmoid(logits)[:, :, None, None]


# ---------------------------------------------------------------------------------------------
# official CBAM
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool_types", [("avg", "max"), ("avg",), ("max",), ("lp",), ("lse",),
                                        ("avg", "max", "lp", "lse")])
def test_official_channel_gate_matches_hand_math(pool_types):
    gate = _randomise(ref.OfficialChannelGate(6, reduction_ratio=2, pool_types=pool_types))
    x = _rand(2, 6, 3, 2)
    expected = official_channel_np(_np(x), gate, pool_types)
    torch.testing.assert_close(gate(x), torch.from_numpy(expected), rtol=1e-12, atol=1e-12)


def test_official_channel_gate_second_bias_counted_per_pool_type():
    gate = ref.OfficialChannelGate(4, reduction_ratio=2).double()
    with torch.no_grad():
        for p in gate.parameters():
            p.zero_()
        gate.mlp[3].bias.fill_(0.5)
    x = _rand(1, 4, 2, 2)
    # zero weights: logit = b2 per pool type, summed over avg and max -> 1.0
    torch.testing.assert_close(gate(x), x * torch.sigmoid(torch.tensor(1.0, dtype=DT)))


def test_pool_types_differ_from_each_other():
    x = _rand(2, 4, 3, 3)
    outs = {}
    for p in ref.POOL_TYPES:
        torch.manual_seed(1)
        g = _randomise(ref.OfficialChannelGate(4, 2, pool_types=(p,)))
        outs[p] = g(x)
    keys = list(outs)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert not torch.allclose(outs[keys[i]], outs[keys[j]]), (keys[i], keys[j])


def test_lse_pool_is_stable_for_large_values():
    x = torch.full((1, 2, 2, 2), 1000.0, dtype=torch.float32)
    x[0, 1] = -1000.0
    x[0, 0, 0, 0] = 1001.0
    out = ref.logsumexp_2d(x)
    assert torch.isfinite(out).all()
    expected0 = 1001.0 + np.log(1.0 + 3.0 * np.exp(-1.0))
    expected1 = -1000.0 + np.log(4.0)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([expected0, expected1],
                                                          dtype=torch.float32))
    gate = ref.OfficialChannelGate(2, 1, pool_types=("lse",))
    assert torch.isfinite(gate(x)).all()


@pytest.mark.parametrize("train", [True, False])
def test_official_spatial_gate_matches_hand_math(train):
    gate = _randomise(ref.OfficialSpatialGate(kernel_size=3))
    gate.train(train)
    x = _rand(2, 5, 4, 3)
    bn = bn_params(gate.spatial.bn)
    expected, rm, rv = spatial_np(_np(x), _np(gate.spatial.conv.weight), "max_mean", bn,
                                  momentum=0.01, train=train)
    out = gate(x)
    torch.testing.assert_close(out, torch.from_numpy(expected), rtol=1e-12, atol=1e-12)
    assert gate.spatial.bn.running_mean.item() == pytest.approx(rm, rel=1e-12, abs=1e-14)
    assert gate.spatial.bn.running_var.item() == pytest.approx(rv, rel=1e-12, abs=1e-14)
    assert int(gate.spatial.bn.num_batches_tracked) == (1 if train else 0)


def test_official_bn_parameters_and_running_update_momentum_001():
    gate = ref.OfficialSpatialGate().double()
    bn = gate.spatial.bn
    assert (bn.eps, bn.momentum, bn.affine) == (1e-5, 0.01, True)
    assert gate.spatial.relu is None
    assert gate.spatial.conv.bias is None and gate.spatial.conv.padding == (3, 3)
    x = _rand(2, 4, 5, 5) + 3.0
    with torch.no_grad():
        z = F.conv2d(gate.compress(x), gate.spatial.conv.weight, padding=3)
    gate.train()(x)
    # from the fresh state (mean 0, var 1): new = 0.99 * old + 0.01 * batch
    assert bn.running_mean.item() == pytest.approx(0.01 * z.mean().item(), rel=1e-12)
    assert bn.running_var.item() == pytest.approx(0.99 + 0.01 * z.var(unbiased=True).item(),
                                                  rel=1e-12)


@pytest.mark.parametrize("train", [True, False])
def test_official_cbam_composition_and_keys(train):
    m = _randomise(ref.OfficialCBAM(8, reduction_ratio=4, kernel_size=3)).train(train)
    x = _rand(2, 8, 3, 4)
    after_channel = official_channel_np(_np(x), m.ChannelGate, ("avg", "max"))
    expected, _, _ = spatial_np(after_channel, _np(m.SpatialGate.spatial.conv.weight),
                                "max_mean", bn_params(m.SpatialGate.spatial.bn), 0.01, train)
    torch.testing.assert_close(m(x), torch.from_numpy(expected), rtol=1e-12, atol=1e-12)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "ChannelGate.mlp.1.weight": (2, 8), "ChannelGate.mlp.1.bias": (2,),
        "ChannelGate.mlp.3.weight": (8, 2), "ChannelGate.mlp.3.bias": (8,),
        "SpatialGate.spatial.conv.weight": (1, 2, 3, 3),
        "SpatialGate.spatial.bn.weight": (1,), "SpatialGate.spatial.bn.bias": (1,),
        "SpatialGate.spatial.bn.running_mean": (1,), "SpatialGate.spatial.bn.running_var": (1,),
        "SpatialGate.spatial.bn.num_batches_tracked": (),
    }


def test_official_cbam_no_spatial():
    m = _randomise(ref.OfficialCBAM(6, reduction_ratio=3, pool_types=("max",), no_spatial=True))
    assert not hasattr(m, "SpatialGate")
    assert sorted(m.state_dict()) == ["ChannelGate.mlp.1.bias", "ChannelGate.mlp.1.weight",
                                      "ChannelGate.mlp.3.bias", "ChannelGate.mlp.3.weight"]
    x = _rand(2, 6, 2, 3)
    expected = official_channel_np(_np(x), m.ChannelGate, ("max",))
    torch.testing.assert_close(m(x), torch.from_numpy(expected), rtol=1e-12, atol=1e-12)


def test_official_default_hidden_width_is_floor_division():
    m = ref.OfficialCBAM(40)  # 40 // 16 = 2 (timm would round 2.5 up to 3)
    assert m.ChannelGate.mlp[1].weight.shape == (2, 40)


# ---------------------------------------------------------------------------------------------
# concat order: official [max, mean] vs timm [mean, max]
# ---------------------------------------------------------------------------------------------


def test_concat_order_official_vs_timm():
    x = _rand(2, 5, 4, 4)
    off = _randomise(ref.OfficialSpatialGate(3)).eval()
    tim = ref.TimmSpatialAttn(3).double().eval()
    # same BN state (eval, momentum irrelevant), conv weight with the two input maps swapped
    tim.conv.bn.load_state_dict(off.spatial.bn.state_dict())
    with torch.no_grad():
        tim.conv.conv.weight.copy_(off.spatial.conv.weight.flip(1))
    torch.testing.assert_close(tim(x), off(x), rtol=1e-12, atol=1e-12)
    # un-swapped weights give a different answer: the orders really differ
    with torch.no_grad():
        tim.conv.conv.weight.copy_(off.spatial.conv.weight)
    assert not torch.allclose(tim(x), off(x))
    # and each order is the one stated
    assert torch.equal(off.compress(x)[:, 0], x.amax(1))
    assert torch.equal(off.compress(x)[:, 1], x.mean(1))


# ---------------------------------------------------------------------------------------------
# timm CBAM
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
def test_timm_cbam_matches_hand_math(train):
    m = _randomise(ref.TimmCBAM(8, rd_channels=3, spatial_kernel_size=3)).train(train)
    x = _rand(2, 8, 3, 4)
    after_channel = timm_channel_np(_np(x), m.channel)
    bn = bn_params(m.spatial.conv.bn)
    expected, rm, rv = spatial_np(after_channel, _np(m.spatial.conv.conv.weight), "mean_max",
                                  bn, momentum=0.1, train=train)
    torch.testing.assert_close(m(x), torch.from_numpy(expected), rtol=1e-12, atol=1e-12)
    assert m.spatial.conv.bn.running_mean.item() == pytest.approx(rm, rel=1e-12, abs=1e-14)
    assert m.spatial.conv.bn.running_var.item() == pytest.approx(rv, rel=1e-12, abs=1e-14)


def test_timm_bn_parameters_and_running_update_momentum_01():
    m = ref.TimmCBAM(16).double()
    bn = m.spatial.conv.bn
    assert (bn.eps, bn.momentum) == (1e-5, 0.1)
    assert m.spatial.conv.conv.bias is None and m.spatial.conv.conv.padding == (3, 3)
    assert m.channel.fc1.bias is None and m.channel.fc2.bias is None
    x = _rand(2, 16, 5, 5) + 3.0
    with torch.no_grad():
        y = m.channel(x)
        pooled = torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1)
        z = F.conv2d(pooled, m.spatial.conv.conv.weight, padding=3)
    m.train()(x)
    assert bn.running_mean.item() == pytest.approx(0.1 * z.mean().item(), rel=1e-12)
    assert bn.running_var.item() == pytest.approx(0.9 + 0.1 * z.var(unbiased=True).item(),
                                                  rel=1e-12)


def _timm_cbam_cls():
    timm_cbam = pytest.importorskip("timm.layers.cbam")
    return timm_cbam.CbamModule


@pytest.mark.parametrize("channels,rd_ratio,rd_channels", [
    (1, 1 / 16, None), (8, 1 / 16, None), (24, 1 / 16, None), (40, 1 / 16, None),
    (56, 1 / 16, None), (64, 1 / 16, None), (100, 1 / 16, None), (20, 0.25, None),
    (30, 1 / 8, None), (12, 1 / 16, 5),
])
def test_timm_hidden_width_rule_matches_timm(channels, rd_ratio, rd_channels):
    theirs = _timm_cbam_cls()(channels, rd_ratio=rd_ratio, rd_channels=rd_channels)
    ours = ref.TimmCBAM(channels, rd_ratio=rd_ratio, rd_channels=rd_channels)
    assert ours.channel.fc1.weight.shape == theirs.channel.fc1.weight.shape
    assert ref.timm_rd_channels(channels, rd_ratio, rd_channels) == theirs.channel.fc1.out_channels


def test_timm_hidden_width_rounds_half_up():
    assert ref.timm_rd_channels(40) == 3  # 2.5 -> 3 (Python round() would give 2)
    assert ref.timm_rd_channels(8) == 1  # 0.5 -> 1
    assert ref.timm_rd_channels(4) == 1  # 0.25 -> 0 -> floored to 1


@pytest.mark.parametrize("train", [True, False])
def test_timm_cbam_matches_timm_module(train):
    CbamModule = _timm_cbam_cls()
    theirs = CbamModule(32, spatial_kernel_size=7).double()
    ours = ref.TimmCBAM(32, spatial_kernel_size=7).double()
    ours_sd = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_sd = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_sd == theirs_sd
    assert set(ours_sd) == {
        "channel.fc1.weight", "channel.fc2.weight", "spatial.conv.conv.weight",
        "spatial.conv.bn.weight", "spatial.conv.bn.bias", "spatial.conv.bn.running_mean",
        "spatial.conv.bn.running_var", "spatial.conv.bn.num_batches_tracked"}
    _randomise(theirs)
    ours.load_state_dict(theirs.state_dict())
    ours.train(train)
    theirs.train(train)
    x = _rand(3, 32, 6, 5)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)
    for k, v in theirs.state_dict().items():  # running stats updated identically
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# SE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_se_module_matches_hand_math(bias):
    m = _randomise(ref.SEModule(6, reduction=3, bias=bias))
    x = _rand(2, 6, 3, 2)
    w1 = _np(m.fc1.weight)[:, :, 0, 0]
    w2 = _np(m.fc2.weight)[:, :, 0, 0]
    b1 = _np(m.fc1.bias) if bias else None
    b2 = _np(m.fc2.bias) if bias else None
    s = _sigmoid(mlp_np(pool_np(_np(x), "avg"), w1, b1, w2, b2))
    torch.testing.assert_close(m(x), torch.from_numpy(_np(x) * s[:, :, None, None]),
                               rtol=1e-12, atol=1e-12)
    expected_keys = {"fc1.weight", "fc2.weight"} | ({"fc1.bias", "fc2.bias"} if bias else set())
    assert set(m.state_dict()) == expected_keys
    assert m.fc1.weight.shape == (2, 6, 1, 1)


def test_se_module_hidden_channels_override():
    m = ref.SEModule(6, reduction=3, hidden_channels=5)
    assert m.fc1.weight.shape == (5, 6, 1, 1) and m.fc2.weight.shape == (6, 5, 1, 1)


@pytest.mark.parametrize("bias", [True, False])
def test_se_module_matches_timm(bias):
    timm_layers = pytest.importorskip("timm.layers")
    theirs = timm_layers.SEModule(32, rd_channels=4, bias=bias).double()
    ours = ref.SEModule(32, reduction=8, bias=bias).double()
    assert ({k: v.shape for k, v in ours.state_dict().items()}
            == {k: v.shape for k, v in theirs.state_dict().items()})
    _randomise(theirs)
    ours.load_state_dict(theirs.state_dict())
    x = _rand(2, 32, 4, 3)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


def test_se_module_matches_torchvision():
    tv_ops = pytest.importorskip("torchvision.ops")
    theirs = tv_ops.SqueezeExcitation(16, 4).double()
    ours = ref.SEModule(16, reduction=4).double()
    assert ({k: v.shape for k, v in ours.state_dict().items()}
            == {k: v.shape for k, v in theirs.state_dict().items()})
    _randomise(theirs)
    ours.load_state_dict(theirs.state_dict())
    x = _rand(2, 16, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


def test_se_block_matches_hand_math_and_keys():
    m = _randomise(ref.SEBlock(8, reduction=4))
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"fc.0.weight": (2, 8), "fc.2.weight": (8, 2)}
    assert isinstance(m.avg_pool, torch.nn.AdaptiveAvgPool2d)
    x = _rand(2, 8, 3, 3)
    s = _sigmoid(mlp_np(pool_np(_np(x), "avg"), _np(m.fc[0].weight), None,
                        _np(m.fc[2].weight), None))
    torch.testing.assert_close(m(x), torch.from_numpy(_np(x) * s[:, :, None, None]),
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# dtype, gradients, errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_in_input_dtype(dtype):
    x = torch.randn(2, 16, 4, 4, dtype=dtype)
    for m in (ref.OfficialCBAM(16, 4), ref.OfficialCBAM(16, 4, pool_types=("lp", "lse")),
              ref.TimmCBAM(16), ref.SEModule(16, 4), ref.SEBlock(16, 4)):
        out = m.to(dtype).eval()(x)
        assert out.dtype == dtype and out.shape == x.shape


def test_gradcheck_reference_modules():
    x = _rand(2, 4, 3, 3).requires_grad_(True)
    for m in (ref.OfficialCBAM(4, 2, kernel_size=3), ref.TimmCBAM(4, spatial_kernel_size=3),
              ref.SEModule(4, 2), ref.SEBlock(4, 2)):
        m = _randomise(m).eval()
        assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("factory,match", [
    (lambda: ref.OfficialCBAM(8, reduction_ratio=16), r"8 // 16 = 0"),
    (lambda: ref.OfficialCBAM(8, reduction_ratio=0), r"reduction_ratio must be a positive"),
    (lambda: ref.OfficialCBAM(0), r"gate_channels must be a positive"),
    (lambda: ref.OfficialCBAM(16, pool_types=("avg", "mean")), r"unknown pool type 'mean'"),
    (lambda: ref.OfficialCBAM(16, pool_types=()), r"at least one"),
    (lambda: ref.OfficialCBAM(16, kernel_size=4), r"odd"),
    (lambda: ref.TimmCBAM(16, spatial_kernel_size=6), r"odd"),
    (lambda: ref.TimmCBAM(16, rd_channels=-2), r"rd_channels must be a positive"),
    (lambda: ref.TimmCBAM(16, rd_ratio=0.0), r"rd_ratio must be > 0"),
    (lambda: ref.SEModule(8, reduction=16), r"8 // 16 = 0"),
    (lambda: ref.SEModule(8, hidden_channels=0), r"hidden_channels must be a positive"),
    (lambda: ref.SEBlock(4, reduction=8), r"4 // 8 = 0"),
])
def test_constructor_errors(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_timm_cbam_rd_channels_zero_means_default_like_timm():
    # timm treats a falsy rd_channels as "not given"
    assert ref.TimmCBAM(32, rd_channels=0).channel.fc1.out_channels == 2
