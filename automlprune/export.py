"""Saving a materialized network in formats that load without automlprune."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from automlprune.errors import ConfigError

FORMATS = {".pt": "pt", ".pt2": "torch.export", ".ts": "torchscript", ".torchscript": "torchscript", ".onnx": "onnx"}


def export_model(model: nn.Module, example_input: torch.Tensor, path: str | Path, fmt: str | None = None) -> Path:
    """Save ``model`` to ``path``; the format follows the suffix unless ``fmt`` is given:

    * ``.pt``: ``torch.save`` of the whole module (loading needs the model's classes importable);
    * ``.pt2``: ``torch.export`` program (``torch.export.load``, no Python classes needed);
    * ``.ts``: TorchScript via tracing (``torch.jit.load``);
    * ``.onnx``: ONNX (needs the ``onnx`` and ``onnxscript`` packages).
    """
    path = Path(path)
    fmt = fmt or FORMATS.get(path.suffix)
    if fmt not in set(FORMATS.values()):
        raise ConfigError(f"cannot tell the export format of '{path.name}'; end the file name in one of {', '.join(FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = example_input[:1].to(next(model.parameters()).device)
    if fmt == "pt":
        torch.save(model, path)
    elif fmt == "torch.export":
        torch.export.save(torch.export.export(model, (example,)), path)
    elif fmt == "torchscript":
        with torch.no_grad():
            torch.jit.trace(model, example).save(str(path))
    else:
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise ConfigError("ONNX export needs the onnx and onnxscript packages; pip install onnx onnxscript") from None
        torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False, verbose=False)
    return path
