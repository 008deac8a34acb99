import pytest
import torch

from automlprune.errors import CheckpointError, ConfigError
from automlprune.models import build_model, load_weights, read_checkpoint, save_checkpoint

from conftest import ZOO_CASES, ZOO_IDS


@pytest.mark.parametrize("name,size,kwargs", ZOO_CASES, ids=ZOO_IDS)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_zoo_models_adapt_to_channels_and_classes(name, size, kwargs, in_channels):
    model = build_model(name, 7, in_channels, **kwargs).eval()
    assert model(torch.zeros(2, in_channels, size, size)).shape == (2, 7)


def test_width_multiplier_shrinks_resnet():
    small = sum(p.numel() for p in build_model("resnet20", 10, 3, width=0.5).parameters())
    assert small < sum(p.numel() for p in build_model("resnet20", 10, 3).parameters()) / 3


def test_unknown_models_and_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown model 'resnet21'"):
        build_model("resnet21", 10, 3)
    with pytest.raises(ConfigError, match="torchvision has no classification model"):
        build_model("torchvision:notanet", 10, 3)
    with pytest.raises(ConfigError, match="does not accept"):
        build_model("resnet20", 10, 3, depthh=3)


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = build_model("digits_cnn", 10, 1)
    path = save_checkpoint(tmp_path / "c.pt", model, {"model": "digits_cnn", "model_kwargs": {}, "test_accuracy": 0.9})
    state, meta = read_checkpoint(path)
    assert meta["test_accuracy"] == 0.9 and meta["automlprune_version"]
    other = build_model("digits_cnn", 10, 1)
    load_weights(other, path, {"model": "digits_cnn"})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_checkpoint_for_another_architecture_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", build_model("resnet20", 10, 1), {"model": "resnet20"})
    with pytest.raises(CheckpointError, match="made for model='resnet20'"):
        load_weights(build_model("resnet32", 10, 1), path, {"model": "resnet32"})
    with pytest.raises(CheckpointError, match="does not fit this model's architecture"):
        load_weights(build_model("resnet32", 10, 1), path, {})


def test_corrupt_and_missing_checkpoints_are_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "none.pt")
    torch.save({"weights": [1, 2]}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="neither an automlprune checkpoint nor a state dict"):
        read_checkpoint(tmp_path / "foreign.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")  # a model's own state dict is read, with no metadata
    state, meta = read_checkpoint(tmp_path / "plain.pt")
    assert set(state) == {"weights"} and meta == {}
