"""Training on several processes: two gloo processes, each on half of every global batch with
the gradients averaged before each step, follow the one-process loss curve on the same global
batch. Without batch norm up to float rounding (1e-4 relative); with batch norm (each process
normalizes its half with the half's statistics) closely (0.03 absolute per-epoch loss)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from automlprune.data import load_dataset
from automlprune.models import build_model
from automlprune.train import Recipe, Trainer

RECIPE = Recipe(epochs=3, batch_size=64, lr=0.05, steps_per_epoch=12)


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "plain":  # no batch norm: two processes compute the one-process steps exactly
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10))
    return build_model("digits_cnn", 10, 1)


def _train(kind: str, checkpoint=None) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    model = _model(kind)
    history = Trainer(model, load_dataset("digits"), "cpu", RECIPE, progress=False, checkpoint=checkpoint).fit()
    return history.train_loss, history.val_accuracy, {k: v.clone() for k, v in model.state_dict().items()}


def _rank(rank: int, world: int, kind: str, rendezvous: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        loss, val, state = _train(kind)
        gathered = [None] * world
        dist.all_gather_object(gathered, {k: v.sum().item() for k, v in state.items()})
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"loss": loss, "val": val, "states": gathered,
                           "state": {k: v.tolist() for k, v in state.items()}}, f)
        dist.barrier()  # both ranks done before either tears its connections down (gloo aborts otherwise)
    finally:
        dist.destroy_process_group()


def _two_processes(kind: str, tmp_path) -> dict:
    out = tmp_path / f"{kind}.json"
    mp.start_processes(_rank, args=(2, kind, str(tmp_path / f"rendezvous-{kind}"), str(out)), nprocs=2, join=True,
                       start_method="spawn")
    return json.loads(out.read_text())


@pytest.mark.parametrize("kind,tolerance", [("plain", 1e-4), pytest.param("batchnorm", 0.03, marks=pytest.mark.slow)])
def test_two_processes_follow_the_one_process_loss_curve(kind, tolerance, tmp_path):
    one_loss, one_val, one_state = _train(kind)
    two = _two_processes(kind, tmp_path)
    assert len(two["loss"]) == len(one_loss) == RECIPE.epochs
    if kind == "plain":
        assert two["loss"] == pytest.approx(one_loss, rel=tolerance)
        for name, value in one_state.items():  # the same weights at the end
            assert torch.tensor(two["state"][name]) == pytest.approx(value, abs=1e-4)
    else:
        assert max(abs(a - b) for a, b in zip(two["loss"], one_loss)) < tolerance
    first, second = two["states"]
    assert first == second  # every rank holds the same network (buffers averaged after each epoch)


def _refuse(rank: int, rendezvous: str) -> None:
    from automlprune.errors import ConfigError

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        with pytest.raises(ConfigError, match="batch size 63 must be divisible by the 2 training processes"):
            Trainer(_model("plain"), load_dataset("digits"), "cpu", Recipe(epochs=1, batch_size=63, lr=0.05), progress=False)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_batch_the_processes_cannot_split_evenly_is_refused_in_one_sentence(tmp_path):
    mp.start_processes(_refuse, args=(str(tmp_path / "rendezvous-odd"),), nprocs=2, join=True, start_method="spawn")


@pytest.mark.slow
def test_train_on_two_processes_writes_one_checkpoint(tmp_path):
    import subprocess

    checkpoint = tmp_path / "digits.pt"
    done = subprocess.run([sys.executable, "-m", "automlprune", "train", "digits-cnn", "--nproc", "2", "--epochs", "2",
                           "--set", f"checkpoint={checkpoint}", "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads(done.stdout)  # one process printed the result
    assert meta["checkpoint"] == str(checkpoint) and checkpoint.is_file() and meta["val_accuracy"] > 0.5
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["resrep", "dmcp"])
def test_a_training_strategy_searches_on_two_processes_with_one_writer(strategy, checkpoint, tmp_path):
    """``search --nproc 2``: both processes train (the follower checks it chose what rank 0 chose,
    else it fails), rank 0 alone evaluates, stores and prints; the fine-tune runs on both."""
    import subprocess

    from automlprune.search.store import RunStore

    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "automlprune", "search", "digits-cnn", "--strategy", strategy, "--budget", "macs=0.5",
                           "--evals", "1", "--nproc", "2", "--finetune-epochs", "1", "--run-dir", str(run),
                           "--set", f"checkpoint={checkpoint}", "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (entry,) = json.loads(done.stdout)["answers"]  # one process printed the result
    assert entry["evaluations"] == 1 and entry["answer"]["relative"]["macs"] <= 0.5
    assert entry["finetune"]["test_accuracy"] > 0.9
    store = RunStore(run, create=False)
    (record,) = store.records(store.find_study(f"{strategy}|macs=0.5|seed0"))
    if strategy == "resrep":  # judged on its trained weights, saved once
        assert (run / record.result.weights["artifact"]).is_file() and len(list((run / "weights").iterdir())) == 1
    assert (run / f"{strategy}-macs0p5-seed0.json").is_file() and not list(run.rglob("*.tmp"))


@pytest.mark.parametrize("strategy,reason", [("gate-decorator", "statistics of the data each process sees"),
                                             ("random", "does not train its networks")])
def test_search_refuses_several_processes_for_a_strategy_whose_ranks_would_disagree(strategy, reason, capsys):
    from automlprune.cli.main import main

    assert main(["search", "digits-cnn", "--strategy", strategy, "--budget", "macs=0.5", "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert f"strategy '{strategy}' cannot train on several processes (--nproc 2)" in err and reason in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_an_error_found_after_the_processes_start_is_one_sentence_with_exit_code_2(checkpoint, tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, "-m", "automlprune", "search", "digits-cnn", "--strategy", "resrep", "--budget", "macs=0.0001",
                           "--evals", "1", "--nproc", "2", "--run-dir", str(tmp_path / "run"), "--set", f"checkpoint={checkpoint}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [next(line for line in done.stderr.splitlines() if line.strip())]  # one line
    assert done.stderr.startswith("automlprune: error: budget macs=0.0001 is impossible") and "Traceback" not in done.stderr


@pytest.mark.parametrize("command", [["train", "digits-cnn"], ["search", "digits-cnn", "--strategy", "resrep", "--budget", "macs=0.5"]])
def test_fewer_than_one_process_is_refused_in_one_sentence(command, capsys):
    from automlprune.cli.main import main

    assert main([*command, "--nproc", "0"]) == 2
    assert capsys.readouterr().err.strip() == "automlprune: error: --nproc 0 must be at least 1"
