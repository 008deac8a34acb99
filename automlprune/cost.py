"""The one cost model: MACs, parameters, bytes and BitOps of any candidate, from formulas.

Per-layer shapes are recorded once (in the :class:`SearchSpace`); a candidate's costs are
then a few small matrix products (tens of microseconds). Everything in automlprune that
needs a cost calls this module: the evaluator, RL observations and action clipping, the
DMCP budget loss (:meth:`CostModel.from_kept` accepts a differentiable torch tensor),
Optuna constraints and the plots.

Units: MACs are multiply-accumulates of Conv2d and Linear layers for one input sample
(FLOPs = 2 x MACs, the convention of ``torch.utils.flop_counter``); params are parameter
counts; bytes are the storage of the parameters: Conv/Linear weights at the candidate's
bits (params x bits / 8) plus, for every layer below 32 bits, its quantization scales (one per
output channel, or one per tensor, as float32, with an int32 zero point each for asymmetric
schemes: :mod:`automlprune.quantization`), biases and batch-norm parameters as float32;
BitOps = MACs x weight bits x activation bits (the space's ``bits.activations``, 32 by
default); latency_ms is the predicted latency of the
materialized network from a measured per-layer table (:mod:`automlprune.latency_table`),
present only when one is attached.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from automlprune.errors import ConfigError, UnsupportedLayerError
from automlprune.quantization import per_channel, scale_bytes_per_entry
from automlprune.space.candidate import Candidate
from automlprune.space.search_space import SearchSpace

METRICS = ("macs", "params", "bytes", "bitops")
BUDGET_METRICS = METRICS + ("latency",)


@dataclass(frozen=True)
class Costs:
    """Costs of one network for one input sample: see the module docstring for units."""

    macs: float
    params: float
    bytes: float
    bitops: float
    latency_ms: float = math.nan

    @property
    def flops(self) -> float:
        return 2 * self.macs

    def get(self, metric: str) -> float:
        if metric == "latency":
            if math.isnan(self.latency_ms):
                raise ConfigError("latency costs need a measured latency table; searches with a latency budget build one")
            return self.latency_ms
        if metric not in METRICS:
            raise ConfigError(f"unknown cost metric '{metric}'; choose one of: {', '.join(BUDGET_METRICS)}")
        return getattr(self, metric)

    def to_dict(self) -> dict[str, float]:
        out = asdict(self)
        if math.isnan(self.latency_ms):
            del out["latency_ms"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Costs":
        latency = data.get("latency_ms")
        return cls(*(float(data[m]) for m in METRICS), float(latency) if isinstance(latency, (int, float)) else math.nan)


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
        index = {name: i for i, name in enumerate(self.layer_names)}
        n_layers, n_groups = len(layers), len(space.groups)
        self.out_full = np.array([l.out_channels for l in layers], dtype=np.float64)
        self.in_full = np.array([l.in_channels for l in layers], dtype=np.float64)
        self.groups_ = np.array([l.groups for l in layers], dtype=np.float64)
        self.kernel = np.array([l.kernel for l in layers], dtype=np.float64)
        self.positions = np.array([l.positions for l in layers], dtype=np.float64)
        self.has_bias = np.array([l.has_bias for l in layers], dtype=np.float64)
        self.is_bn = np.array([l.kind == "bn" for l in layers], dtype=np.float64)
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
        self._torch_cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self.latency_table = None
        self.base = self(space.full())
        if model is not None:
            self.verify(model)

    # ---- formulas --------------------------------------------------------------------------
    def from_kept(self, kept: Any, weight_bits: Any = None) -> dict[str, Any]:
        """Costs from kept channels per group (array of shape (groups,)) and weight bits per
        layer (shape (layers,), default 32). Works on NumPy arrays and on torch tensors
        (differentiable, for relaxed widths); returns {"macs", "params", "bytes", "bitops"}
        and the per-layer "layer_macs" / "layer_params"."""
        a = self._arrays_like(kept)
        removed = a["group_channels"] - kept
        out_k = a["out_full"] - a["removed_out"] @ removed
        in_k = a["in_full"] - a["removed_in"] @ removed
        conv_like = 1 - a["is_bn"]
        in_per_group = a["is_dw"] + (1 - a["is_dw"]) * in_k / a["groups"]
        weights = conv_like * out_k * in_per_group * a["kernel"]
        layer_macs = weights * a["positions"]
        biases = conv_like * a["has_bias"] * out_k
        bn_params = a["is_bn"] * a["has_bias"] * 2 * out_k
        layer_params = weights + biases + bn_params
        bits = a["full_bits"] if weight_bits is None else weight_bits
        quantized = conv_like * (bits < 32) if not isinstance(bits, torch.Tensor) else conv_like * (bits < 32).to(out_k.dtype)
        scale_entries = out_k if self.per_channel_scales else 1.0
        layer_bytes = weights * bits / 8 + (biases + bn_params) * 4 + quantized * scale_entries * self.scale_entry_bytes
        return {
            "macs": layer_macs.sum(), "params": layer_params.sum(), "bytes": layer_bytes.sum(),
            "bitops": (layer_macs * bits * self.activation_bits).sum(),
            "layer_macs": layer_macs, "layer_params": layer_params,
            "kept_in": a["is_dw"] * out_k + (1 - a["is_dw"]) * in_k, "kept_out": out_k,
        }

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

    def bits_vector(self, candidate: Candidate) -> np.ndarray:
        """Weight bits per layer (shape (layers,); batch-norm layers read 32)."""
        bits = self.space.weight_bits(candidate)
        return np.array([bits.get(name, 32) for name in self.layer_names], dtype=np.float64)

    # ---- candidates ------------------------------------------------------------------------
    def __call__(self, candidate: Candidate) -> Costs:
        """Costs of the network ``candidate`` describes (validated against the space)."""
        self.space.validate(candidate)
        out = self.from_kept(self.space.kept_channels(candidate).astype(np.float64), self.bits_vector(candidate))
        latency = math.nan
        if self.latency_table is not None:
            latency = self.latency_table.predict(self.layer_names, out["kept_in"], out["kept_out"],
                                                 float(out["macs"]) / self.base.macs)  # set before a table can be attached
        return Costs(float(out["macs"]), float(out["params"]), float(out["bytes"]), float(out["bitops"]), latency)

    def attach_latency_table(self, table: Any) -> None:
        """Predict latency (the ``latency`` metric) with ``table`` from now on."""
        self.latency_table = table
        self.base = self(self.space.full())

    def relative(self, candidate: Candidate) -> dict[str, float]:
        """Each cost of ``candidate`` as a fraction of the full network's (latency when a table is attached)."""
        return relative_costs(self(candidate), self.base)

    def per_layer(self, candidate: Candidate) -> dict[str, dict[str, float]]:
        """MACs and params of each layer under ``candidate``: {layer: {"macs", "params"}}."""
        out = self.from_kept(self.space.kept_channels(candidate).astype(np.float64), self.bits_vector(candidate))
        return {n: {"macs": float(m), "params": float(p)} for n, m, p in zip(self.layer_names, out["layer_macs"], out["layer_params"])}

    # ---- checks ----------------------------------------------------------------------------
    def verify(self, model: nn.Module) -> None:
        """Check the formulas account for all of ``model``'s MACs and parameters."""
        measured = count_macs(model, self.space.example_input)
        if abs(measured - self.base.macs) > 0.5:
            raise UnsupportedLayerError(
                f"the model performs {measured:.0f} MACs but its Conv2d/Linear layers account for {self.base.macs:.0f}; "
                "it computes convolutions or matrix products outside modules, which automlprune cannot cost: move them into nn.Conv2d/nn.Linear layers"
            )
        params = sum(p.numel() for p in model.parameters())
        if params != int(self.base.params):
            raise UnsupportedLayerError(
                f"the model holds {params} parameters but its Conv2d/Linear/BatchNorm layers account for {int(self.base.params)}; "
                "parameters outside such layers cannot be costed: move them into supported layers"
            )


