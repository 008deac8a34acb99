"""The one cost model: every analytic metric of the registry (:mod:`automlprune.cost.metrics`)
for any candidate, from formulas.

Per-layer shapes are recorded once (in the :class:`SearchSpace`); a candidate's costs are
then a few small matrix products (tens of microseconds). Everything in automlprune that
needs a cost calls this module: the evaluator, RL observations and action clipping, the
DMCP budget loss (:meth:`CostModel.from_kept` accepts a differentiable torch tensor),
Optuna constraints and the plots. Units: see :mod:`automlprune.cost.metrics`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from automlprune.cost.formats import layout_of, smallest
from automlprune.cost.metrics import LayerQuantities, all_metrics, analytic_metrics, check_metric
from automlprune.errors import ConfigError, UnsupportedLayerError
from automlprune.quantization import per_channel, scale_bytes_per_entry
from automlprune.space.candidate import Candidate
from automlprune.space.search_space import Resolved, SearchSpace
from automlprune.sparsity.patterns import matrix_view


class MissingMetric(ConfigError, KeyError):
    """A registered metric a :class:`Costs` does not hold (latency without a latency table)."""

    def __str__(self) -> str:
        return str(self.args[0])


class Costs(Mapping[str, float]):
    """Costs of one network for one input sample: registered metric name -> amount in the
    metric's unit (:mod:`automlprune.cost.metrics`). Immutable. Metrics that were not measured
    (latency without a table) are absent: ``costs["latency"]`` then says how to get them.
    Attribute access (``costs.macs``) reads the same values."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, float] | None = None, **amounts: float) -> None:
        values = {**(values or {}), **amounts}
        for name in values:
            check_metric(name)
        object.__setattr__(self, "_values", {k: float(v) for k, v in values.items() if not math.isnan(float(v))})

    def __getitem__(self, metric: str) -> float:
        if metric in self._values:
            return self._values[metric]
        check_metric(metric)
        raise MissingMetric(f"{metric} costs need a measured latency table; searches with a latency budget build one"
                            if metric == "latency" else f"these costs hold no {metric}")

    def __getattr__(self, metric: str) -> float:
        if metric.startswith("_"):
            raise AttributeError(metric)
        try:
            return self[metric]
        except ConfigError as exc:
            raise AttributeError(str(exc)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Costs are immutable")

    def __reduce__(self) -> tuple:
        return Costs, (self._values,)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Costs) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items())))

    def __repr__(self) -> str:
        return "Costs(" + ", ".join(f"{k}={v:.6g}" for k, v in self._values.items()) + ")"

    @property
    def flops(self) -> float:
        """2 x MACs (one multiply-accumulate = two floating-point operations)."""
        return 2 * self["macs"]

    def to_dict(self) -> dict[str, float]:
        return dict(self._values)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Costs":
        """Inverse of :meth:`to_dict`; other keys are ignored (stored results written before
        the registry named latency ``latency_ms``; results stored before weight sparsity existed
        were dense, so their ``macs_nnz`` is their ``macs``)."""
        names = {m.name for m in all_metrics()}
        values = {k: float(v) for k, v in data.items() if k in names and isinstance(v, (int, float))}
        legacy = data.get("latency_ms")
        if "latency" not in values and isinstance(legacy, (int, float)):
            values["latency"] = float(legacy)
        if "macs_nnz" not in values and "macs" in values:
            values["macs_nnz"] = values["macs"]
        return cls(values)


