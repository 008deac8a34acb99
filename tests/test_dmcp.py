"""DMCP: channel reordering, Markov gates, expected cost, the training strategy."""

import pytest
import torch

from automlprune.cost import CostModel
from automlprune.nn.gates import ChannelScaler
from automlprune.nn.reorder import reorder_channels_
from automlprune.search.dmcp import MarkovGates
from automlprune.train.regularizers import budget_loss
from automlprune.errors import ConfigError
from automlprune.importance import channel_order
from automlprune.materialize import materialize
from automlprune.models import build_model
from automlprune.search.base import SearchContext
from automlprune.search.budget import parse_budget
from automlprune.search.dmcp import DMCPStrategy
from automlprune.space import Candidate, SearchSpace

from conftest import randomize_batchnorm


@pytest.mark.parametrize("name,size", [("digits_cnn", 8), ("resnet20", 16), ("mobilenet_v2", 32)])
def test_reordering_channels_leaves_the_output_unchanged(name, size):
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(name, 10, 3 if name != "digits_cnn" else 1))
    x = torch.randn(4, model_in := (3 if name != "digits_cnn" else 1), size, size)
    space = SearchSpace(model, x[:1])
    order = channel_order(model, space, "random", seed=3)
    reordered = randomize_batchnorm(build_model(name, 10, model_in))
    reordered.load_state_dict(model.state_dict())
    reorder_channels_(reordered, space, order)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), reordered.state_dict().values()))
    with torch.no_grad():
        torch.testing.assert_close(reordered(x), model(x), atol=1e-5, rtol=1e-5)
    # keeping the first k channels of the reordered net = materializing the candidate with that order
    candidate = space.uniform(0.5)
    widths = dict(zip([g.name for g in space.groups], space.kept_channels(candidate).tolist()))
    gated = [g for g in space.prunable]
    scaler = ChannelScaler(reordered, space, gated)
    scaler.set(scaler.masks({g: widths[g] for g in gated}))
    with torch.no_grad():
        torch.testing.assert_close(reordered(x), materialize(model, candidate, space, order)(x), atol=1e-4, rtol=1e-4)
    scaler.remove()


def test_expected_cost_at_hard_gates_is_the_exact_cost(trained_digits_model, digits_space):
    cost_model = CostModel(digits_space, trained_digits_model)
    gates = MarkovGates(digits_space, block_size=3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        blocks = gates.sample_blocks(generator, uniform=True)
        hard = [torch.tensor([1.0] * b + [0.0] * (len(s) - b)) for s, b in zip(gates.sizes, blocks)]
        widths = gates.widths_of_blocks(blocks)
        candidate = Candidate.make({g: w / digits_space.group_by_name[g].channels for g, w in widths.items()})
        expected = cost_model.from_kept(gates.expected_kept(hard))
        exact = cost_model(candidate)
        for metric in ("macs", "params", "bytes"):
            assert float(expected[metric]) == pytest.approx(exact[metric], rel=1e-9)
    # and the soft expectation is differentiable in the alphas
    gates.expected_cost(cost_model, "macs").backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in gates.alphas)


def test_marginals_are_products_of_transitions(digits_space):
    gates = MarkovGates(digits_space, block_size=4)
    with torch.no_grad():
        gates.alphas[0].copy_(torch.linspace(-1, 2, len(gates.alphas[0])))
    p = torch.sigmoid(gates.alphas[0])
    m = gates.marginals()[0]
    assert m[0] == 1
    torch.testing.assert_close(m[1:], torch.cumprod(p, 0))
    assert all(sizes[0] >= 1 and sum(sizes) == digits_space.group_by_name[n].channels for n, sizes in zip(gates.names, gates.sizes))


def test_budget_losses():
    t = 0.5
    assert budget_loss("band", torch.tensor(0.49), t) == 0
    assert budget_loss("band", torch.tensor(0.5), t) == 0
    assert budget_loss("band", torch.tensor(0.6), t) > 0 and budget_loss("band", torch.tensor(0.4), t) > 0
    for kind in ("l2", "l1", "log"):
        assert budget_loss(kind, torch.tensor(0.5), t) == 0 and budget_loss(kind, torch.tensor(0.7), t) > 0
    with pytest.raises(ConfigError):
        budget_loss("cubic", torch.tensor(0.5), t)


def _context(model, space, data, run_dir=None):
    from automlprune.evaluator import Evaluator
    from automlprune.tasks import EvalSettings

    evaluator = Evaluator(model, space, data, EvalSettings(bn_batches=2, bn_batch_size=64))
    from automlprune.search.store import Artifacts

    artifacts = Artifacts(run_dir) if run_dir is not None else None
    return SearchContext(space, evaluator.cost_model, None, evaluator.scores, model, artifacts, data), evaluator


def test_short_dmcp_run_meets_its_budget_and_trains_the_alphas(tmp_path, trained_digits_model, digits_space, digits):
    context, evaluator = _context(trained_digits_model, digits_space, digits, tmp_path)
    strategy = DMCPStrategy(context, parse_budget("macs=0.4"), warmup_epochs=1, search_epochs=6, batch_size=64)
    proposal = strategy.ask()
    candidate = proposal.candidate
    assert not proposal.trained  # DMCP's documented choice: its widths are judged on the original weights
    assert strategy.ask() is None
    assert strategy.feasible(candidate)
    assert all(a.grad is not None for a in strategy.gates.alphas)
    assert all((a.detach() != 2.0).any() for a in strategy.gates.alphas)
    log = strategy.history_log
    assert [e["phase"] for e in log] == ["warmup"] + ["search"] * 6
    assert abs(log[-1]["expected_cost_fraction"] - 0.4) < abs(log[0]["expected_cost_fraction"] - 0.4)
    assert (tmp_path / "dmcp-macs0p4-seed0.json").is_file()
    # a second budget in the same run reuses the warm-up weights
    other = DMCPStrategy(context, parse_budget("macs=0.6"), warmup_epochs=1, search_epochs=6, batch_size=64)
    assert other.feasible(other.ask().candidate)
    assert other.spent["warmup_reused"] == 1.0 and strategy.spent["warmup_reused"] == 0.0
    sampled = DMCPStrategy(context, parse_budget("macs=0.4"), warmup_epochs=1, search_epochs=6, batch_size=64, extract="sample", grid=True)
    grid_answer = sampled.ask().candidate
    assert sampled.feasible(grid_answer)
    assert set(grid_answer.ratio_map.values()) <= set(digits_space.config.ratios)


def test_dmcp_refuses_bad_settings(trained_digits_model, digits_space, digits):
    context, _ = _context(trained_digits_model, digits_space, digits)
    with pytest.raises(ConfigError, match="loss"):
        DMCPStrategy(context, parse_budget("macs=0.5"), loss="cubic")
    with pytest.raises(ConfigError, match="differentiable"):
        DMCPStrategy(context, parse_budget("latency=0.5"))
    with pytest.raises(ConfigError, match="does not take"):
        DMCPStrategy(context, parse_budget("macs=0.5"), epochs=3)
