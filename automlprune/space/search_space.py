"""The search space: which groups may shrink and to what, which layers may be quantized and to
what, how a candidate maps to kept channel counts, and the [-1, 1]^d encoding used by RL
agents and Optuna."""

from __future__ import annotations

import fnmatch
import math
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from automlprune.errors import CandidateError, ConfigError, UnsupportedLayerError
from automlprune.space.candidate import Candidate
from automlprune.space.config import SpaceConfig
from automlprune.space.graph import ChannelGroup, GroupMember, LayerInfo, discover_groups, fixed_parameters, record_layers
from automlprune.sparsity.patterns import Geometry, Pattern, parse_pattern


class AutoPinned(UserWarning):
    """Groups the space pinned by itself because automlprune cannot shrink them exactly (the
    rest of the model is searched); ``groups`` maps each to the reason."""

    def __init__(self, groups: Mapping[str, str]) -> None:
        self.groups = dict(groups)
        super().__init__(f"{len(self.groups)} channel group(s) are kept whole because they cannot be pruned exactly: "
                         f"{_reasons(self.groups)}; the rest of the model is searched")


def _reasons(groups: Mapping[str, str], limit: int = 3) -> str:
    items = [f"'{name}' ({why})" for name, why in groups.items()]
    return "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")


@dataclass(frozen=True)
class Resolved:
    """A candidate checked against its space once, with what every consumer needs from it:
    ``candidate`` in canonical form (each ratio its exact kept fraction), ``kept`` channels per
    group (int64, shape (groups,), the space's group order), ``bits`` per Conv/Linear layer
    (32 = float32) and ``sparsity``: sparse layer -> (pattern, density). The evaluator, cost
    model and materialization take it instead of re-deriving it."""

    candidate: Candidate
    kept: np.ndarray = field(compare=False)
    bits: dict[str, int] = field(compare=False)
    sparsity: dict[str, tuple[Pattern, float]] = field(compare=False, default_factory=dict)

    @property
    def key(self) -> str:
        return self.candidate.key


@dataclass(frozen=True)
class Dimension:
    """One coordinate of the encoding: a group's keep ratio, a layer's weight bits, a layer's
    weight density, or a layer's sparsity pattern (``choices``: indices into
    :meth:`SearchSpace.patterns_of`)."""

    kind: str  # "ratio", "bits", "density" or "pattern"
    name: str
    choices: tuple[float, ...]

    @property
    def ordered(self) -> bool:
        """Whether its choices are ordered quantities (ratios, densities) rather than categories."""
        return self.kind in ("ratio", "density")