def relative_costs(costs: Costs, base: Costs) -> dict[str, float]:
    """Each cost over the full network's; ``latency`` only when both are known."""
    out = {m: costs.get(m) / base.get(m) for m in METRICS}
    if not math.isnan(costs.latency_ms) and not math.isnan(base.latency_ms):
        out["latency"] = costs.latency_ms / base.latency_ms
    return out


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
                             bits: int | None = None) -> float:
    """The largest keep ratio r such that every prunable group at r (and every bit-searchable
    layer at ``bits``, when given) costs at most ``budget`` (absolute units of ``metric``), by
    bisection on r in (0, 1]. Raises ConfigError when even the space's minimum widths exceed the budget."""
    space = cost_model.space
    cost = lambda r: cost_model(space.uniform(r, bits)).get(metric)  # noqa: E731
    if cost(1.0) <= budget:
        return 1.0
    lo = 1e-6
    if cost(lo) > budget:
        raise ConfigError(
            f"a {metric} budget of {budget:.4g} is below what the narrowest uniform network costs ({cost(lo):.4g}); raise the budget"
        )
    return largest_within(lambda r: cost(r) <= budget, lo, 1.0, math.ceil(math.log2((1.0 - lo) / tolerance)))


def largest_within(fits: Callable[[float], bool], lo: float, hi: float, steps: int) -> float:
    """Bisection for the largest x in [lo, hi] with ``fits(x)``, given ``fits(lo)`` holds and
    ``fits`` is monotone (true below a threshold): after ``steps`` halvings, the last fitting x."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
