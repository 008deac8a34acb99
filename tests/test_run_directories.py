"""Run directories that survive being moved, copied, shared by workers started together, read
from another folder, resumed with other settings, and written under faults."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import sqlite3
import subprocess

import pytest

from automlprune.cli.main import main


def _search(run, checkpoint, *extra, strategy="random", budgets="macs=0.5", evals=3):
    return main(["search", "digits-cnn", "--strategy", strategy, "--budgets", budgets, "--evals", str(evals),
                 "--run-dir", str(run), "--set", f"checkpoint={checkpoint}", "--no-export", "--json", *map(str, extra)])


def _trials(run):
    with sqlite3.connect(run / "study.db") as db:
        return db.execute("select count(*) from trials").fetchone()[0]


def _one_sentence_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("automlprune: error:"), err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, checkpoint):
    """A finished digits search whose baseline checkpoint lies inside its run directory."""
    run = tmp_path_factory.mktemp("runs") / "run"
    run.mkdir()
    shutil.copy(checkpoint, run / "baseline.pt")
    assert _search(run, run / "baseline.pt") == 0
    return run


def test_a_moved_run_reads_its_own_study_and_checkpoint(finished_run, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(finished_run, tmp_path / "original")
    (tmp_path / "original").rename(moved)
    (tmp_path / "original").mkdir()  # the old place exists again, empty
    capsys.readouterr()
    assert main(["plot", str(moved), "--json"]) == 0
    assert main(["export", str(moved), "--budget", "macs=0.5", "--format", "pt", "--out", str(tmp_path / "m.pt"), "--json"]) == 0
    assert not any((tmp_path / "original").iterdir())  # nothing created at the old place
    config = json.loads((moved / "config.json").read_text())
    assert config["storage"] is None and config["checkpoint_in_run_dir"] == "baseline.pt"


def test_a_copied_run_reads_the_copy(finished_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    with sqlite3.connect(copy / "study.db") as db:  # the copy's answer changes; the original's does not
        db.execute("update study_user_attributes set value_json = 'null' where key = 'answer'")
    capsys.readouterr()
    assert main(["export", str(copy), "--budget", "macs=0.5", "--json"]) == 2
    assert "no feasible candidate" in _one_sentence_error(capsys)
    assert main(["export", str(finished_run), "--budget", "macs=0.5", "--format", "pt", "--out", str(tmp_path / "m.pt"),
                 "--json"]) == 0


def test_a_run_is_read_from_another_folder(tmp_path, checkpoint, monkeypatch, capsys):
    """The checkpoint given relative to the folder the search ran in is found from anywhere."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(checkpoint, work / "ck.pt")
    monkeypatch.chdir(work)
    assert _search("run", "ck.pt") == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["export", str(work / "run"), "--budget", "macs=0.5", "--format", "pt", "--json"]) == 0
    assert json.loads((work / "run" / "config.json").read_text())["task"]["checkpoint"] == str(work / "ck.pt")


