"""The layer-width Gymnasium environment and the stable-baselines3 strategies."""

import json

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import automlprune  # noqa: F401  (registers automlprune/LayerWidth-v0)
from automlprune.cli.main import main
from automlprune.errors import ConfigError
from automlprune.rl.env import OBSERVATION_FEATURES, LayerWidthEnv
from automlprune.search.budget import parse_budget


def _episode(env, action_fn, seed=0):
    obs, _ = env.reset(seed=seed)
    observations, done, info = [obs], False, {}
    while not done:
        obs, reward, done, truncated, info = env.step(action_fn(env))
        observations.append(obs)
    return observations, reward, info


@pytest.mark.parametrize("action_type", ["continuous", "discrete"])
@pytest.mark.filterwarnings("ignore:.*different from the unwrapped version")
def test_env_passes_gymnasium_and_sb3_checkers_through_make(action_type, digits_evaluator):
    env = gym.make("automlprune/LayerWidth-v0", evaluator=digits_evaluator, budget="macs=0.5", action_type=action_type)
    check_env(env.unwrapped)
    check_env(env)  # the wrapped env gym.make returns
    sb3_check_env(env.unwrapped)
    assert env.observation_space.shape == (len(OBSERVATION_FEATURES),)


def test_make_from_a_task_name(digits_checkpoint):
    env = gym.make("automlprune/LayerWidth-v0", task="digits-cnn", budget="params=0.5",
                   overrides=(f"checkpoint={digits_checkpoint}",))
    _, reward, info = _episode(env.unwrapped, lambda e: e.action_space.sample())
    assert info["feasible"] and 0 <= reward <= 1


@pytest.mark.parametrize("budget", ["macs=0.3", "macs=0.6", "params=0.25", "bytes=0.4"])
@pytest.mark.parametrize("action_type", ["continuous", "discrete"])
def test_every_episode_meets_the_budget(budget, action_type, digits_evaluator):
    env = LayerWidthEnv(digits_evaluator, budget, action_type=action_type)
    env.action_space.seed(0)
    b = parse_budget(budget)
    policies = [lambda e: e.action_space.sample()] * 15
    if action_type == "continuous":
        policies += [lambda e: np.array([-1.0], np.float32), lambda e: np.array([1.0], np.float32)]
    else:
        policies += [lambda e: 0, lambda e: e.action_space.n - 1]
    for policy in policies:
        observations, _, info = _episode(env, policy)
        assert info["feasible"]
        costs = digits_evaluator.cost_model(automlprune.Candidate.from_dict(info["candidate"]))
        assert b.bind(digits_evaluator.cost_model.base).met_by(costs)
        assert all(env.observation_space.contains(o) for o in observations)


