import numpy as np
import pytest
import torch
from torch import nn

from automlprune.cost import CostModel, count_macs
from automlprune.errors import UnsupportedLayerError
from automlprune.materialize import materialize
from automlprune.models import build_model
from automlprune.space import Candidate, SearchSpace, SpaceConfig
from automlprune.space.search_space import AutoPinned

from conftest import ZOO_CASES, ZOO_IDS


def _random_candidates(space, n, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield Candidate.make({g: float(rng.choice(space.config.ratios)) for g in space.prunable})


@pytest.mark.parametrize("name,size,kwargs", ZOO_CASES, ids=ZOO_IDS)
def test_costs_equal_flop_counter_and_parameter_count_of_materialized_net(name, size, kwargs):
    torch.manual_seed(0)
    model = build_model(name, 10, 3, **kwargs).eval()
    x = torch.zeros(1, 3, size, size)
    space = SearchSpace(model, x)
    cost = CostModel(space, model)
    assert cost.base.macs == count_macs(model, x)
    for cand in _random_candidates(space, 3):
        net = materialize(model, cand, space)
        c = cost(cand)
        assert c.macs == count_macs(net, x), cand  # MACs = FlopCounterMode FLOPs / 2
        assert c.params == sum(p.numel() for p in net.parameters()), cand
        assert c.flops == 2 * c.macs


def test_round_to_and_min_channels_stay_exact():
    model = build_model("resnet20", 10, 1).eval()
    x = torch.zeros(1, 1, 16, 16)
    space = SearchSpace(model, x, SpaceConfig(round_to=8, min_channels=8))
    cost = CostModel(space, model)
    for cand in _random_candidates(space, 3, seed=1):
        assert cost(cand).macs == count_macs(materialize(model, cand, space), x)


def test_costs_shrink_monotonically_with_uniform_ratio(digits_space, trained_digits_model):
    cost = CostModel(digits_space, trained_digits_model)
    macs = [cost(digits_space.uniform(r)).macs for r in digits_space.config.ratios]
    assert macs == sorted(macs) and macs[-1] == cost.base.macs
    rel = cost.relative(digits_space.uniform(0.5))
    assert 0.2 < rel["macs"] < 0.35  # conv MACs scale roughly with the square of the width


def test_bytes_and_bitops_follow_bits():
    model = build_model("digits_cnn", 10, 1)
    space = SearchSpace(model, torch.zeros(1, 1, 8, 8), SpaceConfig(bit_choices=(4, 8, 32)))
    cost = CostModel(space, model)
    full = cost(Candidate())
    assert full.bytes == full.params * 4 and full.bitops == full.macs * 32 * 32
    layer = "features.3"
    q = cost(Candidate.make(bits={layer: 4}))
    info = space.layer_by_name[layer]
    weights = info.out_channels * info.in_channels * info.kernel
    assert q.bytes == pytest.approx(full.bytes - weights * 4 + weights * 0.5 + info.out_channels * 4)
    layer_macs = weights * info.positions
    assert q.bitops == pytest.approx(full.bitops - layer_macs * 32 * 32 + layer_macs * 4 * 32)
    assert q.macs == full.macs and q.params == full.params


def test_differentiable_form_matches_exact_costs(digits_space, trained_digits_model):
    cost = CostModel(digits_space, trained_digits_model)
    cand = digits_space.uniform(0.5)
    kept = torch.tensor(digits_space.kept_channels(cand), dtype=torch.float64, requires_grad=True)
    out = cost.from_kept(kept)
    assert out["macs"].item() == cost(cand).macs and out["params"].item() == cost(cand).params
    out["macs"].backward()
    assert torch.all(kept.grad > 0)  # more channels, more MACs


def test_per_layer_costs_sum_to_total(digits_space, trained_digits_model):
    cost = CostModel(digits_space, trained_digits_model)
    cand = digits_space.uniform(0.625)
    table = cost.per_layer(cand)
    assert sum(v["macs"] for v in table.values()) == cost(cand).macs
    assert sum(v["params"] for v in table.values()) == cost(cand).params


class _WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x)).flatten(1))


class _FunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)
        self.register_buffer("kernel", torch.randn(4, 4, 1, 1))

    def forward(self, x):
        x = nn.functional.conv2d(self.conv(x), self.kernel)  # MACs outside any module
        return self.fc(x.mean((2, 3)))


def test_a_layer_norm_over_another_dimension_than_the_channels_is_refused_by_name():
    with pytest.warns(AutoPinned), pytest.raises(UnsupportedLayerError, match="LayerNorm 'norm' normalizes 6 entries, not these 4 channels"):
        SearchSpace(_WithLayerNorm(), torch.zeros(1, 1, 8, 8))


def test_macs_outside_modules_are_never_counted_as_zero():
    model = _FunctionalConv()
    space = SearchSpace(model, torch.zeros(1, 1, 8, 8))
    with pytest.raises(UnsupportedLayerError, match="outside modules"):
        CostModel(space, model)
