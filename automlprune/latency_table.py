"""A per-layer latency table, measured once, that predicts a candidate's inference latency.

Latency is that of the network as automlprune exports it (:func:`automlprune.export.deployable`:
batch norms folded, channels-last memory format). Every Conv2d/Linear layer is timed on its
own (a fresh layer of the same kernel, stride, padding and input size, channels-last) over a
grid of kept input and output widths — the space's keep ratios applied to each dimension — on
the target device and batch size. A candidate's
latency is then ``overhead + sum over layers of the time interpolated (bilinearly) at its
kept widths``. The overhead (batch norm, activations, additions, pooling, dispatch) is what
the layer sum misses on networks measured whole. It grows with the activations the network
writes, not with its MACs (an elementwise layer's time is proportional to its output; a
pruned layer keeps a larger fraction of its outputs than of its MACs), so it is fitted as
``fixed + per-element cost x activation elements`` (the sum over Conv/Linear/BN layers of kept
output channels x output positions) by least squares on :data:`CALIBRATION` networks: the
unpruned one, the space's smallest, uniform prunings and seeded random allocations. Tables
saved before the fit existed interpolate the overhead linearly in the MACs fraction between
the unpruned and the smallest network. ``automlprune benchmark --suite latency`` reports both
models' errors. This is the lookup-table approach of NetAdapt and AMC's latency variant.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.interpolate import RegularGridInterpolator
from torch import nn
from tqdm.auto import tqdm

from automlprune.errors import ConfigError
from automlprune.export import ChannelsLast, deployable
from automlprune.latency import measure_latency
from automlprune.nn import layer_types


@dataclass
class LayerTable:
    """Median milliseconds of one layer at each (kept inputs, kept outputs); depthwise layers
    have a one-dimensional table (inputs = outputs = groups)."""

    inputs: list[int]
    outputs: list[int]
    ms: list[list[float]]

    def __post_init__(self) -> None:
        self._table = table = np.asarray(self.ms, dtype=float)  # built once: predictions are on a hot path
        if len(self.inputs) == 1 or len(self.outputs) == 1:
            self._interp = None
        else:
            self._interp = RegularGridInterpolator((self.inputs, self.outputs), table, bounds_error=False, fill_value=None)

    def __call__(self, kept_in: float, kept_out: float) -> float:
        table = self._table
        if self._interp is not None:
            return float(self._interp([[kept_in, kept_out]])[0])
        if len(self.inputs) > 1:
            return float(np.interp(kept_in, self.inputs, table[:, 0]))
        if len(self.outputs) > 1:
            return float(np.interp(kept_out, self.outputs, table[0, :]))
        return float(table[0, 0])


@dataclass
class LatencyTable:
    """Per-layer tables plus the constant overhead, for one device and batch size."""

    layers: dict[str, LayerTable]
    overhead_ms: float
    device: str
    batch_size: int
    info: dict[str, Any] = field(default_factory=dict)
    small_overhead_ms: float | None = None
    small_macs_fraction: float = 0.0
    overhead_fit: tuple[float, float] | None = None
    """(fixed ms, ms per million activation elements) of the overhead; None in older tables."""

    def overhead(self, macs_fraction: float, activations: float | None = None) -> float:
        """Overhead (ms) of a network writing ``activations`` elements (the fit), or, in a table
        without the fit, at a MACs fraction: linear between the smallest and the full network."""
        if self.overhead_fit is not None and activations is not None:
            fixed, per_million = self.overhead_fit
            return max(0.0, fixed + per_million * activations / 1e6)
        if self.small_overhead_ms is None or self.small_macs_fraction >= 1:
            return self.overhead_ms
        t = (macs_fraction - self.small_macs_fraction) / (1 - self.small_macs_fraction)
        return max(0.0, self.small_overhead_ms + t * (self.overhead_ms - self.small_overhead_ms))

    def layer_sum(self, names: list[str], kept_in: np.ndarray, kept_out: np.ndarray) -> float:
        """Sum of the tabulated layer times (ms)."""
        total = 0.0
        for name, i, o in zip(names, kept_in, kept_out):
            table = self.layers.get(name)
            if table is not None:
                total += max(table(i, o), 0.0)
        return total

    def predict(self, names: list[str], kept_in: np.ndarray, kept_out: np.ndarray, macs_fraction: float = 1.0,
                activations: float | None = None) -> float:
        """Latency (ms) of a network whose layer ``names[i]`` keeps ``kept_in[i]`` inputs and
        ``kept_out[i]`` outputs, ``macs_fraction`` of the unpruned MACs, writing ``activations``
        elements per image (:meth:`overhead`)."""
        return self.overhead(macs_fraction, activations) + self.layer_sum(names, kept_in, kept_out)

    # ---- persistence -----------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"layers": {n: {"inputs": t.inputs, "outputs": t.outputs, "ms": t.ms} for n, t in self.layers.items()},
                           "overhead_ms": self.overhead_ms, "device": self.device, "batch_size": self.batch_size,
                           "info": self.info, "small_overhead_ms": self.small_overhead_ms,
                           "small_macs_fraction": self.small_macs_fraction, "overhead_fit": self.overhead_fit}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "LatencyTable":
        data = json.loads(text)
        return cls({n: LayerTable(**t) for n, t in data["layers"].items()}, data["overhead_ms"], data["device"],
                   data["batch_size"], data.get("info", {}), data.get("small_overhead_ms"), data.get("small_macs_fraction", 0.0),
                   tuple(data["overhead_fit"]) if data.get("overhead_fit") else None)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> "LatencyTable":
        try:
            return cls.from_json(path.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"latency table {path} cannot be read; delete it and it will be measured again") from None


def _width_grid(full: int, ratios: tuple[float, ...]) -> list[int]:
    return sorted({max(1, int(round(r * full))) for r in ratios} | {full})


@torch.no_grad()
def measure_latency_table(model: nn.Module, space: Any, device: torch.device | str = "cpu", batch_size: int = 1,
                          repeats: int = 7, progress: bool = True) -> LatencyTable:
    """Time every Conv2d/Linear layer of ``model`` over its width grid, and the whole network."""
    device = torch.device(device)
    model = model.to(device).eval()
    ratios = space.config.ratios
    start = time.perf_counter()
    layers: dict[str, LayerTable] = {}
    for info in tqdm([l for l in space.layers if l.has_weights], desc="latency table", unit="layer",
                     disable=not progress, dynamic_ncols=True):
        module = model.get_submodule(info.name)
        shape = info.input_shape
        grouped = info.kind == "conv" and info.groups > 1 and not info.depthwise
        ins = [info.in_channels] if grouped else _width_grid(info.in_channels, ratios)
        outs = [info.out_channels] if grouped or info.depthwise else _width_grid(info.out_channels, ratios)
        ms = []
        for i in ins:
            row = []
            for o in (outs if not info.depthwise else [None]):
                layer = ChannelsLast(layer_types.of(module).standalone(module, i, i if info.depthwise else o).to(device)).eval()
                ms_per_call = measure_latency(layer, (i, *shape[1:]), (batch_size,), device, warmup=2, repeats=repeats)[batch_size]
                row.append(info.calls * ms_per_call)  # a shared layer runs once per call (timed at its first call's input)
            ms.append(row)
        if info.depthwise:
            ms = [[v[0]] for v in ms]
            outs = [info.out_channels]
        layers[info.name] = LayerTable(ins, outs, ms)
    from automlprune.cost import CostModel
    from automlprune.latency import measure_latencies
    from automlprune.materialize import materialize

    cost = CostModel(space)
    calibration = calibration_candidates(space)
    shape = tuple(space.example_input.shape[1:])
    nets = [deployable(model)] + [deployable(materialize(model, c, space)) for c in calibration[1:]]
    measured = [m[batch_size] for m in measure_latencies(nets, shape, (batch_size,), device, rounds=3, repeats=max(10, repeats))]
    names = cost.layer_names
    table = LatencyTable(layers, 0.0, str(device), batch_size,
                         {"threads": torch.get_num_threads(), "torch": str(torch.__version__), "full_measured_ms": measured[0],
                          "smallest_measured_ms": measured[1], "calibration_measured_ms": measured,
                          "seconds": time.perf_counter() - start})
    features, residuals = [], []
    for candidate, ms in zip(calibration, measured):
        out = cost.from_kept(space.kept_channels(candidate).astype(float))
        features.append(cost.activations(out) / 1e6)
        residuals.append(ms - table.layer_sum(names, out["kept_in"], out["kept_out"]))
    table.overhead_ms, table.small_overhead_ms = max(0.0, residuals[0]), max(0.0, residuals[1])
    table.small_macs_fraction = cost(calibration[1])["macs"] / cost.base["macs"]
    table.overhead_fit = fit_overhead(np.array(features), np.array(residuals))
    table.info["calibration_activations_m"] = features
    return table


CALIBRATION = 6
"""Networks measured whole to fit the overhead: the unpruned one, the space's smallest, uniform
prunings at 3/4 and 1/2 of the widths and two seeded random allocations."""


def calibration_candidates(space: Any, seed: int = 0) -> list[Any]:
    """The :data:`CALIBRATION` candidates (unpruned first, smallest second)."""
    from automlprune.space import Candidate

    rng = np.random.default_rng(seed)
    randoms = [Candidate.make({g: float(rng.uniform(space.config.ratios[0], 1.0)) for g in space.prunable}) for _ in range(2)]
    return [space.full(), space.smallest(), space.uniform(0.75), space.uniform(0.5), *randoms]


def fit_overhead(activations_m: np.ndarray, residual_ms: np.ndarray) -> tuple[float, float]:
    """(fixed ms, ms per million elements): least squares of the residuals on the activations,
    the slope at least 0 (an overhead never shrinks as a network writes more)."""
    if len(activations_m) < 2 or np.ptp(activations_m) == 0:
        return float(max(0.0, residual_ms.mean())), 0.0
    slope, fixed = np.polyfit(activations_m, residual_ms, 1)
    if slope < 0:
        return float(max(0.0, residual_ms.mean())), 0.0
    return float(fixed), float(slope)
