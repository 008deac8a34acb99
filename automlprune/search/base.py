"""The strategy interface and the search loop it runs in.

A strategy proposes candidates, or :class:`~automlprune.proposal.Proposal` objects carrying
weights it trained (:meth:`Strategy.ask`), and learns from their results
(:meth:`Strategy.tell`); :func:`run_strategy` owns the loop: the evaluation budget (number
of distinct evaluations and/or wall time), evaluation through the shared evaluator (the one
choke point), recording every evaluation in the run store, resuming, and checking that the
answer meets the budget.

Resuming: a strategy with ``replays_on_resume`` (deterministic under its seed) is run again
from the start against the stored results, which the evaluator serves from its cache, so it
reaches the same state without repeating an evaluation; one without it (Optuna samplers)
continues from the study, which already holds its history. A search that stopped itself
(:attr:`Strategy.stopped`, or every proposal a repeat) is finished: resumed, it answers from the
store without asking, unless it is resumed with other options or another evaluation budget.
"""

from __future__ import annotations

import contextlib
import time
import types as types_module
import typing
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import optuna

from automlprune.cost import CostModel
from automlprune.errors import ConfigError
from automlprune.evaluator import EvalResult, Evaluator
from automlprune.proposal import Proposal, as_proposal
from automlprune.search.budget import Budget, BoundBudget
from automlprune.search.repair import repair_to_budget
from automlprune.search.screening import Screening
from automlprune.search.warm_start import default_for, parse_warm_start
from automlprune.search.store import WAIT_S, Artifacts, Claim, RunStore
from automlprune.settings import SEARCH_SIGNAL, EvalSettings
from automlprune.space import Candidate, SearchSpace
from automlprune.train import distributed

MAX_REPEATED_ASKS = 200
"""Consecutive proposals of already-evaluated candidates after which a search stops (it has converged)."""
HELD = "held"
"""What the loop's claim gives a partitioned search for a network another worker is evaluating."""

WORKER_MODES = {
    "shared": "every worker asks its own proposals (from the shared Optuna study, or the same deterministic "
              "answer); a network another worker holds is waited for and read, never evaluated twice",
    "partitioned": "every worker walks the same seeded sequence of proposals; a network another worker holds is "
                   "skipped at once and its result read at the end (evaluated there if that worker died), so the "
                   "workers split the sequence between them",
    "one": "one worker at a time (its study's lease): a second worker is refused in one sentence; a dead worker's "
           "search is taken over after the grace period (at once on its own host)",
}
"""How several workers running the same search share it: :attr:`Strategy.workers`."""


@dataclass
class SearchContext:
    """What a strategy may use: the space and the cost model (free to call), the study of this
    search (for Optuna-backed strategies), the channel scores of the evaluator's importance
    criterion (the ones materialization keeps channels by), the trained model (to read weights),
    the run's artifacts (where a strategy saves what it learned, such as RL agents and
    allocation profiles: :class:`~automlprune.search.store.Artifacts`), the task's data and
    device for strategies that train (DMCP), and ``scores_under`` (criterion -> channel scores,
    :meth:`Evaluator.scores_under`) for the one-shot allocators a search starts from. A search's
    results come only through ask/tell; ``validation`` (:meth:`Evaluator.validation_accuracy`)
    lets a training controller read its network's validation accuracy while it trains."""

    space: SearchSpace
    cost_model: CostModel
    study: optuna.Study | None = None
    channel_scores: dict | None = None
    model: Any = None
    artifacts: Artifacts | None = None
    data: Any = None
    device: Any = "cpu"
    scores_under: Callable[[str], dict] | None = None
    validation: Callable[[Any], float] | None = None


