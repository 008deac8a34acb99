"""Coverage of real CNN families: grouped convolutions, group and layer norms, parameters held
outside layers, channel splits, shared modules, and the torchvision families themselves.

For every model: the space builds, the self-check passes, the cost model's MACs and parameters
equal PyTorch's counts on the materialized network, and (where the norms allow) the materialized
network computes what the masked one does."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from automlprune.benchmarks.models import FAMILIES, measure_family
from automlprune.cost import CostModel
from automlprune.cost.model import count_macs
from automlprune.errors import UnsupportedLayerError
from automlprune.materialize import materialize, mask
from automlprune.self_check import check_space
from automlprune.space import SearchSpace, SpaceConfig
from automlprune.space.search_space import AutoPinned

from conftest import randomize_batchnorm


def _check_exact(model: nn.Module, x: torch.Tensor, space: SearchSpace, candidates: int = 4, equivalence: bool = True) -> None:
    cost = CostModel(space, model)
    check_space(space, model, x[:1], cost)
    rng = np.random.default_rng(0)
    for candidate in [space.smallest()] + [space.decode(rng.uniform(-1, 1, space.ndim)) for _ in range(candidates)]:
        net = materialize(model, candidate, space).eval()
        assert cost(candidate).macs == count_macs(net, x[:1])
        assert cost(candidate).params == sum(p.numel() for p in net.parameters())
        if equivalence:
            with torch.no_grad():
                assert torch.allclose(net(x), mask(model, candidate, space).eval()(x), atol=1e-5)


class ResNeXtBlock(nn.Module):
    """1x1 -> grouped 3x3 (groups=4) -> 1x1 with a residual add, as in ResNeXt / RegNet."""

    def __init__(self, groups: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 32, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(32)
        self.b = nn.Conv2d(32, 32, 3, padding=1, groups=groups, bias=False)
        self.bn_b = nn.BatchNorm2d(32)
        self.c = nn.Conv2d(32, 16, 1, bias=False)
        self.bn_c = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn_a(self.a(x)))
        y = torch.relu(self.bn_b(self.b(y)))
        x = torch.relu(x + self.bn_c(self.c(y)))
        return self.head(x.mean((2, 3)))


def test_grouped_convolutions_are_searched_in_units_of_their_groups():
    model = randomize_batchnorm(ResNeXtBlock(groups=4))
    x = torch.randn(3, 3, 8, 8)
    space = SearchSpace(model, x[:1])
    assert {g.name: g.unit for g in space.groups} == {"stem": 1, "a": 4, "b": 4}
    assert space.group_by_name["a"].channels == 8 and space.group_by_name["a"].width == 32
    _check_exact(model, x, space, candidates=8)
    for ratio in (0.1, 0.3, 0.5, 0.9):  # every network splits evenly into the conv's 4 groups
        net = materialize(model, space.uniform(ratio), space)
        assert net.b.in_channels % 4 == 0 and net.b.out_channels % 4 == 0 and net.b.groups == 4


def test_rounding_applies_to_the_channels_of_a_unit():
    space = SearchSpace(ResNeXtBlock(groups=4).eval(), torch.zeros(1, 3, 8, 8), SpaceConfig(round_to=8, min_channels=8))
    group = space.group_by_name["a"]  # 8 units of 4 channels
    assert space.rounding_step(group.unit) == 2  # 2 units = 8 channels
    assert space.min_width(group) == 2
    assert [space.channels_for(group.channels, r, group.unit) * group.unit for r in (0.1, 0.5, 1.0)] == [8, 16, 32]


def test_group_norm_and_channel_layer_norm_groups_are_searched_and_costed_exactly():
    class Norms(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.gn = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
            self.c2, self.ln = nn.Conv2d(16, 12, 3, padding=1), nn.LayerNorm(12)
            self.head = nn.Linear(12, 10)

        def forward(self, x):
            x = torch.relu(self.gn(self.c1(x)))
            x = self.ln(self.c2(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # channels-last LayerNorm, as ConvNeXt
            return self.head(torch.relu(x).mean((2, 3)))

    model = Norms().eval()
    x = torch.randn(2, 3, 8, 8)
    space = SearchSpace(model, x[:1])
    assert space.group_by_name["c1"].unit == 4 and space.group_by_name["c2"].unit == 1
    _check_exact(model, x, space, equivalence=False)  # norm statistics span the channels: masking is not removal
    net = materialize(model, space.uniform(0.5), space)
    assert (net.gn.num_channels, net.gn.num_groups, net.ln.normalized_shape) == (8, 4, (6,))


def test_a_group_through_a_parameter_outside_layers_is_pinned_with_a_warning_and_the_rest_searched():
    class LayerScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 1), nn.Conv2d(16, 8, 1)
            self.gamma = nn.Parameter(torch.full((8, 1, 1), 0.5))  # as ConvNeXt's layer scale
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            x = self.c1(x)
            x = x + self.gamma * self.c3(torch.relu(self.c2(x)))
            return self.head(x.mean((2, 3)))

    model = LayerScale().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(AutoPinned, match=r"'c1' \(it passes through 'gamma', whose parameters automlprune cannot cut\)"):
        space = SearchSpace(model, x[:1])
    assert space.prunable == ["c2"] and "c1" in space.pinned
    assert space.fixed_parameters == {"gamma": 8}
    _check_exact(model, x, space)  # the layer scale counts in the parameters


def test_uneven_splits_and_reordered_halves_are_pinned_and_every_built_network_runs():
    class Shuffle(nn.Module):
        """Chunks channels and concatenates them in another order: the issue's silently broken network."""

        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 8, 1)
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            a, b = torch.relu(self.c1(x)).chunk(2, dim=1)
            x = torch.relu(self.c3(torch.cat([self.c2(b), a], dim=1)))
            return self.head(x.mean((2, 3)))

    model = Shuffle().eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutoPinned)
        space = SearchSpace(model, x[:1])  # Torch-Pruning maps the chunks to the wrong halves
    with pytest.warns(AutoPinned, match="'c1' \\(its pruned network fails the self-check: it does not run"):
        _check_exact(model, x, space, candidates=8)
    assert space.prunable == ["c3"]  # the rest is searched


