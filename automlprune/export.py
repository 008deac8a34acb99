"""Saving a materialized network: in formats that load without automlprune, or packed.

The packed format (``.qpt``) stores each quantized or sparse layer's weight in the storage
format the cost model chose for it (:mod:`automlprune.cost.formats`: dense, bitmask, CSR, N:M,
block), its values as bit-packed integer codes (``bits`` bits per weight; the float32 bit
pattern for an unquantized sparse layer), with the quantization scales and zero points, so the
file is the size the cost model reports as ``bytes`` (plus batch-norm statistics and metadata);
:func:`load_packed` restores the network, masks included. The other formats (.pt, .pt2, .ts,
.onnx) hold dense tensors: a sparse network's zeros are stored and computed like any weight. Layout: 8 magic bytes,
the length of the metadata (uint64), the metadata (zlib-compressed JSON: the architecture's
registry name, each module's class and changed sizes, where each tensor lies in the payload,
the quantization record), then the payload bytes. Nothing in the file is unpickled or executed:
the network is rebuilt from automlprune's model registry (or from the original model the caller
passes) and cut to the recorded sizes."""

from __future__ import annotations

from pathlib import Path

import copy
import json
import struct
import warnings
import zlib
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from automlprune.cost.formats import FORMATS as STORAGE_FORMATS, Layout, float_bits, from_float_bits, layout_of, smallest
from automlprune.errors import ConfigError
from automlprune.quantization import RECORD_ATTRIBUTE, Quantized, quantize, symmetric, unpack_codes
from automlprune.sparsity.masks import SPARSITY_ATTRIBUTE, sparsity_record
from automlprune.sparsity.patterns import Geometry, from_matrix, matrix_view, parse_pattern

FORMATS = {".pt": "pt", ".pt2": "torch.export", ".ts": "torchscript", ".torchscript": "torchscript", ".onnx": "onnx",
           ".qpt": "packed"}
MAGIC = b"AMLPQPT2"  # then the metadata length (uint64, little-endian), the metadata, the payload
OLD_MAGIC = b"AMLPQPT1"  # before 0.1: pickled metadata, no longer read
SIZE_ATTRIBUTES = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features")
"""Module attributes that record a layer's width (what materializing changes besides tensors)."""


