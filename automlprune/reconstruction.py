"""Least-squares reconstruction: what the layers reading a group lose when its channels go,
and how the kept channels can stand in for the removed ones.

For every layer that reads a group's channels (a plain Conv2d or a Linear, the group's
"in" members), :func:`reader_grams` collects, from a few batches of the *unpruned* network,
the uncentred second moments of the group's channels at that layer's input: a (C, C) Gram
matrix ``G`` over samples x positions (spatial positions for a conv, flatten positions for a
linear after a flatten). Two things follow, both used by the ``prunenet`` strategy:

* the loss of a kept set S: the energy of the reader's output that the kept channels cannot
  reproduce even with optimally re-fitted weights, ``tr(M G M^T) - tr(M G[:, S] G[S, S]^-1 G[S, :] M^T)``,
  where M holds the reader's weights with kernel taps as extra rows (each tap treated as a
  1x1 conv: exact for 1x1 convs and linears, the usual ThiNet / channel-pruning approximation
  for k x k convs, which ignores correlations between neighbouring pixels);
* the re-fit itself, :meth:`Reconstruction.fold_`: the removed channels are regressed on the
  kept ones over the same samples, x_R ~ A x_S with A = G[R, S] G[S, S]^-1, and the reader's
  weights for the removed channels are folded into the kept ones, W[:, S] += W[:, R] A. A
  pixel-wise linear relation holds at every tap, so the fold is exact for any kernel size when
  a removed channel is a linear combination of kept ones (duplicates, scaled copies).

A small ridge (``RIDGE`` x the mean diagonal) keeps the solves stable for dependent channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from automlprune.errors import ConfigError
from automlprune.importance import CRITERIA, DataCriterion
from automlprune.nn import layer_types
from automlprune.nn.hooks import Batch, run_reading_inputs
from automlprune.space.graph import GroupMember
from automlprune.space.search_space import SearchSpace

RIDGE = 1e-6


@dataclass(frozen=True)
class ReaderGram:
    """One layer reading one group: its name, the group member (index map) and the group
    channels' Gram matrix at its input (float64, shape (C, C), mean over samples x positions)."""

    layer: str
    member: GroupMember
    gram: torch.Tensor


def readers_of(model: nn.Module, space: SearchSpace, group_name: str) -> list[GroupMember]:
    """The members of a group through which a plain Conv2d (groups = 1) or a Linear reads its channels."""
    out = []
    for m in space.group_by_name[group_name].members:
        module = model.get_submodule(m.layer)
        if m.dim == "in" and layer_types.of(module).reads_through_weight(module):
            out.append(m)
    return out


def group_features(x: torch.Tensor, member: GroupMember) -> torch.Tensor:
    """The group's channels in a reader's input ``x`` (N, C_in, ...) as (C, samples x positions)."""
    index = torch.as_tensor(member.index_map, device=x.device)  # (C, P)
    feats = x[:, index]  # (N, C, P, *spatial)
    return feats.transpose(0, 1).reshape(index.shape[0], -1)


def reader_grams(model: nn.Module, space: SearchSpace, batches: Sequence[Batch]) -> dict[str, list[ReaderGram]]:
    """Group name -> the Gram matrices at each of its readers, from one pass over ``batches``."""
    members = {g.name: readers_of(model, space, g.name) for g in space.groups}
    wanted = {m.layer for ms in members.values() for m in ms}
    sums: dict[tuple[str, int], torch.Tensor] = {}
    counts: dict[tuple[str, int], int] = {}
    by_layer: dict[str, list[tuple[int, GroupMember]]] = {}
    for g_index, (name, ms) in enumerate(members.items()):
        for m in ms:
            by_layer.setdefault(m.layer, []).append((g_index, m))

    def accumulate(layer: str, x: torch.Tensor) -> None:
        for g_index, m in by_layer[layer]:
            f = group_features(x.double(), m)
            key = (layer, g_index)
            sums[key] = sums.get(key, 0) + f @ f.T
            counts[key] = counts.get(key, 0) + f.shape[1]

    run_reading_inputs(model, wanted, batches, accumulate)
    return {name: [ReaderGram(m.layer, m, (sums[(m.layer, gi)] / counts[(m.layer, gi)]).cpu())
                   for m in ms if (m.layer, gi) in sums]
            for gi, (name, ms) in enumerate(members.items())}


def tap_matrix(model: nn.Module, member: GroupMember) -> torch.Tensor:
    """A reader's weights on the group's channels as (outputs x taps x flatten positions, C), float64."""
    w = model.get_submodule(member.layer).weight.detach().double()
    index = torch.as_tensor(member.index_map, device=w.device)  # (C, P)
    wg = w[:, index]  # (O, C, P, *kernel)
    return wg.transpose(0, 1).reshape(index.shape[0], -1).T.cpu()


def _ridge(gram: torch.Tensor) -> torch.Tensor:
    scale = gram.diagonal().mean().clamp_min(1e-12)
    return gram + RIDGE * scale * torch.eye(len(gram), dtype=gram.dtype)


