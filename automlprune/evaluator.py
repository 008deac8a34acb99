"""The shared evaluator: the one place where a proposal gets its accuracy and costs.

Every strategy goes through :meth:`Evaluator.evaluate`, so comparisons are fair and every
evaluation can be recorded. A proposal is a candidate with the original weights (channels
chosen by the evaluator's criterion) or with weights a strategy trained
(:mod:`automlprune.proposal`); both are judged the same way. Results are cached by proposal
and deterministic under the evaluator's seed (the same BN-recalibration and validation
batches for every candidate).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import nn

from automlprune.accuracy import accuracy, split_accuracy
from automlprune.cost import Costs, CostModel, relative_costs
from automlprune.data import DataSplits, cached_batches
from automlprune.errors import ConfigError
from automlprune.importance import channel_scores, order_from_scores
from automlprune.latency import measure_latencies, measure_latency
from automlprune.materialize import materialize
from automlprune.proposal import Proposal, as_proposal
from automlprune.quantization import ActivationFakeQuant
from automlprune.reconstruction import Reconstruction
from automlprune.settings import EvalSettings, FinetuneSettings
from automlprune.snapshot_ensemble import SnapshotEnsemble
from automlprune.space.candidate import Candidate
from automlprune.space.search_space import Resolved, SearchSpace
from automlprune.sparsity.criteria import WEIGHT_CRITERIA, weight_scores
from automlprune.sparsity.masks import KeepSparse, realized_masks
from automlprune.train import Trainer
from automlprune.train.callbacks import Distillation, QuantizationAware


RECONSTRUCTIONS = ("none", "least_squares")


@dataclass(frozen=True)
class EvalResult:
    """What one evaluation measured.

    accuracy / top5: fractions in [0, 1] on the validation subset (top5 only when classes > 10);
    costs: see :mod:`automlprune.cost`; relative: each cost over the full network's;
    seconds: wall time of the accuracy evaluation (latency measurement excluded); measured_latency_ms: {batch size: median ms} when asked for
    (``costs["latency"]`` is the latency table's prediction, when one is attached);
    weights: where the weights came from (:meth:`OriginalWeights.describe` / :meth:`TrainedWeights.describe`;
    the run store adds the artifact path of trained weights); key: the evaluator's cache key;
    fidelity: the fraction of the validation samples and BN batches it was scored on (1 = a full
    evaluation; only full evaluations can be a search's answer); screening: the accuracy of the
    cheap first look that promoted a full evaluation (see :mod:`automlprune.search.screening`).
    """

    candidate: Candidate
    accuracy: float
    top5: float | None
    costs: Costs
    relative: dict[str, float]
    seconds: float
    measured_latency_ms: dict[int, float] | None = None
    weights: dict[str, Any] = field(default_factory=lambda: {"source": "original"})
    key: str = ""
    fidelity: float = 1.0
    screening: float | None = None

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", self.candidate.key)

    @property
    def trained(self) -> bool:
        return self.weights.get("source") == "trained"

    @property
    def full(self) -> bool:
        """Whether this is a full-fidelity evaluation (one that may be an answer)."""
        return self.fidelity >= 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate.to_dict(), "accuracy": self.accuracy, "top5": self.top5,
                **self.costs.to_dict(), "flops": self.costs.flops,
                "relative": self.relative, "seconds": self.seconds,
                "latency_measured_ms": {str(k): v for k, v in self.measured_latency_ms.items()} if self.measured_latency_ms else None,
                "weights": dict(self.weights), "key": self.key, "fidelity": self.fidelity, "screening": self.screening}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalResult":
        """Inverse of :meth:`to_dict` (used to restore stored results when a run resumes)."""
        latency = data.get("latency_measured_ms")
        candidate = Candidate.from_dict(data["candidate"])
        return cls(candidate, data["accuracy"], data.get("top5"), Costs.from_dict(data), dict(data["relative"]),
                   data["seconds"], {int(k): v for k, v in latency.items()} if latency else None,
                   dict(data.get("weights") or {"source": "original"}), data.get("key") or candidate.key,
                   float(data.get("fidelity", 1.0)), data.get("screening"))


@dataclass(frozen=True)
class FinetuneResult:
    """A fine-tuned network and its accuracies (fractions) on validation and test splits."""

    candidate: Candidate
    val_accuracy: float
    test_accuracy: float
    epochs: int
    seconds: float
    model: nn.Module = field(repr=False, compare=False)
    steps: int = 0
    images: int = 0


class Evaluator:
    """Scores candidates of ``space`` for the trained ``model`` on ``data``.

    The validation subset and the BN-recalibration batches (unaugmented training images,
    chosen with ``seed``) are drawn once and kept on ``device``. ``teacher``: the network
    fine-tunes distil from (default ``model``; a pipeline's later stages pass the unpruned one).
    """

    def __init__(self, model: nn.Module, space: SearchSpace, data: DataSplits, settings: EvalSettings | None = None,
                 device: torch.device | str = "cpu", seed: int = 0, cost_model: CostModel | None = None,
                 teacher: nn.Module | None = None) -> None:
        self.settings = (settings or EvalSettings()).with_defaults({})  # criterion and reconstruction left None: plain
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.teacher = model if teacher is None else teacher.to(self.device).eval()
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
        self._scores: dict[str, dict[str, torch.Tensor]] = {}
        self.scores = self.scores_under(s.criterion)  # data: BN batches
        self.order = order_from_scores(self.scores)
        if s.reconstruction not in RECONSTRUCTIONS:
            raise ConfigError(f"evaluation.reconstruction '{s.reconstruction}' is unknown; use one of: {', '.join(RECONSTRUCTIONS)}")
        self.reconstruction = (Reconstruction.collect(self.model, space, self.bn_batches)
                               if s.reconstruction == "least_squares" else None)
        self.scoring_seconds = time.perf_counter() - start
        """Wall time of the importance scores (and reconstruction statistics): once per evaluator."""
        self._cache: dict[str, EvalResult] = {}
        self._weight_scores: dict[str, torch.Tensor] | None = None
        WEIGHT_CRITERIA.get(s.weight_criterion)  # an unknown name is refused now, not at the first sparse candidate

    def weight_criterion_for(self, proposal: Proposal) -> str | dict[str, torch.Tensor]:
        """What chooses the weights a sparse layer of ``proposal`` keeps: the weight criterion's
        name when it is computed on the network itself, else its scores of the starting network
        (computed once, on the BN batches; for trained weights, on those weights)."""
        name = self.settings.weight_criterion
        if WEIGHT_CRITERIA.get(name).of_network:
            return name
        if proposal.trained:
            return weight_scores(proposal.weights.model, self.space, name, self.space.quantizable, self.bn_batches)
        if self._weight_scores is None:
            self._weight_scores = weight_scores(self.model, self.space, name, self.space.quantizable, self.bn_batches)
        return self._weight_scores

    def scores_under(self, criterion: str) -> dict[str, torch.Tensor]:
        """Channel scores of every group under ``criterion`` (computed once, on the BN batches,
        with this evaluator's combine rule and seed): what a one-shot allocator with its own
        criterion allocates by when a search starts from its answer."""
        if criterion not in self._scores:
            s = self.settings
            self._scores[criterion] = channel_scores(self.model, self.space, criterion, self.bn_batches, s.criterion_combine, self.seed)
        return self._scores[criterion]

    def validation_accuracy(self, model: nn.Module) -> float:
        """Top-1 accuracy (a fraction) of ``model`` as it stands, on this evaluator's validation
        batches: no materialization, no BN re-estimation (for controllers that steer training by
        accuracy, such as Play and Prune's; not an evaluation, not cached)."""
        return accuracy(model, self.val_batches)[1]

    def prime(self, results: list[EvalResult]) -> None:
        """Put already-measured results (e.g. from a run store) in the cache."""
        for result in results:
            self._cache.setdefault(_cache_key(result.key, result.fidelity), result)

    def __len__(self) -> int:
        """Number of distinct evaluations so far (a screening and the full evaluation of one proposal are two)."""
        return len(self._cache)

    def batches(self, fidelity: float = 1.0) -> tuple[list, list]:
        """(validation batches, BN-recalibration batches) of an evaluation at ``fidelity``: the
        first ceil(fidelity x n) of each (at least one), the same for every candidate."""
        def part(batches: list) -> list:
            return batches if fidelity >= 1.0 else batches[:max(1, math.ceil(fidelity * len(batches)))]
        return part(self.val_batches), part(self.bn_batches)

    def network(self, proposal: Candidate | Proposal, resolved: Resolved | None = None, fidelity: float = 1.0) -> nn.Module:
        """The materialized network of ``proposal`` (from the original weights with the
        evaluator's channel order and reconstruction, or from trained weights keeping their
        channels), BN statistics re-estimated when configured, in eval mode; with activation bits
        below 32, its layer inputs quantized over ranges calibrated on the BN batches (see
        :mod:`automlprune.quantization`)."""
        proposal = as_proposal(proposal)
        resolved = resolved or self.space.resolve(proposal.candidate)
        weight_criterion = self.weight_criterion_for(proposal) if resolved.sparsity else "magnitude"
        if proposal.trained:
            weights = proposal.weights
            net = materialize(weights.model.to(self.device), resolved, self.space, weights.order(self.space, resolved),
                              weight_criterion=weight_criterion)
        else:
            net = materialize(self.model, resolved, self.space, self.order, self.reconstruction, weight_criterion)
        recalibrate = self.settings.bn_recalibration if proposal.bn_recalibration is None else proposal.bn_recalibration
        if recalibrate:
            recalibrate_batchnorm(net, self.batches(fidelity)[1])
        if self.space.config.activation_bits < 32:
            ActivationFakeQuant(net, self.space.quantizable, self.space.config.activation_bits).calibrate(self.bn_batches)
        return net.eval()

    def key_of(self, proposal: Candidate | Proposal) -> str:
        """The network key of ``proposal`` (its canonical candidate, and its weights when trained):
        the ``key`` its result will carry, known before evaluating it."""
        proposal = as_proposal(proposal)
        return proposal.key(self.space.resolve(proposal.candidate).key)

    def evaluate(self, proposal: Candidate | Proposal, latency: bool = False, fidelity: float = 1.0) -> EvalResult:
        """Accuracy and costs of ``proposal`` (a plain candidate means the original weights;
        cached by network: the result holds the canonical candidate, see
        :meth:`SearchSpace.canonical`; latency measured when asked for). ``fidelity`` < 1 scores
        it on that fraction of the validation and BN batches (:meth:`batches`); a full result
        already known serves a cheaper request."""
        proposal = as_proposal(proposal)
        resolved = self.space.resolve(proposal.candidate)
        key = proposal.key(resolved.key)
        fidelity = min(1.0, fidelity)
        cached = self._cache.get(key) or self._cache.get(_cache_key(key, fidelity))
        if cached is not None and (cached.measured_latency_ms is not None or not latency):
            return cached
        start = time.perf_counter()
        net = self.network(proposal, resolved, fidelity)
        if cached is None:
            costs = self.cost_model(resolved, realized_masks(net))
            acc = accuracy(net, self.batches(fidelity)[0], self.topk)
            result = EvalResult(resolved.candidate, acc[1], acc.get(5), costs, relative_costs(costs, self.cost_model.base),
                                time.perf_counter() - start, weights=proposal.describe(), key=key, fidelity=fidelity)
        else:  # accuracy already known: only the latency is missing
            result = cached
        if latency:
            result = replace(result, measured_latency_ms=self._measure(net))
        self._cache[_cache_key(key, result.fidelity)] = result
        return result

    def _measure(self, net: nn.Module) -> dict[int, float]:
        """Latency of ``net`` as it is deployed (:func:`automlprune.export.deployable`), ms per batch size."""
        from automlprune.export import deployable

        return measure_latency(deployable(net), self.data.example_input().shape[1:], self.settings.latency_batch_sizes,
                               self.device)

    def latencies(self, networks: Sequence[nn.Module]) -> list[dict[int, float]]:
        """Latency of several networks on this task's inputs, batch sizes and device, timed together
        in interleaved rounds so their ratios hold (ms per batch size; see :func:`measure_latencies`)."""
        return measure_latencies(networks, self.data.example_input().shape[1:], self.settings.latency_batch_sizes, self.device)

    def int8(self, candidate: Candidate | Proposal, network: nn.Module | None = None) -> dict[str, Any]:
        """For a candidate with every Conv2d/Linear layer at 8 bits: PyTorch's own int8 network of
        it (x86 backend, calibrated on the BN batches) with its validation accuracy and measured
        CPU latency (ms per batch size), next to the float32 network's. ``network`` (e.g. a
        fine-tuned one) replaces the materialized network. Returns {"int8": {...}, "float32": {...}, "model"}."""
        from automlprune.int8 import all_eight_bit, int8_network

        if not all_eight_bit(self.space.resolve(as_proposal(candidate).candidate).bits):
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

    def finetune(self, proposal: Candidate | Proposal, settings: FinetuneSettings | None = None,
                 progress: bool = True) -> FinetuneResult:
        """Fine-tune the materialized network of ``proposal`` (from its trained weights when it
        has them; distilling from the unpruned network when configured) and report its validation
        and test accuracy. Quantized layers are fine-tuned quantization-aware (straight-through
        estimator), and sparse layers with their masks fixed (:class:`KeepSparse`): the returned
        network's weights are still on their bit grids and its removed weights still zero."""
        s = settings or FinetuneSettings()
        proposal = as_proposal(proposal)
        resolved = self.space.resolve(proposal.candidate)
        start = time.perf_counter()
        callbacks = [KeepSparse(), QuantizationAware(resolved.bits, self.space.config.bit_scheme)]
        earlier: list = []
        if s.method == "snapshot_ensemble":  # rounds of pruning and retraining first, then the distillation below
            rounds = SnapshotEnsemble(self, proposal, resolved, s)
            rounds.run(progress)
            net, recipe, earlier = self.network(rounds.proposal(), resolved), rounds.distill_recipe(), rounds.histories
            callbacks.append(rounds.distillation())
        else:
            net, recipe = self.network(proposal, resolved), s.recipe()
            if s.distill:
                callbacks.append(Distillation(self.teacher, s.distill_alpha, s.distill_temperature))
        history = Trainer(net, self.data, self.device, recipe, callbacks, description="finetune", progress=progress).fit()
        histories = earlier + [history]
        return FinetuneResult(resolved.candidate, split_accuracy(net, self.data.val, self.data, self.device),
                              split_accuracy(net, self.data.test, self.data, self.device), s.epochs,
                              time.perf_counter() - start, net, sum(h.steps for h in histories), sum(h.images for h in histories))


def _cache_key(key: str, fidelity: float) -> str:
    """The evaluator's cache key of a result: the network's key, marked with a fidelity below 1."""
    return key if fidelity >= 1.0 else f"{key}@{fidelity:g}"


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
