"""Encoders: Conv4's folded inference path is the same function as its module path; ResNet-12."""

import pytest
import torch

from ttt_meta.nn.encoders import Conv4, make_encoder


@pytest.mark.parametrize("size, channels", [(28, 1), (84, 3)])
def test_conv4_folded_inference_equals_modules(size, channels):
    """In eval mode without autograd, Conv4 folds BatchNorm into the convolutions and pools before the ReLU;
    with any running statistics and affine (negative scales included) that is the module stack's function."""
    torch.manual_seed(0)
    enc = Conv4(channels, 16, size)
    with torch.no_grad():
        for bn in enc.net[1::4]:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
    enc.eval()
    x = torch.rand(6, channels, size, size)
    want = enc.net(x.contiguous(memory_format=torch.channels_last))
    with torch.inference_mode():
        got = enc(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.shape == (6, enc.out_features)
    assert torch.equal(enc(x), want)  # with autograd on, the module path itself
    enc.train()
    with torch.no_grad():
        assert not torch.allclose(enc(x), want)  # training mode normalises with the batch's statistics


@pytest.mark.parametrize("size", [84, 32])
def test_resnet12(size):
    encoder = make_encoder("resnet12", 3, 4, size)
    assert encoder.out_features == 40  # widths 4, 10, 20, 40
    assert encoder(torch.rand(2, 3, size, size)).shape == (2, 40)
    per_task = make_encoder("resnet12", 3, 4, size, batch_stats=True)
    assert not any(name.endswith("running_mean") for name, _ in per_task.named_buffers())