class CostModel:
    """Analytic costs of the candidates of one search space.

    Built from the space's layer table and groups. When ``model`` is given, the full
    network's MACs are checked once against ``FlopCounterMode`` and its parameter count
    against ``model.parameters()``, so a layer the formulas miss raises instead of
    being counted as zero.
    """

    def __init__(self, space: SearchSpace, model: nn.Module | None = None) -> None:
        self.space = space
        layers = space.layers
        self.layer_names = [l.name for l in layers]
        self.layer_index = {name: i for i, name in enumerate(self.layer_names)}
        index = self.layer_index
        n_layers, n_groups = len(layers), len(space.groups)
        self.out_full = np.array([l.out_channels for l in layers], dtype=np.float64)
        self.in_full = np.array([l.in_channels for l in layers], dtype=np.float64)
        self.groups_ = np.array([l.groups for l in layers], dtype=np.float64)
        self.kernel = np.array([l.kernel for l in layers], dtype=np.float64)
        self.positions = np.array([l.positions for l in layers], dtype=np.float64)
        self.has_bias = np.array([l.has_bias for l in layers], dtype=np.float64)
        self.is_bn = np.array([not l.has_weights for l in layers], dtype=np.float64)
        self.is_dw = np.array([l.depthwise for l in layers], dtype=np.float64)
        self.removed_out = np.zeros((n_layers, n_groups))  # out channels a layer loses per channel its group loses
        self.removed_in = np.zeros((n_layers, n_groups))
        for g, group in enumerate(space.groups):
            for member in group.members:
                target = self.removed_out if member.dim == "out" else self.removed_in
                target[index[member.layer], g] += member.index_map.shape[1]
        self.group_channels = np.array([g.channels for g in space.groups], dtype=np.float64)
        scheme = space.config.bit_scheme
        self.per_channel_scales = per_channel(scheme)
        self.scale_entry_bytes = scale_bytes_per_entry(scheme)
        self.activation_bits = space.config.activation_bits
        self.fixed_params = float(sum(space.fixed_parameters.values()))
        self._torch_cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self._analytic = [(m.name, m) for m in all_metrics() if m.analytic]
        self.latency_table = None
        self.base = self(space.full())
        if model is not None:
            self.verify(model)

    # ---- formulas --------------------------------------------------------------------------
    def from_kept(self, kept: Any, weight_bits: Any = None, sparsity: Mapping[str, tuple[Any, float]] | None = None,
                  masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Costs from kept channels per group (array of shape (groups,)), weight bits per layer
        (shape (layers,), default 32) and sparse layers (layer -> (pattern, density), NumPy
        only). Works on NumPy arrays and on torch tensors (differentiable, for relaxed widths);
        returns every analytic metric's total by name, ``"per_layer"`` ({metric: per-layer
        values}), the per-layer ``"kept_in"`` / ``"kept_out"``, ``"weights"``, ``"kept_weights"``
        and ``"stored_weight_bits"``, and ``"formats"`` (the storage format of each sparse layer's
        weight, by name). ``masks`` (layer -> realized weight mask) turn the limits of patterns
        whose kept count depends on the weights (DARB) into what the masks really keep."""
        a = self._arrays_like(kept)
        removed = a["group_channels"] - kept
        out_k = a["out_full"] - a["removed_out"] @ removed
        in_k = a["in_full"] - a["removed_in"] @ removed
        conv_like = 1 - a["is_bn"]
        in_per_group = a["is_dw"] + (1 - a["is_dw"]) * in_k / a["groups"]
        weights = conv_like * out_k * in_per_group * a["kernel"]
        bits = a["full_bits"] if weight_bits is None else weight_bits
        quantized = conv_like * (bits < 32) if not isinstance(bits, torch.Tensor) else conv_like * (bits < 32).to(out_k.dtype)
        kept_weights, stored_bits, formats = weights, weights * bits, {}
        if sparsity:
            kept_weights, stored_bits, formats = self._sparse_storage(sparsity, out_k, in_k, weights, bits, masks or {})
        quantities = LayerQuantities(
            weights=weights, inputs=in_k, outputs=out_k, positions=a["positions"], biases=conv_like * a["has_bias"] * out_k,
            norm_params=a["is_bn"] * a["has_bias"] * 2 * out_k, bits=bits, quantized=quantized,
            scale_entries=out_k if self.per_channel_scales else 1.0, scale_entry_bytes=self.scale_entry_bytes,
            activation_bits=self.activation_bits, kept_weights=kept_weights, stored_weight_bits=stored_bits)
        per_layer = {name: metric.formula(quantities) for name, metric in self._analytic}
        totals = {name: values.sum() for name, values in per_layer.items()}
        totals["params"] = totals["params"] + self.fixed_params  # parameters outside the table's layers: float32, never cut
        totals["bytes"] = totals["bytes"] + 4 * self.fixed_params
        return {**totals, "per_layer": per_layer, "formats": formats, "weights": weights, "kept_weights": kept_weights,
                "stored_weight_bits": stored_bits,
                "kept_in": a["is_dw"] * out_k + (1 - a["is_dw"]) * in_k, "kept_out": out_k}

    def _sparse_storage(self, sparsity: Mapping[str, tuple[Any, float]], out_k: np.ndarray, in_k: np.ndarray,
                        weights: np.ndarray, bits: np.ndarray, masks: Mapping[str, torch.Tensor]
                        ) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
        """Per layer: weights kept by its pattern, bits of its smallest honest format, and the
        format's name for each sparse layer (a pattern that cannot apply at the kept widths raises
        :class:`CandidateError`)."""
        kept, stored, formats = np.array(weights, dtype=np.float64), np.array(weights * bits, dtype=np.float64), {}
        for layer, (pattern, density) in sparsity.items():
            i = self.layer_index[layer]
            is_dw = bool(self.is_dw[i])
            geometry = self.space.geometry(layer, inputs=int(round(out_k[i] if is_dw else in_k[i])), rows=int(round(out_k[i])))
            pattern.check(layer, geometry)
            mask = masks.get(layer)
            layout = layout_of(pattern, geometry, density, int(bits[i]), None if mask is None else matrix_view(mask))
            formats[layer], stored[i] = smallest(layout)
            kept[i] = layout.kept
        return kept, stored, formats

    def _arrays_like(self, kept: Any) -> dict[str, Any]:
        names = ("out_full", "in_full", "groups_", "kernel", "positions", "has_bias", "is_bn", "is_dw",
                 "removed_out", "removed_in", "group_channels")
        arrays = {n.rstrip("_"): getattr(self, n) for n in names}
        arrays["full_bits"] = np.full(len(self.layer_names), 32.0)
        if not isinstance(kept, torch.Tensor):
            return arrays
        key = (kept.device, kept.dtype)
        if key not in self._torch_cache:
            self._torch_cache[key] = {k: torch.as_tensor(v, dtype=kept.dtype, device=kept.device) for k, v in arrays.items()}
        return self._torch_cache[key]

    def bits_vector(self, candidate: Candidate | Resolved) -> np.ndarray:
        """Weight bits per layer (shape (layers,); batch-norm layers read 32)."""
        return self._bits_vector(self.space.resolve(candidate).bits)

    def _bits_vector(self, bits: Mapping[str, int]) -> np.ndarray:
        return np.array([bits.get(name, 32) for name in self.layer_names], dtype=np.float64)

    # ---- candidates ------------------------------------------------------------------------
    def __call__(self, candidate: Candidate | Resolved, masks: Mapping[str, torch.Tensor] | None = None) -> Costs:
        """Costs of the network ``candidate`` describes (validated against the space). Without
        ``masks`` a DARB layer is charged its limits (an upper bound); with the materialized
        network's masks (:func:`~automlprune.sparsity.masks.realized_masks`) what it really stores."""
        resolved = self.space.resolve(candidate)
        out = self.from_kept(resolved.kept.astype(np.float64), self._bits_vector(resolved.bits), resolved.sparsity, masks)
        values = {name: float(out[name]) for name in analytic_metrics()}
        if self.latency_table is not None:
            values["latency"] = self.latency_table.predict(self.layer_names, out["kept_in"], out["kept_out"],
                                                           values["macs"] / self.base["macs"],  # set before a table can be attached
                                                           self.activations(out))
        return Costs(values)

    def activations(self, out: Mapping[str, Any]) -> float:
        """Activation elements one image makes the network write (every Conv/Linear/BN layer's kept
        output channels x output positions), from :meth:`from_kept`'s result: what elementwise
        layers' time grows with."""
        return float(np.sum(np.asarray(out["kept_out"], dtype=np.float64) * self.positions))

    def attach_latency_table(self, table: Any) -> None:
        """Predict latency (the ``latency`` metric) with ``table`` from now on."""
        self.latency_table = table
        self.base = self(self.space.full())

    def rebase(self, reference: Costs) -> None:
        """Measure relative costs (and bind relative budgets) against ``reference`` instead of this
        space's full network: a pipeline's later stages search a network an earlier stage already
        shrank, but every fraction they report or budget is of the unpruned network the pipeline
        started from. Refused with a latency table attached (its predictions are of this network)."""
        if self.latency_table is not None:
            raise ConfigError("latency costs of a pipeline stage cannot be measured against the network the pipeline started from; "
                              "budget the stage in macs, params, bytes or bitops")
        self.base = Costs({m: reference[m] for m in reference if m in analytic_metrics()})

    def relative(self, candidate: Candidate) -> dict[str, float]:
        """Each cost of ``candidate`` as a fraction of the full network's (latency when a table is attached)."""
        return relative_costs(self(candidate), self.base)

    def per_layer(self, candidate: Candidate | Resolved) -> dict[str, dict[str, float]]:
        """Every analytic metric of each layer under ``candidate``: {layer: {metric: amount}}."""
        resolved = self.space.resolve(candidate)
        per_layer = self.from_kept(resolved.kept.astype(np.float64), self._bits_vector(resolved.bits), resolved.sparsity)["per_layer"]
        return {n: {m: float(values[i]) for m, values in per_layer.items()} for i, n in enumerate(self.layer_names)}

    def storage(self, candidate: Candidate | Resolved, masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, dict[str, Any]]:
        """How each Conv2d/Linear weight of ``candidate`` is stored: {layer: {"format", "bits"
        (value bits), "density" (kept weights / weights), "pattern" (None when dense), "bytes"
        (the weight alone, in that format)}}; ``masks`` as in :meth:`__call__`."""
        resolved = self.space.resolve(candidate)
        bits = self._bits_vector(resolved.bits)
        out = self.from_kept(resolved.kept.astype(np.float64), bits, resolved.sparsity, masks)
        rows = {}
        for i, name in enumerate(self.layer_names):
            if self.is_bn[i]:
                continue
            pattern, density = resolved.sparsity.get(name, (None, 1.0))
            rows[name] = {"format": out["formats"].get(name, "dense"), "bits": int(bits[i]),
                          "pattern": pattern.name if pattern is not None else None,
                          "density": float(out["kept_weights"][i] / max(out["weights"][i], 1)),
                          "bytes": float(out["stored_weight_bits"][i] / 8)}
        return rows

    # ---- checks ----------------------------------------------------------------------------
    def verify(self, model: nn.Module) -> None:
        """Check the formulas account for all of ``model``'s MACs and parameters."""
        measured = count_macs(model, self.space.example_input)
        if abs(measured - self.base['macs']) > 0.5:
            raise UnsupportedLayerError(
                f"the model performs {measured:.0f} MACs but its Conv2d/Linear layers account for {self.base['macs']:.0f}; "
                "it computes convolutions or matrix products outside modules, which automlprune cannot cost: move them into nn.Conv2d/nn.Linear layers"
            )
        params = sum(p.numel() for p in model.parameters())
        if params != int(self.base['params']):
            raise UnsupportedLayerError(
                f"the model holds {params} parameters but its layers account for {int(self.base['params'])}; "
                "a layer of a type automlprune does not know holds the rest: replace it with standard PyTorch layers"
            )


