"""The candidate: per-group keep ratios and per-layer weight bit widths.

Immutable and hashable; JSON round-trip as ``{"ratios": {group: keep_ratio}, "bits": {layer: bits}}``.
An absent group keeps all its channels; an absent layer stays at full precision (32 bits).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from automlprune.errors import CandidateError


@dataclass(frozen=True, order=True)
class Candidate:
    """ratios: sorted (group name, keep ratio in (0, 1]) pairs; bits: sorted (layer name, bits) pairs.

    Ratios of exactly 1.0 and bits of 32 are dropped, so equal networks have equal keys.
    """

    ratios: tuple[tuple[str, float], ...] = field(default=())
    bits: tuple[tuple[str, int], ...] = field(default=())

    @classmethod
    def make(cls, ratios: Mapping[str, float] | None = None, bits: Mapping[str, int] | None = None) -> "Candidate":
        """Build from plain mappings, checking each ratio is in (0, 1] and each bit width is a positive integer."""
        clean_ratios = []
        for group, ratio in sorted((ratios or {}).items()):
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0 < ratio <= 1:
                raise CandidateError(f"keep ratio {ratio!r} for group '{group}' is outside (0, 1]; use a fraction of channels to keep such as 0.5")
            if ratio < 1:
                clean_ratios.append((str(group), float(ratio)))
        clean_bits = []
        for layer, b in sorted((bits or {}).items()):
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise CandidateError(f"bit width {b!r} for layer '{layer}' is not a positive whole number; use one of the space's bit choices")
            if b < 32:
                clean_bits.append((str(layer), int(b)))
        return cls(tuple(clean_ratios), tuple(clean_bits))

    @property
    def ratio_map(self) -> dict[str, float]:
        return dict(self.ratios)

    @property
    def bit_map(self) -> dict[str, int]:
        return dict(self.bits)

    def ratio(self, group: str) -> float:
        return self.ratio_map.get(group, 1.0)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"ratios": dict(self.ratios), "bits": dict(self.bits)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def key(self) -> str:
        """A canonical string identifying the network this candidate describes (cache key)."""
        return self.to_json()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Candidate":
        if not isinstance(data, Mapping) or set(data) - {"ratios", "bits"}:
            raise CandidateError('a candidate is a JSON object {"ratios": {group: keep_ratio}, "bits": {layer: bits}}; other keys are not allowed')
        ratios, bits = data.get("ratios") or {}, data.get("bits") or {}
        if not isinstance(ratios, Mapping) or not isinstance(bits, Mapping):
            raise CandidateError('"ratios" and "bits" of a candidate must be JSON objects keyed by group / layer name')
        return cls.make(ratios, bits)

    @classmethod
    def from_json(cls, text: str) -> "Candidate":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CandidateError(f"the candidate is not valid JSON ({exc.msg} at line {exc.lineno}); write it as {{\"ratios\": {{...}}, \"bits\": {{...}}}}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> "Candidate":
        path = Path(path)
        if not path.is_file():
            raise CandidateError(f"candidate file {path} does not exist; write one with the group names 'automlprune inspect' lists")
        return cls.from_json(path.read_text())
