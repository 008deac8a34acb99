"""Several workers on one search: each network evaluated once, the evaluation budget counted in the
study (N workers spend exactly ``--evals``), and a dead worker's claim freed for another worker
(heartbeats on any host, at once on the same host)."""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import optuna
import pytest

from automlprune.search import store as store_module
from automlprune.search.store import RunStore
from automlprune.space import Candidate


def _workers(run, checkpoint, strategy, evals, count, storage=None):
    command = [sys.executable, "-m", "automlprune", "search", "digits-cnn", "--strategy", strategy, "--budget", "macs=0.5",
               "--evals", str(evals), "--run-dir", str(run), "--set", f"checkpoint={checkpoint}", "--json", "--no-export",
               *(["--storage", storage] if storage else [])]
    return [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(count)]


def _evaluations(run, strategy, storage=None):
    """(network keys evaluated, evaluations per worker, trials left RUNNING) of a run's study."""
    store = RunStore(run, storage=storage, create=False)
    study = store.find_study(f"{strategy}|macs=0.5|seed0")
    if study is None:
        return [], collections.Counter(), []
    records = store.records(study)
    return ([r.result.key for r in records], collections.Counter(r.worker for r in records),
            study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))


@pytest.mark.parametrize("strategy,count,evals", [("optuna-tpe", 3, 10), pytest.param("optuna-tpe", 4, 40, marks=pytest.mark.slow),
                                                  pytest.param("random", 2, 10, marks=pytest.mark.slow)])
def test_workers_on_one_study_spend_exactly_the_evaluation_budget(strategy, count, evals, checkpoint, tmp_path):
    run = tmp_path / "run"
    workers = _workers(run, checkpoint, strategy, evals, count)
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-2000:]
    keys, _, running = _evaluations(run, strategy)
    assert len(keys) == evals and len(set(keys)) == evals and not running  # exactly the budget, no network twice, nothing left open
    # How the work spreads over the workers depends on when each process gets through its start
    # (imports, data): the next test shows the spread without that race.


def test_a_partitioned_search_skips_networks_another_worker_holds_and_evaluates_them_when_it_dies(
        tmp_path, trained_digits_model, digits_space, digits, monkeypatch):
    from automlprune.search.baselines import RandomStrategy

    from conftest import search_with

    monkeypatch.setattr(store_module, "GRACE_S", 2)
    _, _, _, alone = search_with(tmp_path / "alone", RandomStrategy, trained_digits_model, digits_space, digits, "macs=0.5",
                                 max_evals=6)
    sequence = alone.records(alone.study("random|macs=0.5|seed0"))  # the seeded sequence every worker walks
    other = RunStore(tmp_path / "two")  # another worker, which claimed the 2nd and 4th networks and then went silent
    study = other.study("random|macs=0.5|seed0", {"strategy": "random", "budget": "macs=0.5", "seed": 0})
    held = [sequence[1].result, sequence[3].result]
    claims = [other.claim(study, digits_space, r.key, r.candidate, max_evals=6) for r in held]
    assert all(c.number is not None for c in claims)
    silent = threading.Event()  # the other worker beats for its claims until the search first waits for one of them

    def beat() -> None:
        while not silent.wait(0.2):
            for c in claims:
                other._beat(c.trial_id)

    wait_for = RunStore.wait_for
    monkeypatch.setattr(RunStore, "wait_for", lambda self, *args: (silent.set(), wait_for(self, *args))[1])
    beating = threading.Thread(target=beat)
    beating.start()
    try:
        _, outcome, _, store = search_with(tmp_path / "two", RandomStrategy, trained_digits_model, digits_space, digits,
                                           "macs=0.5", max_evals=6)
    finally:
        silent.set()
        beating.join()
    evaluated = [r.result.key for r in store.records(study)]
    # the networks it was free to take first, in the sequence's order; then the silent worker's, retried once its claims died
    assert evaluated == [sequence[i].result.key for i in (0, 2, 4, 5, 1, 3)]
    assert {t.number: t.state.name for t in study.trials}[claims[0].number] == "FAIL" and outcome.answer is not None


@pytest.mark.slow
def test_four_workers_on_one_postgresql_study_spend_exactly_forty_evaluations(postgres_url, checkpoint, tmp_path):
    workers = _workers(tmp_path / "run", checkpoint, "optuna-tpe", 40, 4, storage=postgres_url)
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-2000:]
    keys, _, running = _evaluations(tmp_path / "run", "optuna-tpe", postgres_url)
    assert len(keys) == 40 and len(set(keys)) == 40 and not running


