import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import SAMPLE
from training.data.vehicles import split_vehicles, load_images
from training.nets.handwritten import HandConv2d, LoopConv2d, corr2d


def test_corr2d_reproduces_the_lab_example():
    X = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    K = torch.tensor([[0, 1], [2, 3]])
    assert corr2d(X, K).tolist() == [[19, 25], [37, 43]]


@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation",
                         [(3, 8, 3, 1, 0, 1), (3, 4, 5, 2, 2, 1), (2, 6, 3, 1, 2, 2), (4, 3, 3, 3, 1, 5), (1, 1, 1, 1, 0, 1)])
def test_hand_conv_equals_f_conv2d_forward_and_backward(cin, cout, k, stride, padding, dilation):
    torch.manual_seed(0)
    conv = HandConv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation).double()
    x = torch.randn(2, cin, 23, 17, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = conv.weight.detach().clone().requires_grad_()
    b_ref = conv.bias.detach().clone().requires_grad_()
    y = conv(x)
    y_ref = F.conv2d(x_ref, w_ref, b_ref, stride=stride, padding=padding, dilation=dilation)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(conv.weight.grad, w_ref.grad)
    torch.testing.assert_close(conv.bias.grad, b_ref.grad)


def test_loop_and_vectorised_convs_agree_on_real_images():
    split = split_vehicles(SAMPLE / "vehicles")
    images, _ = load_images(split.train[:2], (12, 12))
    x = torch.from_numpy(images).float() / 255
    torch.manual_seed(0)
    loop = LoopConv2d(3, 4, 3)
    hand = HandConv2d(3, 4, 3)
    hand.load_state_dict(loop.state_dict())
    reference = F.conv2d(x, loop.weight, loop.bias)
    torch.testing.assert_close(loop(x), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hand(x), reference, rtol=1e-5, atol=1e-5)
    assert not np.allclose(reference.detach().numpy(), 0)
