"""The run store: every evaluation of a search recorded as a trial of an Optuna study.

One study per (strategy, budget, seed), all in one storage (a SQLite file in the run
directory by default, or any Optuna storage URL; ``journal:PATH`` for a journal file).
Directions: maximize accuracy, minimize the budget metric (as a fraction of the unpruned
network). Params are the candidate's grid position per keep-ratio dimension (the [-1, 1]
encoding is ``2 * index / (choices - 1) - 1``) and its bit width per bit dimension (categorical:
the space's bit choices); user attributes hold the exact candidate, every metric,
strategy, seed, budget, task, wall time and versions; the budget is an Optuna constraint
(``cost / limit - 1 <= 0``), so ``optuna.load_study`` and optuna-dashboard read a run like any study.

Several workers share a study through claims (:meth:`RunStore.claim`): a worker evaluates a
network only under a RUNNING trial tagged with the network's key, kept when no earlier trial
stores or holds the same network and fewer than the evaluation budget's networks are stored or
claimed before it. Workers record Optuna heartbeats while they evaluate (database storages), and
:meth:`RunStore.fail_stale_trials` frees the claims of dead workers. A journal storage has no
heartbeats: there a dead worker is noticed only on its own host.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import inspect
import hashlib
import json
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from automlprune.errors import ConfigError
from automlprune.evaluator import EvalResult
from automlprune.proposal import Proposal, TrainedWeights
from automlprune.search.run_dir import OWN_STORAGE, atomic_write_text, config_conflict, run_lock, storage_file
from automlprune.space import Candidate, SearchSpace
from automlprune.space.search_space import Dimension

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")  # the loop records them

DIRECTIONS = ["maximize", "minimize"]
HEARTBEAT_S = 5
"""Seconds between the heartbeats a worker records for the trial it is evaluating (database storages)."""
GRACE_S = 30
"""Seconds without a heartbeat after which another worker, on any host, fails a claimed trial and
may evaluate its network again (Optuna's ``grace_period``)."""
WAIT_S = 0.5
"""Seconds between looks at the study while waiting for another worker's evaluation."""
SETTLE_S = 0.05
"""Seconds between looks at the study while a claim waits for an earlier trial to be tagged with
its network (a sampler's proposal being claimed: milliseconds)."""
UNPRUNED_STUDY = "unpruned"
"""The study holding the unpruned network's figures (validation accuracy, measured latency)."""


def distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """Per dimension of the space with a choice to make: an integer grid index for keep ratios and
    weight densities (ordered), a categorical over the bit choices for bit widths and over the
    pattern names for sparsity patterns."""
    return {_param(d): (IntDistribution(0, len(d.choices) - 1) if d.ordered else CategoricalDistribution(_categories(space, d)))
            for d in space.dimensions if len(d.choices) > 1}


def _param(d: Dimension) -> str:
    return f"{d.kind}:{d.name}"


def _categories(space: SearchSpace, d: Dimension) -> list:
    """A categorical dimension's values as Optuna shows them: bit widths, or pattern names."""
    return [p.name for p in space.patterns_of(d.name)] if d.kind == "pattern" else [int(c) for c in d.choices]


def to_params(space: SearchSpace, candidate: Candidate) -> dict[str, int | str]:
    """Candidate -> params: grid indices of ratios and densities (nearest grid point when off-grid),
    bit widths, pattern names."""
    vector = space.encode(candidate)
    params: dict[str, int | str] = {}
    for x, d in zip(vector, space.dimensions):
        if len(d.choices) > 1:
            index = int(round((float(x) + 1) / 2 * (len(d.choices) - 1)))
            params[_param(d)] = index if d.ordered else _categories(space, d)[index]
    return params


def from_params(space: SearchSpace, params: dict[str, int | str]) -> Candidate:
    """Params -> candidate (dimensions missing from ``params`` stay at their first choice)."""
    vector = np.zeros(space.ndim)
    for i, d in enumerate(space.dimensions):
        n = len(d.choices)
        value = params.get(_param(d))
        index = 0 if value is None else (int(value) if d.ordered else _categories(space, d).index(value))
        vector[i] = 2 * index / (n - 1) - 1 if n > 1 else 0.0
    return space.decode(vector)


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Artifacts:
    """Files a run keeps beside its study, all under the run directory: what strategies learned
    (RL agents, allocation profiles, training logs), trained weights. Paths handed out and
    stored are relative to the run directory, so a moved run still finds them."""

    def __init__(self, run_dir: Path) -> None:
        self.root = run_dir

    def path(self, name: str) -> Path:
        """Where artifact ``name`` (a relative path) lives; its folder is created."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_json(self, name: str, payload: Any) -> Path:
        path = self.path(name)
        path.write_text(json.dumps(payload, indent=1))
        return path

    def read_json(self, name: str) -> Any:
        return json.loads((self.root / name).read_text())

    def glob(self, pattern: str) -> list[Path]:
        return sorted(self.root.glob(pattern))


@dataclass(frozen=True)
class Claim:
    """What :meth:`RunStore.claim` found for a network: this worker holds its trial (``number``,
    ``trial_id``), or it is ``stored`` already, ``held`` by another live worker, or the study's
    evaluation budget is ``full`` (``others_running``: by claims still being evaluated, which may
    yet fail and free their place)."""

    number: int | None = None
    trial_id: int | None = None
    stored: EvalResult | None = None
    held: bool = False
    full: bool = False
    others_running: bool = False
    released: bool = False
    """Whether the trial handed to :meth:`RunStore.claim` was released (the strategy's Optuna trial is gone)."""
    preset: tuple[tuple[str, Any], ...] = ()
    """User attributes the claimed trial was created with (:meth:`RunStore.record` writes only the rest)."""


@dataclass(frozen=True)
class RunSummary:
    """What a search's study records besides its evaluations: written and read through the store
    only (:meth:`RunStore.summary`, :meth:`RunStore.update_summary`), kept as the study's user
    attributes of the same names (so optuna-dashboard shows them and older runs read as they are)."""

    bound_budget: dict[str, Any] | None = None
    """The budget with the unpruned network's amount (:meth:`BoundBudget.to_dict`)."""
    answer: dict[str, Any] | None = None
    """The answer over every worker's evaluations (an :class:`EvalResult` dict), None before the search ends or without one."""
    search_seconds: float | None = None
    """Wall time of the search, all its sessions together (s)."""
    stopped: str | None = None
    """Why the search ended before its evaluation budget (a sentence), None when it spent it, hit its
    time limit or is a one-shot strategy (:attr:`~automlprune.search.base.SearchOutcome.stopped`)."""
    stopped_under: str | None = None
    """What the stopped search was run with (its strategy options and evaluation budget, as
    :func:`~automlprune.search.base.run_strategy`'s ``run_settings``): resumed with the same, it is finished."""
    spent: dict[str, float] | None = None
    """What the strategy spent besides evaluations: training ``seconds``, ``steps``, ``images``."""
    scoring_seconds: float | None = None
    """One-off channel scoring of the search's evaluator (s), shared by its searches, not part of ``search_seconds``."""
    finetune: dict[str, Any] | None = None
    """``compare``'s fine-tune of the answer: its settings, val/test accuracy (fractions), seconds, steps, images."""
    latency_ms: dict[str, float] | None = None
    """Median latency of the exported answer per batch size (ms), measured by ``compare``."""
    latency_of: str | None = None
    """What ``latency_ms`` timed (``compare.TIMED``)."""
    val_accuracy: float | None = None
    """The unpruned network's validation accuracy (a fraction; the run's unpruned study only)."""
    stage: dict[str, Any] | None = None
    """A pipeline stage's frame: ``pipeline``, ``index`` (from 1), ``name``, ``network`` (the run
    artifact holding the network it handed on) and the costs of its input (:mod:`automlprune.search.pipeline`)."""


SUMMARY_FIELDS = tuple(f.name for f in dataclasses.fields(RunSummary))


@dataclass(frozen=True)
class Record:
    """One stored evaluation: its result, the search wall time when it finished (s), its trial
    number, the worker that evaluated it (``host:pid``) and when its trial opened and closed."""

    result: EvalResult
    elapsed_s: float
    number: int
    worker: str = ""
    started: datetime.datetime | None = None
    finished: datetime.datetime | None = None


OPENED_STORAGES: dict[str, None] = {}
"""The storage URLs this process opened, each once, in order (named when a write to one fails)."""

STORAGE_FAILURES = (("readonly database", "is read-only"), ("read-only transaction", "is read-only"),
                    ("database or disk is full", "is on a full disk"), ("disk i/o error", "could not be written (disk I/O error)"),
                    ("unable to open database file", "cannot be opened for writing"))
"""Driver messages (lower case) of a failed storage write, and what they mean for the user."""


def storage_write_problem(exc: BaseException) -> str | None:
    """One sentence for an exception whose causes include a failed write to the run's storage
    (Optuna re-raises SQLite's "attempt to write a readonly database" as a misleading
    "exceeding max length"), or None when it is not one."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen).lower()
        for needle, meaning in STORAGE_FAILURES:
            if needle in text:
                where = ", ".join(dict.fromkeys(storage_file(u) and str(storage_file(u)) or u for u in OPENED_STORAGES)) or "the run's storage"
                return (f"the storage {where} {meaning}; make the run directory and its study.db writable (or free disk space) "
                        "and rerun: what was stored before is kept and the search resumes")
        seen = seen.__cause__ or seen.__context__
    return None


STALE_CALLBACK = ("heartbeat_stale_trial_callback"
                  if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
                  else "failed_trial_callback")
"""RDBStorage's argument for the callback on a trial failed by the heartbeat check (Optuna 4.9
renamed it; the old name still works there, with a deprecation warning)."""


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url`` (any SQLAlchemy URL, or ``journal:PATH``)."""
    OPENED_STORAGES[url] = None
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:"):]))
        with warnings.catch_warnings():  # heartbeats are marked experimental by Optuna; they are what tells a dead worker
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                                 **{STALE_CALLBACK: retry_sampler_trial})
        if url.startswith("sqlite"):
            _write_ahead(storage)
        return storage
    except ImportError as exc:  # a database driver SQLAlchemy needs for the URL is not installed
        cause: BaseException | None = exc
        while cause is not None and not getattr(cause, "name", None):
            cause = cause.__cause__ or cause.__context__
        driver = getattr(cause, "name", None) or "its driver"
        raise ConfigError(f"the storage '{url}' needs the database driver '{driver}', which is not installed; for "
                          "PostgreSQL pip install 'automlprune[postgres]' (psycopg 3: postgresql:// or postgresql+psycopg:// URLs), "
                          "or write postgresql+psycopg2:// if psycopg2 is what you have") from None
    except Exception as exc:  # SQLAlchemy and drivers raise many types
        raise ConfigError(f"cannot open the storage '{url}' ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                          "check the URL, the server and its driver") from None


def _write_ahead(storage: optuna.storages.RDBStorage) -> None:
    """SQLite in write-ahead-log mode with ``synchronous=NORMAL``: a commit costs no fsync (about
    10 ms each otherwise, a dozen per evaluation), readers never block the writer (several
    workers on one file), and a killed process loses nothing committed; only a power cut can
    drop the last commits. The mode stays with the file; the synchronous setting is set on every
    connection."""
    from sqlalchemy import event

    def pragmas(connection: Any, record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections opened while creating the tables are replaced by ones with the pragmas


class RunStore:
    """Studies of one run directory, plus the run's saved configuration.

    The storage is the run directory's own ``study.db`` unless ``storage`` names another URL, so
    a run directory can be moved or copied whole. With ``create=False`` (commands that read a
    finished run: plot, export) nothing is created: a missing run directory or storage file is
    refused in one sentence instead of starting an empty study."""

    def __init__(self, run_dir: str | Path, storage: str | None = None, create: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.explicit_storage = storage
        self.url = storage or f"sqlite:///{(self.run_dir / OWN_STORAGE).resolve()}"
        self.artifacts = Artifacts(self.run_dir)
        file = storage_file(self.url)
        if not create:
            if file is not None and not file.is_file():
                hint = ("copy the run directory whole, or give its storage with --storage" if storage is None
                        else "check the --storage path")
                raise ConfigError(f"the run's storage {file} does not exist; {hint}")
            self.storage = self._open_beside_creators()
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with run_lock(self.run_dir):  # workers started together create the storage's tables one at a time
                self.storage = open_storage(self.url)
        except OSError as exc:
            raise ConfigError(f"cannot create the run directory {exc.filename or self.run_dir} ({exc.strerror}); "
                              "choose a writable --run-dir") from None

    def _open_beside_creators(self) -> optuna.storages.BaseStorage:
        """Open an existing run's storage for reading, after any worker of the run creating it now
        (opening a database storage creates its tables when missing: two processes doing it at once
        collide). The run's lock is taken only when the run has one and it can be opened (a
        read-only copy of a run is read without it)."""
        lock = self.run_dir / ".lock"
        with run_lock(self.run_dir) if lock.is_file() and os.access(lock, os.W_OK) else contextlib.nullcontext():
            return open_storage(self.url)

    # ---- configuration -----------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.json"

    def load_config(self) -> dict[str, Any] | None:
        return json.loads(self.config_path.read_text()) if self.config_path.is_file() else None

    def save_config(self, config: dict[str, Any]) -> None:
        """Save the resolved run configuration (``storage``: only an explicit one; paths inside
        the run directory relative to it), merged with what another search of the run stored;
        refuse one that would change what a stored evaluation means (:func:`config_conflict`)."""
        config = json.loads(json.dumps({**config, "storage": self.explicit_storage, **self._portable_checkpoint(config)}, default=str))
        with run_lock(self.run_dir):
            old = self.refuse_conflict(config)
            if old is not None:
                config = {**old, **config, "strategies": sorted(set(old.get("strategies", [])) | set(config.get("strategies", []))),
                          "budgets": list(dict.fromkeys(old.get("budgets", []) + config.get("budgets", [])))}
            atomic_write_text(self.config_path, json.dumps(config, indent=2))

    def refuse_conflict(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """Refuse ``config`` (what a search is about to run with; parts may be missing) when the
        run's saved config differs in a setting that changes what an evaluation means
        (:func:`config_conflict`); returns the saved config (None for a new run)."""
        old = self.load_config()
        if old is None:
            return None
        saved = {**old, "task": {**old.get("task", {}), "checkpoint": str(self.checkpoint_of(old))}}
        conflict = config_conflict(saved, json.loads(json.dumps(config, default=str)))
        if conflict:
            raise ConfigError(f"run directory {self.run_dir} was made with {conflict}; "
                              "use the same settings to resume it, or choose another --run-dir")
        return old

    def _portable_checkpoint(self, config: dict[str, Any]) -> dict[str, Any]:
        """The task's checkpoint as an absolute path, and relative to the run directory when it
        lies inside (so a moved run finds it), for a config about to be saved."""
        task = config.get("task")
        if not task or not task.get("checkpoint"):
            return {}
        path = Path(task["checkpoint"]).resolve()
        root = self.run_dir.resolve()
        inside = str(path.relative_to(root)) if path.is_relative_to(root) else None
        return {"task": {**task, "checkpoint": str(path)}, "checkpoint_in_run_dir": inside}

    def checkpoint_of(self, config: dict[str, Any]) -> Path:
        """The baseline checkpoint of a saved run: the copy inside the run directory when it was
        saved there (wherever the run now lives), else the saved path (older runs: relative to the
        folder the command ran in)."""
        inside = config.get("checkpoint_in_run_dir")
        if inside and (self.run_dir / inside).is_file():
            return self.run_dir / inside
        return Path(config.get("task", {}).get("checkpoint", ""))

    def saved_task(self, config: dict[str, Any]) -> dict[str, Any]:
        """The saved task of ``config`` with its checkpoint found (:meth:`checkpoint_of`)."""
        return {**config["task"], "checkpoint": str(self.checkpoint_of(config))}

    def update_answers(self, entries: list[dict[str, Any]]) -> Path:
        """Merge this search's ``entries`` into the run's ``answers.json`` (one per strategy,
        budget and seed; a rerun replaces its own, earlier searches keep theirs); returns its path."""
        path = self.run_dir / "answers.json"
        key = lambda e: (e.get("strategy"), e.get("budget"), e.get("seed"))  # noqa: E731
        with run_lock(self.run_dir):
            old = json.loads(path.read_text()) if path.is_file() else []
            merged = {key(e): e for e in old}
            merged.update({key(e): e for e in entries})
            atomic_write_text(path, json.dumps(list(merged.values()), indent=2))
        return path

    # ---- studies -----------------------------------------------------------------------------
    @staticmethod
    def study_name(strategy: str, budget_label: str, seed: int) -> str:
        return f"{strategy}|{budget_label}|seed{seed}"

    def study(self, name: str, attrs: dict[str, Any] | None = None) -> optuna.Study:
        study = optuna.create_study(study_name=name, storage=self.storage, directions=DIRECTIONS, load_if_exists=True)
        for key, value in (attrs or {}).items():
            if study.user_attrs.get(key) != value:
                study.set_user_attr(key, value)
        return study

    def find_study(self, name: str) -> optuna.Study | None:
        """The study ``name`` when this store holds it (read; nothing is created), else None."""
        if name not in self.study_names():
            return None
        return optuna.load_study(study_name=name, storage=self.storage)

    @staticmethod
    def summary(study: optuna.Study) -> RunSummary:
        """The study's :class:`RunSummary` (fields never written are None)."""
        attrs = study.user_attrs
        return RunSummary(**{name: attrs.get(name) for name in SUMMARY_FIELDS})

    @staticmethod
    def update_summary(study: optuna.Study, **values: Any) -> None:
        """Write some fields of the study's :class:`RunSummary`."""
        unknown = sorted(set(values) - set(SUMMARY_FIELDS))
        if unknown:
            raise TypeError(f"RunSummary has no field {', '.join(unknown)}")
        for name, value in values.items():
            study.set_user_attr(name, value)

    def unpruned_accuracy(self) -> float | None:
        """The unpruned network's validation accuracy (a fraction) as the run recorded it (the
        reference point of its plots), or None when it has not."""
        if UNPRUNED_STUDY not in self.study_names():
            return None
        value = self.summary(self.study(UNPRUNED_STUDY)).val_accuracy
        return None if value is None else float(value)

    def study_names(self) -> list[str]:
        return sorted(s.study_name for s in optuna.get_all_study_summaries(self.storage, include_best_trial=False))

    # ---- claims: one evaluation per network, the evaluation budget counted in the study ---------
    def stored_result(self, study: optuna.Study, key: str) -> EvalResult | None:
        """The stored evaluation of the network ``key`` (any worker's), or None."""
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if _key_of(t) == key and t.user_attrs.get("evaluated") and "result" in t.user_attrs:
                return EvalResult.from_dict(t.user_attrs["result"])
        return None

    def claim(self, study: optuna.Study, space: SearchSpace, key: str, candidate: Candidate, max_evals: int,
              trial: optuna.Trial | None = None, attrs: dict[str, Any] | None = None) -> Claim:
        """Claim the evaluation of the network ``key`` for this worker: a RUNNING trial tagged with
        the key (the strategy's open Optuna ``trial``, or a new one with the candidate's params),
        kept only when no other worker stored or holds the same network with an earlier trial and
        fewer than ``max_evals`` distinct networks are stored or claimed before it; otherwise it
        is released (failed, marked ``released``) and the :class:`Claim` says why. The trial
        numbers the storage hands out decide every race, so N workers together evaluate each
        network once and exactly ``max_evals`` networks. A new trial is created with ``attrs``
        and the candidate already set (one write; :meth:`record` adds the result)."""
        self.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE))
        found = self._state_of(trials, key, None)
        if found is not None:
            return found
        if trial is None and len(self._counted(trials, None)) >= max_evals:  # (an open trial is tagged and decided below:
            # left untagged, it would keep a later claim waiting in _settled_before while this one waits for that claim)
            return Claim(full=True, others_running=any(t.state == TrialState.RUNNING and _claimed(t) for t in trials))
        preset: dict[str, Any] = {}
        if trial is not None:
            trial.set_user_attr("key", key)
            trial_id, number = trial._trial_id, trial.number
        else:
            preset = {**(attrs or {}), "key": key, "worker": _worker(), "candidate": candidate.to_dict()}
            template = FrozenTrial(number=-1, state=TrialState.RUNNING, value=None, values=None,
                                   datetime_start=datetime.datetime.now(), datetime_complete=None,
                                   params=to_params(space, candidate), distributions=distributions(space),
                                   user_attrs=preset, system_attrs={}, intermediate_values={}, trial_id=-1)
            template.distributions = {k: v for k, v in template.distributions.items() if k in template.params}
            trial_id = self.storage.create_new_trial(study._study_id, template_trial=template)
            number = self.storage.get_trial_number_from_id(trial_id)
        self._beat(trial_id)
        trials = self._settled_before(study, number)
        found = self._state_of(trials, key, number)
        if found is None and len(self._counted(trials, number)) >= max_evals:
            found = Claim(full=True, others_running=any(t.state == TrialState.RUNNING and _claimed(t) and t.number != number
                                                        for t in trials))
        if found is not None:
            self.release(study, number)
            return dataclasses.replace(found, released=True)
        return Claim(number, trial_id, preset=tuple(preset.items()))

    def _settled_before(self, study: optuna.Study, number: int) -> list[FrozenTrial]:
        """The study's RUNNING and COMPLETE trials, read once every open trial numbered before
        ``number`` says which network it claims. A strategy's Optuna trial is opened by its sampler
        and tagged with its network's key only when claimed (after the sampler, the cost model
        and repair ran): a claim that read an earlier trial before its key was set would leave it
        uncounted while that trial, counting only trials before it, leaves this one uncounted, and
        both would be kept beyond the evaluation budget. Waits :data:`SETTLE_S` between looks; an
        untagged trial of a dead worker is failed by :meth:`fail_stale_trials` (its heartbeat is
        recorded when it is opened: :func:`mark_worker`)."""
        while True:
            trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE))
            if not any(t.state == TrialState.RUNNING and t.number < number and not _claimed(t) for t in trials):
                return trials
            time.sleep(SETTLE_S)
            self.fail_stale_trials(study)

    @staticmethod
    def _state_of(trials: list[FrozenTrial], key: str, mine: int | None) -> Claim | None:
        """Stored, or held by an earlier claim than ``mine`` (None: any claim), or None."""
        for t in trials:
            if _key_of(t) != key or t.number == mine:
                continue
            if t.state == TrialState.COMPLETE and t.user_attrs.get("evaluated") and "result" in t.user_attrs:
                return Claim(stored=EvalResult.from_dict(t.user_attrs["result"]))
            if t.state == TrialState.RUNNING and (mine is None or t.number < mine):
                return Claim(held=True)
        return None

    @staticmethod
    def _counted(trials: list[FrozenTrial], before: int | None) -> set[str]:
        """The distinct networks stored or claimed (before trial ``before``; None: all): what the
        evaluation budget is spent on."""
        return {str(_key_of(t)) for t in trials if (before is None or t.number < before) and _claimed(t)
                and (t.state == TrialState.RUNNING or t.user_attrs.get("evaluated"))}

    def release(self, study: optuna.Study, number: int) -> None:
        """Give up a claimed trial (failed, marked ``released``): its network is free again. A trial
        already finished (released before) is left as it is."""
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        if self.storage.get_trial(trial_id).state.is_finished():
            return
        self.storage.set_trial_user_attr(trial_id, "released", True)
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)

    def wait_for(self, study: optuna.Study, key: str) -> EvalResult | None:
        """Wait while another worker evaluates the network ``key``: its stored result, or None once
        no live claim holds it (its worker released it or died: the caller claims it again)."""
        while True:
            self.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE))
            found = self._state_of(trials, key, None)
            if found is None:
                return None
            if found.stored is not None:
                return found.stored
            time.sleep(WAIT_S)

    @contextlib.contextmanager
    def heartbeat(self, claim: Claim):
        """Record heartbeats for ``claim``'s trial every :data:`HEARTBEAT_S` while the block runs
        (an evaluation, or a training under a claim), so a worker on another host can tell it alive."""
        with _every(HEARTBEAT_S, lambda: self._beat(claim.trial_id)):
            yield

    @contextlib.contextmanager
    def lease(self, study: optuna.Study, strategy: str, reason: str):
        """Hold ``study`` for this worker alone while the block runs (strategies that cannot share
        a search, for ``reason``: e.g. they train their network in one process). The lease is the study's
        ``lease`` attribute ({worker, beat: wall-clock seconds}), renewed every
        :data:`HEARTBEAT_S`; one not renewed for :data:`GRACE_S` (or of a dead process on this host)
        is taken over. A worker finding a live lease of another is refused in one sentence."""
        me = _worker()
        held = study.user_attrs.get("lease")
        if held and held.get("worker") != me and not self._lease_dead(held):
            raise ConfigError(f"strategy '{strategy}' runs on one worker ({reason}) and worker {held['worker']} is running "
                              "this search; wait for it, or run another seed or budget on this worker")
        study.set_user_attr("lease", {"worker": me, "beat": time.time()})
        time.sleep(WAIT_S)  # two workers starting together: the later write wins, the other sees it and stops
        if (study.user_attrs.get("lease") or {}).get("worker") != me:
            raise ConfigError(f"strategy '{strategy}' runs on one worker ({reason}) and another worker has just started "
                              "this search; run another seed or budget on this worker")
        try:
            with _every(HEARTBEAT_S, lambda: study.set_user_attr("lease", {"worker": me, "beat": time.time()})):
                yield
        finally:
            study.set_user_attr("lease", None)

    @staticmethod
    def _lease_dead(lease: dict[str, Any]) -> bool:
        name, _, pid = str(lease.get("worker", "")).rpartition(":")
        if name == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            return True
        return time.time() - float(lease.get("beat", 0.0)) > GRACE_S

    def _beat(self, trial_id: int) -> None:
        if isinstance(self.storage, optuna.storages.RDBStorage):
            self.storage.record_heartbeat(trial_id)

    def record(self, study: optuna.Study, space: SearchSpace, result: EvalResult, *, violation: float, cost_fraction: float,
               attrs: dict[str, Any], trial: optuna.Trial | None = None, claim: Claim | None = None) -> None:
        """Store one result: into the strategy's open Optuna trial, into this worker's claimed
        trial (:meth:`claim`), or as a new completed trial."""
        user_attrs = {**attrs, "candidate": result.candidate.to_dict(), "result": result.to_dict(), "constraint": violation}
        values = [result.accuracy, cost_fraction]
        if claim is not None and trial is None:
            preset = dict(claim.preset)
            for key, value in user_attrs.items():
                if key != "constraint" and (key not in preset or preset[key] != value):
                    self.storage.set_trial_user_attr(claim.trial_id, key, value)
            self.storage.set_trial_user_attr(claim.trial_id, "constraint", violation)
            self.storage.set_trial_system_attr(claim.trial_id, CONSTRAINTS_ATTR, [float(violation)])
            study.tell(claim.number, values)
            return
        if trial is not None:
            for key, value in user_attrs.items():
                if key != "constraint":
                    trial.set_user_attr(key, value)
            set_constraint(trial, violation)
            study.tell(trial, values)
            return
        study.add_trial(optuna.trial.create_trial(
            params=to_params(space, result.candidate), distributions=distributions(space), values=values,
            user_attrs=user_attrs, system_attrs={CONSTRAINTS_ATTR: [violation]}))

    @staticmethod
    def refuse(study: optuna.Study, trial: optuna.Trial, candidate: Candidate, *, violation: float, cost_fraction: float) -> None:
        """Close a sampler's ``trial`` whose candidate the strategy refused unevaluated (over the
        budget, with repair switched off): told to the sampler with accuracy 0 and its cost and
        constraint, marked not evaluated (it spends no evaluation)."""
        trial.set_user_attr("evaluated", False)
        trial.set_user_attr("candidate", candidate.to_dict())
        set_constraint(trial, violation)
        study.tell(trial, [0.0, cost_fraction])

    def save_weights(self, key: str, weights: TrainedWeights) -> str:
        """Save trained weights (:class:`~automlprune.proposal.TrainedWeights`) of the proposal
        with cache key ``key`` (atomically: a crash never leaves half a file); returns the
        artifact's name (relative to the run directory)."""
        name = f"weights/{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
        path = self.artifacts.path(name)
        if not path.is_file():
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            torch.save(weights.to_artifact(), tmp)
            tmp.replace(path)
        return name

    def load_weights(self, name: str, architecture: torch.nn.Module) -> TrainedWeights:
        """The trained weights saved as ``name``, loaded into ``architecture`` (a fresh module of
        the original architecture): a :class:`~automlprune.proposal.TrainedWeights`."""
        path = self.run_dir / name
        if not path.is_file():
            raise ConfigError(f"the trained weights {path} of this run are missing; copy the run directory whole, with its weights/ folder")
        return TrainedWeights.from_artifact(torch.load(path, map_location="cpu", weights_only=True), architecture)

    def proposal(self, result: dict[str, Any], model: torch.nn.Module) -> Proposal:
        """The :class:`~automlprune.proposal.Proposal` a stored result (an answer) was evaluated
        from: its candidate with the original weights, or with its trained weights loaded from
        the run's artifacts into a copy of ``model`` (the original network)."""
        candidate = Candidate.from_dict(result["candidate"])
        weights = result.get("weights") or {}
        if weights.get("source") == "pipeline":
            raise ConfigError(f"this answer is the network of pipeline '{weights.get('pipeline')}', saved in the run as "
                              f"{weights.get('network')}; run 'automlprune pipeline' on it to export or fine-tune it")
        if weights.get("source") != "trained":
            return Proposal(candidate)
        return Proposal(candidate, self.load_weights(weights["artifact"], copy.deepcopy(model)),
                        weights.get("bn_recalibration"))

    def records(self, study: optuna.Study) -> list[Record]:
        """The study's stored evaluations (completed trials that were evaluated), in order."""
        out = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("evaluated", False) and "result" in t.user_attrs:
                out.append(Record(EvalResult.from_dict(t.user_attrs["result"]), float(t.user_attrs.get("elapsed_s", 0.0)), t.number,
                                  str(t.user_attrs.get("worker", "")), t.datetime_start, t.datetime_complete))
        return out

    def fail_stale_trials(self, study: optuna.Study) -> int:
        """Mark as FAIL the running trials of dead workers (a sampler's trial is enqueued again:
        :func:`retry_sampler_trial`): on any host, those whose heartbeat is
        older than :data:`GRACE_S` (database storages; Optuna's heartbeats); on this host at once,
        those of a process that no longer exists (after a crash); and those never tagged with a
        worker although opened over 2 s ago (a live worker tags its trial right after opening it;
        a crash in between leaves it untagged), or never claimed for a network although opened over
        :data:`GRACE_S` ago (a live worker claims its sampler's trial within moments; this catches
        a dead worker's trial of a version that recorded no heartbeat for it)."""
        if isinstance(self.storage, optuna.storages.RDBStorage):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        host = socket.gethostname()
        now = datetime.datetime.now()
        failed = 0
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = str(t.user_attrs.get("worker", ""))
            name, _, pid = worker.rpartition(":")
            dead = name == host and pid.isdigit() and not _alive(int(pid))
            age = (now - t.datetime_start).total_seconds() if t.datetime_start is not None else 0.0
            untagged = not worker and age > 2
            unclaimed = not _claimed(t) and age > GRACE_S
            if dead or untagged or unclaimed:
                try:  # the worker whose write fails the trial retries it (as Optuna's own stale check does)
                    self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                except optuna.exceptions.UpdateFinishedTrialError:  # another worker was first
                    continue
                retry_sampler_trial(study, t)
                failed += 1
        return failed