@pytest.mark.slow
def test_a_worker_killed_mid_search_loses_nothing_and_the_budget_is_still_exact(checkpoint, tmp_path):
    run = tmp_path / "run"
    workers = {w.pid: w for w in _workers(run, checkpoint, "optuna-random", 40, 2)}
    deadline = time.time() + 300
    victim, done = None, 0
    while victim is None and time.time() < deadline:  # kill the first worker to store an evaluation, mid-search
        if (run / "study.db").is_file():
            try:
                keys, by_worker, _ = _evaluations(run, "optuna-random")
            except Exception:  # the study's tables are being made
                keys, by_worker = [], {}
            victim = next((pid for pid in workers if any(w.endswith(f":{pid}") for w in by_worker)), None)
            done = len(keys)
        time.sleep(0.05)
    assert victim is not None, "no worker stored an evaluation within 300 s"
    os.kill(victim, signal.SIGKILL)
    workers[victim].wait()
    assert done < 30, f"{done} of 40 evaluations were stored before a worker could be killed; the test proves little"
    survivor = next(w for pid, w in workers.items() if pid != victim)
    _, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err[-2000:]
    keys, by_worker, running = _evaluations(run, "optuna-random")
    assert len(keys) == 40 and len(set(keys)) == 40 and not running
    # the killed worker's stored evaluations are kept, and the survivor did the rest (over 10 were left at the kill)
    assert by_worker[f"{socket.gethostname()}:{victim}"] >= 1 and by_worker[f"{socket.gethostname()}:{survivor.pid}"] >= 1
    # the network the killed worker was evaluating was asked again and evaluated by the survivor
    study = RunStore(run, create=False).find_study("optuna-random|macs=0.5|seed0")
    dropped = [t.user_attrs["key"] for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
               if "key" in t.user_attrs and not t.user_attrs.get("released")]
    assert set(dropped) <= set(keys)


def test_a_claim_without_heartbeats_is_freed_for_another_host_after_the_grace_period(digits_space, tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "GRACE_S", 2)
    monkeypatch.setattr(store_module, "HEARTBEAT_S", 1)
    first = RunStore(tmp_path / "a", storage=f"sqlite:///{tmp_path / 'shared.db'}")
    second = RunStore(tmp_path / "b", storage=f"sqlite:///{tmp_path / 'shared.db'}")
    study_a, study_b = first.study("s"), second.study("s")
    candidate = digits_space.canonical(Candidate.make({"features.3": 0.5}))
    mine = first.claim(study_a, digits_space, "net-1", candidate, max_evals=5)
    assert mine.number is not None  # the first worker holds it (then goes silent: no heartbeats)
    assert second.claim(study_b, digits_space, "net-1", candidate, max_evals=5).held
    assert second.claim(study_b, digits_space, "net-2", candidate, max_evals=2).number is not None  # another network is free
    full = second.claim(study_b, digits_space, "net-3", candidate, max_evals=2)
    assert full.full and full.others_running  # the budget of 2 is held by two live claims
    time.sleep(3.5)  # past the grace period: the silent claims count as dead, on any host
    retried = second.claim(study_b, digits_space, "net-1", candidate, max_evals=5)
    assert retried.number is not None and retried.number != mine.number
    states = {t.number: t.state.name for t in study_b.trials}
    assert states[mine.number] == "FAIL"


def test_a_training_strategy_refuses_a_second_worker_and_takes_over_a_dead_one_s_search(tmp_path, trained_digits_model,
                                                                                       digits_space, digits):
    from automlprune.errors import ConfigError
    from automlprune.search.l0_anneal import L0AnnealStrategy

    from conftest import search_with

    store = RunStore(tmp_path)
    study = store.study(f"{L0AnnealStrategy.name}|macs=0.5|seed0", {"strategy": "l0-anneal", "budget": "macs=0.5", "seed": 0})
    study.set_user_attr("lease", {"worker": "another-host:4242", "beat": time.time()})  # alive: renewed just now
    with pytest.raises(ConfigError, match=r"runs on one worker \(it trains its network in one process\) and worker another-host:4242 is running"):
        search_with(tmp_path, L0AnnealStrategy, trained_digits_model, digits_space, digits, "macs=0.5", epochs=1, batch_size=64)
    study.set_user_attr("lease", {"worker": "another-host:4242", "beat": time.time() - 3600})  # silent for an hour: dead
    _, outcome, _, _ = search_with(tmp_path, L0AnnealStrategy, trained_digits_model, digits_space, digits, "macs=0.5",
                                   epochs=1, batch_size=64)
    assert outcome.answer is not None and study.user_attrs["lease"] is None  # released when the search ends


