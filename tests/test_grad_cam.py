"""Grad-CAM (the ``grad-cam`` package) on converted models: the same heat map as on the original,
for target layers inside the converted ResNet."""

import pytest
import torch

from model_testing import resnet18_pair

grad_cam = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402


@pytest.mark.parametrize("kind", ["cbam", "se"])
def test_grad_cam_same_on_converted_model(kind):
    original, converted = resnet18_pair(kind)
    x = torch.randn(2, 3, 64, 64)
    targets = [ClassifierOutputTarget(3), ClassifierOutputTarget(7)]
    for layer in ("layer3.1", "layer4.0.conv2", "layer4.1"):  # blocks, and a conv inside one
        heat = []
        for model in (original, converted):
            with grad_cam.GradCAM(model, target_layers=[model.get_submodule(layer)]) as cam:
                heat.append(cam(x, targets))
        assert heat[0].shape == (2, 64, 64) and heat[0].max() > 0.5, layer
        torch.testing.assert_close(torch.from_numpy(heat[1]), torch.from_numpy(heat[0]),
                                   rtol=1e-4, atol=1e-4, msg=layer)