NATIVE_CONSTRAINTS = hasattr(optuna.Trial, "set_constraint")
"""Optuna >= 5 takes constraints on the trial; older versions through the sampler's constraints_func."""


CONSTRAINTS_ATTR = "constraints"
"""The system attribute holding a trial's constraints as a list: what ``create_trial`` stores,
what optuna-dashboard shows, and what Optuna 5 still reads (``trial.constraints == {"0": v}``).
Optuna 5's ``Trial.set_constraint`` writes ``constraints:<key>`` instead, which the dashboard
does not read; every trial of a run (the loop's and the Optuna samplers') uses the list."""


def set_constraint(trial: optuna.Trial, violation: float) -> None:
    """Attach the budget constraint (``<= 0`` feasible) to an open trial."""
    trial.set_user_attr("constraint", violation)
    trial.storage.set_trial_system_attr(trial._trial_id, CONSTRAINTS_ATTR, [float(violation)])


def retry_sampler_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """The run storages' failed-trial callback, also called by :meth:`RunStore.fail_stale_trials`:
    a sampler's trial (an Optuna strategy's proposal, open when its worker died) is enqueued again
    with the same parameters, so the next worker to ask the study evaluates that network. This is
    Optuna's ``RetryFailedTrialCallback`` except that the dead worker's tags are dropped (the copy
    keeps the warm-start candidate, and ``retry_of`` names the dead trial). A loop's claim (the
    other strategies; created with ``evaluated`` set) is not enqueued: its strategy proposes the
    network again itself (a partitioned search at its end, a one-worker search on its resume)."""
    if "evaluated" in trial.user_attrs or not trial.params:
        return
    attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("worker", "key", "retry_of")}
    study.enqueue_trial(trial.params, user_attrs={**attrs, "retry_of": trial.number})