class SearchSpace:
    """Built once from a model and an example input (batch of 1, on the model's device).

    Holds the layer table and channel groups (no reference to the model's weights), the
    space settings, and the candidate <-> channel counts <-> vector maps.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, config: SpaceConfig | None = None) -> None:
        self.config = config or SpaceConfig()
        self.example_input = example_input[:1].detach().clone()
        self.layers: list[LayerInfo] = record_layers(model, self.example_input)
        self.layer_by_name = {l.name: l for l in self.layers}
        self.fixed_parameters: dict[str, int] = fixed_parameters(model)
        """Parameters outside the table's layers: name -> entries (never cut, costed as float32)."""
        self.groups: list[ChannelGroup] = discover_groups(model, self.example_input, self.layers)
        self.group_by_name = {g.name: g for g in self.groups}
        self.quantizable = [l.name for l in self.layers if l.has_weights]
        self.bit_searchable = self._bit_searchable()
        self.layer_patterns = self._layer_patterns()
        """Layer -> the space's sparsity patterns that apply to it at full width (searched layers only)."""
        self.auto_pinned: dict[str, str] = {}
        """Groups pinned because automlprune cannot shrink them exactly: name -> why."""
        self.carried_bits: dict[str, int] = {}
        self.carried_sparsity: dict[str, tuple[Pattern, float]] = {}
        """Settings an earlier stage of a pipeline gave this network's layers (see :meth:`carry`)."""
        self.pin({g.name: g.unprunable for g in self.groups if g.unprunable}, stacklevel=3)

    def pin(self, reasons: Mapping[str, str], stacklevel: int = 2) -> None:
        """Pin the groups ``reasons`` names (group -> why it cannot shrink), with one
        :class:`AutoPinned` warning; raise :class:`UnsupportedLayerError` when no group is left."""
        if reasons:
            self.auto_pinned.update(reasons)
            warnings.warn(AutoPinned(reasons), stacklevel=stacklevel)
        if len(self.auto_pinned) == len(self.groups):
            raise UnsupportedLayerError(f"no channel of this model can be pruned: every group is pinned ({_reasons(self.auto_pinned)})")
        self.pinned = self._pinned_groups()
        self.prunable = [g.name for g in self.groups if g.name not in self.pinned]
        self.dimensions = [Dimension("ratio", g, self.config.ratios) for g in self.prunable] + [
            Dimension("bits", l, tuple(float(b) for b in self.config.bit_choices)) for l in self.bit_searchable
        ]
        for layer, patterns in self.layer_patterns.items():
            self.dimensions.append(Dimension("density", layer, self.config.densities))
            if len(patterns) > 1:
                self.dimensions.append(Dimension("pattern", layer, tuple(float(i) for i in range(len(patterns)))))

    def carry(self, bits: Mapping[str, int], sparsity: Mapping[str, tuple[Pattern | str, float]]) -> None:
        """Keep what an earlier stage of a pipeline decided for this (already narrower) network:
        ``bits`` (layer -> weight bits) and ``sparsity`` (layer -> (pattern, density), a fraction
        of the layer's weights here). A carried setting holds for every candidate on the axes this
        space does not search for that layer (its bits when the layer is not bit-searchable, its
        sparsity when no density is searched for it); where the space searches the axis, the
        candidate decides, as it would on a fresh network. Costs and materialized networks include
        carried settings (:meth:`resolve`); candidates and their keys do not (they are constant
        for every candidate of the space)."""
        for layer in [*bits, *sparsity]:
            if layer not in self.quantizable:
                raise CandidateError(f"an earlier stage set layer '{layer}', which is not a Conv2d/Linear layer of this network")
        self.carried_bits = {layer: int(b) for layer, b in bits.items() if int(b) < 32}
        self.carried_sparsity = {layer: (parse_pattern(p) if isinstance(p, str) else p, float(d))
                                 for layer, (p, d) in sparsity.items() if float(d) < 1}

    # ---- structure -------------------------------------------------------------------------
    def _pinned_groups(self) -> set[str]:
        pinned = set(self.auto_pinned) | {g.name for g in self.groups if any(fnmatch.fnmatchcase(g.name, p) for p in self.config.pinned)}
        for pattern in self.config.pinned:
            if not any(fnmatch.fnmatchcase(g.name, pattern) for g in self.groups):
                raise ConfigError(f"pinned pattern '{pattern}' in space '{self.config.name}' matches no group; run 'automlprune inspect' to list group names")
        if self.config.ratios == (1.0,):  # the space keeps every channel (bits-only, sparse): no width is searched
            pinned |= {g.name for g in self.groups}
        if self.config.pin_first and self.groups:
            first = self.layers[0].name
            pinned |= {g.name for g in self.groups if first in g.out_layers}
        return pinned

    def _bit_searchable(self) -> list[str]:
        if len(self.config.bit_choices) < 2:
            return []
        if self.config.pin_first_last_bits is None:
            return list(self.quantizable)
        return self.quantizable[1:-1]

    def geometry(self, layer: str, inputs: int | None = None, rows: int | None = None) -> Geometry:
        """The weight matrix of ``layer`` as sparsity patterns see it, at full width or with
        ``rows`` output channels and ``inputs`` input channels (before grouping)."""
        info = self.layer_by_name[layer]
        groups = info.in_channels if info.depthwise else info.groups
        rows = info.out_channels if rows is None else rows
        inputs = info.in_channels if inputs is None else inputs
        return Geometry(int(rows), 1 if info.depthwise else int(inputs) // groups, info.kernel)

    def _layer_patterns(self) -> dict[str, tuple[Pattern, ...]]:
        if not self.config.sparse:
            return {}
        layers = self.quantizable[1:-1] if self.config.pin_first_last_density else self.quantizable
        patterns = [parse_pattern(p) for p in self.config.patterns]
        out = {}
        for layer in layers:
            usable = tuple(p for p in patterns if p.why_not(self.geometry(layer)) is None)
            if usable:
                out[layer] = usable
        return out

    def patterns_of(self, layer: str) -> tuple[Pattern, ...]:
        """The sparsity patterns the search may give ``layer`` (empty: it stays dense)."""
        return self.layer_patterns.get(layer, ())

    def free_pattern(self, layer: str) -> Pattern | None:
        """``layer``'s first pattern that allows any density (not N:M), or None: the pattern a
        density chosen alone (RL's density steps, repair's scaling) is given."""
        return next((p for p in self.patterns_of(layer) if p.fixed_density is None), None)

    def feature_layers(self, group: ChannelGroup) -> list[GroupMember]:
        """The out-members whose outputs are ``group``'s feature maps: for each multiply-accumulate
        output layer, its batch norm (a layer without weights) if one follows in the group, else
        the layer itself."""
        outs = [m for m in group.members if m.dim == "out"]
        chosen, norms = [], {m.layer: m for m in outs if not self.layer_by_name[m.layer].has_weights}
        order = {l.name: l.order for l in self.layers}
        for m in outs:
            if not self.layer_by_name[m.layer].has_weights:
                continue
            follower = next((b for name, b in sorted(norms.items(), key=lambda kv: order[kv[0]])
                             if order[name] > order[m.layer] and name not in {c.layer for c in chosen}), None)
            chosen.append(follower or m)
        return chosen

    @property
    def fixed_bits(self) -> dict[str, int]:
        """Bits imposed regardless of the candidate: carried bits of layers the space does not
        search bits for (:meth:`carry`), and the pinned first/last layers when bits are searched."""
        out = {layer: b for layer, b in self.carried_bits.items() if layer not in self.bit_searchable}
        if self.config.pin_first_last_bits is not None and len(self.config.bit_choices) >= 2:
            out.update({self.quantizable[0]: self.config.pin_first_last_bits, self.quantizable[-1]: self.config.pin_first_last_bits})
        return out

    @property
    def ndim(self) -> int:
        return len(self.dimensions)

    # ---- candidates ------------------------------------------------------------------------
    def validate(self, candidate: Candidate) -> Candidate:
        """Raise :class:`CandidateError` if ``candidate`` names unknown or pinned groups or
        layers, or bit widths outside the space's choices; return it unchanged otherwise."""
        for group, _ in candidate.ratios:
            if group not in self.group_by_name:
                raise CandidateError(f"candidate names group '{group}' that the model lacks; run 'automlprune inspect' to list the groups")
            if group in self.pinned:
                raise CandidateError(f"group '{group}' is pinned by the search space; drop it from the candidate or unpin it")
        allowed = set(self.config.bit_choices) | set(self.fixed_bits.values())
        for layer, bits in candidate.bits:
            if layer not in self.quantizable:
                raise CandidateError(f"candidate gives bits to layer '{layer}' that is not a Conv2d/Linear layer of the model; use 'automlprune inspect' for layer names")
            if bits not in allowed:
                raise CandidateError(f"{bits} bits for layer '{layer}' is not among the space's choices {sorted(allowed)}")
        for layer, _ in candidate.densities:
            if layer not in self.quantizable:
                raise CandidateError(f"candidate gives a weight density to layer '{layer}' that is not a Conv2d/Linear layer of the model; "
                                     "use 'automlprune inspect' for layer names")
        return candidate

    def resolve(self, candidate: Candidate | Resolved) -> Resolved:
        """``candidate`` validated, in canonical form, with its kept channels and weight bits (once)."""
        if isinstance(candidate, Resolved):
            return candidate
        self.validate(candidate)
        kept = self.kept_channels(candidate)
        ratios = {g.name: int(k) / g.channels for g, k in zip(self.groups, kept) if k < g.channels}
        fixed = self.fixed_bits  # bits the space imposes whatever the candidate says: not part of its key
        canonical = Candidate.make(ratios, {l: b for l, b in candidate.bit_map.items() if l not in fixed}, candidate.density_map,
                                   dict(candidate.patterns))
        sparsity = {layer: setting for layer, setting in self.carried_sparsity.items() if layer not in self.layer_patterns}
        sparsity.update({layer: (parse_pattern(p), d) for layer, (p, d) in candidate.sparsity().items()})
        return Resolved(canonical, kept, self.weight_bits(candidate), sparsity)

    def surviving_indices(self, kept: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
        """For groups keeping the channel indices ``kept[group]``: (layer, side) -> the sorted
        indices of that layer's side ("out" or "in") that survive, from the groups' index maps
        (a side several groups touch, such as a linear reading a concatenation, loses the union
        of their removed indices). Only sides that lose something are listed."""
        alive: dict[tuple[str, str], np.ndarray] = {}
        for name, keep in kept.items():
            group = self.group_by_name[name]
            gone = np.ones(group.channels, dtype=bool)
            gone[np.asarray(keep, dtype=np.int64)] = False
            if not gone.any():
                continue
            for member in group.members:
                key = (member.layer, member.dim)
                if key not in alive:
                    info = self.layer_by_name[member.layer]
                    alive[key] = np.ones(info.out_channels if member.dim == "out" else info.in_channels, dtype=bool)
                alive[key][member.index_map[gone].reshape(-1)] = False
        return {key: torch.from_numpy(np.flatnonzero(mask)) for key, mask in alive.items()}

    def kept_channels(self, candidate: Candidate) -> np.ndarray:
        """Units each group keeps under ``candidate`` (channels, for groups without grouped
        convolutions): int64 array of shape (len(groups),)."""
        ratios = candidate.ratio_map
        return np.array([self.channels_for(g.channels, ratios.get(g.name, 1.0), g.unit) for g in self.groups], dtype=np.int64)

    def channels_for(self, channels: int, ratio: float, unit: int = 1) -> int:
        """Kept units of a group of ``channels`` units of ``unit`` channels each at keep ratio
        ``ratio``: the kept channels rounded to the nearest multiple of ``round_to`` (and of
        ``unit``), at least ``min_channels`` (and one rounding step), at most all of them."""
        if ratio >= 1.0:
            return channels
        step = self.rounding_step(unit)
        kept = int(np.floor(ratio * channels / step + 0.5)) * step
        floor = max(-(-self.config.min_channels // unit), step)
        return int(min(channels, max(kept, floor)))

    def ratios_from_widths(self, widths: Mapping[str, float], to_grid: bool = False) -> dict[str, float]:
        """Keep ratios from (possibly fractional, e.g. expected) unit counts per group: each
        rounded to the space's channel rounding, or down to the space's ratio grid with ``to_grid``."""
        ratios = {}
        for name, w in widths.items():
            group = self.group_by_name[name]
            r = float(np.clip(w / group.channels, 1e-9, 1.0))
            if to_grid:
                below = [g for g in self.config.ratios if g <= r + 1e-9]
                r = below[-1] if below else self.config.ratios[0]
            ratios[name] = self.channels_for(group.channels, r, group.unit) / group.channels
        return ratios

    def rounding_step(self, unit: int = 1) -> int:
        """Units of ``unit`` channels per step of the kept width: the smallest count whose
        channels are a multiple of ``round_to``."""
        return math.lcm(self.config.round_to, unit) // unit

    def min_width(self, group: str | ChannelGroup) -> int:
        """The fewest units ``group`` may keep (``min_channels``, one rounding step)."""
        group = self.group_by_name[group] if isinstance(group, str) else group
        return self.channels_for(group.channels, 1e-9, group.unit)

    def canonical(self, candidate: Candidate) -> Candidate:
        """The same network with each ratio replaced by its exact kept fraction (kept / channels),
        so candidates describing the same network share one key (cache, evaluation budget, store)."""
        return self.resolve(candidate).candidate

    def weight_bits(self, candidate: Candidate) -> dict[str, int]:
        """Weight bits of every Conv/Linear layer under ``candidate`` (32 = float32)."""
        bits = {layer: 32 for layer in self.quantizable}
        bits.update(candidate.bit_map)
        bits.update(self.fixed_bits)
        return bits

    def full(self) -> Candidate:
        """The unpruned, full-precision network."""
        return Candidate()

    def uniform(self, ratio: float, bits: int | None = None, density: float | None = None) -> Candidate:
        """Every prunable group at keep ratio ``ratio`` (and every bit-searchable layer at ``bits``,
        every sparsity-searchable layer at ``density`` in its :meth:`free_pattern`, or its first
        pattern when it has only N:M ones, as that pattern can have it: an N:M pattern's own
        density, at most 4/9 for PCONV)."""
        sparse = ({l: self.free_pattern(l) or self.patterns_of(l)[0] for l in self.layer_patterns}
                  if density is not None and density < 1 else {})
        return Candidate.make({g: ratio for g in self.prunable}, {l: bits for l in self.bit_searchable} if bits else None,
                              {l: p.clip(density) for l, p in sparse.items()}, {l: p.name for l, p in sparse.items()})

    def smallest(self) -> Candidate:
        """The cheapest candidate of the space: lowest grid ratio, fewest bits and (in each layer's
        sparsest pattern) lowest density everywhere."""
        bits = {l: min(self.config.bit_choices) for l in self.bit_searchable}
        densities, patterns = {}, {}
        for layer, options in self.layer_patterns.items():
            pattern = min(options, key=lambda p: p.clip(self.config.densities[0]))
            densities[layer], patterns[layer] = pattern.clip(self.config.densities[0]), pattern.name
        return Candidate.make({g: self.config.ratios[0] for g in self.prunable}, bits, densities, patterns)

    # ---- encoding --------------------------------------------------------------------------
    def encode(self, candidate: Candidate) -> np.ndarray:
        """Candidate -> float32 vector in [-1, 1]^ndim (grid position of each dimension)."""
        ratios, bits, sparsity = candidate.ratio_map, self.weight_bits(candidate), candidate.sparsity()
        out = np.empty(self.ndim, dtype=np.float32)
        for i, dim in enumerate(self.dimensions):
            if dim.kind == "ratio":
                value = ratios.get(dim.name, 1.0)
            elif dim.kind == "bits":
                value = float(bits[dim.name])
            elif dim.kind == "density":
                value = sparsity.get(dim.name, ("", 1.0))[1]
            else:
                names = [p.name for p in self.patterns_of(dim.name)]
                chosen = sparsity.get(dim.name, (names[0], 1.0))[0]
                value = float(names.index(chosen)) if chosen in names else 0.0
            out[i] = _to_unit(dim.choices, value)
        return out

    def decode(self, vector: Sequence[float] | np.ndarray) -> Candidate:
        """Vector in [-1, 1]^ndim -> candidate, each coordinate snapped to the nearest grid choice."""
        vector = np.asarray(vector, dtype=np.float64).reshape(-1)
        if vector.shape[0] != self.ndim:
            raise CandidateError(f"the space has {self.ndim} dimensions but the vector has {vector.shape[0]}")
        ratios, bits, densities, patterns = {}, {}, {}, {}
        for x, dim in zip(vector, self.dimensions):
            value = _from_unit(dim.choices, float(x))
            if dim.kind == "ratio":
                ratios[dim.name] = value
            elif dim.kind == "bits":
                bits[dim.name] = int(value)
            elif dim.kind == "density":
                densities[dim.name] = value
            else:
                patterns[dim.name] = self.patterns_of(dim.name)[int(value)]
        sparse_patterns = {}
        for layer in [l for l, d in densities.items() if d < 1]:
            pattern = patterns.get(layer, self.patterns_of(layer)[0])
            sparse_patterns[layer] = pattern.name
            densities[layer] = pattern.clip(densities[layer])
        return Candidate.make(ratios, bits, densities, sparse_patterns)

    def describe(self) -> dict:
        """A JSON-able summary: groups (name, channels, layers), pinned groups, dimensions."""
        return {
            "space": self.config.to_dict(),
            "groups": [{"name": g.name, "channels": g.width, "unit": g.unit, "pinned": g.name in self.pinned,
                        **({"unprunable": g.unprunable} if g.unprunable else {}),
                        "layers": sorted({m.layer for m in g.members}),
                        "out_layers": g.out_layers} for g in self.groups],
            "quantizable_layers": self.quantizable,
            "sparsity_patterns": {layer: [p.name for p in patterns] for layer, patterns in self.layer_patterns.items()},
            "dimensions": self.ndim,
            **({"carried": {"bits": self.carried_bits,
                            "sparsity": {l: [p.name, d] for l, (p, d) in self.carried_sparsity.items()}}}
               if self.carried_bits or self.carried_sparsity else {}),
        }


def _to_unit(choices: tuple[float, ...], value: float) -> float:
    if len(choices) == 1:
        return 0.0
    index = int(np.argmin([abs(c - value) for c in choices]))
    return -1.0 + 2.0 * index / (len(choices) - 1)


def _from_unit(choices: tuple[float, ...], x: float) -> float:
    index = int(np.floor((np.clip(x, -1.0, 1.0) + 1.0) / 2.0 * (len(choices) - 1) + 0.5))
    return choices[index]
