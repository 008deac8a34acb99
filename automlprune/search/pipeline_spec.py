"""Pipeline files: the stages of a compression pipeline, read from YAML (shipped ones in
``automlprune/pipelines/``) and checked before anything runs.

A pipeline file::

    description: AMC channels, then HAQ bits
    stages:
      - name: channels          # optional (stage1, stage2, ... by default); letters, digits, - and _
        strategy: ddpg          # any strategy of 'automlprune list strategies'
        options: {episodes: 40} # its options, as --option gives them
        space: default          # this stage's search space (default: the task's)
        budget: macs=0.5        # this stage's budget, a fraction of the UNPRUNED network's cost
        evals: 60               # evaluations of this stage's search (default: the command's --evals)
        finetune: 2             # epochs of fine-tune after the stage (default 0), or a mapping of
                                # the task's finetune settings to change ({epochs: 2, lr: 0.005})
      - strategy: haq
        space: bits-only
        # no budget: the last stage may take it from the command's --budget

What :meth:`PipelineSpec.from_dict` refuses, in one sentence each: unknown keys, an unknown
strategy, space or option, a malformed budget, a latency budget or an accuracy tolerance
(stages are budgeted in analytic costs against the unpruned network), and a stage whose budget is
not tighter than an earlier stage's budget of the same metric (it would have nothing left to do).
What needs the network is checked when the pipeline starts (:mod:`automlprune.search.pipeline`):
a stage whose space cannot lower its budget's metric, and a stage whose budget its input network
already meets.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from automlprune.config_files import check_keys, read_yaml
from automlprune.errors import ConfigError
from automlprune.settings import FinetuneSettings

STAGE_KEYS = ("name", "strategy", "options", "space", "budget", "evals", "finetune")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class StageSpec:
    """One stage as written: ``budget`` the text (``None``: the command's ``--budget``, last
    stage only); ``finetune`` the changes to the task's fine-tune settings (``{}`` with
    ``finetune_epochs`` 0: no fine-tune)."""

    name: str
    strategy: str
    budget: str | None
    options: dict[str, Any] = field(default_factory=dict)
    space: str | None = None
    evals: int | None = None
    finetune: dict[str, Any] = field(default_factory=dict)

    @property
    def finetune_epochs(self) -> int:
        return int(self.finetune.get("epochs", 0))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline: its ``name`` (the file's stem), ``description`` and stages in order."""

    name: str
    stages: tuple[StageSpec, ...]
    description: str = ""

    @classmethod
    def load(cls, name_or_path: str | Path) -> "PipelineSpec":
        """A pipeline by name (``./pipelines/`` then the shipped ones) or by path."""
        from automlprune.tasks import resolve_config

        path = resolve_config(name_or_path, "pipelines")
        return cls.from_dict(read_yaml(path, "pipeline"), path.stem)

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str = "pipeline") -> "PipelineSpec":
        where = f"pipeline '{name}'"
        check_keys(data, {"description", "stages"}, where)
        raw = data.get("stages")
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{where} lists no stages; give 'stages:' a list of stages, each with a strategy and a budget")
        stages = [_stage(entry, k, len(raw), where) for k, entry in enumerate(raw, start=1)]
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where} names two stages '{next(n for n in names if names.count(n) > 1)}'; give each stage its own name")
        spec = cls(name, tuple(stages), str(data.get("description", "")))
        spec.check_budgets()
        return spec

    def with_final_budget(self, budget: str | None) -> "PipelineSpec":
        """This pipeline with ``budget`` (the command's ``--budget``) as its last stage's budget."""
        if budget is None:
            if self.stages[-1].budget is None:
                raise ConfigError(f"the last stage of pipeline '{self.name}' has no budget; give one with --budget, e.g. --budget bytes=0.125")
            return self
        final = replace(self.stages[-1], budget=budget)
        from automlprune.search import STRATEGIES

        STRATEGIES.get(final.strategy).check_budgets([_parse(final, f"pipeline '{self.name}' stage '{final.name}'")])
        spec = replace(self, stages=self.stages[:-1] + (final,))
        spec.check_budgets()
        return spec

    def check_budgets(self) -> None:
        """Refuse a stage whose budget is not tighter than an earlier stage's of the same metric
        (both fractions, or both amounts; a fraction and an amount are compared when the stage
        starts, on the network)."""
        seen: dict[tuple[str, bool], tuple[float, str]] = {}
        for stage in self.stages:
            if stage.budget is None:
                continue
            budget = _parse(stage, f"pipeline '{self.name}' stage '{stage.name}'")
            earlier = seen.get((budget.metric, budget.relative))
            if earlier is not None and budget.value >= earlier[0]:
                raise ConfigError(f"pipeline '{self.name}' stage '{stage.name}' budget {stage.budget} is not tighter than stage "
                                  f"'{earlier[1]}''s {budget.metric}={earlier[0]:g}, which its input already meets; tighten it or drop the stage")
            seen[(budget.metric, budget.relative)] = (budget.value, stage.name)

    def budget(self, k: int) -> Any:
        """The :class:`~automlprune.search.budget.Budget` of stage ``k`` (0-based)."""
        return _parse(self.stages[k], f"pipeline '{self.name}' stage '{self.stages[k].name}'")

    def digest(self, k: int, seed: int) -> str:
        """A short digest of stages 0..k and the seed: what stage k's input depends on (its study
        and saved network are keyed by it, so editing an earlier stage never reuses a later one)."""
        text = json.dumps({"stages": [s.to_dict() for s in self.stages[: k + 1]], "seed": seed}, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:8]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "stages": [s.to_dict() for s in self.stages]}