def export_model(model: nn.Module, example_input: torch.Tensor, path: str | Path, fmt: str | None = None,
                 architecture: dict[str, Any] | None = None) -> Path:
    """Save ``model`` to ``path``; the format follows the suffix unless ``fmt`` is given:

    * ``.pt``: ``torch.save`` of the whole module (loading needs the model's classes importable);
    * ``.pt2``: ``torch.export`` program (``torch.export.load``, no Python classes needed);
    * ``.ts``: TorchScript via tracing (``torch.jit.load``);
    * ``.onnx``: ONNX (needs the ``onnx`` and ``onnxscript`` packages; input ``input``, output ``logits``);

    .pt2 and .onnx take any batch size (:data:`DYNAMIC_BATCH`); .pt2 and .ts hold the network
    as :func:`deployable` makes it (batch norms folded into the convolutions, channels-last
    memory format), .onnx with its batch norms folded (onnxruntime chooses its own layouts).
    * ``.qpt``: packed quantized weights (:func:`save_packed`, which records ``architecture``;
      load with :func:`load_packed`).
    """
    path = Path(path)
    fmt = fmt or FORMATS.get(path.suffix)
    if fmt not in set(FORMATS.values()):
        raise ConfigError(f"cannot tell the export format of '{path.name}'; end the file name in one of {', '.join(FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    first = example_input[:1].to(next(model.parameters()).device)
    example = first.repeat(2, *[1] * (first.dim() - 1))  # batch 2: torch.export specializes a batch of 1
    if fmt == "pt":
        torch.save(model, path)
    elif fmt == "packed":
        save_packed(model, path, architecture)
    elif fmt == "torch.export":
        with warnings.catch_warnings():  # channels-last weights are saved as strided views of their storage, which loads back exactly
            warnings.filterwarnings("ignore", message="No complete tensor found in the group")
            torch.export.save(torch.export.export(deployable(model), (example,), dynamic_shapes=DYNAMIC_BATCH), path)
    elif fmt == "torchscript":
        with torch.no_grad():
            torch.jit.trace(deployable(model), example).save(str(path))
    else:
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise ConfigError("ONNX export needs the onnx and onnxscript packages; pip install onnx onnxscript") from None
        torch.onnx.export(fold_batch_norms(model), (example,), str(path), dynamo=True, external_data=False, verbose=False,
                          dynamic_shapes=DYNAMIC_BATCH, input_names=["input"], output_names=["logits"])
    return path


DYNAMIC_BATCH = ({0: torch.export.Dim("batch", min=1, max=65_536)},)
"""The first input's batch dimension is dynamic in every traced export (.pt2, .onnx): a deployed
network takes any batch size, not only the example's."""


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """``model`` (in eval mode) with every batch norm that follows a convolution folded into it
    (``torch.fx``'s ``fuse``: the exported network runs one layer fewer per block and computes the
    same, within float rounding); the model itself is not changed. A model ``torch.fx`` cannot
    trace is exported unfolded."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model.eval())
    except Exception:  # noqa: BLE001 - untraceable Python control flow: export the module as it is
        return model


class ChannelsLast(nn.Module):
    """``net`` with its 4-D parameters in channels-last memory format; a 4-D input is converted
    inside the call (callers pass NCHW tensors), so the conversion is part of its latency."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)


def deployable(model: nn.Module) -> nn.Module:
    """The form of ``model`` automlprune deploys, times and budgets latency for: batch norms folded
    into the convolutions (:func:`fold_batch_norms`) and channels-last memory format (on 2 CPU
    cores channels-last runs ResNet-20 at batch 64 in 0.76x the time of the folded NCHW network,
    MobileNetV2 in 0.47x, VGG-11 in 0.82x: ``automlprune benchmark --suite latency``). A new
    module in eval mode; ``model`` is not changed."""
    folded = fold_batch_norms(model)
    return ChannelsLast(copy.deepcopy(model).eval() if folded is model else folded).eval()


class _OnnxModule(nn.Module):
    """An onnxruntime session behind the nn.Module call interface (CPU; float32 in, tensor out)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.detach().cpu().numpy()})[0])


def load_exported(path: str | Path) -> nn.Module | None:
    """The network an exported file holds, ready to run as a module: .pt2 (``torch.export.load``),
    .ts (``torch.jit.load``) or .onnx (onnxruntime, when installed); None for other formats."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix)
    if fmt == "torch.export":
        return torch.export.load(str(path)).module()
    if fmt == "torchscript":
        return torch.jit.load(str(path)).eval()
    if fmt == "onnx":
        try:
            return _OnnxModule(path)
        except ImportError:
            return None
    return None


def save_packed(model: nn.Module, path: str | Path, architecture: dict[str, Any] | None = None) -> Path:
    """Save a materialized network with its weights packed (a dense float32 network is stored
    raw, so every answer of a comparison has a file in the same format).

    The file holds one byte payload: per quantized or sparse layer the arrays of its storage
    format (:func:`automlprune.cost.formats.smallest`: the values at ``bits`` bits each, and a
    sparse layer's mask as a bitmask, CSR indices, N:M positions or block indices), float32
    scales and, for asymmetric schemes, int32 zero points; every other parameter and buffer as
    raw bytes. On disk that is the cost model's ``bytes`` (each array padded to whole bytes)
    plus the batch-norm running statistics (buffers, 2 float32 per channel) plus the compressed
    JSON metadata (a few KB). ``architecture`` (``{"model", "num_classes", "in_channels", "kwargs"}``,
    :meth:`automlprune.tasks.Task.architecture`) names the registry model the network was cut
    from, so :func:`load_packed` rebuilds it alone; without it, loading needs the original model.
    """
    record = getattr(model, RECORD_ATTRIBUTE, None) or {"layers": {}}
    sparse = sparsity_record(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    chunks: list[bytes] = []
    entries: list[dict[str, Any]] = []
    offset = 0

    def put(data: bytes) -> list[int]:
        nonlocal offset
        chunks.append(data)
        offset += len(data)
        return [offset - len(data), len(data)]

    modules = {}
    for module_name, module in model.named_modules():
        modules[module_name] = {"class": _class_name(module),
                                "sizes": {a: getattr(module, a) for a in SIZE_ATTRIBUTES if isinstance(getattr(module, a, None), int)}}
        for kind, store in (("parameter", module._parameters), ("buffer", module._buffers)):
            for name, tensor in store.items():
                if tensor is None:
                    continue
                entry: dict[str, Any] = {"module": module_name, "name": name, "kind": kind, "shape": list(tensor.shape),
                                         "dtype": str(tensor.dtype).replace("torch.", "")}
                weight = kind == "parameter" and name == "weight"
                if weight and (module_name in record["layers"] or module_name in sparse):
                    entry.update(_pack_weight(tensor.detach(), record["layers"].get(module_name), record.get("scheme"),
                                              sparse.get(module_name), put))
                else:
                    entry["raw"] = put(tensor.detach().contiguous().numpy().tobytes())
                entries.append(entry)
    kept = {k: v for k, v in record.items() if k != "layers"}
    meta = {"format": 3, "architecture": architecture, "modules": modules, "entries": entries,
            "record": {**kept, "layers": {n: {"bits": i["bits"]} for n, i in record["layers"].items()}},
            "sparsity": {n: {"pattern": i["pattern"], "density": i["density"]} for n, i in sparse.items()}}
    blob = zlib.compress(json.dumps(meta).encode(), 9)
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(blob)) + blob)
        f.writelines(chunks)
    return path


