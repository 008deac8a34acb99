"""Multi-fidelity search: a cheap first look at every proposal, full evaluations for the promising.

An evaluation spends most of its time re-estimating BN statistics and scoring the validation
subset. With ``evaluation.screening: f`` (a fraction) the search loop first scores each proposal
on the first ``f`` of the validation batches and BN batches (:meth:`Evaluator.batches`), and
evaluates it in full only when its screening accuracy ranks in the top ``screening_keep`` of all
screenings of the search so far: the promotion rule of asynchronous successive halving (Li et
al., "A System for Massively Parallel Hyperparameter Tuning", MLSys 2020) with one rung below
the full evaluation and reduction factor ``1 / screening_keep``. The first ``ceil(1 /
screening_keep)`` screenings are always promoted (no ranking exists yet), as are the proposals
evaluated as they are (warm starts, trained weights): they are few and they are the anchors.

A screened-out proposal is stored with its fidelity (``EvalResult.fidelity`` < 1) and told to
the strategy like any result, so samplers and agents learn from it; it never becomes an answer
(:func:`automlprune.search.base.best_feasible` and the reports take full evaluations only). A
promoted result keeps its screening accuracy (``EvalResult.screening``). A proposal over the
budget is never promoted (it cannot be an answer) and does not enter the ranking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from automlprune.evaluator import EvalResult


@dataclass
class Screening:
    """The promotion rule of one search: ``fidelity`` of the first look, ``keep`` the fraction promoted."""

    fidelity: float
    keep: float
    scores: list[float] = field(default_factory=list)
    """Screening accuracies of the search's proposals that met the budget, in order."""

    @classmethod
    def resumed(cls, fidelity: float, keep: float, stored: list[EvalResult]) -> "Screening":
        """The rule with the screenings of already stored results (a resumed search)."""
        screening = cls(fidelity, keep)
        for result in stored:
            score = result.accuracy if not result.full else result.screening
            if score is not None:
                screening.scores.append(float(score))
        return screening

    def promotes(self, accuracy: float) -> bool:
        """Record a screening accuracy (of a proposal within budget) and say whether the proposal
        earns a full evaluation: it ranks within the top ceil(keep x n) of the n screenings so far,
        or fewer than ceil(1 / keep) screenings were made."""
        self.scores.append(float(accuracy))
        n = len(self.scores)
        if n <= math.ceil(1 / self.keep):
            return True
        better = sum(s > accuracy for s in self.scores)
        return better < math.ceil(self.keep * n)