def relative_costs(costs: Costs, base: Costs) -> dict[str, float]:
    """Each cost over the full network's, for the metrics both hold."""
    return {m: costs[m] / base[m] for m in costs if m in base}


def count_macs(model: nn.Module, example_input: torch.Tensor) -> float:
    """MACs of one forward pass of ``model`` on one sample, by PyTorch's own FLOP counter (FLOPs / 2)."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(example_input[:1])
    model.train(was_training)
    return counter.get_total_flops() / 2


def uniform_ratio_for_budget(cost_model: CostModel, metric: str, budget: float, tolerance: float = 1e-4,
                             bits: int | None = None, density: float | None = None) -> float:
    """The largest keep ratio r such that every prunable group at r (and every bit-searchable
    layer at ``bits``, every sparsity-searchable layer at ``density``, when given) costs at most
    ``budget`` (absolute units of ``metric``), by bisection on r between the space's lowest grid
    ratio and 1 (the floor :func:`~automlprune.search.budget.check_achievable` tests, so a budget it
    accepts has an answer even where a measured latency table is not monotone below the grid).
    Raises ConfigError when even the space's minimum widths exceed the budget."""
    space = cost_model.space
    return _largest_uniform(lambda r: cost_model(space.uniform(r, bits, density))[metric], metric, budget, tolerance,
                            "uniform network", min(space.config.ratios))