def _pack_weight(weight: torch.Tensor, quantized: dict[str, Any] | None, scheme: str | None, sparse: dict[str, Any] | None,
                 put: Any) -> dict[str, Any]:
    """A weight's entry: its values (quantization codes, or float32 bit patterns) and mask packed
    in the smallest format the cost model counts for its layout, plus its scales."""
    entry: dict[str, Any] = {}
    if quantized is not None:
        q = quantize(weight, quantized["bits"], scheme)
        values, bits = (q.codes + q.offset).numpy(), q.bits
        entry.update(scale=put(q.scale.float().numpy().tobytes()),
                     zero_point=None if symmetric(q.scheme) else put(q.zero_point.to(torch.int32).numpy().tobytes()))
    else:
        values, bits = float_bits(weight), 32
    geometry = Geometry.of(weight)
    if sparse is not None:
        mask = matrix_view(sparse["mask"].bool()).numpy()
        layout = layout_of(parse_pattern(sparse["pattern"]), geometry, sparse["density"], bits, mask)
        if int(mask.sum()) != layout.kept:
            raise ConfigError(f"a sparse layer keeps {int(mask.sum())} weights but its pattern {sparse['pattern']} at density "
                              f"{sparse['density']:g} keeps {layout.kept}; export a network automlprune materialized")
    else:
        layout, mask = Layout(geometry.rows, geometry.columns, geometry.weights, bits), np.ones((geometry.rows, geometry.columns), bool)
    name, _ = smallest(layout, sparse=sparse is not None)
    arrays = STORAGE_FORMATS.get(name).pack(mask, matrix_view(torch.from_numpy(np.asarray(values).astype(np.int64))).numpy(), layout)
    return {**entry, "bits": bits, "format": name, "layout": {**layout.__dict__, "block": list(layout.block) if layout.block else None},
            "arrays": {k: put(np.asarray(v, dtype=np.uint8).tobytes()) for k, v in arrays.items()}}