class Reconstruction:
    """The least-squares fold of removed channels into kept ones, for a network's groups."""

    def __init__(self, grams: Mapping[str, list[ReaderGram]]) -> None:
        self.grams = grams

    @classmethod
    def collect(cls, model: nn.Module, space: SearchSpace, batches: Sequence[Batch]) -> "Reconstruction":
        return cls(reader_grams(model, space, batches))

    @torch.no_grad()
    def fold_(self, model: nn.Module, kept: Mapping[str, torch.Tensor]) -> None:
        """In place, on ``model`` (a copy of the network the Grams came from): for every group in
        ``kept`` (group -> kept channel indices), fold its removed channels into the kept ones at
        every reader."""
        for group_name, keep in kept.items():
            for reader in self.grams.get(group_name, []):
                channels = reader.gram.shape[0]
                keep_idx = torch.as_tensor(keep, dtype=torch.long)
                removed = torch.tensor(sorted(set(range(channels)) - set(keep_idx.tolist())), dtype=torch.long)
                if len(removed) == 0:
                    continue
                g = reader.gram
                coeff = torch.linalg.solve(_ridge(g[keep_idx][:, keep_idx]), g[keep_idx][:, removed])  # (S, R): A^T
                weight = model.get_submodule(reader.layer).weight
                index = torch.as_tensor(reader.member.index_map, device=weight.device)
                w = weight[:, index].double()  # (O, C, P, *kernel)
                update = torch.einsum("or...,sr->os...", w[:, removed.to(weight.device)], coeff.to(weight.device))
                w[:, keep_idx.to(weight.device)] += update
                weight[:, index] = w.to(weight.dtype)


# ---- importance: reconstruction loss under backward elimination ---------------------------------
ELIMINATION_STEPS = 64
"""Channels leave a group in at most about this many steps (one at a time for groups this narrow)."""


def eliminate(taps: Sequence[torch.Tensor], grams: Sequence[torch.Tensor]) -> tuple[list[int], list[float]]:
    """Backward elimination of one group's channels by least-squares reconstruction loss.

    ``taps[i]`` (rows x C) and ``grams[i]`` (C x C) describe reader i. At each step the channels
    whose removal (with the kept channels optimally re-weighted) raises the readers' summed
    relative reconstruction loss least leave the set; the marginal loss of removing c from S is
    ``||M G[:, S] H e_c||^2 / H_cc`` with ``H = G[S, S]^-1``, divided by the reader's output energy
    ``tr(M G M^T)``. Returns the channels in removal order and each one's marginal loss.
    """
    channels = grams[0].shape[0]
    energies = [float(torch.einsum("rc,cd,rd->", m, g, m).clamp_min(1e-30)) for m, g in zip(taps, grams)]
    kept = list(range(channels))
    removed, losses = [], []
    while kept:
        s = torch.tensor(kept)
        total = torch.zeros(len(kept), dtype=torch.float64)
        for m, g, energy in zip(taps, grams, energies):
            h = torch.linalg.inv(_ridge(g[s][:, s]))
            k = (m @ g[:, s]) @ h
            total += k.pow(2).sum(0) / h.diagonal() / energy
        chunk = max(1, -(-len(kept) // ELIMINATION_STEPS))
        picks = torch.sort(total, stable=True).indices[:chunk].tolist()
        for p in picks:
            removed.append(kept[p])
            losses.append(float(total[p].clamp_min(0)))
        kept = [c for i, c in enumerate(kept) if i not in set(picks)]
    return removed, losses


class ReconstructionImportance(DataCriterion):
    """The ``prunenet`` criterion: one score per channel on one scale across the network.

    Per group, channels are eliminated backward by reconstruction loss (:func:`eliminate`) over
    every layer that reads them (a residual group's readers are scored jointly). A channel's
    score is the group's cumulative relative loss once it and every channel eliminated before it
    are gone (the readers' lost output energy as a fraction of their total, summed over readers):
    non-decreasing along the elimination order, so keeping the top-k scores keeps exactly the
    set elimination kept, and the sorted scores are the group's redundancy curve. Scores are
    fractions, comparable across groups; differences of sorted scores are marginal losses.
    A group no plain conv or linear reads (none in supported models) falls back to L2 norms.
    """

    def score_all(self, model: nn.Module, space: SearchSpace, batches: Sequence[Batch] | None = None,
                  combine: str = "sum", seed: int = 0) -> dict[str, torch.Tensor]:
        if not batches:
            raise ConfigError("criterion 'prunenet' needs a few training batches")
        grams = reader_grams(model, space, batches)
        out = {}
        for group in space.groups:
            readers = grams.get(group.name) or []
            if not readers:
                out[group.name] = CRITERIA.get("l2").score(model, group, combine=combine)
                continue
            order, losses = eliminate([tap_matrix(model, r.member) for r in readers], [r.gram for r in readers])
            scores = torch.zeros(group.channels, dtype=torch.float64)
            scores[torch.tensor(order)] = torch.tensor(losses, dtype=torch.float64).cumsum(0)
            out[group.name] = scores
        return out


RECONSTRUCTION_IMPORTANCE = ReconstructionImportance()