def uniform_density_for_budget(cost_model: CostModel, metric: str, budget: float, tolerance: float = 1e-4,
                               bits: int | None = None) -> float:
    """The largest weight density d such that every sparsity-searchable layer at d (in the pattern
    :meth:`SearchSpace.uniform` gives it: its first free one; every channel kept, every
    bit-searchable layer at ``bits`` when given) costs at most ``budget``, by bisection on d
    between the space's lowest grid density and 1."""
    space = cost_model.space
    return _largest_uniform(lambda d: cost_model(space.uniform(1.0, bits, d))[metric], metric, budget, tolerance,
                            "uniformly sparse network", min(space.config.densities))


def _largest_uniform(cost: Callable[[float], float], metric: str, budget: float, tolerance: float, what: str,
                     lo: float) -> float:
    if cost(1.0) <= budget:
        return 1.0
    if cost(lo) > budget:
        raise ConfigError(f"a {metric} budget of {budget:.4g} is impossible for a {what}: the narrowest this space "
                          f"allows costs {cost(lo):.4g}; raise the budget or widen the space's grid")
    return largest_within(lambda r: cost(r) <= budget, lo, 1.0, max(1, math.ceil(math.log2(max(1.0 - lo, tolerance) / tolerance))))


def largest_within(fits: Callable[[float], bool], lo: float, hi: float, steps: int) -> float:
    """Bisection for the largest x in [lo, hi] with ``fits(x)``, given ``fits(lo)`` holds and
    ``fits`` is monotone (true below a threshold): after ``steps`` halvings, the last fitting x."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
