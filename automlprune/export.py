"""Saving a materialized network: in formats that load without automlprune, or packed.

The packed format (``.qpt``) stores each quantized layer's weights as bit-packed integer codes
(``bits`` bits per weight) with their scales and zero points, so the file is about the size the
cost model reports as ``bytes``; :func:`load_packed` restores the network."""

from __future__ import annotations

from pathlib import Path

import copy

import torch
from torch import nn

from automlprune.errors import ConfigError
from automlprune.quantization import RECORD_ATTRIBUTE, pack_codes, quantize, symmetric, unpack_codes

FORMATS = {".pt": "pt", ".pt2": "torch.export", ".ts": "torchscript", ".torchscript": "torchscript", ".onnx": "onnx",
           ".qpt": "packed"}
PACKED_FORMAT = "automlprune.packed/1"


def export_model(model: nn.Module, example_input: torch.Tensor, path: str | Path, fmt: str | None = None) -> Path:
    """Save ``model`` to ``path``; the format follows the suffix unless ``fmt`` is given:

    * ``.pt``: ``torch.save`` of the whole module (loading needs the model's classes importable);
    * ``.pt2``: ``torch.export`` program (``torch.export.load``, no Python classes needed);
    * ``.ts``: TorchScript via tracing (``torch.jit.load``);
    * ``.onnx``: ONNX (needs the ``onnx`` and ``onnxscript`` packages);
    * ``.qpt``: packed quantized weights (:func:`save_packed`; load with :func:`load_packed`).
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
    elif fmt == "packed":
        save_packed(model, path)
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


def save_packed(model: nn.Module, path: str | Path) -> Path:
    """Save a quantized materialized network with its weights bit-packed.

    The file holds the module with its quantized layers' weights emptied, and per quantized layer
    the packed codes (ceil(weights x bits / 8) bytes), float32 scales and, for asymmetric schemes,
    int32 zero points. On disk it takes the cost model's ``bytes`` plus the batch-norm running
    statistics (buffers, 2 float32 per channel) plus the pickle's metadata (a few KB per model).
    """
    record = getattr(model, RECORD_ATTRIBUTE, None)
    if not record or not record.get("layers"):
        raise ConfigError("the network has no quantized layers to pack; give its candidate bits below 32, or export as .pt2")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    skeleton = copy.deepcopy(model).cpu().eval()
    packed = {}
    for name, info in record["layers"].items():
        module = skeleton.get_submodule(name)
        q = quantize(module.weight, info["bits"], record["scheme"])
        packed[name] = {"bits": q.bits, "shape": tuple(module.weight.shape),
                        "codes": torch.from_numpy(pack_codes((q.codes + q.offset).numpy(), q.bits)),
                        "scale": q.scale.float(), "zero_point": None if symmetric(q.scheme) else q.zero_point.to(torch.int32)}
        module.weight = nn.Parameter(torch.empty(0), requires_grad=False)
    kept = {k: v for k, v in record.items() if k != "layers"}
    setattr(skeleton, RECORD_ATTRIBUTE, {**kept, "layers": {n: {"bits": i["bits"]} for n, i in record["layers"].items()}})
    torch.save({"format": PACKED_FORMAT, "module": skeleton, "packed": packed}, path)
    return path


def load_packed(path: str | Path) -> nn.Module:
    """The network :func:`save_packed` wrote, with its weights dequantized to float32 (their
    quantized values) and its quantization record restored. Needs the model's classes importable."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise ConfigError(f"cannot read {path} as a packed network ({exc}); give a .qpt file that 'automlprune export' wrote") from None
    if not isinstance(blob, dict) or blob.get("format") != PACKED_FORMAT:
        raise ConfigError(f"{path} is not a packed automlprune network; give a .qpt file that 'automlprune export' wrote")
    model = blob["module"]
    record = getattr(model, RECORD_ATTRIBUTE)
    for name, p in blob["packed"].items():
        count = int(torch.Size(p["shape"]).numel())
        scheme = record["scheme"]
        codes = torch.from_numpy(unpack_codes(p["codes"].numpy(), p["bits"], count)).reshape(p["shape"])
        zero = p["zero_point"].long() if p["zero_point"] is not None else torch.zeros_like(p["scale"], dtype=torch.int64)
        offset = 2 ** (p["bits"] - 1) - 1 if symmetric(scheme) else 0
        shape = (-1,) + (1,) * (codes.ndim - 1)
        weight = (codes - offset - zero.view(shape)).float() * p["scale"].view(shape)
        model.get_submodule(name).weight = nn.Parameter(weight)
        record["layers"][name].update(scale=p["scale"], zero_point=zero)
    return model
