"""Gradual channel pruning while training (l0-anneal, prune-while-training) on digits: budgets
met, answers judged on the trained weights, the schedules as specified, dropped channels exactly
zero while training (weights and momentum), resume mid-training."""

from __future__ import annotations

import pytest
import torch

from automlprune.errors import ConfigError
from automlprune.search.gradual import annealed_fraction, linear_fraction
from automlprune.search.gradual_frs import GradualFRSStrategy
from automlprune.search.l0_anneal import L0AnnealStrategy
from automlprune.search.prune_while_training import PruneWhileTrainingStrategy
from automlprune.train import Callback

from conftest import crash_once, search_with

FAST = dict(epochs=3, batch_size=64)


def _search(tmp_path, cls, model, space, data, budget, **options):
    return search_with(tmp_path / cls.name, cls, model, space, data, budget, **{**FAST, **options})


def test_the_annealing_schedule_is_fsa_s_and_reaches_the_target_at_half_the_window():
    n, mu = 40, 20.0
    assert annealed_fraction(0, n, mu) == 1.0
    assert annealed_fraction(1, n, mu) == pytest.approx((n - 2) / (2 * mu + n))
    assert annealed_fraction(10, n, mu) == pytest.approx(20 / 440)
    assert annealed_fraction(20, n, mu) == 0.0 and annealed_fraction(35, n, mu) == 0.0
    fractions = [annealed_fraction(e, n, mu) for e in range(n)]
    assert all(a >= b for a, b in zip(fractions, fractions[1:]))
    assert [linear_fraction(e, 4) for e in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


class ZeroWatch(Callback):
    """Checks after every step (after the pruning callback ran) that every dropped channel is zero
    in the producers' weights and in their momentum buffers."""

    def __init__(self, strategy):
        self.strategy, self.checked = strategy, 0

    def after_step(self, trainer):
        pruning = self.strategy.pruning
        for group, kept in pruning.kept.items():
            gone = torch.ones(self.strategy.space.group_by_name[group].channels, dtype=torch.bool)
            gone[kept] = False
            for module, rows in self.strategy.producer_rows(trainer.model, group):
                dropped = rows[gone.to(rows.device)]
                assert torch.count_nonzero(module.weight[dropped]) == 0
                buffer = trainer.optimizer.state.get(module.weight, {}).get("momentum_buffer")
                if buffer is not None:
                    assert torch.count_nonzero(buffer[dropped]) == 0
            self.checked += int(gone.any())


@pytest.mark.parametrize("cls,options", [(L0AnnealStrategy, {}), (PruneWhileTrainingStrategy, {"criterion": "l1"}),
                                         (PruneWhileTrainingStrategy, {"criterion": "mean_activation"}),
                                         (PruneWhileTrainingStrategy, {"criterion": "random"})])
@pytest.mark.parametrize("budget", ["macs=0.5", "params=0.3"])
def test_gradual_methods_meet_the_budget_on_trained_weights_with_dropped_channels_held_at_zero(
        cls, options, budget, tmp_path, trained_digits_model, digits_space, digits, monkeypatch):
    from automlprune.search import gradual

    watches = []
    original = gradual.GradualStrategy.train

    def train_watched(self, net, candidate):
        watch = ZeroWatch(self)
        watches.append(watch)
        real_trainer = gradual.Trainer

        def with_watch(*args, **kwargs):
            args = list(args)
            args[4] = list(args[4]) + [watch]
            return real_trainer(*args, **kwargs)

        monkeypatch.setattr(gradual, "Trainer", with_watch)
        try:
            return original(self, net, candidate)
        finally:
            monkeypatch.setattr(gradual, "Trainer", real_trainer)

    monkeypatch.setattr(gradual.GradualStrategy, "train", train_watched)
    strategy, outcome, evaluator, store = _search(tmp_path, cls, trained_digits_model, digits_space, digits, budget, **options)
    answer = outcome.answer
    metric, limit = budget.split("=")
    assert outcome.evaluations == 1 and answer.trained and answer.relative[metric] <= float(limit) + 1e-9
    assert strategy.spent["cut_after_training"] == 0.0 and strategy.spent["pruning_events"] >= 2
    assert watches[0].checked > 0  # channels were dropped while training, and stayed zero every step after
    # the schedule went down step by step to the targets, which are the planned widths
    log = strategy.history_log
    assert [e["kept"] for e in log] == sorted((e["kept"] for e in log), reverse=True) and log[-1]["kept"] == sum(strategy.pruning.targets.values())
    assert answer.candidate == strategy.widths()
    # judged on the trained weights: the stored proposal's network is the evaluated one, not the original's
    trained = store.proposal(answer.to_dict(), trained_digits_model)
    x = digits.example_input().repeat(8, 1, 1, 1)
    with torch.no_grad():
        assert not torch.allclose(evaluator.network(trained)(x), evaluator.network(answer.candidate)(x))
    for group, kept in strategy.pruning.kept.items():
        assert torch.equal(kept, trained.weights.kept[group])


def test_the_criteria_choose_differently(tmp_path, trained_digits_model, digits_space, digits):
    kept = {}
    for criterion in ("l1", "mean_activation", "random"):
        strategy, *_ = _search(tmp_path / criterion, PruneWhileTrainingStrategy, trained_digits_model, digits_space, digits,
                               "macs=0.5", criterion=criterion)
        kept[criterion] = {g: k.tolist() for g, k in strategy.pruning.kept.items()}
        assert strategy.activation_batches == 0 or criterion == "mean_activation"
    assert kept["l1"] != kept["mean_activation"] != kept["random"] != kept["l1"]


def test_l0_anneal_reaches_the_target_at_half_the_run(tmp_path, trained_digits_model, digits_space, digits):
    strategy, *_ = _search(tmp_path, L0AnnealStrategy, trained_digits_model, digits_space, digits, "macs=0.5", prune_every=2)
    total = strategy.spent["training_steps"]
    last = strategy.history_log[-1]
    assert last["kept"] == sum(strategy.pruning.targets.values()) and last["step"] <= total / 2 + 2  # fraction 0 at e = N/2 (rounded counts may get there first)
    assert len(strategy.history_log) >= 5


def test_gradual_methods_refuse_bad_options(tmp_path, trained_digits_model, digits_space, digits):
    with pytest.raises(ConfigError, match="criterion 'magic' is unknown; use one of: l1, mean_activation, random"):
        _search(tmp_path, PruneWhileTrainingStrategy, trained_digits_model, digits_space, digits, "macs=0.5", criterion="magic")
    with pytest.raises(ConfigError, match="prune_until"):
        PruneWhileTrainingStrategy.check_options({"prune_until": 1.5})
    with pytest.raises(ConfigError, match="prune_every"):
        L0AnnealStrategy.check_options({"prune_every": 0})
    with pytest.raises(ConfigError, match="schedule 'wavy' is unknown"):
        _search(tmp_path, L0AnnealStrategy, trained_digits_model, digits_space, digits, "macs=0.5", schedule="wavy")


@pytest.mark.parametrize("cls,options", [(L0AnnealStrategy, {}), (PruneWhileTrainingStrategy, {"criterion": "mean_activation"}),
                                         (GradualFRSStrategy, {"score_samples": 128})])
def test_a_crash_mid_training_resumes_and_ends_as_an_uninterrupted_run(cls, options, tmp_path, trained_digits_model,
                                                                      digits_space, digits, monkeypatch):
    from automlprune.search import gradual

    whole, whole_outcome, _, _ = _search(tmp_path / "whole", cls, trained_digits_model, digits_space, digits, "macs=0.5", **options)
    crash_once(monkeypatch, gradual.GradualPruning, "after_step", at_step=int(whole.spent["training_steps"]) - 3)
    with pytest.raises(KeyboardInterrupt):
        _search(tmp_path / "crash", cls, trained_digits_model, digits_space, digits, "macs=0.5", **options)
    again, outcome, _, _ = _search(tmp_path / "crash", cls, trained_digits_model, digits_space, digits, "macs=0.5", **options)
    assert again.spent["resumed_after_epoch"] >= 1
    assert again.spent["training_steps"] == whole.spent["training_steps"]
    assert again.history_log == whole.history_log
    assert outcome.answer.accuracy == whole_outcome.answer.accuracy
    for group, kept in again.pruning.kept.items():
        assert torch.equal(kept, whole.pruning.kept[group])


def test_gradual_frs_prunes_globally_by_relevance_in_equal_cost_steps_to_the_budget(tmp_path, trained_digits_model,
                                                                                   digits_space, digits):
    strategy, outcome, evaluator, store = _search(tmp_path, GradualFRSStrategy, trained_digits_model, digits_space, digits,
                                                  "macs=0.5", epochs=4, score_samples=256)
    answer = outcome.answer
    assert answer.trained and answer.relative["macs"] <= 0.5 + 1e-9
    log = strategy.history_log
    assert len(log) == strategy.settings.events and strategy.spent["cut_after_training"] == 0.0
    for event in log:  # each event's cost at most its share of the way from the full network to the budget
        assert event["cost_fraction"] <= 0.5 + (1 - 0.5) * event["fraction_left"] + 1e-9
    # global: the groups end at different keep ratios (internal groups only, by default)
    ratios = answer.candidate.ratio_map
    assert set(ratios) <= set(strategy.pruned_groups()) and len(set(ratios.values())) > 1
    trained = store.proposal(answer.to_dict(), trained_digits_model)
    x = digits.example_input().repeat(8, 1, 1, 1)
    with torch.no_grad():
        assert not torch.allclose(evaluator.network(trained)(x), evaluator.network(answer.candidate)(x))


def test_feature_relevance_scores_follow_the_official_formula(tmp_path, trained_digits_model, digits_space, digits):
    """One event's scores recomputed by hand: class weights sigmoid(1 / normalized accuracy), the
    per-class relevance sums over N'_k = images + batches, L2-normalized per group."""
    import copy

    from automlprune.data import iterate_batches
    from automlprune.lrp import Relevance
    from automlprune.search.gradual import GradualPruning
    from automlprune.search.gradual_frs import spatial_mean

    strategy, *_ = _search(tmp_path, GradualFRSStrategy, trained_digits_model, digits_space, digits, "macs=0.5",
                           epochs=1, score_samples=128, score_batch_size=64)
    net = copy.deepcopy(trained_digits_model)
    strategy.pruning = GradualPruning(strategy, strategy.pruning_targets(None))
    strategy.scored_events = 0
    scores = strategy.feature_relevance(net)
    group = next(iter(strategy.pruning.targets))
    (layer, index), = strategy.measured_layers(group)
    relevance, classes = Relevance(net), digits.num_classes
    net.eval()
    confusion, f, batches = torch.zeros(classes, classes), torch.zeros(classes, len(index)), 0
    for x, y in iterate_batches(digits.train, digits, 64, "cpu", shuffle=True, augment=True, seed=0, max_batches=2):
        batches += 1
        with torch.no_grad():
            for t, p in zip(y, net(x).argmax(1)):
                confusion[t, p] += 1
        r = spatial_mean(relevance.at_outputs(x, y, [layer])[layer])[:, index]
        for k in range(classes):
            f[k] += r[y == k].sum(0)
    accuracy = confusion.diag() / confusion.sum(1).clamp_min(1)
    s = torch.sigmoid(1 / (accuracy / accuracy.max()))
    frs = ((s[:, None] * f / (confusion.sum(1) + batches)[:, None]).sum(0) / classes).abs()
    assert torch.allclose(scores[group], frs / (frs.norm() + 1e-9), atol=1e-6)