def test_a_claim_waits_until_an_earlier_sampler_trial_says_which_network_it_claims(digits_space, tmp_path):
    # Four TPE workers on PostgreSQL once spent 41 evaluations of 40: a claim read a sampler's earlier
    # trial before its key was set and did not count it, while that trial counted only trials before it.
    from automlprune.search.store import mark_worker

    first, second = RunStore(tmp_path), RunStore(tmp_path)
    study_a, study_b = first.study("s"), second.study("s")
    candidate = digits_space.canonical(Candidate.make({"features.3": 0.5}))
    asked = study_a.ask()  # the first worker's sampler opened its trial and is still proposing (no key yet)
    mark_worker(asked)
    found = {}
    other = threading.Thread(target=lambda: found.update(claim=second.claim(study_b, digits_space, "net-2", candidate,
                                                                            max_evals=1)))
    other.start()
    time.sleep(0.5)
    assert other.is_alive()  # the second worker's claim (a later trial) waits: it cannot yet tell what the first one counts
    mine = first.claim(study_a, digits_space, "net-1", candidate, max_evals=1, trial=asked)
    other.join(timeout=10)
    assert mine.number == asked.number and not mine.released  # the earlier trial holds the one evaluation
    assert found["claim"].full and found["claim"].released and found["claim"].others_running
    running = study_a.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    assert [t.number for t in running] == [asked.number]  # one evaluation under way for a budget of one


def test_releasing_a_claim_twice_leaves_it_released(digits_space, tmp_path):
    store = RunStore(tmp_path)
    study = store.study("s")
    candidate = digits_space.canonical(Candidate.make({"features.3": 0.5}))
    trial = study.ask()  # a sampler's open trial, as the Optuna strategies hand it to the loop
    claim = store.claim(study, digits_space, "net-1", candidate, max_evals=5, trial=trial)
    assert claim.number == trial.number
    store.release(study, claim.number)
    store.release(study, claim.number)  # the loop releases a strategy's trial the claim already gave up: no error
    assert study.trials[claim.number].state.name == "FAIL" and study.trials[claim.number].user_attrs["released"]


@pytest.mark.parametrize("strategy,mode", [("optuna-tpe", "shared"), ("random", "partitioned"), ("uniform", "shared"),
                                           ("greedy", "one"), ("ddpg", "one"), ("resrep", "one"), ("dmcp", "one")])
def test_every_strategy_says_how_workers_share_it(strategy, mode):
    from automlprune.search import STRATEGIES
    from automlprune.search.base import WORKER_MODES

    assert STRATEGIES.get(strategy).workers == mode
    assert all(STRATEGIES.get(name).workers in WORKER_MODES for name in STRATEGIES.names())


def test_an_adaptive_strategy_refuses_a_second_worker_in_one_sentence(tmp_path, trained_digits_model, digits_space, digits):
    from automlprune.errors import ConfigError
    from automlprune.search.baselines import GreedyStrategy

    from conftest import search_with

    store = RunStore(tmp_path)
    study = store.study(f"{GreedyStrategy.name}|macs=0.5|seed0", {"strategy": "greedy", "budget": "macs=0.5", "seed": 0})
    study.set_user_attr("lease", {"worker": "another-host:4242", "beat": time.time()})
    with pytest.raises(ConfigError, match=r"runs on one worker \(each of its proposals depends on the results before it\)"):
        search_with(tmp_path, GreedyStrategy, trained_digits_model, digits_space, digits, "macs=0.5")


