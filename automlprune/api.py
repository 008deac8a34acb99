"""Your own model and data in three lines::

    from automlprune import compress
    result = compress(model, example_input, train=train_loader, budget="macs=0.5")
    smaller = result.network

and :func:`compare` puts several strategies side by side on the same model and data.

:func:`compress` runs one search (any registered strategy, ``prunenet`` by default) on any
``nn.Module`` classifier with the same run store, resume, evaluator and strategies as the command
line; data may be DataLoaders, Datasets or ``(inputs, labels)`` tensors. What the user's objects
become: a task named after the model's class, its data splits (a seeded validation split carved
from ``train`` when ``val`` is not given; ``test`` defaults to the validation split), and the
model's weights saved in the run directory as its baseline checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from automlprune.data.base import DataSplits
from automlprune.data.user import user_data
from automlprune.errors import ConfigError
from automlprune.evaluator import EvalResult
from automlprune.settings import EvalSettings
from automlprune.tasks import Task, TaskSpec



@dataclass
class CompressResult:
    """What :func:`compress` found: ``network`` (the smaller ``nn.Module``, fine-tuned when asked),
    its validation ``accuracy`` (a fraction; BN re-estimated as in the search), ``costs``
    (absolute, in each metric's units) and ``relative`` costs (fractions of the unpruned
    network), ``test_accuracy`` after the fine-tune (None without one), ``pareto`` (the
    non-dominated evaluations of the search, by increasing cost), and the ``run_dir`` holding
    the store (a rerun with the same arguments resumes from it)."""

    network: nn.Module
    answer: EvalResult
    pareto: list[EvalResult]
    run_dir: Path
    strategy: str
    budget: str
    evaluations: int
    seconds: float
    unpruned_accuracy: float
    test_accuracy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.answer.accuracy

    @property
    def costs(self) -> Any:
        return self.answer.costs

    @property
    def relative(self) -> dict[str, float]:
        return self.answer.relative

    def report(self) -> Path:
        """Write ``report.md`` and ``pareto.png`` into the run directory; returns the report's path."""
        from automlprune.report.collect import collect
        from automlprune.report.plots import plot_pareto
        from automlprune.search.store import RunStore

        store = RunStore(self.run_dir, create=False)
        plot = plot_pareto(collect(store), self.run_dir / "pareto.png", f"{self.strategy}: accuracy vs cost", self.unpruned_accuracy)
        lines = [f"# {self.strategy} under {self.budget}", "",
                 f"Validation accuracy {100 * self.accuracy:.2f}% (unpruned {100 * self.unpruned_accuracy:.2f}%)"
                 + (f", test accuracy after fine-tune {100 * self.test_accuracy:.2f}%" if self.test_accuracy is not None else "")
                 + f"; {self.evaluations} evaluations in {self.seconds:.1f} s.", "",
                 "| metric | answer | fraction of unpruned |", "|---|---:|---:|"]
        lines += [f"| {name} | {self.costs[name]:.6g} | {100 * self.relative[name]:.2f}% |" for name in self.relative]
        metric = self.budget.split("=")[0]
        lines += ["", f"Pareto front ({len(self.pareto)} networks, {metric} fraction -> validation accuracy): " + ", ".join(
            f"{100 * r.relative[metric]:.1f}% -> {100 * r.accuracy:.2f}%" for r in self.pareto), "",
            f"![Pareto front]({plot.name})", ""]
        path = self.run_dir / "report.md"
        path.write_text("\n".join(lines))
        return path


