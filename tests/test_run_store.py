"""Run store: Optuna studies, resume after interruption (and after kill -9), reading from another process."""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from automlprune.search.store import RunStore, from_params, to_params

from conftest import evaluated_trials, run_search


class _Crash(Exception):
    pass


@pytest.mark.parametrize("strategy", ["random", "greedy", "optuna-tpe"])
def test_crashed_search_resumes_without_losing_or_repeating(strategy, tmp_path, trained_digits_model, digits_space, digits):
    from automlprune.evaluator import Evaluator
    from automlprune.tasks import EvalSettings

    from automlprune.search import STRATEGIES

    settings = STRATEGIES.get(strategy).evaluation_settings(EvalSettings(bn_batches=2, bn_batch_size=64))  # as a run would
    crashing = Evaluator(trained_digits_model, digits_space, digits, settings)
    real, calls = crashing.evaluate, []

    def evaluate(candidate, latency=False):
        calls.append(candidate)
        if len(calls) > 5:
            raise _Crash()
        return real(candidate, latency)

    crashing.evaluate = evaluate
    with pytest.raises(_Crash):
        run_search(tmp_path, trained_digits_model, digits_space, digits, strategy, max_evals=12, evaluator=crashing)
    store = RunStore(tmp_path / "run")
    name = RunStore.study_name(strategy, "macs=0.5", 0)
    before = [r.result.candidate for r in store.records(store.study(name))]
    assert len(before) == len({c.candidate.key for c in calls[:5]})  # 5 evaluations (two proposals may repair to one network)
    resumed, store, study, evaluator = run_search(tmp_path, trained_digits_model, digits_space, digits, strategy, max_evals=12)
    records = store.records(study)
    keys = [r.result.candidate.key for r in records]
    assert len(keys) == len(set(keys)) == resumed.evaluations <= 12
    assert [r.result.candidate for r in records[:len(before)]] == before  # nothing lost or rewritten
    assert len(evaluator) == len(records)  # only new candidates were evaluated
    if strategy != "optuna-tpe":  # replayed strategies end where an uninterrupted run ends
        straight, *_ = run_search(tmp_path, trained_digits_model, digits_space, digits, strategy, max_evals=12, run_name="straight")
        # (two proposals may be repaired to one network: the history tells both, the store keeps it once)
        assert list(dict.fromkeys(r.candidate.key for r in straight.history)) == [r.result.candidate.key for r in records]
        assert straight.answer.candidate == resumed.answer.candidate


@pytest.mark.parametrize("strategy", ["random", "optuna-tpe"])
def test_trials_hold_encoding_metrics_and_constraint(strategy, tmp_path, trained_digits_model, digits_space, digits):
    outcome, store, study, _ = run_search(tmp_path, trained_digits_model, digits_space, digits, strategy, max_evals=4,
                                          options={"warm_start": "none", "repair": False})  # sampled = evaluated, on the grid
    trial = study.trials[0]
    cand = outcome.history[0].candidate
    assert trial.params == to_params(digits_space, cand) and from_params(digits_space, trial.params) == cand
    assert trial.values[0] == trial.user_attrs["result"]["accuracy"]
    assert trial.values[1] == pytest.approx(trial.user_attrs["result"]["relative"]["macs"])
    assert trial.constraints and list(trial.constraints.values())[0] <= 0
    for t in study.trials:  # where optuna-dashboard reads the constraint, for the loop's trials and Optuna samplers' alike
        assert t.system_attrs["constraints"] == [t.user_attrs["constraint"]] and len(t.constraints) == 1
    assert {"strategy", "seed", "budget", "elapsed_s", "candidate", "result", "evaluated"} <= set(trial.user_attrs)
    loaded = optuna.load_study(study_name=study.study_name, storage=store.url)
    assert len(loaded.trials) == len(study.trials)


def test_a_reader_of_a_run_waits_for_the_worker_creating_its_storage(tmp_path):
    # Opening a database storage creates its tables when missing; a report or a poller opening it while a
    # worker creates it collided with that worker ("table study_system_attributes already exists").
    import threading

    from automlprune.search.run_dir import run_lock

    RunStore(tmp_path)
    opened = threading.Event()
    reader = threading.Thread(target=lambda: (RunStore(tmp_path, create=False), opened.set()))
    with run_lock(tmp_path):  # a worker of the run is creating the storage
        reader.start()
        time.sleep(0.5)
        assert not opened.is_set()
    reader.join(timeout=10)
    assert opened.is_set()


@pytest.mark.slow
def test_kill_9_mid_search_then_resume(tmp_path, digits_checkpoint):
    checkpoint = digits_checkpoint
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "automlprune.cli.main", "search", "digits-cnn", "--strategy", "optuna-tpe",
               "--budget", "macs=0.5", "--evals", "60", "--run-dir", str(run_dir), "--no-export", "--json",
               "--set", f"checkpoint={checkpoint}", "--set", "evaluation.bn_batches=30"]
    name = "optuna-tpe|macs=0.5|seed0"
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while evaluated_trials(run_dir, name) < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the search ended before it could be killed: " + proc.stderr.read().decode()[-500:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = evaluated_trials(run_dir, name)
    assert 8 <= done_before < 60
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'study.db'}")
    complete = optuna.trial.TrialState.COMPLETE
    kept = [t.user_attrs["candidate"] for t in study.trials if t.state == complete and t.user_attrs.get("evaluated")]
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-1000:]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'study.db'}")
    evaluated = [t for t in study.trials if t.state == complete and t.user_attrs.get("evaluated")]
    keys = [json.dumps(t.user_attrs["candidate"], sort_keys=True) for t in evaluated]
    assert len(evaluated) == 60 and len(set(keys)) == 60  # nothing lost, nothing repeated
    assert [t.user_attrs["candidate"] for t in evaluated[:len(kept)]] == kept
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]  # the killed trial is closed
