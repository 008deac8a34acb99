"""What a strategy hands the search loop: a :class:`Proposal`, a candidate plus where its
weights come from.

* :class:`OriginalWeights` (the default): the trained model the search started from, the
  channels each group keeps chosen by the evaluator's importance criterion. Every strategy
  that only chooses widths and bits proposes this (a plain :class:`Candidate` means it).
* :class:`TrainedWeights`: a network the strategy trained (same architecture and shapes as
  the original; reparametrizations folded back) and the channel indices each shrunk group
  keeps. A method that prunes while it trains must be judged on these weights, not on the
  original ones.

The evaluator judges both kinds the same way (materialize, optional BN re-estimation,
accuracy on the validation subset, costs); the run store records which kind it was and keeps
trained weights as a run artifact, from which ``compare``'s fine-tune and ``export`` start.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Mapping, Union

import numpy as np
import torch
from torch import nn

from automlprune.errors import CandidateError
from automlprune.space.candidate import Candidate
from automlprune.space.search_space import Resolved, SearchSpace


@dataclass(frozen=True)
class OriginalWeights:
    """The original model's weights; kept channels chosen by the evaluator's criterion."""

    kind: ClassVar[str] = "original"

    def describe(self) -> dict[str, Any]:
        return {"source": self.kind}


@dataclass(frozen=True, eq=False)
class TrainedWeights:
    """``model``: a trained network with the original architecture and shapes; ``kept``: group
    name -> indices (into the group's channels) of the channels kept, for every group the
    candidate shrinks (whatever the other channels hold is dropped); ``label``: what trained it
    (e.g. ``resrep``), for reports."""

    model: nn.Module = field(repr=False)
    kept: Mapping[str, Any]
    label: str = "trained"
    kind: ClassVar[str] = "trained"

    def __post_init__(self) -> None:
        object.__setattr__(self, "kept", {g: torch.as_tensor(np.asarray(k), dtype=torch.long).cpu() for g, k in self.kept.items()})

    def order(self, space: SearchSpace, resolved: Resolved) -> dict[str, torch.Tensor]:
        """A channel order putting each group's kept indices first (in their given order), so
        that materialization keeps exactly them; checks they match the candidate's widths."""
        out = {}
        for group, count in zip(space.groups, resolved.kept):
            keep = self.kept.get(group.name)
            if keep is None:
                if count < group.channels:
                    raise CandidateError(f"trained weights keep no channel list for group '{group.name}', which the candidate shrinks")
                out[group.name] = torch.arange(group.channels)
                continue
            if len(keep) != count or len(set(keep.tolist())) != len(keep) or (len(keep) and int(keep.max()) >= group.channels):
                raise CandidateError(f"trained weights keep {len(keep)} channels of group '{group.name}' but the candidate keeps {count}")
            rest = torch.as_tensor(np.setdiff1d(np.arange(group.channels), keep.numpy()), dtype=torch.long)
            out[group.name] = torch.cat([keep, rest])
        return out

    @cached_property
    def fingerprint(self) -> str:
        """A digest of the weights and kept indices: two proposals with equal widths but
        different trained weights are different evaluations."""
        digest = hashlib.sha1()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        for group, keep in sorted(self.kept.items()):
            digest.update(group.encode())
            digest.update(keep.numpy().tobytes())
        return digest.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {"source": self.kind, "label": self.label, "fingerprint": self.fingerprint}

    def to_artifact(self) -> dict[str, Any]:
        """What the run store saves (``torch.save``; loads with ``weights_only=True``)."""
        return {"state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "kept": {g: k.tolist() for g, k in self.kept.items()}, "label": self.label}

    @classmethod
    def from_artifact(cls, payload: Mapping[str, Any], architecture: nn.Module) -> "TrainedWeights":
        """Inverse of :meth:`to_artifact`: the weights loaded into ``architecture`` (a module of
        the original architecture; it is modified and becomes the trained model)."""
        architecture.load_state_dict(payload["state_dict"])
        return cls(architecture, payload["kept"], str(payload.get("label", "trained")))


WeightsSource = Union[OriginalWeights, TrainedWeights]
ORIGINAL = OriginalWeights()


@dataclass(frozen=True)
class Proposal:
    """A candidate and the source of its weights. ``bn_recalibration``: whether the evaluator
    re-estimates batch-norm statistics before scoring (None: its setting); a method whose
    folded reparametrization sits after a batch norm sets it False. ``as_proposed``: evaluate
    the candidate exactly as given, never repaired to the budget (a warm start's allocator
    answer, exact for the budget and possibly off the grid)."""

    candidate: Candidate
    weights: WeightsSource = ORIGINAL
    bn_recalibration: bool | None = None
    as_proposed: bool = False

    @property
    def trained(self) -> bool:
        return isinstance(self.weights, TrainedWeights)

    def describe(self) -> dict[str, Any]:
        """Where the weights came from, as stored with the result."""
        out = self.weights.describe()
        if self.bn_recalibration is not None:
            out["bn_recalibration"] = self.bn_recalibration
        return out

    def key(self, candidate_key: str) -> str:
        """The cache key of this proposal given its canonical candidate's key."""
        if not self.trained:
            return candidate_key
        return f"{candidate_key}|{self.weights.fingerprint}|bn={self.bn_recalibration}"


def as_proposal(item: Candidate | Proposal) -> Proposal:
    """A plain candidate means the original weights."""
    return item if isinstance(item, Proposal) else Proposal(item)