def compress(model: nn.Module, example_input: torch.Tensor, train: Any, val: Any = None, budget: str = "macs=0.5",
             strategy: str = "prunenet", *, test: Any = None, evals: int = 50, seed: int = 0, run_dir: str | Path | None = None,
             space: str = "default", criterion: str | None = None, finetune_epochs: int = 0, device: str = "auto",
             progress: bool = True, **options: Any) -> CompressResult:
    """Search the widths (and bits, with a space that has them) of ``model`` under ``budget``
    with ``strategy`` (its ``options`` as keyword arguments) and return the smaller network.

    ``example_input``: one input batch of the model's shape (N, C, H, W). ``train``, ``val``,
    ``test``: DataLoaders, Datasets of (input, label) or ``(inputs, labels)`` tensors, inputs
    already normalised as the model expects (a DataLoader's batching is not used: automlprune
    batches the dataset itself). ``run_dir`` (default ``results/compress/<ModelClass>``) holds the
    store; ``finetune_epochs`` fine-tunes the answer (distillation and schedule: the digits task's
    defaults). Bad input ends in one :class:`~automlprune.errors.ConfigError` sentence."""
    from automlprune.report.pareto import pareto_front

    with _user_session(model, example_input, train, val, test, [budget], {strategy: options}, seed, evals, run_dir,
                       "compress", space, criterion, device, progress) as (session, budgets):
        parsed = budgets[0]
        outcome = session.run(strategy, parsed, seed, evals, None, options)
        if outcome.answer is None:
            raise ConfigError(f"no network met {parsed.label} in {outcome.evaluations} evaluations; raise evals or the budget")
        evaluator, store = session.evaluator_for(strategy), session.store
        proposal = store.proposal(outcome.answer.to_dict(), session.model)
        test_accuracy = None
        if finetune_epochs:
            tuned = evaluator.finetune(proposal, replace(session.task.spec.finetune, epochs=finetune_epochs), progress=progress)
            network, test_accuracy = tuned.model, tuned.test_accuracy
        else:
            network = evaluator.network(proposal)
        history = [r for r in outcome.history if r.full] or [outcome.answer]
        front = pareto_front([r.relative[parsed.metric] for r in history], [r.accuracy for r in history])
        return CompressResult(network.eval(), outcome.answer, [history[i] for i in front], store.run_dir, strategy, parsed.label,
                              outcome.evaluations, outcome.seconds, store.unpruned_accuracy() or float("nan"), test_accuracy)


def compare(model: nn.Module, example_input: torch.Tensor, train: Any, val: Any = None,
            budgets: tuple[str, ...] | list[str] = ("macs=0.5",), strategies: tuple[str, ...] | list[str] = ("uniform", "prunenet"),
            *, test: Any = None, seeds: int = 1, evals: int = 50, run_dir: str | Path | None = None, space: str = "default",
            criterion: str | None = None, finetune_epochs: int = 0, train_budget: float | None = None, device: str = "auto",
            progress: bool = True, options: dict[str, dict[str, Any]] | None = None) -> Path:
    """Run several ``strategies`` on the user's model under the same ``budgets`` and ``seeds``,
    fine-tune every answer identically (``finetune_epochs``, or ``train_budget`` epochs of
    training images in all, as ``automlprune compare --train-budget``), time them together and
    write the comparison report; returns the path of ``report.md`` (beside it ``results.csv``,
    ``results.json`` and the plots). ``options``: per strategy name, its options. Data and
    ``run_dir`` (default ``results/compare/<ModelClass>``) as in :func:`compress`."""
    from automlprune.search import STRATEGIES
    from automlprune.search.compare import finish_answers, write_report

    if seeds < 1 or (train_budget is not None and train_budget <= 0):
        raise ConfigError("compare needs seeds of at least 1 and a positive train_budget")
    per_strategy = {name: dict((options or {}).get(name, {})) for name in strategies}
    with _user_session(model, example_input, train, val, test, list(budgets), per_strategy, 0, evals, run_dir, "compare",
                       space, criterion, device, progress, seeds=list(range(seeds))) as (session, parsed):
        for name in strategies:
            for seed in range(seeds) if STRATEGIES.get(name).uses_seed else [0]:
                for budget in parsed:
                    session.run(name, budget, seed, evals, None, per_strategy[name])
        finish_answers(session, finetune_epochs, progress=progress, train_budget=train_budget)
        command = f"automlprune.compare(..., strategies={list(strategies)}, budgets={list(budgets)}, seeds={seeds})"
        return write_report(session, parsed, session.store.run_dir, command)


