"""Snapshot-ensemble distillation as a fine-tune method: the rounds' widths, the answer's channels
kept exactly, the official loss, the same images as a standard fine-tune, and bad settings refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from automlprune.cli.main import main
from automlprune.proposal import Proposal, TrainedWeights
from automlprune.settings import FinetuneSettings
from automlprune.snapshot_ensemble import SnapshotEnsemble
from automlprune.train.callbacks import Distillation


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
def test_the_ensemble_loss_is_the_mean_of_the_teachers_official_kl_without_cross_entropy():
    torch.manual_seed(0)
    teachers = [nn.Linear(4, 3), nn.Linear(4, 3)]
    x, y, logits = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), torch.randn(5, 3)
    t = 5.0
    expected = sum(F.kl_div(F.log_softmax(logits / t, 1), F.softmax(m(x) / t, 1), reduction="mean") * t ** 2 for m in teachers) / 2
    got = Distillation(teachers, alpha=1.0, temperature=t, reduction="mean").loss(None, x, y, logits, torch.tensor(99.0))
    assert torch.allclose(got, expected.detach(), atol=1e-6)
    one = Distillation(teachers[0], alpha=0.5, temperature=4.0)  # the standard fine-tune's loss is unchanged
    ce = F.cross_entropy(logits, y)
    kd = F.kl_div(F.log_softmax(logits / 4, 1), F.log_softmax(teachers[0](x) / 4, 1), log_target=True, reduction="batchmean") * 16
    assert torch.allclose(one.loss(None, x, y, logits, ce), 0.5 * ce + 0.5 * kd.detach(), atol=1e-6)


def test_rounds_walk_geometrically_to_the_answer_and_keep_exactly_its_channels(digits_evaluator, digits_space):
    candidate = digits_space.uniform(0.25)
    settings = FinetuneSettings(epochs=2, batch_size=64, method="snapshot_ensemble", snapshot_rounds=3)
    resolved = digits_space.resolve(candidate)
    rounds = SnapshotEnsemble(digits_evaluator, Proposal(candidate), resolved, settings)
    paths = [rounds.widths(r) for r in range(4)]
    for group, keep in rounds.final.items():
        widths = [p[group] for p in paths]
        assert widths[0] == digits_space.group_by_name[group].channels and widths[-1] == len(keep)
        assert widths == sorted(widths, reverse=True)
    rounds.run(progress=False)
    assert len(rounds.snapshots) == 3 and len(rounds.histories) == 3
    for group, keep in rounds.final.items():  # the last snapshot holds exactly the answer's channels, the others at zero
        gone = torch.ones(digits_space.group_by_name[group].channels, dtype=torch.bool)
        gone[keep] = False
        for member in digits_space.group_by_name[group].members:
            layer = digits_space.layer_by_name[member.layer]
            if member.dim == "out" and layer.kind == "conv":
                weight = rounds.net.get_submodule(member.layer).weight
                rows = torch.as_tensor(member.index_map[:, 0])
                assert torch.count_nonzero(weight[rows[gone]]) == 0 and torch.count_nonzero(weight[rows[~gone]]) > 0


def test_a_snapshot_fine_tune_sees_the_images_of_a_standard_one_and_answers_the_same_network(digits_evaluator, digits_space):
    candidate = digits_space.uniform(0.5)
    standard = digits_evaluator.finetune(candidate, FinetuneSettings(epochs=3, batch_size=64), progress=False)
    snapshot = digits_evaluator.finetune(candidate, FinetuneSettings(epochs=3, batch_size=64, method="snapshot_ensemble",
                                                                     snapshot_rounds=2), progress=False)
    assert abs(snapshot.images - standard.images) <= 3 * 64  # the same compute, up to one batch per phase
    assert digits_evaluator.cost_model(snapshot.candidate) == digits_evaluator.cost_model(standard.candidate)
    assert sum(p.numel() for p in snapshot.model.parameters()) == sum(p.numel() for p in standard.model.parameters())
    assert 0.5 < snapshot.val_accuracy <= 1


def test_trained_weights_are_where_the_rounds_start_and_their_channels_are_the_end(digits_evaluator, digits_space,
                                                                                  trained_digits_model):
    candidate = digits_space.canonical(digits_space.uniform(0.5))
    resolved = digits_space.resolve(candidate)
    kept = {g.name: torch.arange(g.channels)[-int(k):] for g, k in zip(digits_space.groups, resolved.kept) if k < g.channels}
    proposal = Proposal(candidate, TrainedWeights(trained_digits_model, kept, "test"))
    rounds = SnapshotEnsemble(digits_evaluator, proposal, resolved, FinetuneSettings(method="snapshot_ensemble"))
    assert rounds.net is not trained_digits_model and torch.equal(rounds.net.state_dict()[next(iter(rounds.net.state_dict()))],
                                                                  trained_digits_model.state_dict()[next(iter(rounds.net.state_dict()))])
    assert {g: k.tolist() for g, k in rounds.final.items()} == {g: k.tolist() for g, k in kept.items()}


def test_an_unknown_fine_tune_method_is_one_sentence_and_exit_2(capsys):
    with pytest.raises(ValueError, match="method must be one of standard, snapshot_ensemble, got 'magic'"):
        FinetuneSettings(method="magic")
    assert main(["compare", "digits-cnn", "--strategies", "uniform", "--budgets", "macs=0.5", "--set", "finetune.method=magic"]) == 2
    err = capsys.readouterr().err
    assert "method must be one of standard, snapshot_ensemble" in err and "Traceback" not in err


def test_a_compare_report_describes_the_fine_tune_its_answers_got():
    # (a snapshot-ensemble run's report once described the standard SGD fine-tune it did not run)
    from automlprune.search.compare import _finetune_text

    snapshot = _finetune_text(FinetuneSettings(method="snapshot_ensemble", snapshot_rounds=4), {2})
    assert snapshot.startswith("2 epochs of snapshot-ensemble distillation") and "4 rounds" in snapshot
    assert "cosine" not in snapshot
    standard = _finetune_text(FinetuneSettings(distill=True), {3})
    assert "SGD lr 0.01 with cosine decay, distilled from the unpruned network" in standard