class Strategy:
    """Base class: subclasses implement :meth:`ask` (and usually :meth:`tell`).

    ``name`` is the registry name; ``options`` are strategy-specific settings from the CLI's
    ``--option key=value`` or the Python API.
    """

    name: ClassVar[str] = "strategy"
    replays_on_resume: ClassVar[bool] = True
    uses_seed: ClassVar[bool] = True
    """False for deterministic strategies: comparisons run them once, not once per seed."""
    option_names: ClassVar[tuple[str, ...]] = ()
    """Options accepted beyond the constructor's named parameters."""
    option_types: ClassVar[dict[str, Any]] = {}
    """Value types of ``option_names`` (the named parameters' come from their annotations)."""
    option_ranges: ClassVar[dict[str, Any]] = {}
    """Rules for option values, ``name -> (predicate, "must be ...")`` (see :func:`check_option_values`)."""
    workers: ClassVar[str] = "one"
    """How several workers running this search share it (:data:`WORKER_MODES`): ``shared``
    (Optuna samplers, the deterministic one-shot allocators), ``partitioned`` (random) or ``one``
    (strategies whose every proposal depends on the results before it, and those that train
    their network in one process: the loop holds the study for one worker, :meth:`RunStore.lease`)."""
    one_worker_reason: ClassVar[str] = "each of its proposals depends on the results before it"
    """Why a ``one``-worker strategy refuses a second worker (said in the refusal)."""
    ddp_refusal: ClassVar[str | None] = "it does not train its networks (several workers share a search instead)"
    """Why the strategy cannot run on several training processes (``search --nproc``, ``torchrun``;
    :mod:`automlprune.train.distributed`), or None where it can: a training strategy whose every
    decision reads only weights and gradients (averaged over the ranks), so all ranks decide alike."""
    repairs: ClassVar[bool] = False
    """True for black-box strategies whose proposals the loop moves to the budget before they are
    evaluated (:mod:`automlprune.search.repair`; option ``repair=false`` switches it off) and
    which start from the one-shot allocators' answers (:mod:`automlprune.search.warm_start`;
    option ``warm_start=none`` switches it off)."""
    takes_tolerance: ClassVar[str | None] = None
    """How the strategy answers an accuracy tolerance (``accuracy_drop=...``): ``"native"`` (it
    steers by it), ``"bisect"`` (a one-shot allocator, bisected over cost budgets) or None (refused);
    see :mod:`automlprune.search.tolerance`."""
    evaluation: ClassVar[dict[str, Any]] = {}
    """Evaluation settings the strategy's candidates are materialized with, over the task's
    (e.g. its own importance criterion); see :meth:`evaluation_settings`."""

    def __init__(self, context: SearchContext, budget: Budget, seed: int = 0, max_evals: int = 50, **options: Any) -> None:
        self.context = context
        self.space = context.space
        self.cost_model = context.cost_model
        self.budget: BoundBudget = budget.bind(self.cost_model.base)
        self.limit = self.budget.limit
        self.seed = seed
        self.max_evals = max_evals
        self.rng = np.random.default_rng(seed)
        self.check_options(options)
        self.repair = self.repairs and bool(options.get("repair", True))
        """Whether the loop repairs this strategy's proposals to the budget."""
        self.warm_start = (parse_warm_start(options.get("warm_start", default_for(context.space, self.cost_model, self.budget.metric)))
                           if self.repairs else [])
        """One-shot strategies whose answers this search evaluates first (:mod:`automlprune.search.warm_start`)."""
        self.options = {k: v for k, v in options.items() if k not in ("repair", "warm_start")}
        self.history: list[EvalResult] = []
        self.spent: dict[str, float] = {}
        """What the strategy spent besides evaluations (e.g. training steps, training seconds); recorded on the study."""
        self.pending_trial: optuna.Trial | None = None
        self.stopped: str | None = None
        """Why the strategy stopped asking before its evaluation budget was spent, when that says
        something a user should read (set before :meth:`ask` returns None); None for a one-shot
        strategy's single answer."""

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Refuse options the strategy does not take (its named parameters and ``option_names``)."""
        import inspect

        named = [p for p in inspect.signature(cls.__init__).parameters
                 if p not in ("self", "context", "budget", "seed", "max_evals", "args", "kwargs", "options")]
        accepted = sorted(set(named) | set(cls.option_names) | ({"repair", "warm_start"} if cls.repairs else set()))
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ConfigError(f"strategy '{cls.name}' does not take the options {unknown}; its options are: {', '.join(accepted) or 'none'}")
        types = {**cls.option_types, **typing.get_type_hints(cls.__init__), **({"repair": bool, "warm_start": str} if cls.repairs else {})}
        check_option_values(cls.name, {k: v for k, v in options.items() if k in types}, types, cls.option_ranges)
        if cls.repairs and "warm_start" in options:
            parse_warm_start(options["warm_start"])

    @classmethod
    def check_budgets(cls, budgets: Sequence[Budget]) -> None:
        """Refuse, in one sentence and before any model loads, an accuracy tolerance this strategy cannot answer."""
        tolerance = next((b for b in budgets if b.tolerance), None)
        if tolerance is not None and cls.takes_tolerance is None:
            raise ConfigError(f"strategy '{cls.name}' maximizes accuracy under a cost budget and cannot answer {tolerance.label}; "
                              "use play-and-prune or a one-shot allocator (uniform, global, global-magnitude, prunenet, tp-local, "
                              "tp-global), or give a cost budget such as macs=0.5")

    @classmethod
    def evaluation_settings(cls, task_settings: EvalSettings) -> EvalSettings:
        """The task's evaluation settings with the strategy's own (``evaluation``) applied, and the
        fields the task left to the strategy filled: a black-box search's (``repairs``) with
        :data:`~automlprune.settings.SEARCH_SIGNAL`, any other's with the plain evaluation."""
        return replace(task_settings, **cls.evaluation).with_defaults(SEARCH_SIGNAL if cls.repairs else {})

    # ---- helpers for subclasses ------------------------------------------------------------------
    def cost(self, candidate: Candidate) -> float:
        """The budget metric's cost of ``candidate`` (absolute units)."""
        return self.cost_model(candidate)[self.budget.metric]

    def feasible(self, candidate: Candidate) -> bool:
        return self.budget.met_by(self.cost_model(candidate))

    # ---- the interface ---------------------------------------------------------------------------
    def ask(self) -> Candidate | Proposal | None:
        """The next candidate (original weights) or proposal (e.g. trained weights) to evaluate,
        or None when the strategy has nothing more to try."""
        raise NotImplementedError

    def tell(self, candidate: Candidate | Proposal, result: EvalResult) -> None:
        """Learn from a result (the base class keeps the history)."""
        self.history.append(result)

    def close(self) -> None:
        """Release what the strategy holds (threads, files); called once the loop ends."""

    def answer(self) -> EvalResult | None:
        """The best feasible result this strategy has seen (:func:`best_feasible`)."""
        return best_feasible(self.history, self.budget)


