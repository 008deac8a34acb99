"""Deep-RL strategies: stable-baselines3 agents (DDPG, TD3, SAC, PPO) acting in
:class:`~automlprune.rl.env.LayerWidthEnv`.

SB3 owns its training loop, and the search loop owns evaluation and recording. They meet
through a hand-off: the agent trains in a worker thread; when an episode ends, the
environment passes its candidate to the search loop (``ask``) and waits for the result
(``tell``). The two never run at once, so a run is deterministic under its seed, and an
interrupted run resumes by replaying against the stored results.

Episode budget = the run's evaluation budget (episodes whose candidate was already
evaluated are served from the cache and do not count).

Warm starts (:mod:`automlprune.search.warm_start`, option ``warm_start``, on by default): the
off-policy agents (DDPG, TD3, SAC) replay the one-shot allocators' answers as their first
warm-up episodes: the environment gives, step by step, the action that reproduces the answer
(:meth:`LayerWidthEnv.demonstration_action`) and the agent takes it in place of a random one,
so the answers' episodes and rewards enter its replay buffer like its own. PPO learns on its own
policy's actions only, so for PPO the answers are evaluated first, outside the agent (counted in
the budget, part of the answer). PPO's policy then starts from the best of them (option
``imitate``, on by default; ``--option imitate=false`` starts from a fresh policy as AMC's
agents do): behaviour cloning (:func:`imitate`) toward soft targets on that answer's grid index
at every step (half the probability on it, the rest on the neighbouring indices), so its first
episodes explore around the best one-shot allocation instead of at random. This is
automlprune's, not AMC's. Measured on the 3-seed search benchmark (Fashion-MNIST ResNet-20,
40 evaluations, ``results/benchmarks/fmnist-resnet20-search``): without it PPO never improved on
its best warm start; with it its best validation accuracy at 50% MACs rose from 90.20 to 91.02
(mean of 3 seeds). Every other episode's candidate is moved to
the budget by the search loop before it is evaluated (:mod:`automlprune.search.repair`, option
``repair``): the environment's clipping keeps it within the budget, the repair makes it use it;
the agent's reward is the repaired network's accuracy.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from automlprune.errors import ConfigError
from automlprune.evaluator import EvalResult
from automlprune.rl.env import LayerWidthEnv
from automlprune.proposal import Proposal
from automlprune.search.base import Strategy
from automlprune.search.warm_start import warm_start_candidates
from automlprune.space import Candidate


class DecayingGaussianNoise:
    """AMC's exploration: Gaussian noise of ``sigma`` (0.5 by default) on the action, shrunk by
    ``decay`` (0.95) at the end of every episode after ``warmup_episodes``. SB3 clips the noisy
    action to [-1, 1] (AMC draws from a normal truncated to the bounds, which is close)."""

    def __init__(self, sigma: float, decay: float, warmup_episodes: int, seed: int) -> None:
        self.sigma, self.decay, self.warmup = sigma, decay, warmup_episodes
        self.episodes = 0
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> np.ndarray:
        return self.rng.normal(0.0, self.sigma, size=(1,)).astype(np.float32)

    def reset(self) -> None:
        self.episodes += 1
        if self.episodes > self.warmup:
            self.sigma *= self.decay


def _separate_actor_rate(algorithm_class: type, actor_learning_rate: float) -> type:
    """An SB3 off-policy class whose actor trains at its own learning rate (AMC: actor 1e-4,
    critic 1e-3); SB3 itself applies one rate to both."""

    class SeparateActorRate(algorithm_class):  # type: ignore[misc, valid-type]
        def _update_learning_rate(self, optimizers: Any) -> None:
            super()._update_learning_rate(optimizers)
            actor = getattr(getattr(self, "actor", None), "optimizer", None)
            for group in (actor.param_groups if actor is not None else []):
                group["lr"] = actor_learning_rate

    SeparateActorRate.__name__ = algorithm_class.__name__
    return SeparateActorRate


def _replaying(algorithm_class: type, env: LayerWidthEnv) -> type:
    """An SB3 off-policy class that takes the environment's demonstration action while it
    replays a candidate (:meth:`LayerWidthEnv.demonstration_action`), its own otherwise; the
    replayed action is what its replay buffer stores."""

    class Replaying(algorithm_class):  # type: ignore[misc, valid-type]
        def _sample_action(self, learning_starts: int, action_noise: Any = None, n_envs: int = 1) -> tuple[np.ndarray, np.ndarray]:
            demonstrated = env.demonstration_action()
            if demonstrated is None:
                return super()._sample_action(learning_starts, action_noise, n_envs)
            action = np.repeat(demonstrated.reshape(1, -1), n_envs, axis=0)
            return action, action

    Replaying.__name__ = algorithm_class.__name__
    return Replaying


def _reward_every_step(algorithm_class: type, steps: int) -> type:
    """An SB3 off-policy class that, when an episode ends, gives each of its ``steps`` stored
    transitions the episode's final reward (AMC's assignment: ``agent.observe(final_reward, ...)``
    for every step of the episode in the official amc_search.py), instead of 0 before the last step."""

    class EveryStep(algorithm_class):  # type: ignore[misc, valid-type]
        def _store_transition(self, replay_buffer: Any, buffer_action: np.ndarray, new_obs: Any, reward: np.ndarray,
                              dones: np.ndarray, infos: list) -> None:
            super()._store_transition(replay_buffer, buffer_action, new_obs, reward, dones, infos)
            if dones[0]:
                for back in range(1, steps + 1):
                    replay_buffer.rewards[(replay_buffer.pos - back) % replay_buffer.buffer_size, 0] = reward[0]

    EveryStep.__name__ = algorithm_class.__name__
    return EveryStep


class _Stop(Exception):
    """Raised inside the agent's thread to end its training when the search ends."""


