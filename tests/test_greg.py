"""GReg-1 / GReg-2 on digits: budgets met, answers judged on the trained weights, the penalty
drives the chosen filters towards zero and only those."""

from __future__ import annotations

import pytest
import torch

from automlprune.errors import ConfigError
from automlprune.search.greg import GReg2Strategy, GRegStrategy

from conftest import crash_once, search_with

FAST = dict(batch_size=64, update_interval=2, reg_steps=200, pick_steps=40, stabilize_steps=20, max_epochs=20)


def _search(tmp_path, cls, model, space, data, budget, **options):
    return search_with(tmp_path / cls.name, cls, model, space, data, budget, **{**FAST, **options})


@pytest.mark.parametrize("cls", [GRegStrategy, GReg2Strategy])
@pytest.mark.parametrize("budget", ["macs=0.5", "params=0.4"])
def test_greg_meets_the_budget_and_is_judged_on_its_trained_weights(cls, budget, tmp_path, trained_digits_model,
                                                                     digits_space, digits):
    strategy, outcome, evaluator, store = _search(tmp_path, cls, trained_digits_model, digits_space, digits, budget)
    answer = outcome.answer
    metric, limit = budget.split("=")
    assert outcome.evaluations == 1 and answer.relative[metric] <= float(limit) + 1e-9
    assert answer.trained and strategy.spent["finished"] == 1.0 and strategy.spent["training_steps"] > 0
    # the evaluated network is the trained one: the same logits as materializing the strategy's
    # trained network, not the original model's
    trained = store.proposal(answer.to_dict(), trained_digits_model)
    x = digits.example_input().repeat(8, 1, 1, 1)
    with torch.no_grad():
        ours = evaluator.network(trained)(x)
        original = evaluator.network(answer.candidate)(x)
    assert not torch.allclose(ours, original)
    # the penalty pushed the removed filters to (almost) nothing, the kept ones stay
    reg = strategy.regularizer
    for group, mask in reg.pruned.items():
        scores = reg.scores(group)
        assert scores[mask].mean() < 0.05 * scores[~mask].mean()
        assert torch.equal(torch.nonzero(~mask.cpu()).flatten(), trained.weights.kept[group])
    assert (store.run_dir / f"{cls.name}-{outcome.budget.slug}-seed0.json").is_file()


def test_greg1_picks_once_and_greg2_picks_after_its_uniform_phase(tmp_path, trained_digits_model, digits_space, digits):
    one, _, _, _ = _search(tmp_path, GRegStrategy, trained_digits_model, digits_space, digits, "macs=0.5")
    two, _, _, _ = _search(tmp_path, GReg2Strategy, trained_digits_model, digits_space, digits, "macs=0.5")
    first = [e for e in one.history_log if e["phase"] == "regularize"]
    assert first and one.history_log[-1]["phase"] == "stabilize"
    # GReg-2's kept filters end at the negative 'recover' penalty, GReg-1's at zero
    for group, mask in two.regularizer.pruned.items():
        assert torch.all(two.regularizer.reg[group][~mask] == two.settings.recover_reg) and two.settings.recover_reg < 0
        assert torch.all(one.regularizer.reg[group][~one.regularizer.pruned[group]] == 0)


def test_greg_refuses_what_it_cannot_do(tmp_path, trained_digits_model, digits_space, digits):
    with pytest.raises(ConfigError, match="does not take the options"):
        GRegStrategy.check_options({"lr": 0.1, "mystery": 1})
    with pytest.raises(ConfigError, match="widths 'magic' is unknown"):
        _search(tmp_path, GRegStrategy, trained_digits_model, digits_space, digits, "macs=0.5", widths="magic")


def test_greg_trains_towards_prunenet_widths(tmp_path, trained_digits_model, digits_space, digits):
    strategy, outcome, _, _ = _search(tmp_path, GRegStrategy, trained_digits_model, digits_space, digits, "macs=0.4",
                                      widths="prunenet")
    planned = strategy.prunenet_widths()
    assert outcome.answer.candidate == planned and outcome.answer.relative["macs"] <= 0.4 + 1e-9
    assert planned != strategy.uniform_widths()  # PruneNet allocates unevenly
    assert set(strategy.regularizer.pruned) == set(planned.ratio_map)  # every shrunk group penalized


def test_a_crash_mid_training_resumes_from_the_last_epoch_and_ends_as_an_uninterrupted_run(
        tmp_path, trained_digits_model, digits_space, digits, monkeypatch):
    from automlprune.search import greg

    whole, whole_outcome, _, _ = _search(tmp_path / "whole", GRegStrategy, trained_digits_model, digits_space, digits, "macs=0.5")
    crash_once(monkeypatch, greg.GrowingRegularization, "after_step", at_step=50)
    with pytest.raises(KeyboardInterrupt):
        _search(tmp_path / "crash", GRegStrategy, trained_digits_model, digits_space, digits, "macs=0.5")
    checkpoints = list((tmp_path / "crash" / "greg1" / "checkpoints").glob("*.pt"))
    assert len(checkpoints) == 1  # the last finished epoch, kept for the next run
    again, outcome, _, store = _search(tmp_path / "crash", GRegStrategy, trained_digits_model, digits_space, digits, "macs=0.5")
    assert again.spent["resumed_after_epoch"] >= 1 and not checkpoints[0].exists()  # removed once training ended
    assert again.spent["training_steps"] == whole.spent["training_steps"]  # no step trained twice in the count
    assert outcome.answer.accuracy == whole_outcome.answer.accuracy
    for group, mask in again.regularizer.pruned.items():
        assert torch.equal(mask, whole.regularizer.pruned[group])
