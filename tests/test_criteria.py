"""Every registered importance criterion, and the properties the criteria promise."""

import copy

import pytest
import torch

from automlprune.cli.main import main
from automlprune.data import cached_batches
from automlprune.errors import ConfigError
from automlprune.importance import CRITERIA, channel_scores
from automlprune.models import build_model
from automlprune.space import SearchSpace

from conftest import randomize_batchnorm


@pytest.fixture(scope="module")
def batches(digits):
    return cached_batches(digits.train, digits, 64, "cpu", max_samples=256, seed=0, shuffle=True)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model("resnet20", 10, 1))
    return model, SearchSpace(model, torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize("name", CRITERIA.names())
def test_one_finite_deterministic_score_per_channel(name, trained_digits_model, digits_space, batches, resnet):
    for model, space, data in ((trained_digits_model, digits_space, batches),
                               (resnet[0], resnet[1], [(x[:, :, :8, :8], y) for x, y in batches])):
        a = channel_scores(model, space, name, data, seed=3)
        b = channel_scores(model, space, name, data, seed=3)
        for group in space.groups:
            assert a[group.name].shape == (group.channels,)
            assert torch.isfinite(a[group.name]).all()
            assert torch.equal(a[group.name], b[group.name])


@pytest.mark.parametrize("name", ["l1", "l2", "bn_scale", "taylor"])
def test_a_zeroed_channel_ranks_last(name, trained_digits_model, digits_space, batches):
    model = copy.deepcopy(trained_digits_model)
    with torch.no_grad():
        model.features[3].weight[5] = 0  # conv of group features.3, channel 5
        model.features[4].weight[5] = 0  # its BN gamma
        model.features[4].bias[5] = 0
    scores = channel_scores(model, digits_space, name, batches)["features.3"]
    assert int(torch.argmin(scores)) == 5


def test_similarity_keeps_one_of_two_duplicated_channels(trained_digits_model, digits_space, batches):
    model = copy.deepcopy(trained_digits_model)
    with torch.no_grad():  # channel 7 becomes an exact copy of channel 2 (weights and BN)
        model.features[3].weight[7] = model.features[3].weight[2]
        for p in (model.features[4].weight, model.features[4].bias, model.features[4].running_mean, model.features[4].running_var):
            p[7] = p[2]
    scores = channel_scores(model, digits_space, "similarity", batches)["features.3"]
    low, high = sorted([float(scores[2]), float(scores[7])])
    assert low < 0.01 * high  # one representative kept, the copy scored low
    others = torch.cat([scores[:2], scores[3:7], scores[8:]])
    assert low < float(others.min()) and high >= float(others.median())


def test_random_is_seeded():
    model = build_model("digits_cnn", 10, 1)
    space = SearchSpace(model, torch.zeros(1, 1, 8, 8))
    a = channel_scores(model, space, "random", seed=1)["features.3"]
    assert torch.equal(a, channel_scores(model, space, "random", seed=1)["features.3"])
    assert not torch.equal(a, channel_scores(model, space, "random", seed=2)["features.3"])


def test_data_criteria_need_batches_and_combine_is_checked(trained_digits_model, digits_space):
    with pytest.raises(ConfigError, match="needs a few training batches"):
        channel_scores(trained_digits_model, digits_space, "hrank")
    with pytest.raises(ConfigError, match="combine"):
        channel_scores(trained_digits_model, digits_space, "l1", combine="median")


def test_registry_holds_the_issue_criteria():
    assert {"l1", "l2", "bn_scale", "fpgm", "taylor", "hrank", "ezcrop", "fisher_ratio", "similarity", "hessian",
            "lookahead", "random"} <= set(CRITERIA.names())


def test_cli_criterion_flag(tmp_path, capsys):
    checkpoint = tmp_path / "c.pt"
    assert main(["train", "digits-cnn", "--set", f"checkpoint={checkpoint}", "--set", "train.epochs=2", "--json"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "digits-cnn", "--uniform", "0.5", "--criterion", "taylor", "--set", f"checkpoint={checkpoint}", "--json"]) == 0
    assert main(["evaluate", "digits-cnn", "--uniform", "0.5", "--criterion", "magic", "--set", f"checkpoint={checkpoint}"]) == 2
    assert "unknown criterion 'magic'" in capsys.readouterr().err


def test_combine_modes_differ_on_a_residual_group(resnet):
    model, space = resnet
    sums = channel_scores(model, space, "l1", combine="sum")["conv1"]
    maxes = channel_scores(model, space, "l1", combine="max")["conv1"]
    means = channel_scores(model, space, "l1", combine="mean")["conv1"]
    layers = sum(1 for m in space.group_by_name["conv1"].members if m.dim == "out" and "bn" not in m.layer and "shortcut.1" not in m.layer)
    assert torch.allclose(sums, means * layers, rtol=1e-5) and not torch.allclose(maxes, means)


def test_the_fisher_ratio_is_named_for_what_it_computes_and_its_old_name_warns_for_one_release(
        trained_digits_model, digits_space, digits):
    from automlprune.data import cached_batches

    assert "feature_relevance" not in CRITERIA.names() and "feature_relevance" in CRITERIA
    batches = cached_batches(digits.train, digits, 64, "cpu", max_samples=256)
    new = channel_scores(trained_digits_model, digits_space, "fisher_ratio", batches)
    with pytest.warns(FutureWarning, match="'feature_relevance' is deprecated .* computes a Fisher ratio.*use 'fisher_ratio'"):
        old = channel_scores(trained_digits_model, digits_space, "feature_relevance", batches)
    assert all(torch.equal(new[g], old[g]) for g in new)