def check_option_values(strategy: str, options: dict[str, Any], types: dict[str, Any], ranges: dict[str, Any]) -> None:
    """Refuse, in one sentence and before any model loads, an option whose value has the wrong
    type for its annotation in ``types`` (int, float, bool, str, optionally ``| None``) or lies
    outside its rule in ``ranges`` (``(predicate, "must be ...")``)."""
    for key, value in options.items():
        allowed = typing.get_args(types[key]) if typing.get_origin(types[key]) in (typing.Union, types_module.UnionType) else (types[key],)
        if value is None and type(None) in allowed:
            continue
        simple = [t for t in allowed if t in (int, float, bool, str)]
        if simple and not any(_is(value, t) for t in simple):
            words = {int: "a whole number", float: "a number", bool: "true or false", str: "a word"}
            raise ConfigError(f"strategy '{strategy}' option {key}={value!r} must be {' or '.join(words[t] for t in simple)}")
        if key in ranges and value is not None and not ranges[key][0](value):
            raise ConfigError(f"strategy '{strategy}' option {key}={value!r} {ranges[key][1]}")


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def best_feasible(results: Sequence[EvalResult], budget: BoundBudget) -> EvalResult | None:
    """The answer for a budget: the most accurate full-fidelity result meeting it (cheaper first
    among equals, then the earliest; screenings never answer: :mod:`automlprune.search.screening`);
    for an accuracy tolerance the cheapest accepted result (more accurate first among equals).
    The search's stored answer is this over the study's results, whichever worker evaluated them."""
    feasible = [r for r in results if budget.accepts(r)]
    if not feasible:
        return None
    if budget.tolerance:
        return min(feasible, key=lambda r: (r.costs[budget.metric], -r.accuracy))
    return max(feasible, key=lambda r: (r.accuracy, -r.costs[budget.metric]))


