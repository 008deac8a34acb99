"""PruneNet: reconstruction-loss importance, least-squares fold, cost-aware allocation."""

import pytest
import torch
from torch import nn

from automlprune.cost import CostModel
from automlprune.importance import channel_scores, order_from_scores
from automlprune.materialize import mask, materialize
from automlprune.reconstruction import Reconstruction
from automlprune.search.base import SearchContext
from automlprune.search.budget import parse_budget
from automlprune.search.prunenet import PruneNetStrategy
from automlprune.space import Candidate, SearchSpace

from conftest import randomize_batchnorm, run_search


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.a(x)))
        x = torch.relu(self.bn_b(self.b(x)))
        return self.head(self.pool(x).flatten(1))


@pytest.fixture
def duplicated():
    """Layer a's channels 4..7 are exact copies of 0..3; layer b's channel 2 outputs zero."""
    torch.manual_seed(0)
    model = randomize_batchnorm(TwoLayers())
    with torch.no_grad():
        model.bn_a.bias.fill_(1.0)  # every channel alive after the ReLU
        model.bn_b.bias.fill_(0.3)
        for t in (model.a.weight, model.a.bias, model.bn_a.weight, model.bn_a.bias, model.bn_a.running_mean, model.bn_a.running_var):
            t[4:] = t[:4]
        model.b.weight[2] = 0
        model.b.bias[2] = 0
        model.bn_b.weight[2] = 0
        model.bn_b.bias[2] = 0
    batches = [(torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(i)), torch.zeros(32, dtype=torch.long))
               for i in range(3)]
    space = SearchSpace(model, batches[0][0][:1])
    return model, space, batches


def test_duplicate_channels_score_zero_and_are_pruned_first(duplicated):
    model, space, batches = duplicated
    scores = channel_scores(model, space, "prunenet", batches)
    a, b = scores["a"], scores["b"]
    assert sorted(a.argsort()[:4].remainder(4).tolist()) == [0, 1, 2, 3]  # one copy of each pair goes first
    assert a.sort().values[:4].abs().max() < 1e-3 * a.max()
    assert a.sort().values[:4].max() < b.sort().values[1]  # below every channel of layer b but the zero one
    # the allocation removes the copies before anything else
    cost_model = CostModel(space, model)
    context = SearchContext(space, cost_model, channel_scores=scores, model=model)
    candidate = PruneNetStrategy(context, parse_budget("params=0.6")).propose()
    assert space.kept_channels(candidate).tolist() == [4, 8]


def test_a_channel_with_zero_weights_has_zero_importance(duplicated):
    model, space, batches = duplicated
    scores = channel_scores(model, space, "prunenet", batches)
    assert scores["b"][2] == 0
    assert (scores["b"][torch.arange(8) != 2] > 0).all()
    with torch.no_grad():
        model.head.weight[:, 5] = 0  # nobody reads channel 5 of layer b
    scores = channel_scores(model, space, "prunenet", batches)
    assert scores["b"][5] < 1e-6 * scores["b"].max()


def test_scoring_is_deterministic(digits_evaluator, trained_digits_model, digits_space):
    batches = digits_evaluator.bn_batches
    first = channel_scores(trained_digits_model, digits_space, "prunenet", batches)
    second = channel_scores(trained_digits_model, digits_space, "prunenet", batches)
    for name in first:
        assert torch.equal(first[name], second[name])
        assert first[name].shape == (digits_space.group_by_name[name].channels,)
        assert torch.isfinite(first[name]).all()


def test_least_squares_fold_removes_duplicates_without_changing_the_output(duplicated):
    model, space, batches = duplicated
    order = order_from_scores(channel_scores(model, space, "prunenet", batches))
    reconstruction = Reconstruction.collect(model, space, batches)
    candidate = Candidate.make({"a": 0.5})
    pruned = materialize(model, candidate, space, order, reconstruction).eval()
    masked = mask(model, candidate, space, order, reconstruction).eval()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        reference, out, out_masked = model(x), pruned(x), masked(x)
    assert pruned.a.out_channels == 4
    torch.testing.assert_close(out, reference, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out_masked, out, atol=1e-5, rtol=1e-5)
    plain = materialize(model, candidate, space, order)  # without the fold the copies' contribution is lost
    with torch.no_grad():
        assert (plain(x) - reference).abs().max() > 1e-2


@pytest.mark.parametrize("budget", ["macs=0.5", "params=0.3", "macs=0.27"])
def test_allocation_meets_the_budget_and_nothing_more_fits(budget, tmp_path, trained_digits_model, digits_space, digits):
    outcome, _, _, evaluator = run_search(tmp_path, trained_digits_model, digits_space, digits, "prunenet", budget)
    b = parse_budget(budget)
    cost_model = evaluator.cost_model
    answer = outcome.answer.candidate
    assert b.bind(cost_model.base).met_by(cost_model(answer))
    kept = digits_space.kept_channels(answer)
    for i, group in enumerate(digits_space.groups):
        if group.name in digits_space.prunable and kept[i] < group.channels:
            wider = {g.name: int(k) / g.channels for g, k in zip(digits_space.groups, kept)}
            wider[group.name] = (kept[i] + 1) / group.channels
            assert not b.bind(cost_model.base).met_by(cost_model(Candidate.make(wider)))
    assert outcome.evaluations == 1
    assert evaluator.settings.criterion == "prunenet" and evaluator.reconstruction is not None


def test_prunenet_beats_uniform_on_digits(tmp_path, trained_digits_model, digits_space, digits):
    uniform, *_ = run_search(tmp_path, trained_digits_model, digits_space, digits, "uniform", "macs=0.3", run_name="u")
    prunenet, *_ = run_search(tmp_path, trained_digits_model, digits_space, digits, "prunenet", "macs=0.3", run_name="p")
    assert prunenet.answer.accuracy > uniform.answer.accuracy
