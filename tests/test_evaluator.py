import pytest
import torch
from torch import nn

from automlprune.evaluator import Evaluator, recalibrate_batchnorm
from automlprune.tasks import EvalSettings, FinetuneSettings
from automlprune.accuracy import accuracy


@pytest.fixture(scope="module")
def evaluator(trained_digits_model, digits_space, digits):
    return Evaluator(trained_digits_model, digits_space, digits, EvalSettings(bn_batches=4, bn_batch_size=64))


def test_full_candidate_without_bn_recalibration_scores_the_model_itself(trained_digits_model, digits_space, digits, evaluator):
    plain = Evaluator(trained_digits_model, digits_space, digits, EvalSettings(bn_recalibration=False))
    result = plain.evaluate(digits_space.full())
    assert result.accuracy == accuracy(trained_digits_model, evaluator.val_batches)[1]
    assert result.relative == {"macs": 1.0, "params": 1.0, "bytes": 1.0, "bitops": 1.0, "macs_nnz": 1.0}


def test_result_record_has_accuracy_costs_and_time(evaluator, digits_space):
    result = evaluator.evaluate(digits_space.uniform(0.75))
    assert 0 <= result.accuracy <= 1 and result.top5 is None  # 10 classes: no top-5
    assert result.costs.macs < evaluator.cost_model.base.macs and result.seconds > 0
    record = result.to_dict()
    assert {"accuracy", "macs", "flops", "params", "bytes", "bitops", "relative", "seconds", "candidate"} <= set(record)


def test_results_are_cached_by_candidate_key(evaluator, digits_space):
    first = evaluator.evaluate(digits_space.uniform(0.5))
    count = len(evaluator)
    assert evaluator.evaluate(digits_space.uniform(0.5)) is first
    assert len(evaluator) == count


def test_evaluation_is_deterministic_under_a_seed(trained_digits_model, digits_space, digits):
    settings = EvalSettings(bn_batches=2, bn_batch_size=32)
    a = Evaluator(trained_digits_model, digits_space, digits, settings, seed=3).evaluate(digits_space.uniform(0.375))
    b = Evaluator(trained_digits_model, digits_space, digits, settings, seed=3).evaluate(digits_space.uniform(0.375))
    assert a.accuracy == b.accuracy


def test_accuracy_drops_as_the_network_shrinks(evaluator, digits_space):
    accs = [evaluator.evaluate(digits_space.uniform(r)).accuracy for r in (1.0, 0.5, 0.125)]
    assert accs[0] > 0.9 and accs[0] >= accs[1] >= accs[2]


def test_bn_recalibration_sets_exact_batch_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Dropout(0.5)).eval()
    batches = [(torch.randn(8, 1, 6, 6), torch.zeros(8)) for _ in range(3)]
    recalibrate_batchnorm(net, batches)
    with torch.no_grad():
        feats = torch.cat([net[0](x) for x, _ in batches])
    assert torch.allclose(net[1].running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    assert not net[1].training and not net[2].training and net[1].momentum == 0.1


def test_bn_recalibration_is_on_by_default_and_changes_pruned_accuracy(trained_digits_model, digits_space, digits):
    cand = digits_space.uniform(0.5)
    on = Evaluator(trained_digits_model, digits_space, digits).evaluate(cand)
    off = Evaluator(trained_digits_model, digits_space, digits, EvalSettings(bn_recalibration=False)).evaluate(cand)
    assert EvalSettings().bn_recalibration and on.accuracy != off.accuracy


def test_latency_is_measured_on_request(evaluator, digits_space):
    result = evaluator.evaluate(digits_space.uniform(0.625), latency=True)
    assert set(result.measured_latency_ms) == {1, 64} and all(v > 0 for v in result.measured_latency_ms.values())
    assert evaluator.evaluate(digits_space.uniform(0.625)).measured_latency_ms is not None  # cached with latency


def test_latency_asked_later_is_measured_without_evaluating_again(evaluator, digits_space):
    first = evaluator.evaluate(digits_space.uniform(0.875))
    later = evaluator.evaluate(digits_space.uniform(0.875), latency=True)
    assert first.measured_latency_ms is None and set(later.measured_latency_ms) == {1, 64}
    assert (later.accuracy, later.seconds, later.costs) == (first.accuracy, first.seconds, first.costs)


def test_finetune_recovers_accuracy_and_reports_test_accuracy(evaluator, digits_space):
    cand = digits_space.uniform(0.5)
    before = evaluator.evaluate(cand).accuracy
    tuned = evaluator.finetune(cand, FinetuneSettings(epochs=4, lr=0.02, distill=True), progress=False)
    assert tuned.val_accuracy > before and tuned.test_accuracy > 0.85
    assert sum(p.numel() for p in tuned.model.parameters()) == evaluator.cost_model(cand).params
