"""The Torch-Pruning anchors: the network evaluated is the one Torch-Pruning's own pruner builds."""

import pytest
import torch

from automlprune.cost import CostModel
from automlprune.importance import channel_order
from automlprune.materialize import materialize
from automlprune.models import build_model
from automlprune.search.base import SearchContext
from automlprune.search.budget import parse_budget
from automlprune.search.torch_pruning_anchor import TorchPruningGlobalStrategy, TorchPruningStrategy, torch_pruning_network
from automlprune.space import SearchSpace

from conftest import randomize_batchnorm


@pytest.mark.parametrize("strategy", [TorchPruningStrategy, TorchPruningGlobalStrategy])
def test_anchor_network_is_torch_prunings_own(strategy, budget="macs=0.5"):
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model("resnet20", 10, 3))
    space = SearchSpace(model, torch.randn(1, 3, 16, 16))
    cost = CostModel(space, model)
    b = parse_budget(budget)
    anchor = strategy(SearchContext(space, cost, None, None, model), b)
    candidate = anchor.ask()
    assert b.bind(cost.base).met_by(cost(candidate)) and candidate.ratios
    ours = materialize(model, candidate, space, channel_order(model, space, "tp_magnitude"))
    theirs = torch_pruning_network(model, space, anchor.spent["pruning_ratio"], strategy.global_pruning, 1)
    x = torch.randn(4, 3, 16, 16)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_anchor_widths_follow_the_pruning_ratio_and_global_differs_from_local():
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model("resnet20", 10, 3))
    space = SearchSpace(model, torch.randn(1, 3, 16, 16))
    local = torch_pruning_network(model, space, 0.5, False, 1)
    assert [local.get_submodule(g.name).weight.shape[0] for g in space.groups] == [g.channels // 2 for g in space.groups]
    glob = torch_pruning_network(model, space, 0.5, True, 1)
    assert [glob.get_submodule(g.name).weight.shape[0] for g in space.groups] != [g.channels // 2 for g in space.groups]
