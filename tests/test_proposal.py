"""Proposals: a strategy that trains hands back its trained network, and the evaluator, the
store, fine-tune and export judge and use those weights, not the original ones."""

from __future__ import annotations

import copy

import pytest
import torch

from automlprune.accuracy import accuracy
from automlprune.errors import CandidateError
from automlprune.evaluator import Evaluator, recalibrate_batchnorm
from automlprune.importance import channel_order
from automlprune.materialize import materialize
from automlprune.proposal import Proposal, TrainedWeights
from automlprune.search.base import SearchContext, Strategy, run_strategy
from automlprune.search.budget import parse_budget
from automlprune.search.store import RunStore
from automlprune.settings import EvalSettings, FinetuneSettings
from automlprune.train import Recipe, Trainer


def trained_proposal(model, space, data, ratio=0.5, seed=0, bn_recalibration=None) -> Proposal:
    """A few SGD steps on a copy, then keep each group's channels by the *trained* weights' L1 norm."""
    net = copy.deepcopy(model)
    Trainer(net, data, "cpu", Recipe(epochs=1, batch_size=64, lr=0.05, steps_per_epoch=3, seed=seed),
            progress=False, validate=False).fit()
    candidate = space.uniform(ratio)
    order = channel_order(net, space, "l1")
    kept = {g.name: order[g.name][: int(k)] for g, k in zip(space.groups, space.kept_channels(candidate)) if k < g.channels}
    return Proposal(candidate, TrainedWeights(net, kept, "toy"), bn_recalibration)


class TrainThenPrune(Strategy):
    """A toy training-time method: one proposal with trained weights."""

    name = "toy-trained"

    def ask(self):
        if self.history:
            return None
        return trained_proposal(self.context.model, self.space, self.context.data)


@pytest.fixture
def evaluator(trained_digits_model, digits_space, digits):
    return Evaluator(trained_digits_model, digits_space, digits, EvalSettings(bn_batches=2, bn_batch_size=64))


def test_trained_weights_are_judged_stored_and_reloaded(tmp_path, trained_digits_model, digits_space, digits, evaluator):
    store = RunStore(tmp_path / "run")
    budget = parse_budget("macs=0.5")
    study = store.study("toy|macs=0.5|seed0", {"strategy": "toy-trained", "budget": budget.label, "seed": 0})
    context = SearchContext(digits_space, evaluator.cost_model, study, evaluator.scores, trained_digits_model,
                            store.artifacts, digits)
    outcome = run_strategy(TrainThenPrune(context, budget), evaluator, store, study, max_evals=5)
    answer = outcome.answer
    assert answer.trained and answer.weights["label"] == "toy" and (store.run_dir / answer.weights["artifact"]).is_file()
    # judged on its trained weights: exactly the trained network, materialized and BN re-estimated
    proposal = trained_proposal(trained_digits_model, digits_space, digits)
    by_hand = materialize(proposal.weights.model, answer.candidate, digits_space,
                          proposal.weights.order(digits_space, digits_space.resolve(answer.candidate)))
    recalibrate_batchnorm(by_hand, evaluator.bn_batches)
    assert answer.accuracy == accuracy(by_hand, evaluator.val_batches)[1]
    # the original weights at the same widths are another evaluation
    original = evaluator.evaluate(answer.candidate)
    assert original.key != answer.key and not original.trained and len(evaluator) == 2
    # the stored answer reloads its weights: the same network, for compare's fine-tune and export
    reloaded = store.proposal(answer.to_dict(), trained_digits_model)
    x = digits.example_input().repeat(4, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(evaluator.network(reloaded)(x), evaluator.network(proposal)(x))
        assert not torch.allclose(evaluator.network(reloaded)(x), evaluator.network(answer.candidate)(x))
    tuned = evaluator.finetune(reloaded, FinetuneSettings(epochs=0), progress=False)
    assert tuned.val_accuracy == pytest.approx(accuracy(evaluator.network(proposal), [(x, y) for x, y in _val(digits)])[1])
    # resuming the run evaluates nothing again
    again = run_strategy(TrainThenPrune(context, budget), evaluator, store, study, max_evals=5)
    assert again.evaluations == 1 and len(store.records(study)) == 1


def _val(data):
    from automlprune.data import iterate_batches

    return iterate_batches(data.val, data, 256, torch.device("cpu"))


def test_bn_recalibration_per_proposal_and_kept_channels_checked(trained_digits_model, digits_space, digits, evaluator):
    frozen = trained_proposal(trained_digits_model, digits_space, digits, bn_recalibration=False)
    net = evaluator.network(frozen)
    trained_bn = frozen.weights.model.features[1]
    kept = frozen.weights.kept["features.0"].sort().values
    torch.testing.assert_close(net.features[1].running_mean, trained_bn.running_mean[kept])  # statistics kept as trained
    assert evaluator.evaluate(frozen).key != evaluator.evaluate(trained_proposal(trained_digits_model, digits_space, digits)).key
    wrong = Proposal(digits_space.uniform(0.25), frozen.weights)  # keeps half the channels, the candidate a quarter
    with pytest.raises(CandidateError, match="keep"):
        evaluator.evaluate(wrong)