@dataclass
class SearchOutcome:
    """What one search (one strategy, budget and seed) produced."""

    strategy: str
    budget: BoundBudget
    seed: int
    answer: EvalResult | None
    evaluations: int
    seconds: float
    study_name: str
    history: list[EvalResult] = field(default_factory=list)
    stopped: str | None = None
    """Why the search ended before ``max_evals`` evaluations, when it is not the strategy's nature
    (a one-shot answer) or the time limit (:attr:`RunSummary.stopped`)."""


ProgressFn = Callable[[int, int, EvalResult | None, float], None]
"""(evaluations done, evaluation budget, best feasible result so far, elapsed seconds) -> None"""


def run_strategy(strategy: Strategy, evaluator: Evaluator, store: RunStore, study: optuna.Study, *,
                 max_evals: int, time_limit: float | None = None, attrs: dict[str, Any] | None = None,
                 progress: ProgressFn | None = None, run_settings: str | None = None) -> SearchOutcome:
    """Run ``strategy`` until it stops, ``max_evals`` distinct proposals are evaluated, or
    ``time_limit`` seconds of search (all sessions together) have passed. A search that stopped
    itself in an earlier session under the same ``run_settings`` (what it is run with, e.g. its
    options and evaluation budget, as a string) is finished: it answers from the store."""
    budget = strategy.budget
    rank, world = distributed.rank_and_world()
    if world > 1 and strategy.ddp_refusal:
        raise ConfigError(f"strategy '{strategy.name}' cannot train on several processes: {strategy.ddp_refusal}; "
                          "run it on one process")
    if rank != 0:
        return _follow(strategy)
    attrs = {"strategy": strategy.name, "budget": budget.label, "seed": strategy.seed, **(attrs or {})}
    store.update_summary(study, bound_budget=budget.to_dict())
    one = strategy.workers == "one"
    with store.lease(study, strategy.name, strategy.one_worker_reason) if one else contextlib.nullcontext():
        outcome = _run(strategy, evaluator, store, study, max_evals, time_limit, attrs, progress,
                       _relay if world > 1 else _alone, run_settings)
    if world > 1:
        _relay("stop", outcome)
    return outcome


def _alone(*message: Any) -> None:
    """One process: nobody follows the loop."""


def _relay(*message: Any) -> None:
    """Rank 0 tells the other ranks what the loop does next (:func:`_follow`)."""
    distributed.broadcast_object(message)


def _follow(strategy: Strategy) -> SearchOutcome:
    """The loop on a rank other than 0 of a distributed search: ask when rank 0 asks (each ask
    trains, with its gradients averaged over the ranks), check that it chose what rank 0 chose,
    tell what rank 0 evaluated and stored, and return rank 0's outcome. Nothing is evaluated or
    written here."""
    asked: Any = None
    while True:
        kind, *payload = distributed.broadcast_object()
        if kind == "ask":
            asked = strategy.ask()
        elif kind == "tell":
            mine, evaluated = strategy.space.canonical(as_proposal(asked).candidate), payload[0].candidate
            if mine.to_dict() != strategy.space.canonical(evaluated).to_dict():
                raise RuntimeError(f"training process {distributed.rank_and_world()[0]} chose {mine.to_dict()} where rank 0 "
                                   f"chose {evaluated.to_dict()}: strategy {strategy.name}'s decisions differ across "
                                   "processes; this is a bug (run it without --nproc meanwhile)")
            strategy.tell(asked, payload[0])
        elif kind == "stored":
            strategy.tell(payload[0].candidate, payload[0])
        else:  # "stop"
            strategy.close()
            return payload[0]


