"""The command line: the main flows, and one clear sentence with exit code 2 for bad input."""

import json
import subprocess
import sys

import pytest
import torch

from automlprune.cli.main import main
from automlprune.models import build_model, save_checkpoint


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_writes_a_checkpoint_with_metadata(checkpoint):
    blob = torch.load(checkpoint, weights_only=True)
    meta = blob["metadata"]
    assert meta["model"] == "digits_cnn" and meta["dataset"] == "digits" and meta["epochs"] == 6
    assert 0.8 < meta["test_accuracy"] <= 1 and meta["automlprune_version"]


def test_inspect_json_lists_groups_and_base_costs(capsys):
    code, out, _ = _run(capsys, "inspect", "digits-cnn", "--json")
    info = json.loads(out)
    assert code == 0 and [g["name"] for g in info["groups"]][0] == "features.0"
    assert info["base"]["flops"] == 2 * info["base"]["macs"] and info["base"]["params"] == 40506


def test_evaluate_json_with_latency_and_export(capsys, checkpoint, tmp_path):
    candidate = tmp_path / "c.json"
    candidate.write_text(json.dumps({"ratios": {"features.3": 0.5, "features.7": 0.25}, "bits": {}}))
    code, out, _ = _run(capsys, "evaluate", "digits-cnn", "--set", f"checkpoint={checkpoint}", "--candidate", str(candidate),
                        "--latency", "--export", str(tmp_path / "net.pt2"), "--json")
    result = json.loads(out)
    assert code == 0 and 0 < result["relative"]["macs"] < 1 and result["latency_measured_ms"]["1"] > 0
    assert (tmp_path / "net.pt2").is_file()


def test_evaluate_quantized_candidate_int8_and_packed_export(capsys, checkpoint, tmp_path):
    from automlprune.export import load_packed

    candidate = tmp_path / "c.json"
    candidate.write_text(json.dumps({"ratios": {}, "bits": {"features.3": 8, "features.7": 8, "classifier.1": 8}}))
    code, out, _ = _run(capsys, "evaluate", "digits-cnn", "--set", f"checkpoint={checkpoint}", "--space", "mixed-precision",
                        "--candidate", str(candidate), "--int8", "--export", str(tmp_path / "net.qpt"), "--json")
    result = json.loads(out)
    assert code == 0 and set(result["int8"]) == {"float32", "int8"}
    assert abs(result["int8"]["int8"]["accuracy"] - result["accuracy"]) < 0.03 and result["int8"]["int8"]["latency_ms"]["64"] > 0
    assert load_packed(tmp_path / "net.qpt").features[3].weight.shape[0] == 32
    candidate.write_text(json.dumps({"ratios": {}, "bits": {"features.3": 4}}))
    code, _, err = _run(capsys, "evaluate", "digits-cnn", "--set", f"checkpoint={checkpoint}", "--space", "mixed-precision",
                        "--candidate", str(candidate), "--int8")
    assert code == 2 and "every Conv2d/Linear layer at 8 bits" in err and "Traceback" not in err


def test_list_shows_registries(capsys):
    code, out, _ = _run(capsys, "list", "models")
    assert code == 0 and "resnet56" in out and "torchvision:<name>" in out
    code, out, _ = _run(capsys, "list", "envs", "--json")
    assert {"digits-cnn", "fmnist-resnet20", "fmnist-vgg11", "cifar10-resnet56"} <= set(json.loads(out))


def _bad_yaml(tmp_path, text):
    path = tmp_path / "task.yaml"
    path.write_text(text)
    return str(path)