def test_same_seed_same_episode(digits_evaluator):
    env = LayerWidthEnv(digits_evaluator, "macs=0.5")
    actions = [np.array([a], np.float32) for a in (0.3, -0.2, 0.9, -0.7)]
    runs = []
    for _ in range(2):
        it = iter(actions)
        runs.append(_episode(env, lambda e: next(it), seed=7))
    assert all(np.array_equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    assert runs[0][1] == runs[1][1] and runs[0][2]["candidate"] == runs[1][2]["candidate"]


def test_reward_variants_and_baseline(digits_evaluator):
    plain = LayerWidthEnv(digits_evaluator, "macs=0.5", reward="accuracy")
    amc = LayerWidthEnv(digits_evaluator, "macs=0.5", reward="error_log_macs")
    _, r_plain, info = _episode(plain, lambda e: np.array([0.0], np.float32))
    _, r_amc, _ = _episode(amc, lambda e: np.array([0.0], np.float32))
    acc, macs = info["result"]["accuracy"], info["result"]["macs"]
    assert r_plain == pytest.approx(acc) and r_amc == pytest.approx(-(1 - acc) * np.log(macs))
    shaped = LayerWidthEnv(digits_evaluator, "macs=0.5", reward_baseline=0.5)
    _, first, _ = _episode(shaped, lambda e: np.array([0.0], np.float32))
    assert first == 0.0  # the baseline starts at the first episode's reward


def test_bad_env_options_are_one_sentence(digits_evaluator):
    with pytest.raises(ConfigError, match="unknown reward 'speed'"):
        LayerWidthEnv(digits_evaluator, "macs=0.5", reward="speed")
    with pytest.raises(ConfigError, match="impossible"):
        LayerWidthEnv(digits_evaluator, "macs=0.0001")
    with pytest.raises(ConfigError, match="unknown action type"):
        LayerWidthEnv(digits_evaluator, "macs=0.5", action_type="multi")
    with pytest.raises(ConfigError, match="has no bit choices"):
        LayerWidthEnv(digits_evaluator, "macs=0.5", mode="bits")
    with pytest.raises(ConfigError, match="unknown RL mode 'layers'"):
        LayerWidthEnv(digits_evaluator, "macs=0.5", mode="layers")


@pytest.mark.parametrize("strategy", ["ddpg", pytest.param("ppo", marks=pytest.mark.slow)])
def test_tiny_agent_search_records_evaluations_and_saves_the_agent(strategy, checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["search", "digits-cnn", "--strategy", strategy, "--budget", "macs=0.5", "--evals", "10", "--run-dir", str(run),
                 "--set", f"checkpoint={checkpoint}", "--no-export", "--json", "--option", "warmup=2"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["answers"][0]["evaluations"] == 10 and out["answers"][0]["answer"]["relative"]["macs"] <= 0.5
    agent = run / f"agent-{strategy}-macs0p5-seed0.zip"
    assert agent.is_file()
    code = main(["search", "digits-cnn", "--strategy", strategy, "--budget", "macs=0.5", "--evals", "4", "--seed", "1",
                 "--run-dir", str(run), "--set", f"checkpoint={checkpoint}", "--no-export", "--json",
                 "--option", f"init_agent={agent}"])
    assert code == 0  # a saved agent continues in a new search
    crafted, marker = _crafted_agent(agent, tmp_path)
    code = main(["search", "digits-cnn", "--strategy", strategy, "--budget", "macs=0.5", "--evals", "2", "--seed", "2",
                 "--run-dir", str(run), "--set", f"checkpoint={checkpoint}", "--no-export", "--json",
                 "--option", f"init_agent={crafted}"])
    assert code == 0 and not marker.exists()  # only tensors are read from an agent file: its pickled data never runs


class _WritesAMarker:
    """Unpickling this creates a file: what a crafted agent would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def _crafted_agent(agent, tmp_path):
    """A copy of the agent .zip whose pickled data would create a marker file if unpickled."""
    import base64
    import pickle
    import zipfile

    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.zip"
    with zipfile.ZipFile(agent) as src, zipfile.ZipFile(crafted, "w") as dst:
        for item in src.infolist():
            payload = src.read(item.filename)
            if item.filename == "data":
                data = json.loads(payload)
                data["learning_rate"] = {":type:": "<class 'function'>",
                                         ":serialized:": base64.b64encode(pickle.dumps(_WritesAMarker(marker))).decode()}
                payload = json.dumps(data).encode()
            dst.writestr(item, payload)
    return crafted, marker


@pytest.mark.parametrize("extra,message", [
    (["--strategy", "a2c"], "unknown strategy 'a2c'"),
    (["--strategy", "ddpg", "--option", "reward=speed"], "unknown reward 'speed'"),
    (["--strategy", "ddpg", "--option", "action_type=discrete"], "needs continuous actions"),
    (["--strategy", "ddpg", "--option", "gamma_max=1"], "does not take the options"),
    (["--strategy", "ppo", "--option", "reward_assignment=every_step"], "use it with ddpg, td3 or sac"),
    (["--strategy", "ddpg", "--option", "reward_assignment=first"], "must be last or every_step"),
])
def test_bad_agent_options_exit_2(extra, message, checkpoint, tmp_path, capsys):
    code = main(["search", "digits-cnn", "--run-dir", str(tmp_path / "r"), "--evals", "3", "--set", f"checkpoint={checkpoint}", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("action_type", ["continuous", "discrete"])
def test_a_demonstrated_episode_reproduces_its_candidate(action_type, digits_evaluator, digits_space):
    env = LayerWidthEnv(digits_evaluator, "macs=0.5", action_type=action_type)
    grid = digits_space.config.ratios
    wanted = automlprune.Candidate.make({g: grid[(i * 3) % 4] for i, g in enumerate(env.groups)})  # varied, at most 1/2
    assert parse_budget("macs=0.5").bind(digits_evaluator.cost_model.base).met_by(digits_evaluator.cost_model(wanted))
    env.demonstrate([wanted])
    _, _, info = _episode(env, lambda e: e.demonstration_action())
    got = automlprune.Candidate.from_dict(info["candidate"]).ratio_map  # a feasible demonstration is replayed exactly
    assert got == pytest.approx({g: wanted.ratio_map.get(g, 1.0) for g in env.groups}, abs=1e-6)
    env.reset()
    assert env.demonstration is None and env.demonstration_action() is None  # one episode per queued candidate


@pytest.mark.parametrize("action_type", ["continuous", "discrete"])
def test_behaviour_cloning_makes_a_policy_propose_around_the_demonstration(action_type, digits_evaluator, digits_space):
    import stable_baselines3 as sb3
    import torch

    from automlprune.rl.agents import imitate

    evaluated = []
    env = LayerWidthEnv(None, "macs=0.5", action_type=action_type, space=digits_space,
                        cost_model=digits_evaluator.cost_model, reward_source=evaluated.append)
    grid = digits_space.config.ratios
    wanted = automlprune.Candidate.make({g: grid[(i * 3) % 4] for i, g in enumerate(env.groups)})
    observations, actions = env.demonstration_episode(wanted)
    assert len(observations) == len(env.groups) and not evaluated and env._t == 0  # nothing evaluated, env left reset
    policy = sb3.PPO("MlpPolicy", env, seed=0, device="cpu", policy_kwargs={"net_arch": [32]}).policy
    imitate(policy, observations, actions, env.action_space, steps=300)
    with torch.no_grad():
        chosen = policy.get_distribution(torch.as_tensor(observations)).mode().numpy().reshape(-1)
    ratios = [env.action_to_ratio(a) for a in chosen]  # the policy's most likely action at each demonstrated state
    step = grid[1] - grid[0]  # continuous actions land between grid points (the space rounds them later)
    assert ratios == pytest.approx([wanted.ratio_map.get(g, 1.0) for g in env.groups], abs=1e-6 if action_type == "discrete" else step / 4)


def test_ppo_starts_from_the_best_warm_start_by_default_and_only_ppo_imitates(tmp_path, trained_digits_model, digits_space, digits):
    import torch

    from conftest import search_with
    from automlprune.errors import ConfigError
    from automlprune.search import STRATEGIES

    agent, outcome, _, store = search_with(tmp_path, STRATEGIES.get("ppo"), trained_digits_model, digits_space, digits,
                                           "macs=0.5", max_evals=4, warm_start="uniform,prunenet")
    study = store.study(store.study_names()[-1])
    trials = [t for t in study.trials if t.user_attrs.get("evaluated")]
    best_start = max(trials[:2], key=lambda t: t.values[0])  # the two warm starts come first
    observations, actions = agent.env.demonstration_episode(automlprune.Candidate.from_dict(best_start.user_attrs["candidate"]))
    with torch.no_grad():  # no PPO update yet (4 episodes per update): the policy is the cloned one
        chosen = agent.agent.policy.get_distribution(torch.as_tensor(observations)).mode().numpy().reshape(-1)
    assert chosen.tolist() == actions.reshape(-1).tolist()  # its most likely action is the best warm start's, step by step
    fresh, _, _, _ = search_with(tmp_path / "fresh", STRATEGIES.get("ppo"), trained_digits_model, digits_space, digits,
                                 "macs=0.5", max_evals=4, warm_start="uniform,prunenet", imitate=False)
    with torch.no_grad():
        chosen = fresh.agent.policy.get_distribution(torch.as_tensor(observations)).mode().numpy().reshape(-1)
    assert chosen.tolist() != actions.reshape(-1).tolist()  # imitate=false: the policy AMC's agents start from
    with pytest.raises(ConfigError, match="option imitate is PPO's"):
        STRATEGIES.get("ddpg").check_options({"imitate": True})


@pytest.mark.parametrize("strategy", ["ddpg", "ppo"])
def test_rl_searches_start_from_the_allocators_answers(strategy, tmp_path, trained_digits_model, digits_space, digits):
    from conftest import search_with
    from automlprune.search import STRATEGIES
    from automlprune.search.warm_start import warm_start_candidates

    agent, outcome, _, store = search_with(tmp_path, STRATEGIES.get(strategy), trained_digits_model, digits_space, digits,
                                           "macs=0.5", max_evals=5, warm_start="uniform,prunenet", warmup=1)
    starts = warm_start_candidates(agent, ["uniform", "prunenet"])
    study = store.study(store.study_names()[-1])
    trials = [t for t in study.trials if t.user_attrs.get("evaluated")]
    assert len(trials) == 5 and len(starts) == 2
    assert [t.user_attrs["candidate"] for t in trials[:2]] == [c.to_dict() for c in starts]  # first, counted in the budget
    assert all("repaired" not in t.user_attrs for t in trials[:2])  # evaluated as the allocators answered
    assert all("repaired" in t.user_attrs for t in trials[2:])  # the agent's own episodes are moved to the budget
    if strategy == "ddpg":  # replayed: the agent's replay buffer holds the first answer's actions as its first episode
        env, buffer = agent.env, agent.agent.replay_buffer
        ratios = [env.min_ratio + (float(a) + 1) / 2 * (1 - env.min_ratio) for a in buffer.actions[:len(env.groups), 0, 0]]
        assert ratios == pytest.approx([starts[0].ratio_map.get(g, 1.0) for g in env.groups], abs=1e-5)


@pytest.mark.parametrize("assignment", ["last", "every_step"])
def test_reward_assignment(assignment, tmp_path, trained_digits_model, digits_space, digits):
    from conftest import search_with
    from automlprune.search import STRATEGIES

    agent, *_ = search_with(tmp_path, STRATEGIES.get("ddpg"), trained_digits_model, digits_space, digits, "macs=0.5",
                            max_evals=2, warm_start="none", warmup=1, reward_assignment=assignment, reward_baseline=None)
    steps = len(agent.env.decisions)
    rewards = agent.agent.replay_buffer.rewards[:steps, 0]
    assert rewards[-1] != 0
    if assignment == "every_step":  # AMC: every transition of the episode carries its final reward
        assert np.all(rewards == rewards[-1])
    else:
        assert np.all(rewards[:-1] == 0)