def _unpack_weight(entry: dict[str, Any], scheme: str | None, get: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Inverse of :func:`_pack_weight`: (weight, mask, quantization record entry or {})."""
    layout_data = dict(entry["layout"])
    layout = Layout(**{**layout_data, "block": tuple(layout_data["block"]) if layout_data.get("block") else None})
    arrays = {k: get(span, np.uint8) for k, span in entry["arrays"].items()}
    mask, values = STORAGE_FORMATS.get(entry["format"]).unpack(arrays, layout)
    shape = entry["shape"]
    mask = from_matrix(torch.from_numpy(np.ascontiguousarray(mask)), shape)
    values = from_matrix(torch.from_numpy(np.ascontiguousarray(values)), shape)
    if "scale" not in entry:
        return from_float_bits(values.numpy()) * mask, mask, {}
    scale = torch.from_numpy(get(entry["scale"], np.float32).copy())
    zero = (torch.from_numpy(get(entry["zero_point"], np.int32).astype(np.int64)) if entry["zero_point"] is not None
            else torch.zeros_like(scale, dtype=torch.int64))
    q = Quantized(values, scale, zero, entry["bits"], scheme)
    return replace(q, codes=values - q.offset).dequantize() * mask, mask, {"scale": scale, "zero_point": zero}


def load_packed(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The network :func:`save_packed` wrote, with its weights dequantized to float32 (their
    quantized values) and its quantization record restored. It is rebuilt from the original
    architecture, ``model`` (the unpruned network; copied, not changed) or else the registry
    model the file names, cut to the recorded sizes: nothing in the file runs as code."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror}); give a .qpt file that 'automlprune export' wrote") from None
    if data.startswith(OLD_MAGIC):
        raise ConfigError(f"{path} was written by an older automlprune whose metadata was pickled, which is no longer read; "
                          "export the network again")
    if not data.startswith(MAGIC):
        raise ConfigError(f"{path} is not a packed automlprune network; give a .qpt file that 'automlprune export' wrote")
    start = len(MAGIC) + 8
    (length,) = struct.unpack("<Q", data[len(MAGIC):start])
    try:
        meta = json.loads(zlib.decompress(data[start:start + length]))
    except (zlib.error, ValueError) as exc:
        raise ConfigError(f"cannot read {path} as a packed network ({exc}); give a .qpt file that 'automlprune export' wrote") from None
    net = _skeleton(path, meta, model)
    payload = np.frombuffer(data, dtype=np.uint8, offset=start + length)
    record = {**meta["record"], "layers": {n: dict(i) for n, i in meta["record"]["layers"].items()}}
    scheme = record.get("scheme")

    def get(span: list[int], dtype: np.dtype) -> np.ndarray:
        return np.frombuffer(payload[span[0]: span[0] + span[1]].tobytes(), dtype=dtype)

    sparse = {}
    for e in meta["entries"]:
        module = net.get_submodule(e["module"])
        count = int(np.prod(e["shape"], dtype=np.int64))
        if "format" in e:
            tensor, mask, quantized = _unpack_weight(e, scheme, get)
            if quantized:
                record["layers"][e["module"]].update(quantized)
            if e["module"] in meta.get("sparsity", {}):
                sparse[e["module"]] = {**meta["sparsity"][e["module"]], "mask": mask.bool()}
        elif "codes" in e:  # files of format 2: dense quantized layers
            scale = torch.from_numpy(get(e["scale"], np.float32).copy())
            zero = (torch.from_numpy(get(e["zero_point"], np.int32).astype(np.int64)) if e["zero_point"] is not None
                    else torch.zeros_like(scale, dtype=torch.int64))
            unsigned = torch.from_numpy(unpack_codes(get(e["codes"], np.uint8), e["bits"], count)).reshape(e["shape"])
            q = Quantized(unsigned, scale, zero, e["bits"], scheme)
            tensor = replace(q, codes=unsigned - q.offset).dequantize()
            record["layers"][e["module"]].update(scale=scale, zero_point=zero)
        else:
            tensor = torch.from_numpy(get(e["raw"], np.dtype(e["dtype"])).copy()).reshape(e["shape"])
        if e["kind"] == "parameter":
            module._parameters[e["name"]] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
        else:
            module._buffers[e["name"]] = tensor
    if record.get("layers") or record.get("activation_bits", 32) < 32:
        setattr(net, RECORD_ATTRIBUTE, record)
    if sparse:
        setattr(net, SPARSITY_ATTRIBUTE, sparse)
    return net.eval()


def _class_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _skeleton(path: Path, meta: dict[str, Any], model: nn.Module | None) -> nn.Module:
    """The original architecture (``model`` copied, or built from the registry name in
    ``meta``) with every module's sizes set as recorded, after checking its modules are the
    recorded ones (a file from another architecture is refused)."""
    if model is None:
        arch = meta.get("architecture")
        if not arch:
            raise ConfigError(f"{path} does not name its architecture; load it with load_packed(path, original_model)")
        from automlprune.models import build_model

        model = build_model(arch["model"], num_classes=arch["num_classes"], in_channels=arch["in_channels"], **arch.get("kwargs", {}))
    net = copy.deepcopy(model).cpu()
    present = dict(net.named_modules())
    if set(present) != set(meta["modules"]):
        raise ConfigError(f"{path} holds a network with other modules than this architecture; load it with the model it was exported from")
    for name, info in meta["modules"].items():
        if _class_name(present[name]) != info["class"]:
            raise ConfigError(f"{path} holds a network whose module '{name}' is a {info['class']}, not a "
                              f"{_class_name(present[name])}; load it with the model it was exported from")
        for attribute, value in info["sizes"].items():
            setattr(present[name], attribute, value)
    return net