class RLStrategy(Strategy):
    """Base of the SB3 strategies. Options (``--option key=value``):

    mode: channels | bits | density | joint (see :mod:`automlprune.rl.env`); action_type: continuous |
    discrete; reward: accuracy | error_log_macs; warmup: episodes of random actions before
    learning (default min(100, evals // 4)); learning_rate (critic, and actor unless
    actor_learning_rate is set; DDPG/TD3 default to AMC's 1e-3 and 1e-4); batch_size; gamma
    (1.0, as AMC); tau; net_arch (hidden sizes, default [300, 400] as AMC); noise_sigma,
    noise_decay (DDPG/TD3); reward_baseline (moving-average rate, DDPG default 0.5, others
    off); reward_assignment: last (the reward on the episode's last step only, the default) or
    every_step (AMC: every transition of the episode gets the final reward; off-policy agents);
    episodes_per_update, n_epochs, imitate (PPO, default true; see the module docstring); init_agent: an SB3 .zip (one a previous search
    saved) whose network and optimizer weights the agent starts from; only its tensors are read
    (``torch.load(weights_only=True)``), never its pickled data, so the agent's settings are these options.
    The trained agent is saved as ``agent-<strategy>-<budget>-seed<k>.zip`` in the run directory.
    """

    algorithm: ClassVar[str] = "ddpg"
    default_action_type: ClassVar[str] = "continuous"
    default_mode: ClassVar[str] = "channels"
    option_names = ("mode", "action_type", "reward", "warmup", "learning_rate", "actor_learning_rate", "batch_size", "gamma", "tau", "net_arch",
                    "noise_sigma", "noise_decay", "reward_baseline", "episodes_per_update", "n_epochs", "init_agent",
                    "reward_assignment", "imitate")
    option_types = {**dict.fromkeys(("mode", "action_type", "reward", "init_agent", "reward_assignment"), str),
                    "imitate": bool,
                    **dict.fromkeys(("warmup", "batch_size", "episodes_per_update", "n_epochs"), int),
                    **dict.fromkeys(("learning_rate", "actor_learning_rate", "gamma", "tau", "noise_sigma", "noise_decay"), float),
                    "reward_baseline": float | None}
    option_ranges = {**dict.fromkeys(("batch_size", "episodes_per_update", "n_epochs"), (lambda v: v >= 1, "must be at least 1")),
                     "warmup": (lambda v: v >= 0, "cannot be negative"),
                     **dict.fromkeys(("learning_rate", "actor_learning_rate", "noise_decay"), (lambda v: v > 0, "must be positive")),
                     **dict.fromkeys(("gamma", "tau"), (lambda v: 0 <= v <= 1, "must be in [0, 1]")),
                     "noise_sigma": (lambda v: v >= 0, "cannot be negative"),
                     "reward_assignment": (lambda v: v in ("last", "every_step"), "must be last or every_step")}

    repairs = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        o = self.options
        self.env = LayerWidthEnv(None, self.budget, action_type=o.get("action_type", self.default_action_type),
                                 reward=o.get("reward", "accuracy"), reward_source=self._request,
                                 reward_baseline=o.get("reward_baseline", 0.5 if self.algorithm == "ddpg" else None),
                                 mode=o.get("mode", self.default_mode), space=self.space, cost_model=self.cost_model)
        self.steps_per_episode = len(self.env.decisions)
        starts = warm_start_candidates(self, self.warm_start) if self.env.groups else []  # bits and density modes keep channels whole
        self._first: list[Candidate] = starts if self.algorithm == "ppo" else []
        """Warm starts the loop evaluates before the agent runs (PPO: not replayed)."""
        self._served_first = False
        if self.algorithm != "ppo":
            self.env.demonstrate(starts)
        self.agent = self._build_agent()
        self._to_loop: queue.Queue = queue.Queue()
        self._to_agent: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.spent = {"episodes": 0, "agent_steps": 0}

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        super().check_options(options)
        if cls.algorithm == "ppo" and options.get("reward_assignment", "last") != "last":
            raise ConfigError(f"strategy '{cls.name}' option reward_assignment=every_step rewrites an off-policy replay "
                              "buffer; use it with ddpg, td3 or sac")
        if cls.algorithm != "ppo" and options.get("imitate"):
            raise ConfigError(f"strategy '{cls.name}' replays the warm starts into its replay buffer already; "
                              "option imitate is PPO's")

    # ---- the agent -------------------------------------------------------------------------------
    def _build_agent(self) -> Any:
        import stable_baselines3 as sb3

        o = self.options
        warmup = int(o.get("warmup", min(100, max(1, self.max_evals // 4))))
        arch = list(o.get("net_arch", [300, 400]))
        common = dict(seed=self.seed, verbose=0, device="cpu", gamma=float(o.get("gamma", 1.0)))
        algorithm_class = getattr(sb3, self.algorithm.upper())
        actor_rate = o.get("actor_learning_rate", 1e-4 if self.algorithm in ("ddpg", "td3") else None)  # AMC: 1e-4
        if actor_rate is not None and self.algorithm != "ppo":
            algorithm_class = _separate_actor_rate(algorithm_class, float(actor_rate))
        if self.algorithm != "ppo":
            algorithm_class = _replaying(algorithm_class, self.env)
            if o.get("reward_assignment", "last") == "every_step":
                algorithm_class = _reward_every_step(algorithm_class, self.steps_per_episode)
        agent = self._new_agent(algorithm_class, common, arch, warmup)
        if "init_agent" in o:
            _load_weights(agent, Path(o["init_agent"]))
        return agent

    def _new_agent(self, algorithm_class: Any, common: dict[str, Any], arch: list[int], warmup: int) -> Any:
        import stable_baselines3 as sb3

        o, T = self.options, self.steps_per_episode
        if self.algorithm == "ppo":
            episodes = int(o.get("episodes_per_update", 4))
            return sb3.PPO("MlpPolicy", self.env, n_steps=T * episodes, batch_size=T, n_epochs=int(o.get("n_epochs", 10)),
                           learning_rate=float(o.get("learning_rate", 3e-4)), policy_kwargs={"net_arch": arch}, **common)
        if self.env.action_type != "continuous":
            raise ConfigError(f"{self.algorithm} needs continuous actions; use action_type=continuous (or the ppo strategy)")
        off_policy = dict(learning_starts=warmup * T, batch_size=int(o.get("batch_size", 64)), tau=float(o.get("tau", 0.01)),
                          learning_rate=float(o.get("learning_rate", 1e-3)), train_freq=(1, "episode"), gradient_steps=-1,
                          policy_kwargs={"net_arch": {"pi": arch, "qf": arch}}, buffer_size=100_000, **common)
        if self.algorithm in ("ddpg", "td3"):
            off_policy["action_noise"] = DecayingGaussianNoise(float(o.get("noise_sigma", 0.5)), float(o.get("noise_decay", 0.95)),
                                                               warmup, self.seed)
        return algorithm_class("MlpPolicy", self.env, **off_policy)

    def _train(self) -> None:
        try:
            self.agent.learn(total_timesteps=10 ** 9)
        except _Stop:
            pass
        except BaseException as exc:  # re-raised in the search loop's thread
            self._error = exc
        finally:
            self._to_loop.put(None)

    def _request(self, candidate: Candidate) -> EvalResult:
        """Called by the environment (agent thread) at the end of an episode."""
        self.spent["episodes"] += 1
        self.spent["agent_steps"] += self.steps_per_episode
        self._to_loop.put(candidate)
        result = self._to_agent.get()
        if result is None:
            raise _Stop()
        return result

    # ---- ask / tell --------------------------------------------------------------------------------
    def ask(self) -> Candidate | Proposal | None:
        self._served_first = bool(self._first)
        if self._first:
            return Proposal(self._first.pop(0), as_proposed=True)
        if self._thread is None:
            if self.options.get("imitate", True):
                self._imitate_best_start()
            self._thread = threading.Thread(target=self._train, name=f"automlprune-{self.name}", daemon=True)
            self._thread.start()
        candidate = self._to_loop.get()
        if candidate is None and self._error is not None:
            raise self._error
        if candidate is not None and self.env.demonstration is not None:  # a replayed answer: evaluated as it is
            return Proposal(candidate, as_proposed=True)
        return candidate

    def _imitate_best_start(self) -> None:
        """Clone the best feasible warm start (evaluated first) into PPO's policy before it acts."""
        best = self.answer()  # the warm starts are all the history so far
        if best is None or not self.env.groups:
            return
        observations, actions = self.env.demonstration_episode(best.candidate)
        imitate(self.agent.policy, observations, actions, self.env.action_space)

    def tell(self, candidate: Candidate | Proposal, result: EvalResult) -> None:
        super().tell(candidate, result)
        if not self._served_first:  # the agent asked for it
            self._to_agent.put(result)

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._to_agent.put(None)
            self._thread.join()
        if self.context.artifacts is not None:
            self.agent.save(self.context.artifacts.path(f"agent-{self.name}-{self.budget.slug}-seed{self.seed}.zip"))


IMITATION_TARGET = {0: 0.5, -1: 0.2, 1: 0.2, -2: 0.05, 2: 0.05}
"""Soft target of behaviour cloning for a discrete policy: probability per offset from the demonstrated index."""

IMITATION_SIGMA = 0.2
"""Standard deviation a continuous policy keeps after behaviour cloning (actions span [-1, 1])."""


def imitate(policy: Any, observations: np.ndarray, actions: np.ndarray, action_space: Any, steps: int = 300,
            learning_rate: float = 1e-3) -> float:
    """Behaviour cloning of an SB3 actor-critic ``policy`` on one demonstrated episode: a discrete
    policy is fitted by cross-entropy to :data:`IMITATION_TARGET` around each demonstrated index
    (renormalised at the ends of the grid), a continuous one by the likelihood of the demonstrated
    actions with its spread held at :data:`IMITATION_SIGMA`. Full-batch Adam, ``steps`` steps
    (deterministic on the CPU). Returns the final loss."""
    import torch
    from gymnasium import spaces

    obs = torch.as_tensor(observations, dtype=torch.float32)
    discrete = isinstance(action_space, spaces.Discrete)
    if discrete:
        n = int(action_space.n)
        target = torch.zeros(len(obs), n)
        for row, index in enumerate(np.asarray(actions).reshape(-1).astype(int)):
            for offset, p in IMITATION_TARGET.items():
                if 0 <= index + offset < n:
                    target[row, index + offset] = p
        target /= target.sum(dim=1, keepdim=True)
        parameters = list(policy.parameters())
    else:
        wanted = torch.as_tensor(np.asarray(actions, dtype=np.float32).reshape(len(obs), -1))
        with torch.no_grad():
            policy.log_std.fill_(float(np.log(IMITATION_SIGMA)))
        parameters = [p for p in policy.parameters() if p is not policy.log_std]
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)
    loss = torch.zeros(())
    for _ in range(steps):
        distribution = policy.get_distribution(obs)
        if discrete:
            loss = -(target * torch.log_softmax(distribution.distribution.logits, dim=-1)).sum(dim=-1).mean()
        else:
            loss = -distribution.log_prob(wanted).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def _make(algorithm: str, action_type: str = "continuous", name: str | None = None, mode: str = "channels",
          doc: str | None = None) -> type[RLStrategy]:
    name = name or algorithm
    doc = doc or f"stable-baselines3 {algorithm.upper()} in the layer-width environment (see RLStrategy for options)."
    return type(f"{name.upper()}Strategy", (RLStrategy,), {"name": name, "algorithm": algorithm, "default_action_type": action_type,
                                                            "default_mode": mode, "__doc__": doc})


DDPGStrategy = _make("ddpg")
TD3Strategy = _make("td3")
SACStrategy = _make("sac")
PPOStrategy = _make("ppo", "discrete")
HAQStrategy = _make("ddpg", name="haq", mode="bits",
                    doc="HAQ (Wang et al., CVPR 2019): DDPG choosing each layer's weight bits, channels whole, the budget "
                        "enforced by lowering bits from the last layer backward (the ddpg strategy with mode=bits).")


def _load_weights(agent: Any, path: Path) -> None:
    """Start ``agent`` from the network and optimizer weights of the SB3 .zip ``path``, read
    without unpickling (SB3's ``set_parameters``: ``load_data=False``, ``weights_only=True``): a
    crafted file cannot run code."""
    import zipfile

    if not path.is_file():
        raise ConfigError(f"agent file {path} does not exist; give the .zip a previous search saved")
    try:
        agent.set_parameters(str(path), exact_match=True, device="cpu")
    except (ValueError, RuntimeError, KeyError, zipfile.BadZipFile, OSError) as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ConfigError(f"agent file {path} does not fit this agent ({first}); give a .zip saved by a search with the "
                          "same strategy, mode and net_arch") from None
