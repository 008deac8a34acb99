"""The space self-check: a space whose networks do not run, are costed wrongly or compute
something else than their masks is refused with the groups named before any search starts,
unless single groups explain it: those are pinned and the rest is searched."""

from __future__ import annotations

import pytest
import torch

from automlprune import self_check
from automlprune.cost import CostModel
from automlprune.errors import UnsupportedLayerError
from automlprune.models import build_model
from automlprune.space import SearchSpace, SpaceConfig
from automlprune.space.search_space import AutoPinned


def test_a_sound_space_passes(trained_digits_model, digits_space, digits):
    self_check.check_space(digits_space, trained_digits_model, digits.example_input(), CostModel(digits_space, trained_digits_model))


def test_a_space_whose_networks_fail_is_refused_naming_the_groups(trained_digits_model, digits_space, digits, monkeypatch):
    real = self_check.materialize

    def broken(model, candidate, space, *args, **kwargs):
        net = real(model, candidate, space, *args, **kwargs)
        net.register_forward_pre_hook(lambda module, inputs: (_ for _ in ()).throw(RuntimeError("expected input to have 8 channels")))
        return net

    monkeypatch.setattr(self_check, "materialize", broken)
    with pytest.raises(UnsupportedLayerError, match=r"fail the self-check \(it does not run: .*expected input to have 8 channels\) when the groups classifier.1, features.0.* shrink together"):
        self_check.check_space(digits_space, trained_digits_model, digits.example_input(), CostModel(digits_space, trained_digits_model))


def test_a_space_costed_wrongly_is_refused(trained_digits_model, digits_space, digits, monkeypatch):
    monkeypatch.setattr(self_check, "count_macs", lambda net, x: 1.0)
    with pytest.raises(UnsupportedLayerError, match="the cost model gives .* MACs but PyTorch counts 1"):
        self_check.check_space(digits_space, trained_digits_model, digits.example_input(), CostModel(digits_space, trained_digits_model))


def test_a_group_whose_network_alone_differs_from_its_mask_is_pinned_and_the_rest_checked(trained_digits_model, digits, monkeypatch):
    space = SearchSpace(trained_digits_model, digits.example_input())
    real = self_check.materialize
    culprit = space.prunable[1]

    def wrong_when_culprit_shrinks(model, candidate, space, *args, **kwargs):
        net = real(model, candidate, space, *args, **kwargs)
        if candidate.ratio_map.get(culprit, 1.0) < 1:
            net.register_forward_hook(lambda module, inputs, output: output + 1.0)
        return net

    monkeypatch.setattr(self_check, "materialize", wrong_when_culprit_shrinks)
    with pytest.warns(AutoPinned, match=rf"'{culprit}' \(its pruned network fails the self-check: it computes something else"):
        self_check.check_space(space, trained_digits_model, digits.example_input(), CostModel(space, trained_digits_model))
    assert culprit in space.pinned and culprit not in space.prunable and len(space.prunable) >= 1


@pytest.mark.slow
def test_googlenet_is_searchable_without_its_auxiliary_heads():
    model = build_model("torchvision:googlenet", 10, 3).eval()
    x = torch.zeros(1, 3, 64, 64)
    space = SearchSpace(model, x, SpaceConfig())
    assert len(space.prunable) > 20
    self_check.check_space(space, model, x, CostModel(space, model))
