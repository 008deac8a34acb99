"""Training: the one loop (:class:`Trainer`) and what configures it (callbacks, regularizers)."""

from automlprune.train.trainer import Callback, FitHistory, Recipe, StepResult, Trainer, fit

__all__ = ["Callback", "FitHistory", "Recipe", "StepResult", "Trainer", "fit"]
