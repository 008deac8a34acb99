"""The one training loop: callbacks can reparametrize, regroup the optimizer, add loss terms,
edit gradients, act after steps and epochs, and stop; randomness stays inside."""

from __future__ import annotations

import copy

import torch

from automlprune.models import build_model
from automlprune.train import Callback, Recipe, StepResult, Trainer, fit

RECIPE = Recipe(epochs=3, batch_size=64, lr=0.05, steps_per_epoch=4)


class Journal(Callback):
    """Records the order of the hooks the trainer calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_start(self, trainer):
        self.calls.append("start")

    def loss(self, trainer, x, y, logits, loss):
        self.calls.append("loss")
        return loss

    def before_step(self, trainer):
        self.calls.append("before_step")

    def after_step(self, trainer):
        self.calls.append("after_step")

    def on_epoch_end(self, trainer, epoch):
        self.calls.append(f"epoch{epoch}")

    def on_end(self, trainer):
        self.calls.append("end")


def test_hooks_run_in_order_and_training_is_reproducible_without_touching_global_rng(digits):
    model = build_model("digits_cnn", 10, 1)
    twin = copy.deepcopy(model)
    journal = Journal()
    state = torch.random.get_rng_state()
    history = fit(model, digits, "cpu", RECIPE, [journal], progress=False, validate=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert journal.calls[0] == "start" and journal.calls[-1] == "end"
    assert journal.calls[1:4] == ["loss", "before_step", "after_step"] and journal.calls.count("after_step") == 12
    assert [c for c in journal.calls if c.startswith("epoch")] == ["epoch0", "epoch1", "epoch2"]
    assert history.steps == 12 and history.images == 12 * 64 and len(history.train_loss) == 3 and not history.val_accuracy
    fit(twin, digits, "cpu", RECIPE, progress=False, validate=False)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)


def test_callbacks_freeze_parameters_edit_gradients_add_terms_and_stop(digits):
    model = build_model("digits_cnn", 10, 1)
    first, last = model.features[0].weight, model.classifier[-1].weight
    first_before, last_before = first.detach().clone(), last.detach().clone()

    class Surgery(Callback):
        def param_groups(self, trainer, groups):  # freeze the first conv
            return [{"params": [p for p in trainer.model.parameters() if p is not first]}]

        def loss(self, trainer, x, y, logits, loss):
            return loss + 0.0 * logits.sum()

        def before_step(self, trainer):  # the last layer never moves: its gradients are reset
            last.grad.zero_()

        def on_epoch_end(self, trainer, epoch):
            return epoch < 1  # stop after the second epoch

    history = Trainer(model, digits, "cpu", Recipe(epochs=5, batch_size=64, lr=0.05, momentum=0.0, weight_decay=0.0,
                                                    steps_per_epoch=3), [Surgery()], progress=False).fit()
    assert len(history.train_loss) == 2 and len(history.val_accuracy) == 2
    assert torch.equal(first.detach(), first_before) and torch.equal(last.detach(), last_before)
    assert not torch.equal(model.features[3].weight.detach(), build_model("digits_cnn", 10, 1).features[3].weight.detach())


def test_a_replaced_step_and_a_resumed_schedule(digits):
    model = build_model("digits_cnn", 10, 1)

    class EveryOtherBatch(Callback):
        """Two batches per step: the odd ones are looked at, not trained on (as DMCP's architecture steps)."""

        def __init__(self):
            self.looked = 0

        def batches_in_epoch(self, trainer, epoch, steps):
            return 2 * steps

        def train_step(self, trainer, x, y):
            if trainer.batch_index % 2:
                self.looked += 1
                return StepResult(None, stepped=False)
            return None  # the default step

    cb = EveryOtherBatch()
    trainer = Trainer(model, digits, "cpu", Recipe(epochs=2, batch_size=64, lr=0.05, steps_per_epoch=3), [cb],
                      progress=False, validate=False, start_epoch=1)
    history = trainer.fit()
    assert cb.looked == 3 and history.steps == 3 and history.images == 6 * 64
    assert trainer.scheduler.last_epoch == 6  # the skipped epoch's 3 steps, then 3 trained