@contextlib.contextmanager
def _user_session(model: nn.Module, example_input: torch.Tensor, train: Any, val: Any, test: Any, budgets: list[str],
                  strategy_options: dict[str, dict[str, Any]], seed: int, evals: int, run_dir: str | Path | None, kind: str,
                  space: str, criterion: str | None, device: str, progress: bool, seeds: list[int] | None = None) -> Iterator[tuple[Any, list]]:
    """A search session over the user's model and data (checked first, in one sentence each), with
    the run's config saved; a run directory it created is removed again if nothing gets stored."""
    from automlprune.device import resolve_device
    from automlprune.search import STRATEGIES
    from automlprune.search.budget import parse_budget
    from automlprune.search.run_dir import removed_if_left_empty
    from automlprune.search.runner import SearchSession
    from automlprune.search.store import RunStore

    if not isinstance(model, nn.Module):
        raise ConfigError(f"{kind} needs an nn.Module model, not {type(model).__name__}")
    if evals < 1 or seed < 0:
        raise ConfigError(f"{kind} needs evals of at least 1 and a seed of 0 or more")
    parsed = [parse_budget(b) for b in budgets]
    for name, options in strategy_options.items():
        STRATEGIES.get(name).check_options(options)
        STRATEGIES.get(name).check_budgets(parsed)
    dev = resolve_device(device)
    classes = _check_model(model, example_input)
    data = user_data(train, val, test, example_input, classes, seed)
    run_dir = Path(run_dir or Path("results", kind, type(model).__name__))
    task = UserTask(model, data, run_dir, space, EvalSettings() if criterion is None else EvalSettings(criterion=criterion))
    with removed_if_left_empty(run_dir, also=(task.spec.checkpoint.name,)):
        store = RunStore(run_dir)
        store.refuse_conflict({"task": task.spec.to_dict()})
        task.save_baseline()
        session = SearchSession(task, dev, store, task.spec.space, progress=progress)
        session.check_budgets(parsed)
        session.save_config(list(strategy_options), parsed, seeds or [seed], evals, None,
                            {n: o for n, o in strategy_options.items() if o})
        yield session, parsed


def _check_model(model: nn.Module, example_input: Any) -> int:
    """The number of classes the model outputs for ``example_input``; one sentence when it cannot run."""
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else type(example_input).__name__
        raise ConfigError(f"the example input must be an image batch tensor of shape (N, C, H, W), got {shape}")
    device = next(model.parameters()).device
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(example_input.to(device))
    except Exception as exc:  # noqa: BLE001 - the user's forward: any error becomes one sentence
        raise ConfigError(f"the model raises in forward on the example input of shape {tuple(example_input.shape)} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); "
                          "give an input the model accepts") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConfigError("the model must return class scores of shape (N, classes) for automlprune to judge its accuracy")
    return int(out.shape[1])


class UserTask(Task):
    """A task made of the user's model and data (see :func:`compress`): the architecture is the
    model itself (copied), its baseline checkpoint the model's weights saved in the run directory,
    and a digest of the weights in the spec so a resume with other weights is refused."""

    def __init__(self, model: nn.Module, data: DataSplits, run_dir: Path, space: str, evaluation: EvalSettings) -> None:
        self.model = copy.deepcopy(model).cpu().eval()
        buffer = io.BytesIO()
        torch.save(self.model.state_dict(), buffer)
        digest = hashlib.sha1(buffer.getvalue()).hexdigest()[:16]
        name = type(model).__name__
        spec = TaskSpec(name=name, model=f"user:{type(model).__module__}.{type(model).__qualname__}", model_kwargs={"weights_sha1": digest},
                        dataset="user", dataset_options={"train": len(data.train), "val": len(data.val), "test": len(data.test)},
                        checkpoint=run_dir / "baseline.pt", space=space, evaluation=evaluation)
        super().__init__(spec)
        self._data = data
        self._weights = buffer.getvalue()

    def save_baseline(self) -> None:
        """The model's weights as the run's baseline checkpoint (a state dict)."""
        self.spec.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        self.spec.checkpoint.write_bytes(self._weights)

    def build_model(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def load_model(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def architecture(self) -> dict[str, Any] | None:
        return None  # not in the model registry: packed exports load with load_packed(path, model)
