"""Weight (and activation) quantization: one uniform quantizer used for evaluation, for
quantization-aware fine-tuning and for packed export.

Schemes (the search space's ``bits.scheme``):

* ``per_channel_symmetric`` (default): one scale per output channel, codes in
  [-(2^(b-1) - 1), 2^(b-1) - 1], scale = max|w| / (2^(b-1) - 1), no zero point;
* ``per_channel_asymmetric``: one scale and one zero point per output channel, codes in
  [0, 2^b - 1] over [min(w, 0), max(w, 0)];
* ``per_tensor_symmetric`` / ``per_tensor_asymmetric``: the same with one scale (and zero point)
  for the whole weight tensor.

Storage (what the cost model counts as bytes): codes at b bits each, scales as float32 (4 bytes),
zero points as int32 (4 bytes). Quantization-aware fine-tuning keeps float shadow weights and
quantizes them in every forward pass with a straight-through estimator (the gradient of the
rounding is taken as 1; Bengio et al. 2013, as in HAQ and most QAT).

Activations, when the space sets ``bits.activations`` below 32, are quantized at the input of
every Conv2d/Linear layer, per tensor and asymmetric, over a range calibrated once as the min
and max seen on the evaluator's BN batches; the network's first input (the image) included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from automlprune.errors import ConfigError
from automlprune.nn.hooks import run_reading_inputs

SCHEMES = ("per_channel_symmetric", "per_channel_asymmetric", "per_tensor_symmetric", "per_tensor_asymmetric")
SCALE_BYTES = 4  # float32 scale
ZERO_POINT_BYTES = 4  # int32 zero point
RECORD_ATTRIBUTE = "automlprune_quantization"
"""Attribute a quantized materialized network carries: {"scheme", "activation_bits", "layers": {name: {"bits", "scale", "zero_point"}}}."""


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme '{scheme}'; use one of: {', '.join(SCHEMES)}")
    return scheme


def per_channel(scheme: str) -> bool:
    return scheme.startswith("per_channel")


def symmetric(scheme: str) -> bool:
    return scheme.endswith("_symmetric")


def scale_bytes_per_entry(scheme: str) -> int:
    """Bytes stored per scale entry (a scale, plus a zero point for asymmetric schemes)."""
    return SCALE_BYTES + (0 if symmetric(scheme) else ZERO_POINT_BYTES)


@dataclass(frozen=True)
class Quantized:
    """Integer codes of a weight tensor and how to map them back: w ~ (codes - zero_point) x scale.

    codes: int64, the weight's shape, in [0, 2^bits - 1] once offset by :attr:`offset`;
    scale: float32, shape (out_channels,) per channel or (1,) per tensor; zero_point: int64 like scale.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    scheme: str

    @property
    def offset(self) -> int:
        """Added to symmetric codes to make them unsigned (they span [-offset, offset])."""
        return 2 ** (self.bits - 1) - 1 if symmetric(self.scheme) else 0

    def dequantize(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.codes.ndim - 1)
        return ((self.codes - self.zero_point.view(shape)).float() * self.scale.view(shape))


