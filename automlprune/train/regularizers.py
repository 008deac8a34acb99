"""Regularizers: penalties added to a training loss, by name.

The first family are budget losses: a penalty on an expected cost ``ratio`` (a fraction of the
unpruned network's, from the differentiable cost model) against a ``target`` fraction, as DMCP
trains its gates with. A new one is one :func:`register` call.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from automlprune.registry import Registry

BudgetLoss = Callable[[torch.Tensor, float], torch.Tensor]
BUDGET_LOSSES: Registry[BudgetLoss] = Registry("budget loss")
BAND_LOW = 0.95
"""The ``band`` loss is zero for expected costs in [BAND_LOW x target, target]."""


def _band(ratio: torch.Tensor, target: float) -> torch.Tensor:
    return (F.relu(ratio - target) + F.relu(BAND_LOW * target - ratio)) / target


BUDGET_LOSSES.register("l2", lambda r, t: ((r - t) / t) ** 2, description="((r - t) / t)^2")
BUDGET_LOSSES.register("l1", lambda r, t: (r - t).abs() / t, description="|r - t| / t")
BUDGET_LOSSES.register("log", lambda r, t: (r.log() - math.log(t)) ** 2, description="(log r - log t)^2")
BUDGET_LOSSES.register("band", _band, description=f"zero inside [{BAND_LOW} t, t], the relative distance to that band outside")


def budget_loss(kind: str, ratio: torch.Tensor, target: float) -> torch.Tensor:
    """The budget loss ``kind`` of expected cost fraction ``ratio`` against ``target`` (unknown
    names raise a ConfigError listing the registered ones)."""
    return BUDGET_LOSSES.get(kind)(ratio, target)