@pytest.mark.slow
def test_searches_killed_at_random_moments_lose_and_repeat_nothing(digits_checkpoint, tmp_path):
    from automlprune.benchmarks.chaos import run_chaos_benchmark

    report = run_chaos_benchmark("digits-cnn", tmp_path / "chaos", ["random", "optuna-tpe"], kills=4, evals=8,
                                 overrides=[f"checkpoint={digits_checkpoint}"], progress=False)
    for row in report["rows"]:
        assert row["finished"] and row["lost"] == 0 and row["repeated"] == 0 and row["budget_exact"], row
        assert any(k["killed"] for k in row["kills"]), row  # at least one kill landed mid-search
    assert report["rows"][0]["answer_identical"] and report["passed"]  # random replays to the reference's answer
    assert "| random |" in (tmp_path / "chaos" / "report.md").read_text()


def test_a_sampler_trial_of_another_host_never_claimed_is_failed_after_the_grace_period(digits_space, tmp_path, monkeypatch):
    # (a worker of an older version recorded no heartbeat for it: without this, a claim would wait for it forever)
    monkeypatch.setattr(store_module, "GRACE_S", 1)
    store = RunStore(tmp_path)
    study = store.study("s")
    silent = study.ask()
    silent.set_user_attr("worker", "another-host:4242")
    candidate = digits_space.canonical(Candidate.make({"features.3": 0.5}))
    time.sleep(1.2)
    claim = store.claim(study, digits_space, "net-1", candidate, max_evals=5)
    assert claim.number is not None and study.trials[silent.number].state.name == "FAIL"


def test_a_sampler_trial_has_a_heartbeat_from_when_its_worker_tags_it(digits_space, tmp_path, monkeypatch):
    # Optuna's own stale check (any host) fails it once its worker is silent for the grace period
    from automlprune.search.store import mark_worker

    monkeypatch.setattr(store_module, "GRACE_S", 1)
    study = RunStore(tmp_path).study("s")
    asked = study.ask()
    mark_worker(asked)
    time.sleep(2.2)  # SQLite's CURRENT_TIMESTAMP has whole seconds: 1.5 s apart can read as 1 s, not over the grace
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        optuna.storages.fail_stale_trials(study)
    assert study.trials[asked.number].state.name == "FAIL"


def test_an_optuna_strategy_tags_its_trial_before_its_sampler_proposes(tmp_path, trained_digits_model, digits_space, digits,
                                                                       monkeypatch):
    # other workers fail a trial untagged for 2 s, and a GP sampler can take longer than that
    from automlprune.search import optuna_strategies

    from conftest import search_with

    class TagChecking(optuna.samplers.RandomSampler):
        def sample_independent(self, study, trial, name, distribution):
            assert "worker" in trial.user_attrs, "the sampler ran before the trial was tagged with its worker"
            return super().sample_independent(study, trial, name, distribution)

    monkeypatch.setattr(optuna_strategies, "_sampler", lambda kind, seed, max_evals: TagChecking(seed=seed))
    _, outcome, _, _ = search_with(tmp_path, optuna_strategies.RandomSamplerStrategy, trained_digits_model, digits_space,
                                   digits, "macs=0.5", max_evals=3, warm_start="none")
    assert outcome.evaluations == 3


def test_a_dead_worker_s_sampler_trial_is_asked_again_and_a_loop_claim_is_not(digits_space, tmp_path):
    from automlprune.search.store import distributions

    store = RunStore(tmp_path)
    study = store.study("s")
    dists = distributions(digits_space)
    dead = study.ask(dists)  # an Optuna strategy's open proposal ...
    dead.set_user_attr("worker", f"{socket.gethostname()}:{2 ** 22 + 12345}")  # ... of a process that no longer exists
    dead.set_user_attr("key", "net-1")
    candidate = digits_space.canonical(Candidate.make({"features.3": 0.5}))
    claim = store.claim(study, digits_space, "net-2", candidate, max_evals=5,  # a loop claim of the same dead process
                        attrs={"evaluated": True, "repeat": False})
    store.storage.set_trial_user_attr(claim.trial_id, "worker", f"{socket.gethostname()}:{2 ** 22 + 12345}")
    store.fail_stale_trials(study)  # (the claim above already ran it once: the sampler's trial failed then)
    assert {t.number: t.state.name for t in study.trials if t.number in (dead.number, claim.number)} == {
        dead.number: "FAIL", claim.number: "FAIL"}
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == [dead.params] and waiting[0].user_attrs == {"retry_of": dead.number}
    again = study.ask(dists)  # the next worker to ask evaluates the dead worker's network
    assert again.params == dead.params and again.number == waiting[0].number