def _ranges(weight: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    flat = weight.detach().flatten(1) if per_channel(scheme) else weight.detach().reshape(1, -1)
    return flat.amin(dim=1), flat.amax(dim=1)


def quantize(weight: torch.Tensor, bits: int, scheme: str = "per_channel_symmetric") -> Quantized:
    """Quantize ``weight`` (out channels first) to ``bits`` under ``scheme`` (see module docstring)."""
    check_scheme(scheme)
    if not 2 <= bits <= 31:
        raise ConfigError(f"{bits}-bit weights cannot be quantized; use 2 to 31 bits (32 = float32)")
    lo, hi = _ranges(weight, scheme)
    shape = (-1,) + (1,) * (weight.ndim - 1) if per_channel(scheme) else (1,) * weight.ndim
    w = weight.detach().float()
    if symmetric(scheme):
        levels = 2 ** (bits - 1) - 1
        scale = torch.maximum(lo.abs(), hi.abs()).float().clamp_min(1e-12) / levels
        zero = torch.zeros_like(scale, dtype=torch.int64)
        codes = torch.clamp(torch.round(w / scale.view(shape)), -levels, levels).to(torch.int64)
    else:
        top = 2 ** bits - 1
        lo, hi = lo.float().clamp_max(0), hi.float().clamp_min(0)
        scale = ((hi - lo) / top).clamp_min(1e-12)
        zero = torch.clamp(torch.round(-lo / scale), 0, top).to(torch.int64)
        codes = torch.clamp(torch.round(w / scale.view(shape)) + zero.view(shape), 0, top).to(torch.int64)
    return Quantized(codes, scale.float(), zero, bits, scheme)


def fake_quantize(weight: torch.Tensor, bits: int, scheme: str = "per_channel_symmetric") -> torch.Tensor:
    """``weight`` rounded to its ``bits``-bit grid, in float, with a straight-through gradient."""
    if bits >= 32:
        return weight
    snapped = quantize(weight, bits, scheme).dequantize().to(weight.dtype)
    return weight + (snapped - weight).detach()


class WeightFakeQuant(nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrization: the layer sees its quantized weight,
    gradients reach the float shadow weight straight through."""

    def __init__(self, bits: int, scheme: str) -> None:
        super().__init__()
        self.bits, self.scheme = bits, scheme

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, self.bits, self.scheme)


def quantize_weights_(model: nn.Module, bits: Mapping[str, int], scheme: str = "per_channel_symmetric",
                      activation_bits: int = 32) -> None:
    """In place: snap the weights of the named Conv/Linear layers to their bits (32 = untouched)
    and record the quantization on ``model`` (attribute ``automlprune_quantization``)."""
    check_scheme(scheme)
    layers = {}
    with torch.no_grad():
        for name, b in bits.items():
            if b >= 32:
                continue
            weight = model.get_submodule(name).weight
            q = quantize(weight, b, scheme)
            weight.copy_(q.dequantize().to(weight.dtype))
            layers[name] = {"bits": int(b), "scale": q.scale.cpu(), "zero_point": q.zero_point.cpu()}
    if layers or activation_bits < 32:  # other entries (activation ranges) are kept
        record = getattr(model, RECORD_ATTRIBUTE, {})
        record.update(scheme=scheme, activation_bits=int(activation_bits), layers=layers)
        setattr(model, RECORD_ATTRIBUTE, record)


# ---- activations ----------------------------------------------------------------------------------
class ActivationFakeQuant:
    """Forward pre-hooks quantizing the input of each Conv2d/Linear layer to ``bits`` (per tensor,
    asymmetric, straight-through gradient) over ranges calibrated by :meth:`calibrate`."""

    def __init__(self, model: nn.Module, layers: Sequence[str], bits: int) -> None:
        self.model, self.layers, self.bits = model, list(layers), bits
        self.ranges: dict[str, tuple[float, float]] = {}
        self._handles: list = []

    def calibrate(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> "ActivationFakeQuant":
        """Record each layer input's min and max over ``batches`` (model in eval mode), then install the quantizers."""
        seen: dict[str, list[float]] = {}

        def observe(name: str, x: torch.Tensor) -> None:
            lo, hi = float(x.min()), float(x.max())
            old = seen.get(name, [lo, hi])
            seen[name] = [min(old[0], lo), max(old[1], hi)]

        run_reading_inputs(self.model, self.layers, batches, observe)
        self.ranges = {n: (min(v[0], 0.0), max(v[1], 0.0)) for n, v in seen.items()}
        self.install()
        return self

    def install(self) -> None:
        self.remove()
        self._handles = [self.model.get_submodule(n).register_forward_pre_hook(InputQuantizer(*self.ranges[n], self.bits))
                         for n in self.layers if n in self.ranges]
        record = getattr(self.model, RECORD_ATTRIBUTE, None)
        if record is not None:
            record["activation_ranges"] = dict(self.ranges)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class InputQuantizer:
    """A forward pre-hook (picklable, so quantized networks save with ``torch.save``): the
    layer's input fake-quantized to ``bits`` over [lo, hi], straight-through gradient."""

    def __init__(self, lo: float, hi: float, bits: int) -> None:
        self.lo, self.hi, self.bits = lo, hi, bits

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        top = 2 ** self.bits - 1
        scale = max(self.hi - self.lo, 1e-12) / top
        zero = round(-self.lo / scale)
        x = args[0]
        q = (torch.clamp(torch.round(x / scale) + zero, 0, top) - zero) * scale
        return (x + (q - x).detach(),) + tuple(args[1:])


# ---- packing ------------------------------------------------------------------------------------------
def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integer codes (each < 2^bits) -> uint8 array of ceil(n x bits / 8) bytes, bit-packed."""
    codes = np.asarray(codes, dtype=np.uint64).reshape(-1)
    planes = ((codes[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)  # (n, bits), LSB first
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the first ``count`` codes as int64."""
    planes = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")[: count * bits].reshape(count, bits)
    return (planes.astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(axis=1)