def test_a_missing_study_or_storage_file_is_refused_without_creating_one(finished_run, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(finished_run / "config.json", bare / "config.json")
    capsys.readouterr()
    assert main(["plot", str(bare)]) == 2
    assert "study.db does not exist" in _one_sentence_error(capsys) and not (bare / "study.db").exists()
    assert main(["plot", str(finished_run), "--storage", f"sqlite:///{tmp_path / 'typo.db'}"]) == 2
    assert "check the --storage path" in _one_sentence_error(capsys) and not (tmp_path / "typo.db").exists()


def test_resuming_with_a_setting_that_changes_evaluations_is_refused(finished_run, capsys):
    before = (finished_run / "config.json").read_text()
    capsys.readouterr()
    code = _search(finished_run, finished_run / "baseline.pt", "--set", "evaluation.bn_recalibration=false")
    assert code == 2
    err = _one_sentence_error(capsys)
    assert "evaluation.bn_recalibration true, not false" in err
    assert (finished_run / "config.json").read_text() == before


def test_a_second_search_keeps_the_first_one_s_answers(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert _search(run, run / "baseline.pt", strategy="uniform") == 0
    answers = json.loads((run / "answers.json").read_text())
    assert sorted(a["strategy"] for a in answers) == ["random", "uniform"]
    assert sorted(json.loads((run / "config.json").read_text())["strategies"]) == ["random", "uniform"]


def _start_worker(run_dir, barrier, strategy, errors):
    """One worker's start: open the store, save the run's config, create its study, store a trial."""
    import optuna

    from automlprune.search.store import RunStore

    try:
        barrier.wait()
        store = RunStore(run_dir)
        store.save_config({"task": {"name": "t"}, "space": {"name": "s"}, "strategies": [strategy]})
        study = store.study(RunStore.study_name(strategy, "macs=0.5", 0), {"strategy": strategy})
        study.add_trial(optuna.trial.create_trial(values=[0.5, 0.5]))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        errors.put(f"{type(exc).__name__}: {exc}")


def test_four_workers_started_at_the_same_instant_share_a_fresh_run(tmp_path):
    run = tmp_path / "run"
    fork = multiprocessing.get_context("fork")
    barrier, errors = fork.Barrier(4), fork.Queue()
    workers = [fork.Process(target=_start_worker, args=(run, barrier, f"s{i}", errors)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    problems = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert problems == [] and all(w.exitcode == 0 for w in workers)
    assert json.loads((run / "config.json").read_text())["strategies"] == ["s0", "s1", "s2", "s3"]
    assert _trials(run) == 4 and not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))


def test_the_stored_answer_is_the_study_s_best_whichever_worker_found_it(digits_evaluator, digits_space, tmp_path):
    """Another worker stores a better feasible result while this one searches: the answer is the study's best."""
    from dataclasses import replace

    from automlprune.search import STRATEGIES
    from automlprune.search.base import SearchContext, run_strategy
    from automlprune.search.budget import parse_budget
    from automlprune.search.store import RunStore

    evaluator = digits_evaluator
    store, budget = RunStore(tmp_path / "run"), parse_budget("macs=0.5")
    study = store.study("random|macs=0.5|seed0", {"strategy": "random"})
    strategy = STRATEGIES.get("random")(SearchContext(digits_space, evaluator.cost_model, study, evaluator.scores), budget, max_evals=3)
    other = evaluator.evaluate(digits_space.uniform(0.5))
    other = replace(other, accuracy=0.9999)
    asked = {"n": 0}
    original = strategy.ask

    def ask_while_another_worker_stores():
        asked["n"] += 1
        if asked["n"] == 2:
            store.record(study, digits_space, other, violation=-0.01, cost_fraction=other.relative["macs"],
                         attrs={"evaluated": True, "strategy": "random"})
        return original()

    strategy.ask = ask_while_another_worker_stores
    outcome = run_strategy(strategy, evaluator, store, study, max_evals=3)
    assert outcome.answer.accuracy == 0.9999
    assert study.user_attrs["answer"]["accuracy"] == 0.9999


# ---- write failures: one sentence, exit 2, what was stored intact -----------------------------------
def _read_only(path, undo):
    """Make ``path`` unwritable for this process: chmod, or (as root, whom modes do not stop)
    the immutable attribute."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(mode & 0o555)
        undo.append(lambda: path.chmod(mode))
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("running as root without chattr +i: a read-only file cannot be made")
    undo.append(lambda: subprocess.run(["chattr", "-i", str(path)], check=True))


@pytest.fixture
def undo():
    actions = []
    yield actions
    for action in reversed(actions):
        action()


@pytest.mark.parametrize("target", ["run directory", "study.db"])
def test_a_read_only_run_ends_in_one_sentence_and_keeps_its_store(target, finished_run, tmp_path, undo, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = _trials(run)
    _read_only(run if target == "run directory" else run / "study.db", undo)
    capsys.readouterr()
    assert _search(run, run / "baseline.pt", strategy="uniform") == 2
    err = _one_sentence_error(capsys)
    assert str(run) in err
    undo.pop()()
    assert _trials(run) == before


def test_a_read_only_parent_ends_in_one_sentence(tmp_path, checkpoint, undo, capsys):
    parent = tmp_path / "parent"
    parent.mkdir()
    _read_only(parent, undo)
    capsys.readouterr()
    assert _search(parent / "run", checkpoint) == 2
    assert "cannot create the run directory" in _one_sentence_error(capsys)


def test_a_full_disk_ends_in_one_sentence_and_keeps_the_store(finished_run, tmp_path, monkeypatch, capsys):
    from automlprune.search import store as store_module

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)

    def no_space(self, entries):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run / "answers.json"))

    monkeypatch.setattr(store_module.RunStore, "update_answers", no_space)
    capsys.readouterr()
    assert _search(run, run / "baseline.pt", strategy="uniform") == 2
    err = _one_sentence_error(capsys)
    assert "No space left on device" in err and "answers.json" in err
    assert _trials(run) == _trials(finished_run) + 1  # the search's evaluation was stored before the write failed


@pytest.mark.slow
def test_four_search_commands_started_together_on_a_fresh_run_all_finish(tmp_path, checkpoint):
    """Four `automlprune search` processes (seeds 0-3) started at the same moment on one new run directory."""
    import sys

    run = tmp_path / "run"
    command = [sys.executable, "-m", "automlprune.cli.main", "search", "digits-cnn", "--strategy", "random", "--evals", "2",
               "--run-dir", str(run), "--set", f"checkpoint={checkpoint}", "--no-export", "--json"]
    workers = [subprocess.Popen(command + ["--seed", str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for seed in range(4)]
    outcomes = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0, 0], [err[-500:] for _, err in outcomes]
    answers = json.loads((run / "answers.json").read_text())
    assert sorted(a["seed"] for a in answers) == [0, 1, 2, 3]
    with sqlite3.connect(run / "study.db") as db:
        studies = {name for (name,) in db.execute("select study_name from studies")}
    assert {f"random|macs=0.5|seed{s}" for s in range(4)} <= studies


def test_a_run_made_with_a_criterion_the_defaults_now_leave_to_the_strategy_names_it():
    """Runs saved when the shipped tasks pinned evaluation.criterion=l1: resumed without it, the
    refusal names the setting and the value to pass."""
    from automlprune.search.run_dir import config_conflict

    old = {"task": {"name": "t", "evaluation": {"criterion": "l1", "reconstruction": "none", "bn_batches": 10}}}
    new = {"task": {"name": "t", "evaluation": {"criterion": None, "reconstruction": None, "bn_batches": 10}}}
    assert config_conflict(old, new) == "task.evaluation.criterion \"l1\", not unset (the strategy's default)"
    pinned = {"task": {"name": "t", "evaluation": {"criterion": "l1", "reconstruction": "none", "bn_batches": 10}}}
    assert config_conflict(old, pinned) is None
