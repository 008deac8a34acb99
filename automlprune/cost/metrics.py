"""The metric registry: every cost automlprune can report or budget, with its unit and formula.

A metric is one :func:`register` call: a name, a unit, and (for analytic metrics) a per-layer
formula over the :class:`LayerQuantities` of a candidate. The cost model, budgets (parsing,
units, checks), the CLI, ``compare``'s tables and columns, and DMCP's differentiable budget
loss all enumerate this registry, so a new metric appears everywhere at once. Formulas work
on NumPy arrays and on torch tensors alike (differentiable in the kept widths).

Units: MACs are multiply-accumulates of Conv2d and Linear layers for one input sample
(FLOPs = 2 x MACs, the convention of ``torch.utils.flop_counter``): what the backend executes,
so a sparse layer counts all its weights (no PyTorch kernel skips zeros in a convolution);
``macs_nnz`` is the theoretical count of the nonzero weights, labelled so and never a budget;
params are parameter counts (dense: a pruned weight is still a parameter of the network);
bytes are the storage of the parameters: Conv/Linear weights at the candidate's bits in their
smallest honest format (:mod:`automlprune.cost.formats`; params x bits / 8 for a dense layer) plus, for every layer below 32 bits, its quantization scales (one per
output channel, or one per tensor, as float32, with an int32 zero point each for asymmetric
schemes: :mod:`automlprune.quantization`), biases and batch-norm parameters as float32;
BitOps = MACs x weight bits x activation bits; latency is the predicted latency of the
materialized network in milliseconds from a measured per-layer table
(:mod:`automlprune.latency_table`), present only when one is attached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from automlprune.errors import ConfigError
from automlprune.registry import Registry


@dataclass(frozen=True)
class LayerQuantities:
    """Per-layer quantities of one candidate (arrays of shape (layers,), NumPy or torch).

    weights: multiply-accumulate weights kept (0 for batch norms); inputs / outputs: kept input
    and output channels; positions: output positions per sample; biases: bias entries kept; norm_params: batch-norm affine entries kept; bits:
    weight bits; quantized: 1 where the layer's weights are below 32 bits; scale_entries: its
    quantization scales (per channel or 1); scale_entry_bytes: bytes per scale entry (scalar);
    activation_bits: bits of every layer's input (scalar); kept_weights: weights left nonzero by
    the layer's sparsity pattern (= weights for a dense layer); stored_weight_bits: bits of the
    weight in its smallest honest storage format (:mod:`automlprune.cost.formats`; weights x
    bits for a dense layer)."""

    weights: Any
    inputs: Any
    outputs: Any
    positions: Any
    biases: Any
    norm_params: Any
    bits: Any
    quantized: Any
    scale_entries: Any
    scale_entry_bytes: float
    activation_bits: float
    kept_weights: Any = None
    stored_weight_bits: Any = None


@dataclass(frozen=True)
class Metric:
    """name: the key in :class:`Costs` and budgets; unit: what one unit is (for tables and
    messages); formula: per-layer values from :class:`LayerQuantities`, summed for the network
    (None for a metric that is not analytic, such as measured latency); differentiable: the
    formula is smooth in the kept widths (usable in gradient-based searches such as DMCP);
    budgetable: usable as a budget; scale: a one-letter unit suffix in tables ("M" = 1e6)."""

    name: str
    unit: str
    formula: Optional[Callable[[LayerQuantities], Any]]
    differentiable: bool
    budgetable: bool = True
    description: str = ""
    scale: tuple[str, float] = ("", 1.0)

    @property
    def analytic(self) -> bool:
        return self.formula is not None


METRICS: Registry[Metric] = Registry("cost metric")


def register(metric: Metric) -> Metric:
    """Add ``metric`` to the registry (a duplicate name raises)."""
    METRICS.register(metric.name, metric, description=metric.description)
    return metric


def metric(name: str) -> Metric:
    return METRICS.get(name)


def all_metrics() -> list[Metric]:
    """Every registered metric, in registration order."""
    return [METRICS.get(n) for n in METRICS.ordered_names()]


def analytic_metrics() -> list[str]:
    """Names of the metrics the cost model computes from formulas, in registration order."""
    return [m.name for m in all_metrics() if m.analytic]


def differentiable_metrics() -> list[str]:
    return [m.name for m in all_metrics() if m.differentiable]


def budget_metrics() -> list[str]:
    return [m.name for m in all_metrics() if m.budgetable]


def check_metric(name: str) -> Metric:
    """The metric ``name``, or a ConfigError naming the registered ones."""
    if name not in METRICS:
        raise ConfigError(f"unknown cost metric '{name}'; choose one of: {', '.join(budget_metrics())}")
    return METRICS.get(name)


def _macs(q: LayerQuantities) -> Any:
    return q.weights * q.positions


register(Metric("macs", "MACs", _macs, differentiable=True, scale=("M", 1e6),
                description="multiply-accumulates of Conv2d/Linear layers per sample (FLOPs = 2 x MACs)"))
register(Metric("params", "parameters", lambda q: q.weights + q.biases + q.norm_params, differentiable=True,
                scale=("k", 1e3), description="parameter count"))
register(Metric("bytes", "bytes", lambda q: q.stored_weight_bits / 8 + (q.biases + q.norm_params) * 4
                + q.quantized * q.scale_entries * q.scale_entry_bytes, differentiable=True, scale=("k", 1e3),
                description="parameter storage: weights at their bits in their smallest honest format (dense, bitmask, CSR, "
                            "N:M, block), quantization scales, float32 biases and BN affine"))
register(Metric("bitops", "BitOps", lambda q: _macs(q) * q.bits * q.activation_bits, differentiable=True,
                scale=("G", 1e9), description="MACs x weight bits x activation bits"))
register(Metric("macs_nnz", "MACs (theoretical)", lambda q: q.kept_weights * q.positions, differentiable=True,
                budgetable=False, scale=("M", 1e6),
                description="theoretical MACs of the nonzero weights; PyTorch runs sparse layers dense, so they execute 'macs'"))
register(Metric("latency", "ms (predicted)", None, differentiable=False,
                description="predicted latency from a measured per-layer table (attached for latency budgets)"))
