"""Coverage benchmark (``automlprune benchmark --suite models``): can automlprune search every
torchvision CNN family, with exact costs and networks that compute what their masks say?

Per family (random weights, batch norms given random statistics and layer scales near 1,
so no block is an identity, a small input to save time), it records:

* the space: time to build it (Torch-Pruning's dependency graph included) and to self-check it,
  the channel groups found, those searched in units of a grouped convolution's or group norm's
  groups, and those pinned automatically, each with its reason;
* cost exactness: the cost model's MACs and parameters against PyTorch's FLOP counter and
  ``parameters()`` of the materialized network, for the narrowest and a few random candidates;
* equivalence: the largest difference between the materialized and the masked network on the
  same inputs (not comparable for candidates that shrink a group normalized by a LayerNorm or
  GroupNorm, whose statistics span the channels: reported as such);
* export: the materialized network of one random candidate exported with ``torch.export`` (.pt2)
  and ONNX (onnxruntime), loaded back and run at batch 1 and 7 against the module.

Each family's result is written to ``<out>/families/<name>.json`` as soon as it is measured; a
rerun skips the families already there (delete a file to measure it again).
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from automlprune.errors import AutomlpruneError

FAMILIES: dict[str, str] = {
    "resnet18": "ResNet-18", "resnet50": "ResNet-50", "resnext50_32x4d": "ResNeXt-50 (32x4d)",
    "wide_resnet50_2": "Wide-ResNet-50-2", "mobilenet_v2": "MobileNetV2", "mobilenet_v3_large": "MobileNetV3-Large",
    "efficientnet_b0": "EfficientNet-B0", "regnet_x_400mf": "RegNetX-400MF", "regnet_y_400mf": "RegNetY-400MF",
    "densenet121": "DenseNet-121", "shufflenet_v2_x1_0": "ShuffleNetV2 x1.0", "squeezenet1_0": "SqueezeNet 1.0",
    "googlenet": "GoogLeNet", "mnasnet1_0": "MNASNet 1.0", "convnext_tiny": "ConvNeXt-Tiny", "vgg11_bn": "VGG-11-BN",
}
"""torchvision model name -> family name in the report."""

INPUT_SIZE = 64
"""Height and width of the example input (pixels): small to save time, large enough for every family."""
CANDIDATES = 3
"""Random candidates checked per family, besides the narrowest."""


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure_family(name: str, size: int = INPUT_SIZE, candidates: int = CANDIDATES, seed: int = 0,
                   export: bool = True) -> dict[str, Any]:
    """One row of the coverage table for torchvision model ``name`` (see the module docstring;
    without ``export``, the export check is left out)."""
    from automlprune.cost import CostModel
    from automlprune.cost.model import count_macs
    from automlprune.materialize import materialize, mask
    from automlprune.models import build_model
    from automlprune.nn import layer_types
    from automlprune.self_check import check_space
    from automlprune.nn.randomize import randomize_norms
    from automlprune.space import SearchSpace
    from automlprune.space.search_space import AutoPinned

    torch.manual_seed(seed)
    model = build_model(f"torchvision:{name}", 10, 3).eval()
    randomize_norms(model, seed)
    x = torch.randn(7, 3, size, size, generator=torch.Generator().manual_seed(seed))
    row: dict[str, Any] = {"model": name, "family": FAMILIES.get(name, name), "input": [3, size, size],
                           "params": sum(p.numel() for p in model.parameters())}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AutoPinned)  # the pinned groups are a column of the table
            space, row["space_build_s"] = _timed(lambda: SearchSpace(model, x[:1]))
        cost = CostModel(space, model)
        _, row["self_check_s"] = _timed(lambda: check_space(space, model, x[:1], cost))
    except AutomlpruneError as exc:
        return {**row, "searchable": False, "refused": str(exc)}
    row.update(searchable=True, groups=len(space.groups), searched=len(space.prunable), dimensions=space.ndim,
               in_units={g.name: g.unit for g in space.groups if g.unit > 1}, auto_pinned=dict(space.auto_pinned),
               macs=cost.base["macs"])
    inexact = {layer.name for layer in space.layers if not layer_types.of(model.get_submodule(layer.name)).exact_when_masked}
    rng = np.random.default_rng(seed)
    checks = [space.smallest()] + [space.decode(rng.uniform(-1, 1, space.ndim)) for _ in range(candidates)]
    macs_error = params_error = 0.0
    differences, skipped = [], 0
    for candidate in checks:
        net = materialize(model, candidate, space).eval()
        costs = cost(candidate)
        macs_error = max(macs_error, abs(costs.macs - count_macs(net, x[:1])) / max(1.0, costs.macs))
        params_error = max(params_error, abs(costs.params - sum(p.numel() for p in net.parameters())) / max(1.0, costs.params))
        shrunk = {g for g, r in candidate.ratios if r < 1}
        if any(m.layer in inexact for g in shrunk for m in space.group_by_name[g].members):
            skipped += 1
            continue
        with torch.no_grad():
            differences.append(float((net(x) - mask(model, candidate, space).eval()(x)).abs().max()))
    row.update(candidates_checked=len(checks), macs_relative_error=macs_error, params_relative_error=params_error,
               max_masked_difference=max(differences) if differences else None, equivalence_not_comparable=skipped)
    if export:
        row["export"] = _export_check(materialize(model, checks[-1], space).eval(), x)
    return row


def _export_check(net: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Export ``net`` to .pt2 and .onnx, load each back and compare at batch 1 and 7."""
    from automlprune.export import export_model, load_exported

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        expected = net(x)
        for suffix in (".pt2", ".onnx"):
            try:
                path, seconds = _timed(lambda: export_model(net, x[:1], Path(tmp) / f"net{suffix}"))
                loaded = load_exported(path)
                if loaded is None:
                    out[suffix] = {"ok": False, "error": "no runtime to load it (onnxruntime missing)"}
                    continue
                difference = max(float((loaded(x[:b]) - expected[:b]).abs().max()) for b in (1, 7))
                out[suffix] = {"ok": difference < 1e-3, "max_abs_difference": difference, "export_s": seconds,
                               "batches": [1, 7], "bytes": path.stat().st_size}
            except Exception as exc:  # noqa: BLE001 - a failed export is a result of this benchmark
                out[suffix] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    return out


