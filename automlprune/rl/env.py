"""The layer-width search as a Gymnasium environment (AMC, He et al., ECCV 2018).

One episode walks the prunable channel groups in network order; each step sets one
group's keep ratio. The observation is AMC's layer embedding; actions are clipped so the
budget stays reachable whatever the agent does (the groups still to come are assumed to
go to their minimum), so every finished episode yields a candidate that meets the budget.
The reward, given at the last step only, comes from the shared evaluator.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from automlprune.cost import largest_within
from automlprune.errors import ConfigError
from automlprune.evaluator import EvalResult, Evaluator
from automlprune.search.budget import Budget, check_achievable, parse_budget
from automlprune.space import Candidate

REWARDS = ("accuracy", "error_log_macs")
OBSERVATION_FEATURES = (
    "step index", "is linear", "is depthwise", "in channels", "out channels", "stride", "kernel size",
    "group MACs", "group params", "budget metric removed so far", "budget metric of the groups to come", "previous action",
)


class LayerWidthEnv(gym.Env):
    """``reward_baseline``: when set (AMC uses 0.5 for DDPG), the reward is the raw reward minus
    an exponential moving average of past episodes' raw rewards with that rate.

    Observation: float32 vector of :data:`OBSERVATION_FEATURES`, each in [0, 1] (channels,
    kernel, stride, MACs and params divided by their maximum over groups; costs by the unpruned
    network's). Action: ``Box(-1, 1, (1,))`` mapped linearly to a keep ratio in [min grid
    ratio, 1] (``action_type="continuous"``), or ``Discrete(len(grid))`` over the ratio grid
    (``"discrete"``). Reward: 0 until the last step, then the evaluator's validation accuracy
    (``reward="accuracy"``) or AMC's ``-error * log(MACs)`` (``"error_log_macs"``).

    ``reward_source`` (default ``evaluator.evaluate``) turns the finished candidate into a
    result; searches route it through the run's recording loop.
    """

    metadata = {"render_modes": []}

    def __init__(self, evaluator: Evaluator | None, budget: Budget | str, action_type: str = "continuous",
                 reward: str = "accuracy", mode: str = "channels",
                 reward_source: Callable[[Candidate], EvalResult] | None = None, reward_baseline: float | None = None,
                 space: Any = None, cost_model: Any = None) -> None:
        super().__init__()
        if evaluator is None and (space is None or cost_model is None or reward_source is None):
            raise ConfigError("LayerWidthEnv needs an evaluator, or a space, a cost model and a reward source")
        if mode != "channels":
            raise ConfigError(f"RL mode '{mode}' is not available yet (bit-width search comes with mixed precision); use mode channels")
        if action_type not in ("continuous", "discrete"):
            raise ConfigError(f"unknown action type '{action_type}'; use continuous or discrete")
        if reward not in REWARDS:
            raise ConfigError(f"unknown reward '{reward}'; use one of: {', '.join(REWARDS)}")
        self.space = space if space is not None else evaluator.space
        self.cost_model = cost_model if cost_model is not None else evaluator.cost_model
        self.budget = parse_budget(budget) if isinstance(budget, str) else budget
        if self.budget.metric == "latency" and self.cost_model.latency_table is None:
            raise ConfigError("a latency budget needs a latency table on the cost model: "
                              "cost_model.attach_latency_table(measure_latency_table(model, space))")
        check_achievable(self.budget, self.cost_model)
        self.limit = self.budget.limit(self.cost_model.base)
        self.metric = self.budget.metric
        self.reward_kind = reward
        self.action_type = action_type
        self.reward_source = reward_source or evaluator.evaluate
        self.reward_baseline = reward_baseline
        self._baseline: float | None = None
        self.groups = list(self.space.prunable)
        if not self.groups:
            raise ConfigError("the search space has no prunable group; unpin some groups")
        self.grid = list(self.space.config.ratios)
        self.min_ratio = self.grid[0]
        self.static = self._static_features()
        self.observation_space = spaces.Box(0.0, 1.0, shape=(len(OBSERVATION_FEATURES),), dtype=np.float32)
        self.action_space = (spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32) if action_type == "continuous"
                             else spaces.Discrete(len(self.grid)))
        self._ratios: dict[str, float] = {}
        self._t = 0
        self._prev = 1.0

    # ---- features --------------------------------------------------------------------------------
    def _static_features(self) -> np.ndarray:
        """Per-group, per-episode-constant features (columns 1..8 of the observation)."""
        layer_costs = self.cost_model.per_layer(self.space.full())
        rows = []
        for name in self.groups:
            group = self.space.group_by_name[name]
            root = self.space.layer_by_name[group.name]
            layers = {m.layer for m in group.members}
            rows.append([float(root.kind == "linear"), float(root.depthwise), root.in_channels, root.out_channels,
                         root.stride, math.sqrt(root.kernel), sum(layer_costs[l]["macs"] for l in layers),
                         sum(layer_costs[l]["params"] for l in layers)])
        table = np.array(rows, dtype=np.float64)
        return table / np.maximum(table.max(axis=0), 1e-12)

    def _cost(self, ratios: dict[str, float]) -> float:
        return self.cost_model(Candidate.make(ratios)).get(self.metric)

    def _observation(self) -> np.ndarray:
        """AMC's embedding of the current group; costs in the budget's metric, as fractions of
        the unpruned network: removed by the decided groups, and still removable by the later ones."""
        t = min(self._t, len(self.groups) - 1)
        base = self.cost_model.base.get(self.metric)
        decided = {g: self._ratios[g] for g in self.groups[:self._t]}
        later_at_min = {g: self.min_ratio for g in self.groups[self._t + 1:]}
        now = self._cost(decided)
        removable_later = now - self._cost({**decided, **later_at_min})
        obs = np.concatenate([[t / max(1, len(self.groups) - 1)], self.static[t],
                              [(base - now) / base, removable_later / base, self._prev]])
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    # ---- dynamics --------------------------------------------------------------------------------
    def max_feasible_ratio(self) -> float:
        """AMC's clipping bound: the largest keep ratio for the current group such that, with the
        groups still to come at their minimum, the budget is met."""
        fixed = {g: self._ratios[g] for g in self.groups[:self._t]}
        later = {g: self.min_ratio for g in self.groups[self._t + 1:]}
        current = self.groups[self._t]
        cost = lambda r: self._cost({**fixed, current: r, **later})  # noqa: E731
        if cost(1.0) <= self.limit:
            return 1.0
        lo = largest_within(lambda r: cost(r) <= self.limit, self.min_ratio, 1.0, 30)
        return max(self.min_ratio, math.floor(lo * 1e6) / 1e6)  # tidy candidate keys; flooring keeps it feasible

    def action_to_ratio(self, action: Any) -> float:
        """The agent's keep ratio before clipping."""
        if self.action_type == "discrete":
            return self.grid[int(np.asarray(action).reshape(-1)[0])]
        a = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0))
        return round(self.min_ratio + (a + 1.0) / 2.0 * (1.0 - self.min_ratio), 6)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._ratios, self._t, self._prev = {}, 0, 1.0
        return self._observation(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        wanted = self.action_to_ratio(action)
        bound = self.max_feasible_ratio()
        ratio = min(wanted, bound)
        if self.action_type == "discrete" and ratio < wanted:
            ratio = max([r for r in self.grid if r <= bound + 1e-12], default=self.min_ratio)
        group = self.groups[self._t]
        self._ratios[group] = ratio
        self._prev = ratio
        self._t += 1
        info: dict[str, Any] = {"group": group, "ratio": ratio, "clipped": ratio < wanted}
        if self._t < len(self.groups):
            return self._observation(), 0.0, False, False, info
        candidate = Candidate.make(self._ratios)
        result = self.reward_source(candidate)
        raw = self.reward(result)
        shaped = raw
        if self.reward_baseline is not None:  # AMC: subtract a moving average of past episode rewards
            self._baseline = raw if self._baseline is None else self._baseline
            shaped = raw - self._baseline
            self._baseline += self.reward_baseline * (raw - self._baseline)
        info.update(candidate=candidate.to_dict(), result=result.to_dict(), raw_reward=raw,
                    feasible=self.budget.met_by(result.costs, self.cost_model.base))
        return self._observation(), float(shaped), True, False, info

    def reward(self, result: EvalResult) -> float:
        if self.reward_kind == "accuracy":
            return result.accuracy
        return -(1.0 - result.accuracy) * math.log(max(result.costs.macs, 1.0))


def make_layer_width_env(task: str | None = None, budget: str | Budget = "macs=0.5", evaluator: Evaluator | None = None,
                         device: str = "cpu", space: str | None = None, overrides: tuple[str, ...] = (),
                         **kwargs: Any) -> LayerWidthEnv:
    """Entry point of ``automlprune/LayerWidth-v0``: from an evaluator, or from a task name or
    YAML path (its baseline is loaded, or trained if the task says ``auto_train``)."""
    if evaluator is None:
        if task is None:
            raise ConfigError("automlprune/LayerWidth-v0 needs task=NAME_OR_YAML or evaluator=Evaluator(...)")
        from automlprune.baseline import ensure_baseline
        from automlprune.device import resolve_device
        from automlprune.tasks import Task, TaskSpec

        the_task = Task(TaskSpec.load(task, overrides))
        dev = resolve_device(device)
        model = ensure_baseline(the_task, dev, progress=False)
        evaluator = Evaluator(model, the_task.search_space(model, space), the_task.data, the_task.spec.evaluation, dev)
    wanted = parse_budget(budget) if isinstance(budget, str) else budget
    if wanted.metric == "latency" and evaluator.cost_model.latency_table is None:
        from automlprune.latency_table import measure_latency_table

        evaluator.cost_model.attach_latency_table(
            measure_latency_table(evaluator.model, evaluator.space, evaluator.device, progress=False))
    return LayerWidthEnv(evaluator, wanted, **kwargs)
