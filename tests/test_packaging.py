"""The shipped task and space files travel with the package: found by name from any directory,
and inside a built wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from automlprune.tasks import TaskSpec, list_configs, resolve_config


def test_shipped_files_are_found_from_an_empty_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"digits-cnn", "fmnist-resnet20"} <= set(list_configs("envs"))
    assert {"default", "mixed-precision", "bits-only", "kernel-sparse"} <= set(list_configs("search_spaces"))
    assert {"two-stage-drl", "channels-then-bits"} <= set(list_configs("pipelines"))
    assert TaskSpec.load("digits-cnn").name == "digits-cnn"


def test_a_user_file_in_the_current_directory_wins_over_the_shipped_one(tmp_path, monkeypatch):
    (tmp_path / "envs").mkdir()
    (tmp_path / "envs" / "digits-cnn.yaml").write_text("name: mine\nmodel: digits_cnn\ndataset: digits\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_config("digits-cnn", "envs") == tmp_path / "envs" / "digits-cnn.yaml"


@pytest.mark.slow
def test_the_wheel_ships_the_task_and_space_files(tmp_path):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
                   check=True, capture_output=True)
    wheel = next(tmp_path.glob("automlprune-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"automlprune/envs/digits-cnn.yaml", "automlprune/search_spaces/default.yaml", "automlprune/pipelines/two-stage-drl.yaml"} <= names
