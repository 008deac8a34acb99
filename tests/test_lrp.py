"""Layer-wise relevance propagation (automlprune.lrp): the official alpha-beta formulas, the
residual split, conservation, and a clear refusal for untraceable models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from automlprune.errors import ConfigError
from automlprune.lrp import Relevance


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(3 * 4 * 4, 5, bias=False)

    def forward(self, x):
        h = F.relu(self.bn(self.conv1(x)))
        return self.fc(torch.flatten(F.relu(self.conv2(h)), 1))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6, bias=False)
        self.b = nn.Linear(6, 6, bias=False)
        self.out = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.out(F.relu(self.a(x) + self.b(x)))


def test_conv_relevance_is_the_official_alpha_beta_rule_with_transposed_convolutions():
    torch.manual_seed(0)
    net = ConvNet().eval()
    x, y = torch.rand(2, 2, 8, 8), torch.tensor([1, 3])
    got = Relevance(net).at_outputs(x, y, ["bn", "conv2"])
    # by hand, from the top: the linear rule, then conv2's rule with conv_transpose2d, as the official relprop
    h = F.relu(net.bn(net.conv1(x)))
    a2 = F.relu(net.conv2(h))
    r = F.one_hot(y, 5).float()

    def linear(x, w, r):
        wp, wn = w.clamp(min=1e-9), w.clamp(max=-1e-9)
        return x * ((2 * r / (x @ wp.t() + 1e-9)) @ wp + (-r / (x @ wn.t() + 1e-9)) @ wn)

    r_a2 = linear(a2.flatten(1), net.fc.weight, r).view_as(a2)
    assert torch.allclose(got["conv2"], r_a2, atol=1e-6)
    w = net.conv2.weight
    wp, wn = w.clamp(min=1e-9), w.clamp(max=-1e-9)
    zp = F.conv2d(h, wp, stride=2, padding=1) + 1e-9
    zn = F.conv2d(h, wn, stride=2, padding=1) + 1e-9
    back = lambda s, v: F.conv_transpose2d(s, v, stride=2, padding=1, output_padding=1)  # noqa: E731
    r_h = h * (back(2 * r_a2 / zp, wp) + back(-r_a2 / zn, wn))
    assert torch.allclose(got["bn"], r_h, atol=1e-5)  # ReLU passes R; the BN output's relevance is h's


def test_a_residual_add_splits_relevance_in_proportion_to_its_inputs():
    torch.manual_seed(0)
    net = Residual().eval()
    x, y = torch.rand(4, 6), torch.tensor([0, 1, 2, 0])
    got = Relevance(net).at_outputs(x, y, ["a", "b"])
    a, b = net.a(x), net.b(x)
    h, w = F.relu(a + b), net.out.weight
    wp, wn = w.clamp(min=1e-9), w.clamp(max=-1e-9)
    r = F.one_hot(y, 3).float()
    r_sum = h * ((2 * r / (h @ wp.t() + 1e-9)) @ wp + (-r / (h @ wn.t() + 1e-9)) @ wn)  # the ReLU passes it to the sum
    assert torch.allclose(got["a"] + got["b"], r_sum, atol=1e-5)  # the split loses nothing
    assert torch.allclose(got["a"], a * r_sum / (a + b), atol=1e-5) and torch.allclose(got["b"], b * r_sum / (a + b), atol=1e-5)


def test_an_untraceable_model_is_refused_in_one_sentence():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(ConfigError, match="needs a model torch.fx can trace, and tracing Branchy failed"):
        Relevance(Branchy())
    with pytest.raises(ConfigError, match="not called in the traced network"):
        Relevance(Residual()).at_outputs(torch.rand(1, 6), torch.tensor([0]), ["nope"])
