"""The shared evaluator: the one place where a candidate gets its accuracy and costs.

Every strategy goes through :meth:`Evaluator.evaluate`, so comparisons are fair and every
evaluation can be recorded. Results are cached by candidate key and deterministic under
the evaluator's seed (the same BN-recalibration and validation batches for every candidate).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import nn

from automlprune.cost import Costs, CostModel, relative_costs
from automlprune.data import DataSplits, cached_batches
from automlprune.errors import ConfigError
from automlprune.importance import channel_scores, order_from_scores
from automlprune.latency import measure_latencies, measure_latency
from automlprune.materialize import materialize
from automlprune.quantization import ActivationFakeQuant, quantization_aware
from automlprune.reconstruction import Reconstruction
from automlprune.space.candidate import Candidate
from automlprune.space.search_space import SearchSpace
from automlprune.tasks import EvalSettings, FinetuneSettings
from automlprune.training import accuracy, fit, split_accuracy


RECONSTRUCTIONS = ("none", "least_squares")


@dataclass(frozen=True)
class EvalResult:
    """What one evaluation measured.

    accuracy / top5: fractions in [0, 1] on the validation subset (top5 only when classes > 10);
    costs: see :mod:`automlprune.cost`; relative: each cost over the full network's;
    seconds: wall time of the accuracy evaluation (latency measurement excluded); measured_latency_ms: {batch size: median ms} when asked for
    (``costs.latency_ms`` is the latency table's prediction, when one is attached).
    """

    candidate: Candidate
    accuracy: float
    top5: float | None
    costs: Costs
    relative: dict[str, float]
    seconds: float
    measured_latency_ms: dict[int, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate.to_dict(), "accuracy": self.accuracy, "top5": self.top5,
                **self.costs.to_dict(), "flops": self.costs.flops,
                "relative": self.relative, "seconds": self.seconds,
                "latency_measured_ms": {str(k): v for k, v in self.measured_latency_ms.items()} if self.measured_latency_ms else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalResult":
        """Inverse of :meth:`to_dict` (used to restore stored results when a run resumes)."""
        latency = data.get("latency_measured_ms")
        return cls(Candidate.from_dict(data["candidate"]), data["accuracy"], data.get("top5"),
                   Costs.from_dict(data), dict(data["relative"]), data["seconds"],
                   {int(k): v for k, v in latency.items()} if latency else None)


@dataclass(frozen=True)
class FinetuneResult:
    """A fine-tuned network and its accuracies (fractions) on validation and test splits."""

    candidate: Candidate
    val_accuracy: float
    test_accuracy: float
    epochs: int
    seconds: float
    model: nn.Module = field(repr=False, compare=False)


class Evaluator:
    """Scores candidates of ``space`` for the trained ``model`` on ``data``.

    The validation subset and the BN-recalibration batches (unaugmented training images,
    chosen with ``seed``) are drawn once and kept on ``device``.
    """

    def __init__(self, model: nn.Module, space: SearchSpace, data: DataSplits, settings: EvalSettings | None = None,
                 device: torch.device | str = "cpu", seed: int = 0, cost_model: CostModel | None = None) -> None:
        self.settings = settings or EvalSettings()
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.space = space
        self.data = data
        self.seed = seed
        self.cost_model = cost_model or CostModel(space, self.model)
        self.topk = (1, 5) if data.num_classes > 10 else (1,)
        s = self.settings
        self.val_batches = cached_batches(data.val, data, s.batch_size, self.device, max_samples=s.val_samples)
        self.bn_batches = cached_batches(data.train, data, s.bn_batch_size, self.device,
                                         max_samples=s.bn_batches * s.bn_batch_size, seed=seed, shuffle=True)
        start = time.perf_counter()
        self.scores = channel_scores(self.model, space, s.criterion, self.bn_batches, s.criterion_combine, seed)  # data: BN batches
        self.order = order_from_scores(self.scores)
        if s.reconstruction not in RECONSTRUCTIONS:
            raise ConfigError(f"evaluation.reconstruction '{s.reconstruction}' is unknown; use one of: {', '.join(RECONSTRUCTIONS)}")
        self.reconstruction = (Reconstruction.collect(self.model, space, self.bn_batches)
                               if s.reconstruction == "least_squares" else None)
        self.scoring_seconds = time.perf_counter() - start
        """Wall time of the importance scores (and reconstruction statistics): once per evaluator."""
        self._cache: dict[str, EvalResult] = {}

    def prime(self, results: list[EvalResult]) -> None:
        """Put already-measured results (e.g. from a run store) in the cache."""
        for result in results:
            self._cache.setdefault(result.candidate.key, result)

    def __len__(self) -> int:
        """Number of distinct candidates evaluated so far."""
        return len(self._cache)

    def network(self, candidate: Candidate) -> nn.Module:
        """The materialized network of ``candidate``, BN statistics re-estimated when configured, in
        eval mode; with activation bits below 32, its layer inputs quantized over ranges calibrated
        on the BN batches (see :mod:`automlprune.quantization`)."""
        net = materialize(self.model, candidate, self.space, self.order, self.reconstruction)
        if self.settings.bn_recalibration:
            recalibrate_batchnorm(net, self.bn_batches)
        if self.space.config.activation_bits < 32:
            ActivationFakeQuant(net, self.space.quantizable, self.space.config.activation_bits).calibrate(self.bn_batches)
        return net.eval()

    def evaluate(self, candidate: Candidate, latency: bool = False) -> EvalResult:
        """Accuracy and costs of ``candidate`` (cached by network: the result holds the canonical
        candidate, see :meth:`SearchSpace.canonical`; latency measured when asked for)."""
        candidate = self.space.canonical(self.space.validate(candidate))
        cached = self._cache.get(candidate.key)
        if cached is not None and (cached.measured_latency_ms is not None or not latency):
            return cached
        start = time.perf_counter()
        net = self.network(candidate)
        if cached is None:
            costs = self.cost_model(candidate)
            acc = accuracy(net, self.val_batches, self.topk)
            result = EvalResult(candidate, acc[1], acc.get(5), costs, relative_costs(costs, self.cost_model.base),
                                time.perf_counter() - start)
        else:  # accuracy already known: only the latency is missing
            result = cached
        if latency:
            result = replace(result, measured_latency_ms=self._measure(net))
        self._cache[candidate.key] = result
        return result

    def _measure(self, net: nn.Module) -> dict[int, float]:
        return measure_latency(net, self.data.example_input().shape[1:], self.settings.latency_batch_sizes, self.device)

    def latencies(self, networks: Sequence[nn.Module]) -> list[dict[int, float]]:
        """Latency of several networks on this task's inputs, batch sizes and device, timed together
        in interleaved rounds so their ratios hold (ms per batch size; see :func:`measure_latencies`)."""
        return measure_latencies(networks, self.data.example_input().shape[1:], self.settings.latency_batch_sizes, self.device)

    def int8(self, candidate: Candidate, network: nn.Module | None = None) -> dict[str, Any]:
        """For a candidate with every Conv2d/Linear layer at 8 bits: PyTorch's own int8 network of
        it (x86 backend, calibrated on the BN batches) with its validation accuracy and measured
        CPU latency (ms per batch size), next to the float32 network's. ``network`` (e.g. a
        fine-tuned one) replaces the materialized network. Returns {"int8": {...}, "float32": {...}, "model"}."""
        from automlprune.int8 import all_eight_bit, int8_network

        if not all_eight_bit(self.space.weight_bits(candidate)):
            raise ConfigError("a real int8 network needs every Conv2d/Linear layer at 8 bits; "
                              "give the candidate 8 bits everywhere (e.g. a space with bits.choices [8])")
        float_net = (network or self.network(candidate)).cpu().eval()
        quantized = int8_network(float_net, self.data.example_input(), [(x.cpu(), y) for x, y in self.bn_batches])
        cpu_val = [(x.cpu(), y.cpu()) for x, y in self.val_batches]
        shape = self.data.example_input().shape[1:]
        out = {}
        for label, net in (("float32", float_net), ("int8", quantized)):
            out[label] = {"accuracy": accuracy(net, cpu_val, (1,))[1],
                          "latency_ms": measure_latency(net, shape, self.settings.latency_batch_sizes, "cpu")}
        out["model"] = quantized
        float_net.to(self.device)
        return out

    def finetune(self, candidate: Candidate, settings: FinetuneSettings | None = None, progress: bool = True) -> FinetuneResult:
        """Fine-tune the materialized network of ``candidate`` (distilling from the unpruned
        network when configured) and report its validation and test accuracy. Quantized layers
        are fine-tuned quantization-aware (straight-through estimator): the returned network's
        weights are still on their bit grids."""
        s = settings or FinetuneSettings()
        start = time.perf_counter()
        net = self.network(candidate)
        with quantization_aware(net, self.space.weight_bits(candidate), self.space.config.bit_scheme):
            fit(net, self.data, self.device, epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, momentum=s.momentum,
                weight_decay=s.weight_decay, seed=s.seed, teacher=self.model if s.distill else None,
                distill_alpha=s.distill_alpha, distill_temperature=s.distill_temperature,
                description="finetune", progress=progress, steps_per_epoch=s.steps_per_epoch)
        return FinetuneResult(candidate, split_accuracy(net, self.data.val, self.data, self.device),
                              split_accuracy(net, self.data.test, self.data, self.device), s.epochs,
                              time.perf_counter() - start, net)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Re-estimate every BatchNorm's running mean/var as the plain average over ``batches``
    (adaptive BN, Li et al., 'EagleEye', ECCV 2020); other layers stay in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not batches:
        return
    model.eval()
    saved = []
    for bn in norms:
        saved.append(bn.momentum)
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average = exact mean over the batches
        bn.train()
    for x, _ in batches:
        model(x)
    for bn, momentum in zip(norms, saved):
        bn.momentum = momentum
        bn.eval()
