import pytest

from automlprune.errors import ConfigError
from automlprune.tasks import Task, TaskSpec, apply_overrides, list_configs


def test_shipped_tasks_parse():
    for name in ("digits-cnn", "fmnist-resnet20", "fmnist-vgg11", "fmnist-mobilenetv2", "cifar10-resnet56"):
        spec = TaskSpec.load(name)
        assert spec.name == name and spec.checkpoint.name == f"{name}.pt"
    assert {"default", "hw-friendly", "mixed-precision"} <= set(list_configs("search_spaces"))


def test_overrides_are_parsed_as_yaml():
    spec = TaskSpec.load("digits-cnn", ["train.epochs=3", "evaluation.val_samples=100", "train.weight_decay=1e-3"])
    assert spec.train.epochs == 3 and spec.evaluation.val_samples == 100 and spec.train.weight_decay == 1e-3
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["epochs"])


def test_an_optional_string_setting_is_read_as_a_string():
    spec = TaskSpec.load("digits-cnn", ["evaluation.criterion=prunenet", "evaluation.reconstruction=least_squares"])
    assert spec.evaluation.criterion == "prunenet" and spec.evaluation.reconstruction == "least_squares"
    assert TaskSpec.load("digits-cnn").evaluation.criterion is None  # left to the strategy
    with pytest.raises(ConfigError, match="evaluation.criterion must be a string"):
        TaskSpec.load("digits-cnn", ["evaluation.criterion=3"])


def test_wrong_types_are_refused_with_the_key():
    with pytest.raises(ConfigError, match="train.epochs must be a whole number"):
        TaskSpec.load("digits-cnn", ["train.epochs=2.5"])
    with pytest.raises(ConfigError, match="bn_recalibration must be true or false"):
        TaskSpec.load("digits-cnn", ["evaluation.bn_recalibration=maybe"])
    with pytest.raises(ConfigError, match="unknown key 'lr_max'"):
        TaskSpec.load("digits-cnn", ["train.lr_max=1"])


def test_task_builds_model_space_and_reads_space_yaml():
    task = Task(TaskSpec.load("digits-cnn"))
    space = task.search_space(space="hw-friendly")
    assert space.config.round_to == 8 and "features.0" in space.pinned
