"""The candidate: per-group keep ratios, per-layer weight bit widths and per-layer weight
densities with their sparsity patterns.

Immutable and hashable; JSON round-trip as ``{"ratios": {group: keep_ratio}, "bits": {layer:
bits}, "densities": {layer: fraction of weights kept}, "patterns": {layer: pattern}}`` (the last
two only when a layer is sparse, so candidates written before densities existed keep their keys).
An absent group keeps all its channels; an absent layer stays at full precision (32 bits) and
dense; a sparse layer without a pattern is ``unstructured`` (:mod:`automlprune.sparsity.patterns`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from automlprune.errors import CandidateError
from automlprune.sparsity.patterns import check_density, parse_pattern


@dataclass(frozen=True, order=True)
class Candidate:
    """ratios: sorted (group name, keep ratio in (0, 1]) pairs; bits: sorted (layer name, bits)
    pairs; densities: sorted (layer name, fraction of its weights kept, in (0, 1)) pairs;
    patterns: sorted (layer name, pattern name) pairs for sparse layers whose pattern is not
    ``unstructured``.

    Ratios and densities of exactly 1.0, bits of 32 and ``unstructured`` patterns are dropped,
    so equal networks have equal keys.
    """

    ratios: tuple[tuple[str, float], ...] = field(default=())
    bits: tuple[tuple[str, int], ...] = field(default=())
    densities: tuple[tuple[str, float], ...] = field(default=())
    patterns: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def make(cls, ratios: Mapping[str, float] | None = None, bits: Mapping[str, int] | None = None,
             densities: Mapping[str, float] | None = None, patterns: Mapping[str, str] | None = None) -> "Candidate":
        """Build from plain mappings, checking each ratio is in (0, 1], each bit width is a positive
        integer, each density is in (0, 1] and each pattern is known (an N:M pattern sets its
        layer's density to N/M; a density it contradicts is refused)."""
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
        clean_densities = {str(layer): check_density(d, f"layer '{layer}'") for layer, d in (densities or {}).items()}
        clean_patterns = {}
        for layer, text in (patterns or {}).items():
            pattern = parse_pattern(text)
            density = clean_densities.get(str(layer), pattern.fixed_density)
            if density is None:
                raise CandidateError(f"layer '{layer}' has sparsity pattern '{pattern.name}' but no density; give it one in \"densities\"")
            if pattern.fixed_density is not None and abs(density - pattern.fixed_density) > 1e-9:
                raise CandidateError(f"pattern {pattern.name} keeps {pattern.fixed_density:g} of the weights of layer '{layer}', "
                                     f"not the density {density:g} given; drop the density or match it")
            if density > pattern.max_density + 1e-12:
                raise CandidateError(f"pattern {pattern.name} keeps at most {pattern.max_density:.4g} of a layer's weights, "
                                     f"not the density {density:g} given for layer '{layer}'")
            clean_densities[str(layer)] = pattern.fixed_density or density
            if pattern.name != "unstructured":
                clean_patterns[str(layer)] = pattern.name
        sparse = {layer: d for layer, d in clean_densities.items() if d < 1}
        return cls(tuple(clean_ratios), tuple(clean_bits), tuple(sorted(sparse.items())),
                   tuple(sorted((layer, p) for layer, p in clean_patterns.items() if layer in sparse)))

    @property
    def ratio_map(self) -> dict[str, float]:
        return dict(self.ratios)

    @property
    def bit_map(self) -> dict[str, int]:
        return dict(self.bits)

    @property
    def density_map(self) -> dict[str, float]:
        return dict(self.densities)

    def sparsity(self) -> dict[str, tuple[str, float]]:
        """Sparse layers: layer -> (pattern name, density)."""
        patterns = dict(self.patterns)
        return {layer: (patterns.get(layer, "unstructured"), d) for layer, d in self.densities}

    def ratio(self, group: str) -> float:
        return self.ratio_map.get(group, 1.0)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {"ratios": dict(self.ratios), "bits": dict(self.bits)}
        if self.densities:
            out["densities"] = dict(self.densities)
        if self.patterns:
            out["patterns"] = dict(self.patterns)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def key(self) -> str:
        """A canonical string identifying the network this candidate describes (cache key)."""
        return self.to_json()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Candidate":
        keys = ("ratios", "bits", "densities", "patterns")
        if not isinstance(data, Mapping) or set(data) - set(keys):
            raise CandidateError('a candidate is a JSON object {"ratios": {group: keep_ratio}, "bits": {layer: bits}, '
                                 '"densities": {layer: fraction kept}, "patterns": {layer: pattern}}; other keys are not allowed')
        parts = [data.get(k) or {} for k in keys]
        if not all(isinstance(p, Mapping) for p in parts):
            raise CandidateError('"ratios", "bits", "densities" and "patterns" of a candidate must be JSON objects keyed by group / layer name')
        return cls.make(*parts)

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