def _stage(entry: Any, k: int, count: int, where: str) -> StageSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} stage {k} must be a mapping with at least a strategy, e.g. {{strategy: prunenet, budget: macs=0.5}}")
    name = str(entry.get("name", f"stage{k}"))
    if not _NAME.match(name):
        raise ConfigError(f"{where} stage name '{name}' may hold only letters, digits, - and _")
    here = f"{where} stage '{name}'"
    check_keys(entry, STAGE_KEYS, here)
    if "strategy" not in entry:
        raise ConfigError(f"{here} names no strategy; add one, e.g. strategy: prunenet")
    from automlprune.search import STRATEGIES

    strategy = str(entry["strategy"])
    cls = STRATEGIES.get(strategy)
    options = entry.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{here} options must be a mapping of option names to values, e.g. options: {{episodes: 40}}")
    cls.check_options(options)
    budget = entry.get("budget")
    if budget is None and k < count:
        raise ConfigError(f"{here} has no budget; every stage but the last needs one, e.g. budget: macs=0.5")
    space = entry.get("space")
    if space is not None:
        from automlprune.space import SpaceConfig
        from automlprune.tasks import resolve_config

        SpaceConfig.load(resolve_config(str(space), "search_spaces"))
    evals = entry.get("evals")
    if evals is not None and (isinstance(evals, bool) or not isinstance(evals, int) or evals < 1):
        raise ConfigError(f"{here} evals must be a whole number of at least 1, got {evals!r}")
    stage = StageSpec(name, strategy, None if budget is None else str(budget), dict(options),
                      None if space is None else str(space), evals, _finetune(entry.get("finetune", 0), here))
    if budget is not None:
        cls.check_budgets([_parse(stage, here)])
    return stage


def _finetune(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{where} finetune must be a number of epochs or a mapping of fine-tune settings, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{where} finetune cannot be a negative number of epochs")
        return {"epochs": value} if value else {}
    check_keys(value, [f.name for f in fields(FinetuneSettings)], f"{where} finetune")
    return dict(value)


def _parse(stage: StageSpec, where: str) -> Any:
    from automlprune.search.budget import parse_budget

    budget = parse_budget(str(stage.budget))
    if budget.tolerance:
        raise ConfigError(f"{where} budget {stage.budget}: accuracy tolerances are not supported in pipelines; give a cost budget such as macs=0.5")
    if budget.metric == "latency":
        raise ConfigError(f"{where} budget {stage.budget}: latency budgets are not supported in pipelines (a stage's latency "
                          "table would be of its own network, not of the unpruned one); budget it in macs, params, bytes or bitops")
    return budget


def finetune_settings(stage: StageSpec, task_settings: FinetuneSettings, where: str) -> FinetuneSettings:
    """The task's fine-tune settings with the stage's changes, checked like a task file's."""
    from automlprune.tasks import read_settings

    merged = {f.name: getattr(task_settings, f.name) for f in fields(FinetuneSettings)}
    merged.update({"epochs": 0, **stage.finetune})
    return read_settings(FinetuneSettings, merged, f"{where} finetune")
