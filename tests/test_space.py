import json

import numpy as np
import pytest
import torch

from automlprune.errors import CandidateError, ConfigError
from automlprune.models import build_model
from automlprune.space import Candidate, SearchSpace, SpaceConfig


def test_candidate_is_immutable_hashable_and_round_trips():
    a = Candidate.make({"b": 0.5, "a": 0.25, "c": 1.0}, {"x": 4, "y": 32})
    b = Candidate.from_json(json.dumps({"ratios": {"a": 0.25, "b": 0.5}, "bits": {"x": 4}}))
    assert a == b and hash(a) == hash(b) and a.key == b.key
    assert Candidate.from_json(a.to_json()) == a
    assert a.to_dict() == {"ratios": {"a": 0.25, "b": 0.5}, "bits": {"x": 4}}
    with pytest.raises(AttributeError):
        a.ratios = ()  # frozen


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan"), "half", True])
def test_ratio_outside_unit_interval_is_refused(ratio):
    with pytest.raises(CandidateError, match="outside \\(0, 1\\]"):
        Candidate.make({"g": ratio})


def test_candidate_file_errors(tmp_path):
    with pytest.raises(CandidateError, match="does not exist"):
        Candidate.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CandidateError, match="not valid JSON"):
        Candidate.load(bad)
    bad.write_text('{"widths": {}}')
    with pytest.raises(CandidateError, match="other keys are not allowed"):
        Candidate.load(bad)


def test_resnet_groups_couple_residual_channels():
    model = build_model("resnet20", 10, 1)
    space = SearchSpace(model, torch.zeros(1, 1, 16, 16))
    names = [g.name for g in space.groups]
    assert names[0] == "conv1"
    stage1 = space.group_by_name["conv1"]
    outs = set(stage1.out_layers)
    assert {"conv1", "bn1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"} <= outs
    assert "layer2.0.conv1" in {m.layer for m in stage1.members if m.dim == "in"}
    # every block's inner channels form their own group
    assert {"layer1.0.conv1", "layer2.1.conv1", "layer3.2.conv1"} <= set(names)
    assert "fc" not in names  # the output layer never loses outputs


def test_mobilenet_depthwise_conv_is_coupled_to_its_producer():
    model = build_model("mobilenet_v2", 10, 3)
    space = SearchSpace(model, torch.zeros(1, 3, 32, 32))
    group = space.group_by_name["features.2.conv.0.0"]
    assert "features.2.conv.1.0" in group.out_layers  # the depthwise conv shrinks with the expansion conv


def test_flatten_coupling_maps_one_channel_to_many_features():
    model = build_model("digits_cnn", 10, 1)
    space = SearchSpace(model, torch.zeros(1, 1, 8, 8))
    member = next(m for m in space.group_by_name["features.7"].members if m.layer == "classifier.1")
    assert member.dim == "in" and member.index_map.shape == (64, 4)
    assert sorted(member.index_map.ravel().tolist()) == list(range(256))


def test_encode_decode_round_trip_on_grid(digits_space):
    rng = np.random.default_rng(0)
    for _ in range(20):
        cand = Candidate.make({g: float(rng.choice(digits_space.config.ratios)) for g in digits_space.prunable})
        vec = digits_space.encode(cand)
        assert vec.dtype == np.float32 and vec.shape == (digits_space.ndim,)
        assert np.all(vec >= -1) and np.all(vec <= 1)
        assert digits_space.decode(vec) == cand


def test_decode_snaps_to_grid_and_clips(digits_space):
    cand = digits_space.decode(np.full(digits_space.ndim, 5.0))
    assert cand == Candidate()
    cand = digits_space.decode(np.full(digits_space.ndim, -0.01))
    assert set(cand.ratio_map.values()) <= set(digits_space.config.ratios)
    with pytest.raises(CandidateError, match="dimensions"):
        digits_space.decode(np.zeros(digits_space.ndim + 1))


def test_kept_channels_follow_rounding_and_minimum():
    model = build_model("digits_cnn", 10, 1)
    space = SearchSpace(model, torch.zeros(1, 1, 8, 8), SpaceConfig(round_to=8, min_channels=8))
    assert space.channels_for(64, 0.3) == 16  # 19.2 -> nearest multiple of 8
    assert space.channels_for(16, 0.1) == 8  # never below min_channels
    assert space.channels_for(64, 1.0) == 64
    kept = space.kept_channels(Candidate.make({"features.7": 0.5}))
    assert kept.tolist() == [16, 32, 32, 64]


def test_validate_refuses_unknown_and_pinned_groups_and_bad_bits():
    model = build_model("digits_cnn", 10, 1)
    space = SearchSpace(model, torch.zeros(1, 1, 8, 8), SpaceConfig(pinned=("features.0",)))
    assert "features.0" not in space.prunable
    with pytest.raises(CandidateError, match="'nope' that the model lacks"):
        space.validate(Candidate.make({"nope": 0.5}))
    with pytest.raises(CandidateError, match="pinned"):
        space.validate(Candidate.make({"features.0": 0.5}))
    with pytest.raises(CandidateError, match="not among the space's choices"):
        space.validate(Candidate.make(bits={"features.3": 4}))
    with pytest.raises(CandidateError, match="not a Conv2d/Linear"):
        space.validate(Candidate.make(bits={"features.4": 8}))


def test_pin_pattern_matching_nothing_is_refused():
    model = build_model("digits_cnn", 10, 1)
    with pytest.raises(ConfigError, match="matches no group"):
        SearchSpace(model, torch.zeros(1, 1, 8, 8), SpaceConfig(pinned=("layer9*",)))


def test_space_yaml_errors(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("ratios: [0.5, 1.0]\nwidths: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'widths'"):
        SpaceConfig.load(path)
    path.write_text("ratios: [0.0, 1.0]\n")
    with pytest.raises(ConfigError, match="ratios"):
        SpaceConfig.load(path)
    path.write_text("ratios: {min: 0.25, max: 1.0, step: 0.25}\nbits: {choices: [4, 8, 32], pin_first_last: 8}\n")
    config = SpaceConfig.load(path)
    assert config.ratios == (0.25, 0.5, 0.75, 1.0) and config.bit_choices == (4, 8, 32)


def test_mixed_precision_space_adds_bit_dimensions():
    model = build_model("digits_cnn", 10, 1)
    space = SearchSpace(model, torch.zeros(1, 1, 8, 8), SpaceConfig(bit_choices=(4, 8, 32), pin_first_last_bits=8))
    assert [d.kind for d in space.dimensions].count("bits") == len(space.quantizable) - 2
    cand = Candidate.make({"features.3": 0.5}, {"features.3": 4})
    assert space.decode(space.encode(cand)) == cand
    assert space.weight_bits(cand)["features.0"] == 8  # pinned first layer