def mark_worker(trial: optuna.Trial) -> None:
    """Tag an open trial with this process, so a later resume can tell it was abandoned, and
    record its first heartbeat (database storages), so a worker on another host fails it
    :data:`GRACE_S` after its process died before claiming it (:meth:`RunStore.claim` waits
    for it until then)."""
    trial.set_user_attr("worker", _worker())
    if is_heartbeat_enabled(trial.storage):  # (a study's storage is Optuna's cache around the database's)
        trial.storage.record_heartbeat(trial._trial_id)


@contextlib.contextmanager
def _every(seconds: float, action: Any):
    """Run ``action()`` every ``seconds`` on a background thread while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(seconds):
            action()

    thread = threading.Thread(target=loop, daemon=True, name="automlprune-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _key_of(trial: FrozenTrial) -> str | None:
    """The network a trial claimed or stored: its ``key`` tag, or the key of its stored result
    (trials stored before claims existed)."""
    return trial.user_attrs.get("key") or (trial.user_attrs.get("result") or {}).get("key")


def _claimed(trial: FrozenTrial) -> bool:
    """Whether a trial claims or stores a network (:meth:`RunStore.claim`)."""
    return _key_of(trial) is not None


def trial_candidate(trial: FrozenTrial) -> Candidate:
    return Candidate.from_dict(trial.user_attrs["candidate"])
