"""Shared fixtures: the digits task (embedded data) and a baseline trained for a few seconds."""

from __future__ import annotations

import os

import pytest
import torch

from automlprune.data import load_dataset
from automlprune.models import build_model
from automlprune.space import SearchSpace
from automlprune.train import Recipe, fit

torch.set_num_threads(2)

# (model name, input size, kwargs): every zoo family plus the torchvision models the issue names.
# The deeper members of each family run in the slow set (-m slow); each family keeps a fast one.
_slow = pytest.mark.slow
ZOO_CASES = [
    ("digits_cnn", 8, {}),
    ("resnet20", 16, {}),
    pytest.param("resnet32", 16, {}, marks=_slow, id="resnet32"),
    pytest.param("resnet56", 16, {}, marks=_slow, id="resnet56"),
    ("vgg11_bn", 32, {}),
    pytest.param("vgg16_bn", 32, {}, marks=_slow, id="vgg16_bn"),
    ("mobilenet_v2", 32, {}),
    ("torchvision:resnet18", 32, {}),
    pytest.param("torchvision:mobilenet_v2", 32, {}, marks=_slow, id="torchvision:mobilenet_v2"),
]
ZOO_IDS = [case.id if hasattr(case, "id") else case[0] for case in ZOO_CASES]


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BN non-trivial statistics and affine parameters, so masking tests are real."""
    from automlprune.nn.randomize import randomize_norms

    return randomize_norms(model, seed, spread=1.0)


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def trained_digits_model(digits):
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, 1)
    fit(model, digits, torch.device("cpu"), Recipe(epochs=12, batch_size=64, lr=0.05), progress=False)
    return model.eval()


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory):
    """The digits task's baseline checkpoint, trained once per test session through the CLI
    (6 epochs); tests pass it with ``--set checkpoint=PATH``."""
    from automlprune.cli.main import main

    path = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    assert main(["train", "digits-cnn", "--set", f"checkpoint={path}", "--set", "train.epochs=6", "--json"]) == 0
    return path


@pytest.fixture(scope="session")
def checkpoint(digits_checkpoint):
    """The shared digits checkpoint (:func:`digits_checkpoint`)."""
    return digits_checkpoint


def assert_drawn(path, min_ink: float = 0.01, min_colors: int = 3) -> None:
    """The PNG at ``path`` holds a drawing: at least ``min_ink`` of its pixels differ from the
    background (the most common colour) and it uses at least ``min_colors`` colours. A blank
    or empty figure fails."""
    import matplotlib.image
    import numpy as np

    image = matplotlib.image.imread(str(path))[..., :3]
    pixels = (image.reshape(-1, 3) * 255).round().astype(np.uint8)
    colors, counts = np.unique(pixels, axis=0, return_counts=True)
    ink = 1 - counts.max() / counts.sum()
    assert ink >= min_ink and len(colors) >= min_colors, f"{path} looks blank ({ink:.2%} ink, {len(colors)} colours)"


@pytest.fixture(scope="session")
def digits_space(trained_digits_model, digits):
    return SearchSpace(trained_digits_model, digits.example_input())


@pytest.fixture(scope="session")
def digits_evaluator(trained_digits_model, digits_space, digits):
    from automlprune.evaluator import Evaluator
    from automlprune.tasks import EvalSettings

    return Evaluator(trained_digits_model, digits_space, digits, EvalSettings(bn_batches=2, bn_batch_size=64))


def run_search(tmp_path, model, space, data, strategy, budget="macs=0.5", seed=0, max_evals=8, run_name="run", evaluator=None,
               options=None):
    """One search with a fresh evaluator (so its cache counts this search's evaluations only)."""
    from automlprune.evaluator import Evaluator
    from automlprune.search import STRATEGIES
    from automlprune.search.base import SearchContext, run_strategy
    from automlprune.search.budget import parse_budget
    from automlprune.search.store import RunStore
    from automlprune.search.tolerance import build_strategy
    from automlprune.tasks import EvalSettings

    if evaluator is None:
        settings = STRATEGIES.get(strategy).evaluation_settings(EvalSettings(bn_batches=2, bn_batch_size=64))
        evaluator = Evaluator(model, space, data, settings)
    store = RunStore(tmp_path / run_name)
    b = parse_budget(budget)
    study = store.study(RunStore.study_name(strategy, b.label, seed), {"strategy": strategy, "budget": b.label, "seed": seed})
    context = SearchContext(space, evaluator.cost_model, study, evaluator.scores, model, data=data,
                            scores_under=evaluator.scores_under, validation=evaluator.validation_accuracy)
    b = b.with_reference(evaluator.evaluate(space.full()).accuracy) if b.tolerance else b  # the runner's binding
    instance = build_strategy(STRATEGIES.get(strategy), context, b, seed, max_evals, options or {})
    outcome = run_strategy(instance, evaluator, store, study, max_evals=max_evals)
    return outcome, store, study, evaluator


def search_with(run_dir, cls, model, space, data, budget, max_evals=None, **options):
    """One search of the strategy class ``cls`` (options as given) with a fresh evaluator and
    store in ``run_dir``, ``max_evals`` evaluations (3 unless given; given, the strategy is told
    too): (strategy, outcome, evaluator, store)."""
    from automlprune.evaluator import Evaluator
    from automlprune.search.base import SearchContext, run_strategy
    from automlprune.search.budget import parse_budget
    from automlprune.search.store import RunStore
    from automlprune.search.tolerance import build_strategy
    from automlprune.tasks import EvalSettings

    evaluator = Evaluator(model, space, data, EvalSettings(bn_batches=2, bn_batch_size=64))
    store = RunStore(run_dir)
    study = store.study(f"{cls.name}|{budget}|seed0", {"strategy": cls.name, "budget": budget, "seed": 0})
    context = SearchContext(space, evaluator.cost_model, study, evaluator.scores, model, store.artifacts, data,
                            scores_under=evaluator.scores_under, validation=evaluator.validation_accuracy)
    parsed = parse_budget(budget)
    parsed = parsed.with_reference(evaluator.evaluate(space.full()).accuracy) if parsed.tolerance else parsed  # the runner's binding
    strategy = build_strategy(cls, context, parsed, 0, max_evals or 50, options)
    return strategy, run_strategy(strategy, evaluator, store, study, max_evals=max_evals or 3), evaluator, store


def crash_once(monkeypatch, cls, method: str, at_step: int) -> None:
    """Make ``cls.method(self, trainer)`` raise KeyboardInterrupt once, at optimizer step
    ``at_step`` (a machine going down mid-training); later calls behave normally."""
    original = getattr(cls, method)
    crashed = {"done": False}

    def wrapper(self, trainer):
        if trainer.step == at_step and not crashed["done"]:
            crashed["done"] = True
            raise KeyboardInterrupt("the machine went down")
        return original(self, trainer)

    monkeypatch.setattr(cls, method, wrapper)


def _postgres_programs():
    """The directory holding PostgreSQL's initdb and pg_ctl, or None."""
    import glob
    import shutil

    found = shutil.which("initdb") and shutil.which("pg_ctl")
    if found:
        return os.path.dirname(os.path.realpath(shutil.which("pg_ctl")))
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.isfile(os.path.join(folder, "pg_ctl")):
            return folder
    return None


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server on the loopback address for this test session (a fresh
    cluster, trust authentication), as a SQLAlchemy URL. Skipped with the reason where the server
    programs are missing, unless AUTOMLPRUNE_REQUIRE_POSTGRES is set (CI), where that fails."""
    import socket
    import subprocess

    required = bool(os.environ.get("AUTOMLPRUNE_REQUIRE_POSTGRES"))
    programs = _postgres_programs()
    if programs is None:
        message = "PostgreSQL's server programs (initdb, pg_ctl) are not installed: apt-get install postgresql"
        pytest.fail(message) if required else pytest.skip(message)
    import shutil
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp(prefix="automlprune-postgres-"))  # under /tmp: reachable by the postgres user
    data = root / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres user
        os.chmod(root, 0o777)
        as_user = ["runuser", "-u", "postgres", "--"]
    run = lambda *args: subprocess.run([*as_user, *args], capture_output=True, text=True)  # noqa: E731
    init = run(os.path.join(programs, "initdb"), "-D", str(data), "-U", "automlprune", "--auth=trust")
    start = run(os.path.join(programs, "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start") if init.returncode == 0 else init
    if start.returncode != 0:
        message = f"the PostgreSQL test server did not start: {(start.stderr or start.stdout).strip()[-300:]}"
        pytest.fail(message) if required else pytest.skip(message)
    yield f"postgresql+psycopg://automlprune@127.0.0.1:{port}/postgres"
    run(os.path.join(programs, "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
    shutil.rmtree(root, ignore_errors=True)


def evaluated_trials(run_dir, study_prefix: str) -> int:
    """Stored evaluations of the first study of the run whose name starts with ``study_prefix``,
    read as a report command reads a run (``RunStore(create=False)``: it waits for a worker
    creating the storage); 0 while the storage or the study does not exist yet."""
    from automlprune.errors import ConfigError
    from automlprune.search.store import RunStore

    try:
        store = RunStore(run_dir, create=False)
    except ConfigError:
        return 0
    name = next((n for n in store.study_names() if n.startswith(study_prefix)), None)
    return 0 if name is None else len(store.records(store.find_study(name)))
