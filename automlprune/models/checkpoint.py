"""Checkpoints: a state dict plus metadata (architecture, dataset, accuracy, versions),
always loaded with ``torch.load(weights_only=True)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from automlprune.errors import CheckpointError


def save_checkpoint(path: str | Path, model: nn.Module, metadata: dict[str, Any]) -> Path:
    """Write ``{"state_dict", "metadata"}``; metadata must hold only plain Python values."""
    import json

    import automlprune

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"automlprune_version": automlprune.__version__, "torch_version": str(torch.__version__), **metadata}
    meta = json.loads(json.dumps(meta, default=str))  # plain types only: weights_only loading accepts nothing else
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"state_dict": model.state_dict(), "metadata": meta}, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read (state_dict, metadata) from a checkpoint written by :func:`save_checkpoint`, or from
    a plain state dict (``torch.save(model.state_dict(), path)``; metadata ``{}``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train it with 'automlprune train <task>'")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}); delete it and retrain with 'automlprune train <task>'") from None
    if isinstance(blob, dict) and blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return blob, {}  # a plain state dict (a model's own checkpoint): no metadata to check
    if not isinstance(blob, dict) or "state_dict" not in blob or "metadata" not in blob:
        raise CheckpointError(f"{path} is neither an automlprune checkpoint nor a state dict; retrain with 'automlprune train <task>'")
    return blob["state_dict"], blob["metadata"]


def load_weights(model: nn.Module, path: str | Path, expect: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint into ``model`` after checking its metadata matches ``expect``
    (model name and options, dataset); returns the metadata."""
    state, meta = read_checkpoint(path)
    for key, value in expect.items():
        if key in meta and meta[key] != value:
            raise CheckpointError(
                f"checkpoint {path} was made for {key}={meta[key]!r} but the task needs {value!r}; "
                "point the task at the right checkpoint or retrain with 'automlprune train <task>'"
            )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model's architecture (layer names or shapes differ); retrain with 'automlprune train <task>'"
        ) from None
    return meta
