"""automlprune: search per-layer channel widths and bit widths of trained PyTorch CNNs under a
budget (MACs, parameters, bytes or latency) and hand back the physically smaller network.

The public API is re-exported here lazily (``import automlprune`` stays cheap)::

    from automlprune import compress  # your model and data: result = compress(model, x, train=loader)
    from automlprune import Candidate, CostModel, Evaluator, SearchSpace, materialize
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Candidate": "automlprune.space", "SearchSpace": "automlprune.space", "SpaceConfig": "automlprune.space",
    "CostModel": "automlprune.cost", "Costs": "automlprune.cost",
    "Evaluator": "automlprune.evaluator", "EvalResult": "automlprune.evaluator",
    "materialize": "automlprune.materialize", "mask": "automlprune.materialize",
    "channel_order": "automlprune.importance", "CRITERIA": "automlprune.importance",
    "Task": "automlprune.tasks", "TaskSpec": "automlprune.tasks",
    "build_model": "automlprune.models", "load_dataset": "automlprune.data",
    "export_model": "automlprune.export", "AutomlpruneError": "automlprune.errors",
    "compress": "automlprune.api", "compare": "automlprune.api", "CompressResult": "automlprune.api",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'automlprune' has no attribute '{name}'")


def _register_environments() -> None:
    """Register ``automlprune/LayerWidth-v0`` with Gymnasium (lazy entry point)."""
    try:
        import gymnasium
    except ImportError:  # gymnasium is a dependency; tolerate its absence in stripped installs
        return
    if "automlprune/LayerWidth-v0" not in gymnasium.registry:
        gymnasium.register(id="automlprune/LayerWidth-v0", entry_point="automlprune.rl.env:make_layer_width_env")


_register_environments()