def _run(strategy: Strategy, evaluator: Evaluator, store: RunStore, study: optuna.Study, max_evals: int,
         time_limit: float | None, attrs: dict[str, Any], progress: ProgressFn | None,
         relay: Callable[..., None], run_settings: str | None) -> SearchOutcome:
    """The loop (on rank 0 of a distributed search, which ``relay`` tells its every ask and tell)."""
    budget = strategy.budget
    store.fail_stale_trials(study)
    stored = store.records(study)
    evaluator.prime([r.result for r in stored])
    stored_keys = {r.result.key for r in stored}
    offset = max((r.elapsed_s for r in stored), default=0.0)
    seen: set[str] = set()
    settings = evaluator.settings
    screening = (Screening.resumed(settings.screening, settings.screening_keep, [r.result for r in stored])
                 if settings.screening else None)
    if not strategy.replays_on_resume:
        seen |= stored_keys
        for r in stored:
            relay("stored", r.result)
            strategy.tell(r.result.candidate, r.result)
    start = time.perf_counter()
    elapsed = lambda: offset + time.perf_counter() - start  # noqa: E731
    repeats = 0
    before = store.summary(study)
    stopped = before.stopped if before.stopped_under == run_settings else None  # it stopped itself in an earlier session:
    if stopped is not None:  # asked again with the same settings, it would stop the same way
        seen |= stored_keys
    deferred: dict[str, tuple[Candidate | Proposal, Proposal, dict[str, Any]]] = {}

    def claim_and_evaluate(proposal: Proposal, key: str, repaired: dict[str, Any], skip_held: bool) -> EvalResult | str | None:
        """Evaluate ``proposal`` under a claim, or read another worker's stored result (waiting
        while it is held, unless ``skip_held``: then ``HELD``); None when the study's evaluation
        budget is spent on other networks."""
        while key not in stored_keys:
            claim = store.claim(study, strategy.space, key, strategy.space.canonical(proposal.candidate), max_evals,
                                strategy.pending_trial, {**attrs, **repaired, "evaluated": True, "repeat": False})
            if claim.released or (claim.held and strategy.pending_trial is not None):
                _release_pending(store, study, strategy)  # another worker has this network: its sampler asks again
            if claim.held and skip_held:
                return HELD
            if claim.stored is not None or claim.held:
                found = claim.stored or store.wait_for(study, key)
                if found is not None:
                    evaluator.prime([found])
                    stored_keys.add(key)
            elif claim.full:
                if not claim.others_running:
                    return None
                time.sleep(WAIT_S)  # another worker's claim may yet fail and free its place
            else:
                try:
                    with store.heartbeat(claim):
                        result = _evaluate(evaluator, proposal, screening, budget, stored_keys)
                except BaseException:  # an error or Ctrl-C: the network is free again at once (a kill -9 waits for the stale check)
                    store.release(study, claim.number)
                    raise
                stored_keys.add(key)
                return _record(store, study, strategy, proposal, result, {**attrs, "elapsed_s": elapsed(), **repaired},
                               repeat=False, claim=claim)
        result = _evaluate(evaluator, proposal, screening, budget, stored_keys)  # served from the store
        if strategy.pending_trial is not None:  # an Optuna re-proposal: told to its sampler, not counted
            result = _record(store, study, strategy, proposal, result, {**attrs, "elapsed_s": elapsed(), **repaired},
                             repeat=True)
        return result

    try:
        while stopped is None and len(seen) < max_evals and (time_limit is None or elapsed() < time_limit):
            relay("ask")
            asked = strategy.ask()
            if asked is None:
                stopped = strategy.stopped
                break
            proposal, repaired = _repaired(strategy, as_proposal(asked))
            key = evaluator.key_of(proposal)  # one key per network (and weights), however it was written
            result = claim_and_evaluate(proposal, key, repaired, skip_held=strategy.workers == "partitioned")
            if result is None:  # the study's evaluation budget is spent
                break
            repeats = repeats + 1 if key in seen else 0
            seen.add(key)
            if result is HELD:  # another worker of this partitioned search evaluates it: read at the end
                deferred[key] = (asked, proposal, repaired)
                continue
            relay("tell", result)
            strategy.tell(asked, result)
            if progress is not None:
                progress(len(seen), max_evals, strategy.answer(), elapsed())
            if repeats >= MAX_REPEATED_ASKS:
                stopped = (f"its last {MAX_REPEATED_ASKS} proposals were all networks it had already evaluated: the space "
                           f"holds few networks near {budget.label} (a finer ratio grid or a larger budget gives a search "
                           "more to choose from)")
                break
        for key, (asked, proposal, repaired) in deferred.items():  # held by other workers: their results, or retried
            result = claim_and_evaluate(proposal, key, repaired, skip_held=False)  # if its worker died
            if result is None:
                break
            strategy.tell(asked, result)
    finally:
        _release_pending(store, study, strategy)
        strategy.close()
        store.fail_stale_trials(study)  # a worker that died meanwhile may have left a trial open: the last one out closes it
    answer = best_feasible([r.result for r in store.records(study)] + strategy.history, budget)  # every worker's, not only this one's
    if answer is not None and not budget.accepts(answer):
        raise RuntimeError(f"strategy {strategy.name} answered a candidate over its budget {budget.label}; this is a bug")
    store.update_summary(study, search_seconds=elapsed(), stopped=stopped, stopped_under=run_settings if stopped else None,
                         **({"answer": answer.to_dict()} if answer is not None else {}),
                         **({"spent": dict(strategy.spent)} if strategy.spent else {}))
    return SearchOutcome(strategy.name, budget, strategy.seed, answer, len(seen), elapsed(), study.study_name,
                         list(strategy.history), stopped)