def run_models_benchmark(out: Path, names: list[str] | None = None, size: int = INPUT_SIZE, candidates: int = CANDIDATES,
                         progress: bool = True) -> dict[str, Any]:
    """Measure every family (resuming from ``out/families``), write ``out/report.md`` and
    ``out/models.json``, return the report's data."""
    names = names or list(FAMILIES)
    folder = Path(out) / "families"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(names, 1):
        path = folder / f"{name}.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
            continue
        if progress:
            print(f"[{i}/{len(names)}] {name} ...", flush=True)
        row, seconds = _timed(lambda: measure_family(name, size, candidates))
        row["seconds"] = seconds
        path.write_text(json.dumps(row, indent=1))
        rows.append(row)
        if progress:
            print(f"[{i}/{len(names)}] {name}: {_status(row)} ({seconds:.0f} s)", flush=True)
    report = {"input_size": size, "candidates": candidates, "machine": {"cpu": platform.processor() or platform.machine(),
                                                                         "threads": torch.get_num_threads(), "torch": torch.__version__},
              "families": rows}
    (Path(out) / "models.json").write_text(json.dumps(report, indent=1))
    (Path(out) / "report.md").write_text(render(report))
    return report


def _status(row: dict[str, Any]) -> str:
    if not row["searchable"]:
        return "refused"
    exports = row.get("export", {})
    ok = all(v.get("ok") for v in exports.values())
    return (f"{row['searched']}/{row['groups']} groups searched, MACs error {row['macs_relative_error']:.1e}, "
            f"masked difference {_fmt(row['max_masked_difference'])}, exports {'ok' if ok else 'FAILED'}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1e}"


def render(report: dict[str, Any]) -> str:
    """The Markdown coverage table."""
    size = report["input_size"]
    lines = ["# Coverage of torchvision CNN families", "",
             f"Command: `automlprune benchmark --suite models` (random weights, random batch-norm statistics, input 3x{size}x{size}, "
             f"the narrowest and {report['candidates']} random candidates per family; "
             f"{report['machine']['threads']} threads, torch {report['machine']['torch']}).", "",
             "| family | space build (s) | self-check (s) | groups searched / found | in units (grouped) | pinned automatically | "
             "MACs error | params error | materialized vs masked | .pt2 batch 1, 7 | .onnx batch 1, 7 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    notes = []
    for row in report["families"]:
        if not row["searchable"]:
            lines.append(f"| {row['family']} | refused | | | | | | | | | |")
            notes.append(f"- **{row['family']}** is refused: {row['refused']}")
            continue
        exports = [row["export"].get(s, {}) for s in (".pt2", ".onnx")]
        cells = ["ok ({:.0e})".format(e["max_abs_difference"]) if e.get("ok") else "fails" for e in exports]
        masked = _fmt(row["max_masked_difference"])
        if row["equivalence_not_comparable"]:
            masked += f" ({row['equivalence_not_comparable']} with a LayerNorm/GroupNorm group shrunk: n/a)"
        lines.append(f"| {row['family']} | {row['space_build_s']:.1f} | {row['self_check_s']:.1f} | {row['searched']} / {row['groups']} | "
                     f"{len(row['in_units'])} | {len(row['auto_pinned'])} | {row['macs_relative_error']:.0e} | "
                     f"{row['params_relative_error']:.0e} | {masked} | {cells[0]} | {cells[1]} |")
        for group, reason in row["auto_pinned"].items():
            notes.append(f"- {row['family']}: group `{group}` pinned automatically: {reason}.")
        for suffix, e in zip((".pt2", ".onnx"), exports):
            if not e.get("ok"):
                notes.append(f"- {row['family']}: {suffix} export failed: {e.get('error', 'output differs')}.")
    searchable = sum(r["searchable"] for r in report["families"])
    lines += ["", f"{searchable} of {len(report['families'])} families searchable.", "",
              "Groups *in units* feed or leave a grouped convolution (or group norm): the search keeps or removes one "
              "channel per convolution group at a time, so every network still splits evenly into its groups "
              "(Torch-Pruning prunes them the same way). *Pinned automatically*: groups kept whole because automlprune "
              "cannot shrink them exactly; the rest of the model is searched.", ""]
    if notes:
        lines += ["## Notes", ""] + notes + [""]
    return "\n".join(lines)
