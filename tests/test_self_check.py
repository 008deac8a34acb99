"""The space self-check: a space whose networks do not run, or are costed wrongly, is refused
with the groups named before any search starts."""

from __future__ import annotations

import pytest
import torch

from automlprune import self_check
from automlprune.cost import CostModel
from automlprune.errors import UnsupportedLayerError
from automlprune.models import build_model
from automlprune.space import SearchSpace, SpaceConfig


def test_a_sound_space_passes(trained_digits_model, digits_space, digits):
    self_check.check_space(digits_space, trained_digits_model, digits.example_input(), CostModel(digits_space, trained_digits_model))


def test_a_space_whose_networks_fail_is_refused_naming_the_groups(trained_digits_model, digits_space, digits, monkeypatch):
    real = self_check.materialize

    def broken(model, candidate, space, *args, **kwargs):
        net = real(model, candidate, space, *args, **kwargs)
        net.register_forward_pre_hook(lambda module, inputs: (_ for _ in ()).throw(RuntimeError("expected input to have 8 channels")))
        return net

    monkeypatch.setattr(self_check, "materialize", broken)
    with pytest.raises(UnsupportedLayerError, match=r"do not run .*expected input to have 8 channels.* when the groups classifier.1, features.0"):
        self_check.check_space(digits_space, trained_digits_model, digits.example_input(), CostModel(digits_space, trained_digits_model))


def test_a_space_costed_wrongly_is_refused(trained_digits_model, digits_space, digits, monkeypatch):
    monkeypatch.setattr(self_check, "count_macs", lambda net, x: 1.0)
    with pytest.raises(UnsupportedLayerError, match="PyTorch counts 1 on the network"):
        self_check.check_space(digits_space, trained_digits_model, digits.example_input(), CostModel(digits_space, trained_digits_model))


@pytest.mark.slow
def test_googlenet_is_searchable_without_its_auxiliary_heads():
    model = build_model("torchvision:googlenet", 10, 3).eval()
    x = torch.zeros(1, 3, 64, 64)
    space = SearchSpace(model, x, SpaceConfig())
    assert len(space.prunable) > 20
    self_check.check_space(space, model, x, CostModel(space, model))