BAD_INPUTS = {
    "unknown model": (["inspect", "{yaml:model: {name: resnet999}\ndataset: {name: digits}}"], "unknown model 'resnet999'"),
    "unknown dataset": (["inspect", "{yaml:model: {name: digits_cnn}\ndataset: {name: mnist3d}}"], "unknown dataset 'mnist3d'"),
    "unknown yaml key": (["inspect", "{yaml:model: {name: digits_cnn}\ndataset: {name: digits}\nepochz: 3}"], "unknown key 'epochz'"),
    "unknown criterion": (["evaluate", "digits-cnn", "--uniform", "0.5", "--set", "evaluation.criterion=magic", "--set", "checkpoint={ckpt}"], "unknown criterion 'magic'"),
    "ratio outside (0, 1]": (["evaluate", "digits-cnn", "--uniform", "1.5", "--set", "checkpoint={ckpt}"], "outside (0, 1]"),
    "candidate ratio outside (0, 1]": (["evaluate", "digits-cnn", "--candidate", "{cand:{\"ratios\": {\"features.3\": 0}}}", "--set", "checkpoint={ckpt}"], "outside (0, 1]"),
    "unknown group": (["evaluate", "digits-cnn", "--candidate", "{cand:{\"ratios\": {\"layer9\": 0.5}}}", "--set", "checkpoint={ckpt}"], "'layer9' that the model lacks"),
    "checkpoint of another architecture": (["evaluate", "digits-cnn", "--uniform", "0.5", "--set", "checkpoint={other}"], "made for model='resnet20'"),
    "corrupt checkpoint": (["evaluate", "digits-cnn", "--uniform", "0.5", "--set", "checkpoint={corrupt}"], "cannot be read"),
    "missing checkpoint": (["evaluate", "digits-cnn", "--uniform", "0.5", "--set", "auto_train=false", "--set", "checkpoint={tmp}/none.pt"], "automlprune train"),
    "missing data": (["inspect", "{yaml:model: {name: resnet20}\ndataset: {name: fashion-mnist, root: /nonexistent}}"], "apt-get install dataset-fashion-mnist"),
    "unknown env": (["inspect", "no-such-task"], "no envs config named 'no-such-task'"),
    "bad export suffix": (["evaluate", "digits-cnn", "--uniform", "0.5", "--set", "checkpoint={ckpt}", "--export", "{tmp}/x.zip"], "export format"),
    "cuda without cuda": (["inspect", "digits-cnn", "--device", "cuda"], "no CUDA device"),
    "negative learning rate": (["inspect", "digits-cnn", "--set", "train.lr=-1"], "train.lr must be positive, got -1.0"),
    "negative fine-tune epochs": (["evaluate", "digits-cnn", "--uniform", "0.5", "--set", "checkpoint={ckpt}", "--finetune-epochs", "-1"],
                                  "--finetune-epochs cannot be negative"),
    "empty dataset root": (["inspect", "{yaml:model: {name: resnet20}\ndataset: {name: fashion-mnist, root: ''}}"], "dataset root is empty"),
    "no benchmark candidates": (["benchmark", "--quick", "--candidates", "0", "--out", "{tmp}/bench"], "--candidates must be at least 1"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_is_one_sentence_and_exit_code_2(case, capsys, tmp_path, checkpoint, monkeypatch):
    if case == "cuda without cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    if case == "missing data":
        from automlprune.data import sources

        monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
        monkeypatch.delenv("AUTOMLPRUNE_DATA", raising=False)
    other = save_checkpoint(tmp_path / "other.pt", build_model("resnet20", 10, 1), {"model": "resnet20", "dataset": "digits"})
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    argv, expected = BAD_INPUTS[case]
    resolved = []
    for arg in argv:
        arg = arg.format(ckpt=checkpoint, other=other, corrupt=corrupt, tmp=tmp_path) if "{yaml" not in arg and "{cand" not in arg else arg
        if arg.startswith("{yaml:"):
            arg = _bad_yaml(tmp_path, arg[6:-1])
        elif arg.startswith("{cand:"):
            path = tmp_path / "cand.json"
            path.write_text(arg[6:-1])
            arg = str(path)
        resolved.append(arg)
    code, out, err = _run(capsys, *resolved)
    assert code == 2, (out, err)
    assert expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_console_script_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "automlprune.cli.main", "inspect", "no-such-task"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("automlprune: error: no envs config named 'no-such-task'")


def test_list_formats_and_weight_criteria(capsys):
    code, out, _ = _run(capsys, "list", "formats", "--json")
    formats = json.loads(out)
    assert code == 0 and list(formats)[:3] == ["dense", "bitmask", "csr"] and {"n:m", "bsr", "pconv"} <= set(formats)
    assert all(formats.values())  # every format says how it stores a layer
    code, out, _ = _run(capsys, "list", "weight-criteria", "--json")
    assert code == 0 and set(json.loads(out)) >= {"magnitude", "lap", "hessian"}


def test_inspect_names_the_layers_searched_for_sparsity_and_their_patterns(capsys):
    code, out, _ = _run(capsys, "inspect", "digits-cnn", "--space", "sparse")
    assert code == 0 and "3 layers searched for weight sparsity (densities 0.02" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and "unstructured" in line}
    assert set(lines) == {"features.3", "features.7", "classifier.1"}
    assert "pconv" in lines["features.3"] and "pconv" not in lines["classifier.1"]  # PCONV patterns are for 3x3 kernels only
