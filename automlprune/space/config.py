"""Search-space settings, read from a YAML file (shipped ones in ``automlprune/search_spaces/``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from automlprune.config_files import check_keys, read_yaml
from automlprune.errors import CandidateError, ConfigError
from automlprune.quantization import SCHEMES
from automlprune.sparsity.patterns import parse_pattern


@dataclass(frozen=True)
class SpaceConfig:
    """How the search may shrink a network.

    ratios: the keep-ratio grid strategies choose from, ascending, within (0, 1].
    min_channels: no group keeps fewer channels than this (or all it has, if fewer).
    round_to: kept channel counts are rounded to a multiple of this (hardware-friendly widths).
    pinned: fnmatch patterns of group names never pruned.
    pin_first: never prune the group holding the first layer's output channels.
    bit_choices: weight bit widths the search may give a Conv/Linear layer (32 = float32).
    pin_first_last_bits: bits for the first and last layer when bit widths are searched (HAQ pins 8); None = searched too.
    bit_scheme: how weights are quantized (:data:`automlprune.quantization.SCHEMES`; per-channel symmetric by default).
    activation_bits: bits of every Conv2d/Linear layer's input activations (32 = float32, the default).
    densities: the weight-density grid (fraction of a layer's weights kept), ascending, ending at
    1.0 (dense; added when missing); (1.0,) = no weight sparsity is searched.
    patterns: the sparsity patterns a layer may take (:mod:`automlprune.sparsity.patterns`), each
    offered to the layers it applies to.
    pin_first_last_density: the first and last Conv2d/Linear layers stay dense (as their bits are
    often pinned: they are small and sensitive).
    """

    ratios: tuple[float, ...] = tuple(np.round(np.arange(1, 9) / 8, 6))
    min_channels: int = 1
    round_to: int = 1
    pinned: tuple[str, ...] = ()
    pin_first: bool = False
    bit_choices: tuple[int, ...] = (32,)
    pin_first_last_bits: int | None = None
    bit_scheme: str = "per_channel_symmetric"
    activation_bits: int = 32
    densities: tuple[float, ...] = (1.0,)
    patterns: tuple[str, ...] = ("unstructured",)
    pin_first_last_density: bool = True
    name: str = "default"

    def __post_init__(self) -> None:
        if not self.ratios or any(not 0 < r <= 1 for r in self.ratios) or list(self.ratios) != sorted(set(self.ratios)):
            raise ConfigError(f"space '{self.name}': ratios must be distinct ascending keep ratios in (0, 1], got {list(self.ratios)}")
        if self.min_channels < 1 or self.round_to < 1:
            raise ConfigError(f"space '{self.name}': min_channels and round_to must be at least 1")
        if not self.bit_choices or any(b < 2 or b > 32 for b in self.bit_choices):
            raise ConfigError(f"space '{self.name}': bit choices must be whole numbers from 2 to 32, got {list(self.bit_choices)}")
        if self.pin_first_last_bits is not None and not 2 <= self.pin_first_last_bits <= 32:
            raise ConfigError(f"space '{self.name}': bits.pin_first_last must be from 2 to 32, got {self.pin_first_last_bits}")
        if not 2 <= self.activation_bits <= 32:
            raise ConfigError(f"space '{self.name}': bits.activations must be from 2 to 32, got {self.activation_bits}")
        if not self.densities or any(not 0 < d <= 1 for d in self.densities) or list(self.densities) != sorted(set(self.densities)) \
                or self.densities[-1] != 1.0:
            raise ConfigError(f"space '{self.name}': sparsity.densities must be distinct ascending fractions in (0, 1], got {list(self.densities)}")
        try:
            parsed = [parse_pattern(p) for p in self.patterns]
        except CandidateError as exc:
            raise ConfigError(f"space '{self.name}': {exc}") from None
        if not parsed:
            raise ConfigError(f"space '{self.name}': sparsity.patterns must list at least one pattern, such as unstructured")
        for pattern in parsed:
            steps = [s for s in (pattern.run, *(pattern.block or ())) if s and s > 1]
            if len(self.ratios) > 1 and self.sparse and any(self.round_to % s for s in steps):
                raise ConfigError(f"space '{self.name}': pattern {pattern.name} needs pruned widths in multiples of "
                                  f"{max(steps)}, but round_to is {self.round_to}; set round_to to a multiple of it")
        if self.bit_scheme not in SCHEMES:
            raise ConfigError(f"space '{self.name}': bits.scheme '{self.bit_scheme}' is unknown; use one of: {', '.join(SCHEMES)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str = "space") -> "SpaceConfig":
        allowed = {"ratios", "min_channels", "round_to", "pinned", "pin_first", "bits", "sparsity", "description"}
        check_keys(data, allowed, f"search space '{name}'")
        kwargs: dict[str, Any] = {"name": name}
        if "ratios" in data:
            kwargs["ratios"] = _ratio_grid(data["ratios"], name)
        for key in ("min_channels", "round_to"):
            if key in data:
                kwargs[key] = _int(data[key], key, name)
        if "pinned" in data:
            if not isinstance(data["pinned"], list):
                raise ConfigError(f"search space '{name}': pinned must be a list of group-name patterns")
            kwargs["pinned"] = tuple(str(p) for p in data["pinned"])
        if "pin_first" in data:
            kwargs["pin_first"] = bool(data["pin_first"])
        if "bits" in data:
            bits = data["bits"] or {}
            check_keys(bits, {"choices", "pin_first_last", "scheme", "activations"}, f"search space '{name}' bits")
            if "choices" in bits:
                kwargs["bit_choices"] = tuple(sorted(_int(b, "bits.choices", name) for b in bits["choices"]))
            if bits.get("pin_first_last") is not None:
                kwargs["pin_first_last_bits"] = _int(bits["pin_first_last"], "bits.pin_first_last", name)
            if "scheme" in bits:
                kwargs["bit_scheme"] = str(bits["scheme"])
            if "activations" in bits:
                kwargs["activation_bits"] = _int(bits["activations"], "bits.activations", name)
        if "sparsity" in data:
            sparsity = data["sparsity"] or {}
            check_keys(sparsity, {"densities", "patterns", "pin_first_last"}, f"search space '{name}' sparsity")
            if "densities" in sparsity:
                kwargs["densities"] = tuple(sorted(set(_ratio_grid(sparsity["densities"], name, "sparsity.densities")) | {1.0}))
            if "patterns" in sparsity:
                if not isinstance(sparsity["patterns"], list):
                    raise ConfigError(f"search space '{name}': sparsity.patterns must be a list such as [unstructured, \"2:4\"]")
                try:
                    kwargs["patterns"] = tuple(dict.fromkeys(parse_pattern(p).name for p in sparsity["patterns"]))
                except CandidateError as exc:
                    raise ConfigError(f"search space '{name}': {exc}") from None
            if "pin_first_last" in sparsity:
                kwargs["pin_first_last_density"] = bool(sparsity["pin_first_last"])
        return cls(**kwargs)

    @property
    def sparse(self) -> bool:
        """Whether weight densities are searched."""
        return len(self.densities) > 1

    @classmethod
    def load(cls, path: str | Path) -> "SpaceConfig":
        path = Path(path)
        return cls.from_dict(read_yaml(path, "search space"), name=path.stem)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _int(value: Any, key: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"search space '{name}': {key} must be a whole number, got {value!r}")
    return value


def _ratio_grid(spec: Any, name: str, key: str = "ratios") -> tuple[float, ...]:
    if isinstance(spec, list):
        values = spec
    elif isinstance(spec, dict):
        check_keys(spec, {"min", "max", "step"}, f"search space '{name}' {key}")
        try:
            lo, hi, step = float(spec.get("min", 0.125)), float(spec.get("max", 1.0)), float(spec.get("step", 0.125))
        except (TypeError, ValueError):
            raise ConfigError(f"search space '{name}': {key} min/max/step must be numbers") from None
        if step <= 0 or lo <= 0 or hi > 1 or lo > hi:
            raise ConfigError(f"search space '{name}': {key} need 0 < min <= max <= 1 and step > 0")
        values = list(np.arange(lo, hi + step / 2, step))
    else:
        raise ConfigError(f"search space '{name}': {key} must be a list or {{min, max, step}}")
    try:
        return tuple(sorted({round(float(v), 6) for v in values}))
    except (TypeError, ValueError):
        raise ConfigError(f"search space '{name}': {key} must be numbers") from None