def test_a_module_used_twice_is_coupled_across_its_calls():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
            self.block = nn.Conv2d(16, 16, 3, padding=1)  # runs twice
            self.mid, self.out = nn.Conv2d(16, 32, 1), nn.Conv2d(32, 16, 1)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            x = torch.relu(self.block(torch.relu(self.bn(self.stem(x)))))
            x = torch.relu(self.out(torch.relu(self.mid(x))))
            return self.head(torch.relu(self.block(x)).mean((2, 3)))

    model = randomize_batchnorm(Shared())
    x = torch.randn(2, 3, 8, 8)
    space = SearchSpace(model, x[:1])
    assert space.layer_by_name["block"].calls == 2
    stem = space.group_by_name["stem"]  # both producers of block's input shrink together
    assert {(m.layer, m.dim) for m in stem.members} >= {("stem", "out"), ("out", "out"), ("block", "in")}
    _check_exact(model, x, space, candidates=6)


def test_a_model_with_nothing_prunable_is_refused_in_one_sentence():
    class AllScaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.scale, self.head = nn.Conv2d(3, 8, 3), nn.Parameter(torch.ones(8, 1, 1)), nn.Linear(8, 10)

        def forward(self, x):
            return self.head((self.c1(x) * self.scale).mean((2, 3)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutoPinned)
        with pytest.raises(UnsupportedLayerError, match=r"no channel of this model can be pruned: every group is pinned \('c1' \(it passes through 'scale'"):
            SearchSpace(AllScaled().eval(), torch.zeros(1, 3, 8, 8))


def test_a_model_torch_pruning_cannot_trace_is_refused_in_one_sentence(monkeypatch):
    import torch_pruning as tp

    def fails(self, *args, **kwargs):
        raise ZeroDivisionError("integer division or modulo by zero")  # as Torch-Pruning on a hand-written shuffle

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", fails)
    with pytest.raises(UnsupportedLayerError, match=r"Torch-Pruning, .* cannot trace this model \(ZeroDivisionError: integer division"):
        SearchSpace(ResNeXtBlock().eval(), torch.zeros(1, 3, 8, 8))


def test_a_hand_written_channel_shuffle_is_caught_by_the_self_check_and_pinned():
    class OwnShuffle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 10)

        def forward(self, x):
            x = self.c1(x)
            n, c, h, w = x.shape
            x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
            return self.head(self.c2(x).mean((2, 3)))

    model = OwnShuffle().eval()
    x = torch.randn(2, 3, 8, 8)
    space = SearchSpace(model, x[:1])
    with pytest.warns(AutoPinned, match="'c1' \\(its pruned network fails the self-check"):
        _check_exact(model, x, space, candidates=8)
    assert space.prunable == ["c2"]


def test_shufflenet_is_searched_with_the_groups_through_its_shuffles_pinned():
    row = measure_family("shufflenet_v2_x0_5", size=32, candidates=2, export=False)
    assert row["searchable"] and row["searched"] >= 12
    assert any("channel shuffle" in why for why in row["auto_pinned"].values())
    assert row["macs_relative_error"] == 0 and row["params_relative_error"] == 0 and row["max_masked_difference"] < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_torchvision_family_is_searchable_with_exact_costs_equivalent_networks_and_exports(name):
    row = measure_family(name, candidates=1)
    assert row["searchable"] and row["searched"] > 0
    assert row["macs_relative_error"] == 0 and row["params_relative_error"] == 0
    assert row["max_masked_difference"] is None or row["max_masked_difference"] < 1e-4
    assert all(e["ok"] for e in row["export"].values()), row["export"]
