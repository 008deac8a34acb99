"""A per-layer latency table, measured once, that predicts a candidate's inference latency.

Every Conv2d/Linear layer is timed on its own (a fresh layer of the same kernel, stride,
padding and input size) over a grid of kept input and output widths — the space's keep
ratios applied to each dimension — on the target device and batch size. A candidate's
latency is then ``overhead + sum over layers of the time interpolated (bilinearly) at its
kept widths``. The overhead (batch norm, activations, additions, pooling, dispatch) is what
the layer sum misses on two networks measured whole — the unpruned one and the space's
smallest — and is interpolated linearly in the candidate's MACs fraction between them.
This is the lookup-table approach of NetAdapt and AMC's latency variant.
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

    def overhead(self, macs_fraction: float) -> float:
        """Overhead (ms) at a MACs fraction: linear between the smallest and the full network."""
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

    def predict(self, names: list[str], kept_in: np.ndarray, kept_out: np.ndarray, macs_fraction: float = 1.0) -> float:
        """Latency (ms) of a network whose layer ``names[i]`` keeps ``kept_in[i]`` inputs and
        ``kept_out[i]`` outputs, ``macs_fraction`` of the unpruned MACs."""
        return self.overhead(macs_fraction) + self.layer_sum(names, kept_in, kept_out)

    # ---- persistence -----------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"layers": {n: {"inputs": t.inputs, "outputs": t.outputs, "ms": t.ms} for n, t in self.layers.items()},
                           "overhead_ms": self.overhead_ms, "device": self.device, "batch_size": self.batch_size,
                           "info": self.info, "small_overhead_ms": self.small_overhead_ms,
                           "small_macs_fraction": self.small_macs_fraction}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "LatencyTable":
        data = json.loads(text)
        return cls({n: LayerTable(**t) for n, t in data["layers"].items()}, data["overhead_ms"], data["device"],
                   data["batch_size"], data.get("info", {}), data.get("small_overhead_ms"), data.get("small_macs_fraction", 0.0))

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
                layer = layer_types.of(module).standalone(module, i, i if info.depthwise else o).to(device).eval()
                ms_per_call = measure_latency(layer, (i, *shape[1:]), (batch_size,), device, warmup=2, repeats=repeats)[batch_size]
                row.append(info.calls * ms_per_call)  # a shared layer runs once per call (timed at its first call's input)
            ms.append(row)
        if info.depthwise:
            ms = [[v[0]] for v in ms]
            outs = [info.out_channels]
        layers[info.name] = LayerTable(ins, outs, ms)
    shape = tuple(space.example_input.shape[1:])
    full = measure_latency(model, shape, (batch_size,), device, warmup=5, repeats=max(20, 3 * repeats))[batch_size]
    from automlprune.cost import CostModel
    from automlprune.materialize import materialize

    cost = CostModel(space)
    smallest = space.smallest()
    small = measure_latency(materialize(model, smallest, space), shape, (batch_size,), device, warmup=5,
                            repeats=max(20, 3 * repeats))[batch_size]
    names = cost.layer_names

    def widths(candidate: Any) -> tuple[np.ndarray, np.ndarray]:
        out = cost.from_kept(space.kept_channels(candidate).astype(float))
        return out["kept_in"], out["kept_out"]

    table = LatencyTable(layers, 0.0, str(device), batch_size,
                         {"threads": torch.get_num_threads(), "torch": str(torch.__version__), "full_measured_ms": full,
                          "smallest_measured_ms": small, "seconds": time.perf_counter() - start})
    table.overhead_ms = max(0.0, full - table.layer_sum(names, *widths(space.full())))
    table.small_overhead_ms = max(0.0, small - table.layer_sum(names, *widths(smallest)))
    table.small_macs_fraction = cost(smallest)["macs"] / cost.base["macs"]
    return table
