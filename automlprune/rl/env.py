"""The layer-width and bit-width search as a Gymnasium environment (AMC, He et al., ECCV
2018; HAQ, Wang et al., CVPR 2019).

One episode walks the decisions of its ``mode`` in network order, one per step:

* ``channels``: each prunable channel group's keep ratio (AMC);
* ``bits``: each bit-searchable layer's weight bits, channels kept whole (HAQ);
* ``density``: each sparsity-searchable layer's weight density (in its first pattern that
  allows any density: unstructured or block), channels kept whole and weights float32;
* ``joint``: the channel groups first, then the layers' densities (when the space searches
  them), then the layers' bits, in the same episode.

Keep ratios and densities are clipped as in AMC so the budget stays reachable whatever the agent
does (the decisions still to come are assumed to go to their minimum, bits included). Bit widths are
taken as chosen and, if the finished candidate is over budget, lowered as in HAQ: one choice
at a time, sweeping from the last layer backward, until the budget is met. So every finished
episode yields a candidate that meets the budget. The reward, given at the last step only,
comes from the shared evaluator.
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
MODES = ("channels", "bits", "density", "joint")
OBSERVATION_FEATURES = (
    "step index", "is linear", "is depthwise", "in channels", "out channels", "stride", "kernel size",
    "decision MACs", "decision params", "budget metric removed so far", "budget metric of the decisions to come",
    "previous action", "decision kind (0 widths, 0.5 densities, 1 bits)",
)
KIND_FEATURE = {"ratio": 0.0, "density": 0.5, "bits": 1.0}


class LayerWidthEnv(gym.Env):
    """``reward_baseline``: when set (AMC uses 0.5 for DDPG), the reward is the raw reward minus
    an exponential moving average of past episodes' raw rewards with that rate.

    Observation: float32 vector of :data:`OBSERVATION_FEATURES`, each in [0, 1] (for a channel
    decision, the group's root layer and the MACs / params of all its layers; for a bit decision,
    the layer itself; channels, kernel, stride, MACs and params divided by their maximum over the
    episode's decisions; costs by the unpruned network's; the previous action as a keep ratio or as
    the position of the bits among the choices). Action: ``Box(-1, 1, (1,))`` mapped linearly to a
    keep ratio in [min grid ratio, 1] or to the nearest bit choice (``action_type="continuous"``),
    or ``Discrete(n)`` over the ratio grid / bit choices (``"discrete"``; in ``joint`` mode n is the
    longer of the two and indices are scaled to the shorter). Reward: 0 until the last step, then
    the evaluator's validation accuracy (``reward="accuracy"``) or AMC's ``-error * log(MACs)``
    (``"error_log_macs"``).

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
        if mode not in MODES:
            raise ConfigError(f"unknown RL mode '{mode}'; use one of: {', '.join(MODES)}")
        if action_type not in ("continuous", "discrete"):
            raise ConfigError(f"unknown action type '{action_type}'; use continuous or discrete")
        if reward not in REWARDS:
            raise ConfigError(f"unknown reward '{reward}'; use one of: {', '.join(REWARDS)}")
        self.space = space if space is not None else evaluator.space
        self.cost_model = cost_model if cost_model is not None else evaluator.cost_model
        wanted = parse_budget(budget) if isinstance(budget, str) else budget
        if wanted.metric == "latency" and self.cost_model.latency_table is None:
            raise ConfigError("a latency budget needs a latency table on the cost model: "
                              "cost_model.attach_latency_table(measure_latency_table(model, space))")
        check_achievable(wanted, self.cost_model)
        self.budget = wanted.bind(self.cost_model.base)
        self.limit = self.budget.limit
        self.metric = self.budget.metric
        self.mode = mode
        self.reward_kind = reward
        self.action_type = action_type
        self.reward_source = reward_source or evaluator.evaluate
        self.reward_baseline = reward_baseline
        self._baseline: float | None = None
        self.groups = list(self.space.prunable) if mode in ("channels", "joint") else []
        self.bit_layers = list(self.space.bit_searchable) if mode in ("bits", "joint") else []
        free = {l: self.space.free_pattern(l) for l in self.space.layer_patterns} if mode in ("density", "joint") else {}
        self.patterns = {l: p for l, p in free.items() if p is not None}
        """Layer -> the pattern its density decisions use."""
        self.density_layers = list(self.patterns)
        if mode == "density" and not self.density_layers:
            raise ConfigError("mode density searches weight densities but the search space has none (or only N:M patterns); "
                              "use a space with a sparsity section (e.g. --space sparse)")
        if mode in ("channels", "joint") and (not self.groups or len(self.space.config.ratios) < 2):
            raise ConfigError(f"mode {mode} searches channel widths but the search space has no channel choices (no prunable "
                              "group or one ratio only); use a space with ratios below 1, or --option mode=bits")
        if mode in ("bits", "joint") and not self.bit_layers:
            raise ConfigError(f"mode {mode} searches bit widths but the search space has no bit choices; "
                              "use a space with bits.choices (e.g. --space mixed-precision) or mode channels")
        self.decisions = ([("ratio", g) for g in self.groups] + [("density", l) for l in self.density_layers]
                          + [("bits", l) for l in self.bit_layers])
        self.grid = list(self.space.config.ratios)
        self.min_ratio = self.grid[0]
        self.density_grid = list(self.space.config.densities)
        self.min_density = self.density_grid[0]
        self.bit_choices = list(self.space.config.bit_choices)
        self._check_reachable()
        self.static = self._static_features()
        self.observation_space = spaces.Box(0.0, 1.0, shape=(len(OBSERVATION_FEATURES),), dtype=np.float32)
        sizes = (([len(self.grid)] if self.groups else []) + ([len(self.density_grid)] if self.density_layers else [])
                 + ([len(self.bit_choices)] if self.bit_layers else []))
        self.action_space = (spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32) if action_type == "continuous"
                             else spaces.Discrete(max(sizes)))
        self._ratios: dict[str, float] = {}
        self._densities: dict[str, float] = {}
        self._bits: dict[str, int] = {}
        self._t = 0
        self._prev = 1.0
        self._demonstrations: list[Candidate] = []
        self.demonstration: Candidate | None = None
        """The candidate the current episode replays (:meth:`demonstrate`), or None."""

    def demonstrate(self, candidates: list[Candidate]) -> None:
        """Queue candidates for the next episodes to replay: in each, :meth:`demonstration_action`
        gives the action that takes the candidate's keep ratio (or bits) at every step, so an agent
        that takes it (the RL strategies' warm-up) stores the candidate's episode as its own."""
        self._demonstrations.extend(candidates)

    def demonstration_episode(self, candidate: Candidate) -> tuple[np.ndarray, np.ndarray]:
        """The (observations, actions) of an episode replaying ``candidate``, one row per decision,
        without evaluating it (the last step, which would ask for the reward, is not taken); the
        environment is left reset."""
        self._demonstrations.insert(0, candidate)
        obs, _ = self.reset()
        observations, actions = [], []
        for t in range(len(self.decisions)):
            action = self.demonstration_action()
            observations.append(obs)
            actions.append(np.asarray(action))
            if t < len(self.decisions) - 1:
                obs, *_ = self.step(action)
        self._clear()
        self.demonstration = None
        return np.stack(observations), np.stack(actions)

    def demonstration_action(self) -> np.ndarray | None:
        """The action reproducing the replayed candidate's decision at the current step (continuous:
        in [-1, 1]; discrete: the grid index at or below its ratio), or None when no episode is replayed."""
        if self.demonstration is None or self._t >= len(self.decisions):
            return None
        kind, name = self.decisions[self._t]
        if kind in ("ratio", "density"):
            value = (self.demonstration.ratio_map.get(name, 1.0) if kind == "ratio"
                     else self.demonstration.density_map.get(name, 1.0))
            grid, low = (self.grid, self.min_ratio) if kind == "ratio" else (self.density_grid, self.min_density)
            if self.action_type == "continuous":
                return np.array([2.0 * (value - low) / (1.0 - low) - 1.0], dtype=np.float32).clip(-1, 1)
            index, n = max([i for i, r in enumerate(grid) if r <= value + 1e-9], default=0), len(grid)
        else:
            index, n = self.bit_choices.index(self.demonstration.bit_map.get(name, self.bit_choices[-1])), len(self.bit_choices)
        if self.action_type == "continuous":
            return np.array([2.0 * index / max(1, n - 1) - 1.0], dtype=np.float32)
        size = int(self.action_space.n)
        return np.array(int(round(index * (size - 1) / max(1, n - 1))) if size != n else index)

    def _check_reachable(self) -> None:
        """In ``bits`` and ``density`` modes channels stay whole: refuse budgets that even every
        decision at its minimum cannot meet."""
        if self.mode not in ("bits", "density"):
            return
        _, lowest_densities, lowest_bits = self._at_minimum_after(-1)
        lowest = self._cost({}, lowest_bits, lowest_densities)
        if lowest > self.limit:
            base = self.cost_model.base[self.metric]
            least = f"{self.bit_choices[0]} bits" if self.mode == "bits" else f"density {self.min_density:g}"
            raise ConfigError(f"budget {self.budget.label} is out of reach in mode {self.mode}: at {least} everywhere and "
                              f"all channels kept the network costs {lowest:.4g} {self.budget.unit} ({lowest / base:.1%}); "
                              "use mode joint, or a bytes budget")

    # ---- features --------------------------------------------------------------------------------
    def _static_features(self) -> np.ndarray:
        """Per-decision, per-episode-constant features (columns 1..8 of the observation)."""
        layer_costs = self.cost_model.per_layer(self.space.full())
        rows = []
        for kind, name in self.decisions:
            if kind == "ratio":
                group = self.space.group_by_name[name]
                root = self.space.layer_by_name[group.name]
                layers = {m.layer for m in group.members}
            else:
                root, layers = self.space.layer_by_name[name], {name}
            rows.append([float(root.kind == "linear"), float(root.depthwise), root.in_channels, root.out_channels,
                         root.stride, math.sqrt(root.kernel), sum(layer_costs[l]["macs"] for l in layers),
                         sum(layer_costs[l]["params"] for l in layers)])
        table = np.array(rows, dtype=np.float64)
        return table / np.maximum(table.max(axis=0), 1e-12)

    def _candidate(self, ratios: dict[str, float], bits: dict[str, int], densities: dict[str, float] | None = None) -> Candidate:
        densities = {l: self.patterns[l].clip(d) for l, d in (densities or {}).items() if d < 1}
        return Candidate.make(ratios, bits, densities, {l: self.patterns[l].name for l in densities})

    def _cost(self, ratios: dict[str, float], bits: dict[str, int], densities: dict[str, float] | None = None) -> float:
        return self.cost_model(self._candidate(ratios, bits, densities))[self.metric]

    def _at_minimum_after(self, t: int) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
        """The decisions after step ``t`` at their minimum (lowest ratio and density, fewest bits)."""
        later = self.decisions[t + 1:]
        return ({n: self.min_ratio for k, n in later if k == "ratio"}, {n: self.min_density for k, n in later if k == "density"},
                {n: self.bit_choices[0] for k, n in later if k == "bits"})

    def _observation(self) -> np.ndarray:
        """AMC's embedding of the current decision; costs in the budget's metric, as fractions of
        the unpruned network: removed by the decisions taken, and still removable by the later ones."""
        t = min(self._t, len(self.decisions) - 1)
        base = self.cost_model.base[self.metric]
        now = self._cost(self._ratios, self._bits, self._densities)
        later_ratios, later_densities, later_bits = self._at_minimum_after(self._t)
        kind = self.decisions[t][0]
        removable_later = now - self._cost({**self._ratios, **later_ratios}, {**self._bits, **later_bits},
                                           {**self._densities, **later_densities})
        obs = np.concatenate([[t / max(1, len(self.decisions) - 1)], self.static[t],
                              [(base - now) / base, removable_later / base, self._prev, KIND_FEATURE[kind]]])
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    # ---- dynamics --------------------------------------------------------------------------------
    def max_feasible_ratio(self) -> float:
        """AMC's clipping bound: the largest keep ratio for the current group (or density for the
        current layer) such that, with the decisions still to come at their minimum, the budget is met."""
        later_ratios, later_densities, later_bits = self._at_minimum_after(self._t)
        kind, current = self.decisions[self._t]
        bits = {**self._bits, **later_bits}
        if kind == "ratio":
            cost = lambda r: self._cost({**self._ratios, current: r, **later_ratios}, bits, {**self._densities, **later_densities})  # noqa: E731
        else:
            cost = lambda r: self._cost({**self._ratios, **later_ratios}, bits, {**self._densities, current: r, **later_densities})  # noqa: E731
        low = self.min_ratio if kind == "ratio" else self.min_density
        if cost(1.0) <= self.limit:
            return 1.0
        lo = largest_within(lambda r: cost(r) <= self.limit, low, 1.0, 30)
        return max(low, math.floor(lo * 1e6) / 1e6)  # tidy candidate keys; flooring keeps it feasible

    def _index(self, action: Any, n: int) -> int:
        """The agent's action as an index into a list of ``n`` choices."""
        if self.action_type == "discrete":
            i, size = int(np.asarray(action).reshape(-1)[0]), int(self.action_space.n)
            return int(round(i * (n - 1) / max(1, size - 1))) if size != n else i
        a = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0))
        return int(np.floor((a + 1.0) / 2.0 * (n - 1) + 0.5))

    def action_to_ratio(self, action: Any, kind: str = "ratio") -> float:
        """The agent's keep ratio (``kind="density"``: weight density) before clipping."""
        grid = self.grid if kind == "ratio" else self.density_grid
        if self.action_type == "discrete":
            return grid[self._index(action, len(grid))]
        a = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0))
        return round(grid[0] + (a + 1.0) / 2.0 * (1.0 - grid[0]), 6)

    def action_to_bits(self, action: Any) -> int:
        """The agent's bit width (the nearest choice)."""
        return self.bit_choices[self._index(action, len(self.bit_choices))]

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._clear()
        self.demonstration = self._demonstrations.pop(0) if self._demonstrations else None
        return self._observation(), {}

    def _clear(self) -> None:
        """Forget the decisions of the episode under way."""
        self._ratios, self._densities, self._bits, self._t, self._prev = {}, {}, {}, 0, 1.0

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        kind, name = self.decisions[self._t]
        if kind in ("ratio", "density"):
            grid = self.grid if kind == "ratio" else self.density_grid
            wanted = self.action_to_ratio(action, kind)
            bound = self.max_feasible_ratio()
            ratio = min(wanted, bound)
            if self.action_type == "discrete" and ratio < wanted:
                ratio = max([r for r in grid if r <= bound + 1e-12], default=grid[0])
            (self._ratios if kind == "ratio" else self._densities)[name] = ratio
            self._prev = ratio
            info: dict[str, Any] = ({"group": name, "ratio": ratio} if kind == "ratio" else {"layer": name, "density": ratio})
            info["clipped"] = ratio < wanted
        else:
            bits = self.action_to_bits(action)
            self._bits[name] = bits
            self._prev = self.bit_choices.index(bits) / max(1, len(self.bit_choices) - 1)
            info = {"layer": name, "bits": bits}
        self._t += 1
        if self._t < len(self.decisions):
            return self._observation(), 0.0, False, False, info
        info["bits_lowered"] = self.lower_bits_to_budget()
        candidate = self._candidate(self._ratios, self._bits, self._densities)
        result = self.reward_source(candidate)
        raw = self.reward(result)
        shaped = raw
        if self.reward_baseline is not None:  # AMC: subtract a moving average of past episode rewards
            self._baseline = raw if self._baseline is None else self._baseline
            shaped = raw - self._baseline
            self._baseline += self.reward_baseline * (raw - self._baseline)
        info.update(candidate=candidate.to_dict(), result=result.to_dict(), raw_reward=raw,
                    feasible=self.budget.met_by(result.costs))
        return self._observation(), float(shaped), True, False, info

    def lower_bits_to_budget(self) -> int:
        """HAQ's budget enforcement: while the episode's candidate is over budget, lower the bits
        one choice at a time, sweeping from the last layer backward; returns how many steps it took."""
        steps = 0
        while self._cost(self._ratios, self._bits, self._densities) > self.limit:
            lowered = False
            for layer in reversed(self.bit_layers):
                position = self.bit_choices.index(self._bits[layer])
                if position == 0:
                    continue
                self._bits[layer] = self.bit_choices[position - 1]
                steps, lowered = steps + 1, True
                if self._cost(self._ratios, self._bits, self._densities) <= self.limit:
                    return steps
            if not lowered:
                break
        return steps

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
        from automlprune.settings import SEARCH_SIGNAL
        from automlprune.tasks import Task, TaskSpec

        the_task = Task(TaskSpec.load(task, overrides))
        dev = resolve_device(device)
        model = ensure_baseline(the_task, dev, progress=False)
        settings = the_task.spec.evaluation.with_defaults(SEARCH_SIGNAL)  # an agent in this env is a black-box search
        evaluator = Evaluator(model, the_task.search_space(model, space), the_task.data, settings, dev)
    wanted = parse_budget(budget) if isinstance(budget, str) else budget
    if wanted.metric == "latency" and evaluator.cost_model.latency_table is None:
        from automlprune.latency_table import measure_latency_table

        evaluator.cost_model.attach_latency_table(
            measure_latency_table(evaluator.model, evaluator.space, evaluator.device, evaluator.settings.latency_batch,
                                  progress=False))
    return LayerWidthEnv(evaluator, wanted, **kwargs)