def _evaluate(evaluator: Evaluator, proposal: Proposal, screening: Screening | None, budget: BoundBudget,
              stored_keys: set[str]) -> EvalResult:
    """``proposal``'s result: in full, or, when the search screens, its screening unless that
    promotes it (:mod:`automlprune.search.screening`); a stored result is served as it was."""
    if screening is None or proposal.trained or proposal.as_proposed:
        return evaluator.evaluate(proposal)
    first = evaluator.evaluate(proposal, fidelity=screening.fidelity)
    if first.full or first.key in stored_keys or not budget.met_by(first.costs) or not screening.promotes(first.accuracy):
        return first
    return replace(evaluator.evaluate(proposal), screening=first.accuracy)


def _repaired(strategy: Strategy, proposal: Proposal) -> tuple[Proposal, dict[str, Any]]:
    """``proposal`` moved to the strategy's budget when the strategy asks for it (original weights
    only), and what the store records about it: ``repaired`` and the ``proposed`` candidate."""
    if not strategy.repair or proposal.trained or proposal.as_proposed:
        return proposal, {}
    moved = repair_to_budget(proposal.candidate, strategy.space, strategy.cost_model, strategy.budget)
    if moved.key == strategy.space.canonical(proposal.candidate).key:
        return proposal, {"repaired": False}
    return replace(proposal, candidate=moved), {"repaired": True, "proposed": proposal.candidate.to_dict()}


def _release_pending(store: RunStore, study: optuna.Study, strategy: Strategy) -> None:
    """Give up the strategy's open Optuna trial (if any) that will not be recorded."""
    if strategy.pending_trial is not None:
        store.release(study, strategy.pending_trial.number)
        strategy.pending_trial = None


def _record(store: RunStore, study: optuna.Study, strategy: Strategy, proposal: Proposal, result: EvalResult,
            attrs: dict[str, Any], repeat: bool, claim: Claim | None = None) -> EvalResult:
    """Store one result (and the trained weights of a proposal that has them); an Optuna
    re-proposal of a stored candidate is told to the sampler but not counted as an evaluation.
    Returns the result as stored (with the path of its weights artifact)."""
    budget = strategy.budget
    if proposal.trained and not repeat:
        result = replace(result, weights={**result.weights, "artifact": store.save_weights(result.key, proposal.weights)})
    store.record(study, strategy.space, result, violation=budget.violation(result.costs),
                 cost_fraction=budget.cost_fraction(result.costs),
                 attrs={**attrs, "evaluated": not repeat, "repeat": repeat}, trial=strategy.pending_trial, claim=claim)
    strategy.pending_trial = None
    return result
